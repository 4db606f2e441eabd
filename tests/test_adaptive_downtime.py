"""Downtime that adapts (issue 25), as inputs of the switch-over arbiter: the stepped downtime
limit (`--downtime-steps`, `--downtime-step-delay`), stall detection (`--switchover-on-stall`)
and the switch-over bandwidth (`--switchover-bandwidth`); the arbiter's decisions as unit
tests, the settings' refusals, then a real migration of a guest that does not converge at a
fixed 300 ms limit, beside the model."""

import pytest
from checks import frames_exact, wait_progress
from test_cli import one_line_error, run

from cluster.model import predict
from cluster.model.block import settings_inputs
from nodes.errors import ConfigError, MigrationTimedOut
from nodes.host.specs import GuestSpec
from nodes.migration.decide.downtimesteps import (
    DowntimeSteps,
    SwitchoverBudget,
    budget_of,
    parse_downtime_steps,
    step_limits,
)
from nodes.migration.decide.policy import Action, PrecopyStats, QemuPolicy, StopCode
from nodes.migration.decide.stall import StallSwitch, Watermark
from nodes.migration.decide.switchover import Arbiter, Moment
from nodes.migration.decide.timeouts import Timeouts
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
PAGE = 4096


def at(now: float, pending_pages: int) -> Moment:
    stats = PrecopyStats(iteration=1, dirty_count=pending_pages, total_written=0,
                         guest_pages=16384, page_size=PAGE, elapsed_seconds=now)
    return Moment(stats, now, stats.pending_bytes)


def qemu_measured(bandwidth: float, limit: float = 0.3) -> QemuPolicy:
    """A qemu policy whose first window measured `bandwidth` bytes per second."""
    p = QemuPolicy(downtime_limit_seconds=limit)
    p.start(0.0, 0)
    assert p.window_closed(0.1, int(bandwidth * 0.1), 0, False)
    return p


# -- the steps ----------------------------------------------------------------------------------
def test_steps_give_steps_plus_one_limits_both_ends_included():
    assert step_limits(parse_downtime_steps("150ms..1050ms/5", "x")) == pytest.approx(
        (0.15, 0.33, 0.51, 0.69, 0.87, 1.05))
    assert step_limits(parse_downtime_steps("VEP291", "x")) == pytest.approx(
        tuple(0.15 * i for i in range(1, 8)))
    assert parse_downtime_steps(" 0.2s .. 1s / 2 ", "x") == "200ms..1000ms/2"
    assert step_limits("200ms..1000ms/2") == pytest.approx((0.2, 0.6, 1.0))


@pytest.mark.parametrize("text,message", [
    ("150ms-1050ms/5", "START..END/STEPS"), ("1s..2s", "START..END/STEPS"),
    ("1s..2s/0", "must be >= 1"), ("2s..1s/3", "must not be below"),
    ("0s..1s/2", "positive"), ("fast..1s/2", "cannot read"), (5, "must be text")])
def test_bad_steps_are_refused_in_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_downtime_steps(text, "--downtime-steps")


def test_the_limit_in_force_steps_with_the_delay_and_holds_the_last():
    steps = DowntimeSteps((0.15, 0.33, 0.51), 2.0)
    assert [steps.limit_at(t) for t in (0.0, 1.99, 2.0, 4.5, 99.0)] == \
        [0.15, 0.15, 0.33, 0.51, 0.51]


def test_the_delay_is_absolute_or_per_gib_or_openstacks_75s_per_gib():
    def delay(**kw):
        s = MigrationSettings(policy="qemu", downtime_steps="1s..2s/1", **kw)
        return budget_of(s, 512 * MiB, 0.0).steps.delay_seconds
    assert delay(downtime_step_delay_seconds=3.0) == 3.0
    assert delay(downtime_step_delay_per_gib_seconds=10.0) == 5.0
    assert delay() == 37.5
    assert budget_of(MigrationSettings(policy="qemu"), MiB, 0.0) is None


