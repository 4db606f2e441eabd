"""Where the switch-over is decided: one arbiter that, told what a migration knows at a decision
point (a `Moment`: the policy's `PrecopyStats`, the clock, the remaining bytes, the rounds),
returns the next `Decision`. The sender's live rounds (`nodes.migration.send.liverounds`) and the
analytic model (`cluster.model.iterative`, `cluster.model.continuous`) both ask it, so one rule
set serves the engine and the model.

The arbiter decides nothing itself: its inputs do (the policy, the post-copy trigger, the
convergence aids and their timeouts, Xen's adaptive rate), and it orders them. The order is
`RULES`, an ordered tuple of rules, each `rule(arbiter, moment) -> Decision | None`; the first
that answers wins, and when none does the policy's own CONTINUE stands:

0. **cancel**: the operator's cancel (`MigrationCancelled` raised) before anything is decided.
   **the budget** (`nodes.migration.decide.downtimesteps`): the downtime limit in force (it
   steps up with the time) and the switch-over bandwidth are set on the qemu policy, which
   decides on them next; it never decides itself.
1. **the policy's own end**: ABORT, its own POSTCOPY, or a stop-and-copy on its target (a
   converged `StopCode`: what is pending fits, so, as QEMU completes before start_postcopy,
   nothing is worth post-copying).
2. **the post-copy switch** (post-copy allowed): asked for by the operator
   (migrate-postcopy), after N live rounds, or once a time has passed.
3. **the policy's other answers**: a stop on one of its caps (rounds, volume), which gives way
   to a due switch above; a throttle.
   **stall detection** (`nodes.migration.decide.stall`): no new low of the remaining bytes
   for a while: a stop at their next local minimum (`stall-minimum`). It reads every
   decision's remaining bytes while the policy goes on, before the timeouts, whose progress
   timeout shares its detector and gives way to it.
4. **the aids' timeouts** (`Convergence.tick`: dirty-limit's period, then the completion
   timeout, which pauses, switches or aborts, and the progress timeout, which aborts by
   raising `MigrationTimedOut`): only consulted while the policy says go on.
5. **Xen's adaptive rate** (between passes only): at its cap a round that sent more than
   the one before stops; otherwise it sets the next round's rate.

That is today's order, the one the live rounds always had (the policy first, the timeouts only
when it goes on), not the order an operator might list them in. Inputs consulted after the
winner are not consulted at all, which matters: the timeouts move their progress watermark
and the adaptive rate paces the link when asked.

Inside a pass the live rounds ask three narrower questions, also here: `within_pass` (between
the batches of a per-pass policy: the timeouts alone, the remaining bytes unreadable),
`cuts_pass` (the switch by time or request ends the pass under way; the next decision makes
it), `switch_after` (a switch after N rounds ends a mid-pass policy's chunk at the pass's end).

A new reason to switch is an input (a keyword of `Arbiter`) and a rule put into `RULES` where
it belongs, as the budget and stall detection are.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nodes.migration.decide.downtimesteps import BudgetedPolicy
from nodes.migration.decide.policy import Action, Decision, PrecopyStats, StopCode


class Round(Protocol):
    """A live round as the rules read it (the sender's `RoundStats`, the model's rounds)."""

    @property
    def pages_sent(self) -> float: ...

    @property
    def pages_dirtied(self) -> float: ...

    @property
    def duration_seconds(self) -> float: ...


@dataclass(frozen=True)
class Moment:
    """What the arbiter is told at one decision point. `now` is the clock the timeouts read
    (the sender's monotonic clock, the model's seconds since the start); `remaining_bytes`
    the exact pending bytes, None when they cannot be read now (mid-pass under a per-pass
    policy, the model)."""

    stats: PrecopyStats
    now: float
    remaining_bytes: int | None = None
    rounds: Sequence[Round] = ()


# -- the inputs ---------------------------------------------------------------------------------
class Policy(Protocol):
    """A pre-copy policy (`nodes.migration.decide.policy.PrecopyPolicy`)."""

    def decide(self, stats: PrecopyStats) -> Decision: ...


class SwitchTrigger(Protocol):
    """What asks for the switch to post-copy (`nodes.migration.postcopy.trigger.SwitchRule`;
    on the sender `PostcopySource`, which adds the operator's request)."""

    def due(self, stats: PrecopyStats) -> str | None: ...

    def timed_out(self, elapsed_seconds: float) -> bool: ...

    def due_after(self, rounds: int) -> bool: ...


class Aids(Protocol):
    """The convergence aids' periodic work and timeouts (`Convergence.tick`; the model's
    `ModelTimeouts`): a Decision that ends pre-copy, or None; an abort raises."""

    def tick(self, now: float, remaining_bytes: int | None) -> Decision | None: ...


class RateInput(Protocol):
    """Xen's adaptive rate between passes (`nodes.migration.decide.adaptive.PacedRate`)."""

    def between_rounds(self, rounds: Sequence[Round], page_size: int) -> Decision | None: ...


class BudgetInput(Protocol):
    """The downtime limit in force and the switch-over bandwidth
    (`nodes.migration.decide.downtimesteps.SwitchoverBudget`)."""

    def apply(self, policy: BudgetedPolicy, now: float) -> None: ...


class StallInput(Protocol):
    """Stall detection (`nodes.migration.decide.stall.StallSwitch`)."""

    def decide(self, now: float, remaining_bytes: int | None) -> Decision | None: ...


Rule = Callable[["Arbiter", Moment], Decision | None]


class Arbiter:
    """One migration's switch-over: its inputs, asked in the order of `rules` (`RULES`)."""

    def __init__(self, policy: Policy, *, cancel: Callable[[], None] | None = None,
                 switch: SwitchTrigger | None = None, aids: Aids | None = None,
                 adaptive: RateInput | None = None, budget: BudgetInput | None = None,
                 stall: StallInput | None = None,
                 rules: "tuple[Rule, ...] | None" = None):
        self.policy = policy
        self.cancel = cancel          # raises MigrationCancelled when the operator cancelled
        self.switch = switch          # None: post-copy not allowed
        self.aids = aids
        self.adaptive = adaptive
        self.budget = budget          # None: the policy's fixed limit, measured bandwidth
        self.stall = stall            # None: no stall detection
        self.rules = RULES if rules is None else rules
        self._said: tuple[Moment, Decision] | None = None

    def decide(self, moment: Moment) -> Decision:
        """The next Decision: the first rule's that answers, else the policy's CONTINUE."""
        for rule in self.rules:
            decision = rule(self, moment)
            if decision is not None:
                return decision
        return self.policy_says(moment)

    def policy_says(self, moment: Moment) -> Decision:
        """The policy's answer at this moment, asked once however many rules read it."""
        if self._said is None or self._said[0] is not moment:
            self._said = (moment, self.policy.decide(moment.stats))
        return self._said[1]

    # -- inside a pass --------------------------------------------------------------------
    def within_pass(self, now: float) -> Decision | None:
        """Between the batches of a per-pass policy's pass: the timeouts alone (the remaining
        bytes are not read mid-pass); a Decision ends the pass where it stands."""
        return self.aids.tick(now, None) if self.aids is not None else None

    def cuts_pass(self, elapsed_seconds: float) -> bool:
        """The switch is asked for now (the operator, or the time has come): the pass under
        way ends here, and the next decision switches."""
        return self.switch is not None and self.switch.timed_out(elapsed_seconds)

    def switch_after(self, rounds: int) -> bool:
        """A switch after N live rounds is due once `rounds` have ended: a mid-pass policy's
        chunk ends there, so no next pass begins first."""
        return self.switch is not None and self.switch.due_after(rounds)


# -- the rules, in their order ------------------------------------------------------------------
def cancelled(arb: Arbiter, moment: Moment) -> Decision | None:
    """0. The operator's cancel raises before anything is decided."""
    if arb.cancel is not None:
        arb.cancel()
    return None


def budget(arb: Arbiter, moment: Moment) -> Decision | None:
    """0. The limit in force and the switch-over bandwidth, set for the policy to read."""
    if arb.budget is not None:
        arb.budget.apply(arb.policy, moment.now)
    return None


def policy_end(arb: Arbiter, moment: Moment) -> Decision | None:
    """1. The policy aborts, switches by itself, or stopped on its own target."""
    d = arb.policy_says(moment)
    if d.action in (Action.ABORT, Action.POSTCOPY):
        return d
    if d.action is Action.STOP_AND_COPY and d.stop_code is not None and d.stop_code.converged:
        return d
    return None


def postcopy_due(arb: Arbiter, moment: Moment) -> Decision | None:
    """2. The switch, when post-copy is allowed and it is due."""
    if arb.switch is None:
        return None
    why = arb.switch.due(moment.stats)
    return None if why is None else Decision(Action.POSTCOPY, why, StopCode.POSTCOPY)


def policy_other(arb: Arbiter, moment: Moment) -> Decision | None:
    """3. Whatever else the policy said that is not CONTINUE (a cap's stop, a throttle)."""
    d = arb.policy_says(moment)
    return None if d.action is Action.CONTINUE else d


def stall_minimum(arb: Arbiter, moment: Moment) -> Decision | None:
    """3. Stalled: a stop at the remaining bytes' next local minimum."""
    return arb.stall.decide(moment.now, moment.remaining_bytes) if arb.stall else None


def timeouts(arb: Arbiter, moment: Moment) -> Decision | None:
    """4. The aids' period and timeouts, on the exact remaining bytes when readable."""
    return arb.aids.tick(moment.now, moment.remaining_bytes) if arb.aids is not None else None


def adaptive_rate(arb: Arbiter, moment: Moment) -> Decision | None:
    """5. Xen's adaptive rate: a stop at its cap, else the next round's rate is set."""
    if arb.adaptive is None:
        return None
    return arb.adaptive.between_rounds(moment.rounds, moment.stats.page_size)


RULES: tuple[Rule, ...] = (cancelled, budget, policy_end, postcopy_due, policy_other,
                           stall_minimum, timeouts, adaptive_rate)
