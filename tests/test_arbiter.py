"""The switch-over arbiter (`nodes.migration.decide.switchover`): the order in which its inputs decide,
with fakes and the real inputs (policies, the switch rule, the timeouts, the adaptive rate).
Unit tests: no sockets, no threads."""

from dataclasses import dataclass

import pytest

from cluster.model.iterative import model_arbiter
from nodes.errors import MigrationCancelled, MigrationTimedOut
from nodes.migration.decide import switchover
from nodes.migration.decide.adaptive import MAX_MBIT_RATE, AdaptiveRate, PacedRate
from nodes.migration.decide.policy import Action, Decision, PrecopyStats, StopCode, XenPolicy
from nodes.migration.decide.switchover import Arbiter, Moment
from nodes.migration.decide.timeouts import Timeouts
from nodes.migration.postcopy.trigger import SwitchRule
from nodes.migration.progress import RoundStats

CONVERGED = Decision.stop(StopCode.DIRTY_THRESHOLD, "few dirty")
CAPPED = Decision.stop(StopCode.MAX_ITERATIONS, "cap")
PAUSE = Decision.stop(StopCode.PAUSED, "timed out: paused")
RATE_STOP = Decision.stop(StopCode.RATE_CAP, "rate cap")
GO = Decision.go_on()


def moment(iteration=0, elapsed=0.0, dirty=500, rounds=()):
    stats = PrecopyStats(iteration=iteration, dirty_count=dirty, total_written=0,
                         guest_pages=1000, page_size=4096, elapsed_seconds=elapsed)
    return Moment(stats, now=elapsed, remaining_bytes=stats.pending_bytes, rounds=rounds)


class Log(list):
    """Who was asked, in order."""


@dataclass
class FakePolicy:
    answer: Decision
    log: Log

    def decide(self, stats):
        self.log.append("policy")
        return self.answer


@dataclass
class FakeSwitch:
    why: str | None
    log: Log
    cut: bool = False
    after: bool = False

    def due(self, stats):
        self.log.append("switch")
        return self.why

    def timed_out(self, elapsed_seconds):
        return self.cut

    def due_after(self, rounds):
        return self.after


@dataclass
class FakeAids:
    answer: Decision | None
    log: Log

    def tick(self, now, remaining_bytes):
        self.log.append(("aids", remaining_bytes))
        return self.answer


@dataclass
class FakeRate:
    answer: Decision | None
    log: Log

    def between_rounds(self, rounds, page_size):
        self.log.append("rate")
        return self.answer


def arbiter(policy=GO, switch=None, aids=None, rate=None, cancel=False):
    log = Log()

    def cancelled():
        log.append("cancel")
        if cancel:
            raise MigrationCancelled("cancelled by the operator")
    return Arbiter(FakePolicy(policy, log), cancel=cancelled,
                   switch=None if switch is None else FakeSwitch(switch, log),
                   aids=None if aids is None else FakeAids(aids, log),
                   adaptive=None if rate is None else FakeRate(rate, log)), log


# -- the order, written once --------------------------------------------------------------------
def test_the_rules_are_in_the_documented_order():
    assert switchover.RULES == (switchover.cancelled, switchover.budget,
                                switchover.policy_end,
                                switchover.postcopy_due, switchover.policy_other,
                                switchover.stall_minimum,
                                switchover.timeouts, switchover.adaptive_rate)
    doc = switchover.__doc__
    places = [doc.index(w) for w in ("**cancel**", "**the budget**",
                                     "**the policy's own end**",
                                     "**the post-copy switch**", "**the policy's other answers**",
                                     "**stall detection**",
                                     "**the aids' timeouts**", "**Xen's adaptive rate**")]
    assert places == sorted(places)


def test_cancel_comes_before_anything_is_asked():
    arb, log = arbiter(CONVERGED, switch="asked", aids=PAUSE, rate=RATE_STOP, cancel=True)
    with pytest.raises(MigrationCancelled):
        arb.decide(moment())
    assert log == ["cancel"]