# -- the arbiter: stepping ----------------------------------------------------------------------
def test_a_stepped_limit_stops_when_the_fixed_one_would_not_and_reports_it():
    """1 MiB pending at 4 MiB/s: 300 ms fits 1.2 MiB; 150 ms does not, 330 ms does."""
    p = qemu_measured(4 * MiB)
    steps = SwitchoverBudget(DowntimeSteps(step_limits("150ms..1050ms/5"), 1.0), None, t0=10.0)
    arb = Arbiter(p, budget=steps)
    pending = int(1.0 * MiB / PAGE)
    assert arb.decide(at(10.5, pending)).action is Action.CONTINUE, "150 ms: 0.6 MiB"
    assert p.downtime_limit_seconds == pytest.approx(0.15)
    d = arb.decide(at(11.2, pending))
    assert d.stop_code is StopCode.FITS_DOWNTIME and "330 ms" in d.reason
    assert p.downtime_limit_seconds == pytest.approx(0.33)
    assert p.threshold_bytes == pytest.approx(4 * MiB * 0.33), "the threshold follows at once"


def test_the_budget_sets_nothing_before_the_first_window():
    p = QemuPolicy(downtime_limit_seconds=0.3)
    p.start(0.0, 0)
    arb = Arbiter(p, budget=SwitchoverBudget(DowntimeSteps((1.0,), 1.0), 1e12))
    assert arb.decide(at(0.05, 1)).action is Action.CONTINUE, "0 until data has flowed"
    assert p.downtime_limit_seconds == 1.0 and p.threshold_bytes == 0


# -- the arbiter: the switch-over bandwidth -----------------------------------------------------
def test_the_switchover_bandwidth_replaces_the_measured_one_in_the_decision_only():
    """Measured 1 MiB/s (a loaded link), told 10 MiB/s is available: 2 MiB pending fits
    10 MiB/s x 300 ms, not 1 MiB/s x 300 ms; the measured bandwidth is still reported."""
    pending = 2 * MiB // PAGE
    plain = qemu_measured(1 * MiB)
    assert Arbiter(plain).decide(at(0.2, pending)).action is Action.CONTINUE
    told = qemu_measured(1 * MiB)
    arb = Arbiter(told, budget=SwitchoverBudget(None, 10 * MiB))
    assert arb.decide(at(0.2, pending)).stop_code is StopCode.FITS_DOWNTIME
    assert told.bandwidth_bytes_per_second == pytest.approx(1 * MiB, rel=1e-4)
    assert told.window_closed(0.3, int(0.2 * MiB), 5 * MiB, True)
    assert told.threshold_bytes == pytest.approx(10 * MiB * 0.3), "every window after too"
    assert told.expected_downtime_seconds == pytest.approx(0.5), "5 MiB over 10 MiB/s"


# -- the arbiter: stall detection ---------------------------------------------------------------
def stalled_arbiter(stall: float = 1.0, progress: float | None = None):
    low = Watermark(0.0)
    timeouts = Timeouts(None, "abort", progress, 0.0, low=low,
                        stall_switches=progress is not None)
    policy = QemuPolicy(downtime_limit_seconds=0.3)         # threshold 0: never fits

    class Aids:
        def tick(self, now, remaining):
            return timeouts.check(now, remaining)
    return Arbiter(policy, aids=Aids(), stall=StallSwitch(low, stall)), low


def readings(arb: Arbiter, pages: list[int], step: float = 0.25) -> list:
    """Each reading a decision `step` seconds after the last: its Decision's stop code."""
    return [arb.decide(at(i * step, n)).stop_code for i, n in enumerate(pages)]


def test_no_stall_while_the_remaining_bytes_make_new_lows():
    arb, _ = stalled_arbiter()
    assert set(readings(arb, [900, 800, 700, 600, 500, 400, 300, 200, 100])) == {None}


def test_stalled_it_switches_one_reading_after_the_next_local_minimum():
    """A sawtooth whose lows never go below 300: stalled 1 s after the low at 0.5 s; the
    next fall bottoms at 320 (t = 1.75) and the rise after it switches (t = 2.0)."""
    arb, low = stalled_arbiter()
    pages = [500, 400, 300, 600, 500, 400, 350, 320, 700, 600]
    codes = readings(arb, pages)
    assert codes[:8] == [None] * 8
    assert codes[8] is StopCode.STALL_MINIMUM, codes
    assert low.low == 300 * PAGE and arb.stall.armed_at == 1.5
    again, _ = stalled_arbiter()
    reason = [again.decide(at(i * 0.25, n)) for i, n in enumerate(pages)][8].reason
    assert f"({320 * PAGE} bytes)" in reason, "the local minimum it switched at"


def test_stalled_on_a_floor_it_switches_there_and_a_plateau_after_a_rise_waits():
    arb, _ = stalled_arbiter()
    codes = readings(arb, [400, 300, 500, 500, 500, 500, 500, 400, 400])
    assert codes.index(StopCode.STALL_MINIMUM) == 8, codes


def test_stall_and_progress_timeout_share_the_detector_and_the_switch_wins():
    arb, low = stalled_arbiter(stall=1.0, progress=0.5)
    codes = readings(arb, [500, 400, 300, 600, 500, 400, 350, 320, 700])
    assert codes[-1] is StopCode.STALL_MINIMUM, "no abort at 0.5 s of no progress"
    alone = Timeouts(None, "abort", 0.5, 0.0, low=Watermark(0.0))
    alone.check(0.0, 300)
    with pytest.raises(MigrationTimedOut):
        alone.check(0.6, 400)


def test_a_policy_stop_beats_the_stall_switch():
    arb, _ = stalled_arbiter()
    arb.policy = qemu_measured(100 * MiB)                 # everything fits now
    readings(arb, [500, 400, 300, 600, 500])
    assert arb.decide(at(2.0, 320)).stop_code is StopCode.FITS_DOWNTIME


# -- the settings -------------------------------------------------------------------------------
def test_the_settings_round_trip_and_are_the_qemu_policys_only():
    s = MigrationSettings(policy="qemu", downtime_steps="vep291",
                          downtime_step_delay_per_gib_seconds=75.0,
                          switchover_on_stall_seconds=2.0,
                          switchover_bandwidth_bytes_per_second=1e9)
    assert MigrationSettings.from_dict(s.to_dict()) == s
    for kw in ({"downtime_steps": "vep291"}, {"switchover_on_stall_seconds": 1.0},
               {"switchover_bandwidth_bytes_per_second": 1e9}):
        with pytest.raises(ConfigError, match="use --policy qemu"):
            MigrationSettings(policy="xen", **kw)


@pytest.mark.parametrize("args,message", [
    (["migrate", "--downtime-steps", "vep291"], "use --policy qemu"),
    (["migrate", "--switchover-on-stall", "2s", "--policy", "xen-legacy"], "use --policy qemu"),
    (["migrate", "--policy", "qemu", "--downtime-steps", "1s..2s"], "START..END/STEPS"),
    (["migrate", "--policy", "qemu", "--downtime-step-delay", "5s/MiB"], "10s/GiB"),
    (["migrate", "--policy", "qemu", "--switchover-bandwidth", "0"], "positive"),
])
def test_bad_adaptive_options_are_one_line_and_exit_2(tmp_path, args, message):
    assert message in one_line_error(run(*args, home=tmp_path, check_rc=None))


# -- end to end ---------------------------------------------------------------------------------
HOT = WorkloadSpec("hotset", 8000, hot_fraction=0.5, hot_share=1.0, fill="random", seed=3)