def test_nothing_to_say_leaves_the_policys_own_continue():
    own = Decision(Action.CONTINUE, "keep going")
    arb, log = arbiter(own, switch=None, aids=None, rate=None)
    assert arb.decide(moment()) is own
    arb, log = arbiter(own, switch=None, aids=None, rate=None)
    arb.cancel = None
    assert arb.decide(moment()) is own and log == ["policy"]


@pytest.mark.parametrize("answer", [CONVERGED, Decision.abort("no"),
                                    Decision(Action.POSTCOPY, "its own", StopCode.POSTCOPY)])
def test_the_policys_own_end_beats_everything_after_it(answer):
    arb, log = arbiter(answer, switch="due", aids=PAUSE, rate=RATE_STOP)
    assert arb.decide(moment()) is answer
    assert log == ["cancel", "policy"], "nothing after the winner is asked"


def test_a_due_switch_beats_a_cap_and_a_throttle_but_not_a_converged_stop():
    arb, _ = arbiter(CAPPED, switch="due")
    d = arb.decide(moment())
    assert (d.action, d.stop_code, d.reason) == (Action.POSTCOPY, StopCode.POSTCOPY, "due")
    throttle = Decision(Action.THROTTLE, "slow it", throttle=0.5)
    arb, _ = arbiter(throttle, switch="due")
    assert arb.decide(moment()).action is Action.POSTCOPY
    arb, _ = arbiter(throttle, switch=None, aids=PAUSE)
    assert arb.decide(moment()) is throttle, "a throttle is not CONTINUE: no timeout"
    arb, _ = arbiter(CAPPED, switch=None, aids=PAUSE, rate=RATE_STOP)
    assert arb.decide(moment()) is CAPPED, "without post-copy the cap stands"


def test_the_timeouts_only_while_the_policy_and_the_switch_go_on():
    arb, log = arbiter(Decision.go_on(), switch=None, aids=PAUSE, rate=RATE_STOP)
    m = moment(dirty=7)
    assert arb.decide(m) is PAUSE
    assert log == ["cancel", "policy", ("aids", 7 * 4096)], "exact remaining bytes; no rate"
    arb, log = arbiter(Decision.go_on(), switch="due", aids=PAUSE)
    assert arb.decide(moment()).action is Action.POSTCOPY
    assert log == ["cancel", "policy", "switch"], "a due switch: the timeouts not ticked"


def test_the_adaptive_rate_last():
    arb, log = arbiter(Decision.go_on(), switch="", aids=None, rate=RATE_STOP)
    arb.switch.why = None
    assert arb.decide(moment()) is RATE_STOP
    assert log == ["cancel", "policy", "switch", "rate"]
    arb, log = arbiter(Decision.go_on(), aids=None, rate=None)
    assert arb.decide(moment()).action is Action.CONTINUE


def test_the_policy_is_asked_once_per_decision_however_many_rules_read_it():
    arb, log = arbiter(Decision.go_on(), switch=None)
    arb.decide(moment())
    arb.decide(moment())
    assert log.count("policy") == 2


def test_a_new_rule_goes_where_it_belongs():
    stall = Decision.stop(StopCode.MAX_ITERATIONS, "stalled at a local minimum")

    def stalled(arb, m):
        return stall if m.stats.iteration >= 3 else None
    rules = switchover.RULES[:4] + (stalled,) + switchover.RULES[4:]
    log = Log()
    arb = Arbiter(FakePolicy(Decision.go_on(), log), aids=FakeAids(PAUSE, log), rules=rules)
    assert arb.decide(moment(iteration=3)) is stall and ("aids", 500 * 4096) not in log
    assert arb.decide(moment(iteration=2)) is PAUSE


# -- inside a pass ------------------------------------------------------------------------------
def test_inside_a_pass_the_timeouts_read_no_remaining_bytes_and_the_switch_cuts():
    arb, log = arbiter(CONVERGED, switch=None, aids=PAUSE)
    assert arb.within_pass(5.0) is PAUSE and log == [("aids", None)], "no policy mid-pass"
    assert not arb.cuts_pass(1e9) and not arb.switch_after(99)
    arb, _ = arbiter(switch=None)
    assert arb.within_pass(5.0) is None
    arb.switch = FakeSwitch(None, Log(), cut=True, after=True)
    assert arb.cuts_pass(0.0) and arb.switch_after(0)


# -- the real inputs ----------------------------------------------------------------------------
def test_real_inputs_a_converged_xen_stop_beats_the_completion_timeout_and_the_switch():
    timeouts = Timeouts(completion=1.0, on_timeout="postcopy", progress=None, t0=0.0)
    arb = Arbiter(XenPolicy(), switch=SwitchRule(after_rounds=2), aids=_Tick(timeouts))
    d = arb.decide(moment(iteration=2, elapsed=5.0, dirty=10))
    assert d.stop_code is StopCode.DIRTY_THRESHOLD
    d = arb.decide(moment(iteration=2, elapsed=5.0, dirty=500))
    assert d.stop_code is StopCode.POSTCOPY and "live round" in d.reason, "the rule's switch"
    arb = Arbiter(XenPolicy(), aids=_Tick(timeouts))
    d = arb.decide(moment(iteration=2, elapsed=5.0, dirty=500))
    assert d.stop_code is StopCode.POSTCOPY and "--completion-timeout" in d.reason


def test_real_inputs_the_progress_watermark_moves_only_when_the_timeouts_are_asked():
    timeouts = Timeouts(completion=None, on_timeout="abort", progress=3.0, t0=0.0)
    arb = Arbiter(XenPolicy(), aids=_Tick(timeouts))
    arb.decide(moment(dirty=10))                       # the policy stops: no tick
    assert timeouts.watermark is None
    arb.decide(moment(dirty=500))
    assert timeouts.watermark == 500 * 4096
    with pytest.raises(MigrationTimedOut):
        arb.decide(moment(elapsed=4.0, dirty=600))


def test_the_adaptive_rate_stops_at_its_cap_or_paces_the_next_round():
    paced = []
    rate = AdaptiveRate()
    inp = PacedRate(rate, paced.append)
    arb = Arbiter(XenPolicy(max_iterations=99), adaptive=inp)
    assert arb.decide(moment(rounds=[])).action is Action.CONTINUE and paced == []
    one = [RoundStats(index=0, pages_sent=800, pages_dirtied=100, duration_seconds=1.0)]
    assert arb.decide(moment(iteration=1, rounds=one)).action is Action.CONTINUE
    assert paced == [rate.bytes_per_second]
    rate.mbit_rate = MAX_MBIT_RATE
    two = one + [RoundStats(index=1, pages_sent=900, pages_dirtied=100, duration_seconds=1.0)]
    d = arb.decide(moment(iteration=2, rounds=two))
    assert d.stop_code is StopCode.RATE_CAP and len(paced) == 1, "a stop paces nothing"


def test_the_model_asks_the_same_arbiter():
    pause = Timeouts(2.0, "pause", None, 0.0)
    arb = model_arbiter(XenPolicy(), pause, None, None)
    assert arb.decide(moment(elapsed=1.0)).action is Action.CONTINUE
    assert arb.decide(moment(elapsed=2.0)).stop_code is StopCode.PAUSED
    abort = model_arbiter(XenPolicy(), Timeouts(2.0, "abort", None, 0.0), 2, None)
    assert abort.decide(moment(iteration=1, elapsed=2.0)).action is Action.ABORT, \
        "the model's abort is a decision, not a raise"
    assert abort.decide(moment(iteration=2, elapsed=2.0)).action is Action.POSTCOPY
    assert abort.switch_after(2) and not abort.switch_after(1)
    assert model_arbiter(XenPolicy(), None, None, None).switch is None


@dataclass
class _Tick:
    """The engine's `Timeouts` as the aids input (`Convergence.tick` without dirty-limit)."""

    timeouts: Timeouts

    def tick(self, now, remaining_bytes):
        return self.timeouts.check(now, remaining_bytes)