def migrate_hot(in_process, **settings):
    """A 1 MiB guest rewriting its 127-page hot set (0.5 MiB) many times a pass over a
    1 MiB/s link: every pass leaves the whole hot set dirty, which 300 ms (0.3 MiB) never
    fits; the model predicts the same settings."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 1 * MiB, "p2m", workload=HOT))
    wait_progress(tb.host("host-0"), "vm")
    s = MigrationSettings(policy="qemu", link_bytes_per_second=1 * MiB, **settings)
    r = tb.migrate("vm", "host-1", s)
    assert r.status == "completed" and r.integrity.verified, r.table()
    frames_exact(tb)
    m = predict(guest_memory_bytes=1 * MiB, workload=HOT, link_bytes_per_second=1 * MiB,
                **settings_inputs(s, 1 * MiB))
    return r, m


def test_a_guest_that_never_fits_300ms_converges_on_stepped_limits(in_process):
    fixed, fixed_model = migrate_hot(in_process, max_iterations=3)
    assert fixed.stop_code == fixed_model.stop_code == "max-iterations", fixed.table()
    assert fixed.downtime_limit_in_force_seconds == pytest.approx(0.3)
    stepped, model = migrate_hot(in_process, downtime_steps="150ms..1050ms/5",
                                 downtime_step_delay_seconds=0.5, max_iterations=8)
    assert stepped.stop_code == model.stop_code == "fits-downtime", stepped.table()
    limit = stepped.downtime_limit_in_force_seconds
    assert limit > 0.3 and any(limit == pytest.approx(x) for x in step_limits(
        "150ms..1050ms/5")), limit
    assert f"{limit * 1000:g} ms" in stepped.stop_reason
    steps = [x["t_seconds"] for x in stepped.progress_history if x["event"] == "downtime-step"]
    assert len(steps) == step_limits("150ms..1050ms/5").index(pytest.approx(limit)), \
        "each step up to the one in force is an event of the history (the timeline's)"
    print(f"fixed 300 ms: {fixed.stop_code}, total {fixed.total_time_seconds:.2f} s, "
          f"downtime {fixed.downtime_seconds:.3f} s (guest saw "
          f"{fixed.guest_observed_downtime_seconds:.3f} s); stepped: fits at "
          f"{limit * 1000:g} ms, total {stepped.total_time_seconds:.2f} s, downtime "
          f"{stepped.downtime_seconds:.3f} s (guest saw "
          f"{stepped.guest_observed_downtime_seconds:.3f} s); model "
          f"{model.total_time_seconds:.2f} s, {model.downtime_seconds:.3f} s")


def test_stall_detection_switches_within_one_pass_of_the_local_minimum(in_process):
    r, model = migrate_hot(in_process, switchover_on_stall_seconds=0.3, max_iterations=12)
    assert r.stop_code == model.stop_code == "stall-minimum", r.table()
    live = [x for x in r.rounds if not x["final"]]
    assert len(live) < 12, "switched before the cap"
    # The remaining bytes the source published over time, until the pause: the switch came
    # no later than one pass after their last local minimum.
    samples = [(s["t_seconds"], s["remaining_bytes"]) for s in r.progress_history
               if s["phase"] == "precopy"]
    switch_t = samples[-1][0]
    minima = [t for (t, b), (_, before), (_, after) in zip(samples[1:], samples, samples[2:],
                                                             strict=False)
              if b < before and b <= after]
    assert minima, samples
    longest_pass = max(x["duration_seconds"] for x in live)
    assert switch_t - minima[-1] <= longest_pass, (switch_t, minima, longest_pass)
    print(f"stall switch: {r.stop_reason}; total {r.total_time_seconds:.2f} s, downtime "
          f"{r.downtime_seconds:.3f} s (guest saw {r.guest_observed_downtime_seconds:.3f} s)"
          f"; {switch_t - minima[-1]:.3f} s after the last local minimum (a pass: "
          f"{longest_pass:.3f} s)")
