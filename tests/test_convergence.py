"""Making pre-copy converge (issue 14): QEMU's throttle trigger, auto-converge and dirty-limit,
the vCPU's throttle, the operators' timeouts, Xen's adaptive rate and the fixed downtime, from
their rules on synthetic input up to migrations of non-converging guests on in-process hosts.
"""

import time

import numpy as np
import pytest
from checks import frames_exact, wait_progress
from test_cli import one_line_error, run

from cluster.model import predict
from cluster.model.throttle_model import ThrottleSpec
from nodes.errors import ConfigError, MigrationTimedOut
from nodes.host.specs import GuestSpec
from nodes.migration.decide.adaptive import MAX_MBIT_RATE, AdaptiveRate
from nodes.migration.decide.policy import Action, StopCode
from nodes.migration.decide.throttle import AutoConverge, DirtyLimit, Hot, ThrottleTrigger
from nodes.migration.decide.timeouts import Timeouts, completion_seconds
from nodes.migration.send.dirtysync import SyncPeriod
from nodes.migration.settings import MigrationSettings
from nodes.xen.hypervisor import Hypervisor
from workloads.patterns import make_workload
from workloads.spec import WorkloadSpec
from workloads.vcpu import VCPU, throttle_sleep_seconds

MiB = 1024 * 1024
PAGE = 4096


# -- the trigger on synthetic periods ----------------------------------------------------------
def period(dirtied_bytes: int, sent_bytes: int) -> SyncPeriod:
    return SyncPeriod(seconds=1.0, dirtied_pages=dirtied_bytes // PAGE, sent_bytes=sent_bytes)


HOT, COLD = period(600 * PAGE, 1000 * PAGE), period(400 * PAGE, 1000 * PAGE)


def test_trigger_fires_on_every_second_hot_period():
    trigger = ThrottleTrigger(50)
    fired = [trigger.observe(HOT, PAGE) is not None for _ in range(6)]
    assert fired == [False, True, False, True, False, True]


def test_a_cold_period_does_not_reset_the_count():
    trigger = ThrottleTrigger(50)
    fired = [trigger.observe(p, PAGE) is not None for p in (HOT, COLD, COLD, HOT, COLD, HOT)]
    assert fired == [False, False, False, True, False, False]


def test_hot_means_more_than_the_thresholds_share_of_what_was_sent():
    trigger = ThrottleTrigger(50)
    exactly_half = period(500 * PAGE, 1000 * PAGE)
    assert [trigger.observe(exactly_half, PAGE) for _ in range(4)] == [None] * 4
    hot = [trigger.observe(HOT, PAGE) for _ in range(2)][1]
    assert hot == Hot(bytes_dirty_period=600 * PAGE, bytes_dirty_threshold=500 * PAGE)


# -- the schedule --------------------------------------------------------------------------------
def test_auto_converge_steps_from_initial_by_increment_to_the_cap():
    auto = AutoConverge(initial=20, increment=10, maximum=55)
    hot = Hot(2000, 1000)
    assert [auto.throttle_down(hot) for _ in range(6)] == [20, 30, 40, 50, 55, 55]


def test_tailslow_steps_no_further_than_the_threshold_asks():
    auto = AutoConverge(initial=20, increment=10, maximum=99, tailslow=True)
    auto.throttle_down(Hot(2000, 1000))
    # cpu_now 80, ideal 80 x 1900/2000 = 76: a step of 4, not 10
    assert auto.throttle_down(Hot(2000, 1900)) == 24
    assert auto.throttle_down(Hot(4000, 1000)) == 34          # far off: the full increment


def test_throttle_sleep_per_slice_is_qemus():
    assert throttle_sleep_seconds(0) == 0.0
    for pct, ms in ((20, 2.5), (50, 10.0), (99, 990.0)):
        assert throttle_sleep_seconds(pct) == pytest.approx(ms / 1000, abs=2e-9)


# -- dirty-limit ---------------------------------------------------------------------------------
def test_dirty_limit_adjusts_as_qemu():
    limit = DirtyLimit(quota_mb_per_second=10, page_size=PAGE)      # a 16 MiB ring
    full_us = 16 * 1000000 // 100                                  # its fill time at 100 MB/s
    # 100 MB/s against 10: off by 90 % (> 50): linear, 90/(100-90) x the fill time
    assert limit.adjust(100) == full_us * 90 // 10
    before = limit.throttle_us_per_full
    assert limit.adjust(30) == before                              # within 25 MB/s: kept
    # 45 against 10: off by 77 %: linear again, on the fill time at the highest rate seen
    assert limit.adjust(45) == before + int(full_us * 77 / 23)
    near = DirtyLimit(quota_mb_per_second=60, page_size=PAGE)
    assert near.adjust(100) == full_us // 10                       # off by 40 %: a tenth
    assert near.adjust(100) == 2 * (full_us // 10)
    assert near.adjust(20) == 0                                     # quota above: down, >= 0
    capped = DirtyLimit(quota_mb_per_second=1, page_size=PAGE)
    for _ in range(30):
        capped.adjust(1000)
    assert capped.throttle_us_per_full == (16 * 1000000 // 1000) * 99


def test_dirty_limit_of_an_idle_vcpu_is_no_sleep():
    limit = DirtyLimit(quota_mb_per_second=50, page_size=PAGE)
    limit.adjust(200)
    assert limit.throttle_us_per_full > 0
    assert limit.adjust(0) == 0


def test_a_small_quota_settles_near_quota_plus_tolerance():
    """A guest dirtying 200 MB/s flat out, its rate falling as the ring's sleep grows (fill
    time over fill plus sleep): QEMU's rule stops adjusting within 25 MB/s of the quota."""
    limit = DirtyLimit(quota_mb_per_second=1, page_size=PAGE)
    raw, rate = 200, 200
    for _ in range(50):
        us = limit.adjust(rate)
        fill_us = 16 * 1000000 / raw
        rate = int(raw * fill_us / (fill_us + us))
    assert rate <= 1 + 25


# -- the timeouts --------------------------------------------------------------------------------
def test_completion_timeout_absolute_or_per_gib():
    assert completion_seconds(30.0, None, 64 * MiB) == 30.0
    assert completion_seconds(None, 10.0, 512 * MiB) == 5.0
    assert completion_seconds(None, None, MiB) is None


@pytest.mark.parametrize("on_timeout,action,code", [
    ("pause", Action.STOP_AND_COPY, StopCode.PAUSED),
    ("postcopy", Action.POSTCOPY, StopCode.POSTCOPY)])
def test_completion_timeout_pauses_or_switches(on_timeout, action, code):
    t = Timeouts(completion=2.0, on_timeout=on_timeout, progress=None, t0=100.0)
    assert t.check(101.9, 10**6) is None
    d = t.check(102.0, 10**6)
    assert (d.action, d.stop_code) == (action, code)


def test_completion_timeout_aborts_with_its_code():
    t = Timeouts(completion=2.0, on_timeout="abort", progress=None, t0=0.0)
    with pytest.raises(MigrationTimedOut) as e:
        t.check(2.5, 10**6)
    assert e.value.stop_code == "completion-timeout"


def test_progress_timeout_follows_the_lowest_remaining():
    t = Timeouts(completion=None, on_timeout="abort", progress=3.0, t0=0.0)
    t.check(0.0, 1000)
    t.check(2.0, 900)                 # a new low: the clock restarts
    t.check(4.0, 950)
    t.check(4.5, None)                # no reading mid-pass: the low's age still counts
    with pytest.raises(MigrationTimedOut) as e:
        t.check(5.0, 901)
    assert e.value.stop_code == "no-progress"


# -- xen-legacy's adaptive rate ------------------------------------------------------------------
def test_adaptive_rate_starts_at_100_mbit_or_the_admins_rate():
    assert AdaptiveRate().mbit_rate == 100
    assert AdaptiveRate(50e6 / 8).mbit_rate == 50


def test_adaptive_rate_rises_to_the_dirty_rate_plus_50_capped():
    rate = AdaptiveRate()
    # 3052 pages of 4 KiB in 1 s are 100 Mbit/s: not faster than the rate, no change
    assert rate.round_done(3052, PAGE, 1.0) == 100 * 1e6 / 8
    rate.round_done(6104, PAGE, 1.0)                # 200 Mbit/s dirtied
    assert rate.mbit_rate == 250
    rate.round_done(61035, PAGE, 1.0)               # 2000 Mbit/s
    assert rate.mbit_rate == MAX_MBIT_RATE
    assert rate.decide(sent_this_round=100, sent_last_round=200) is None
    assert rate.decide(sent_this_round=300, sent_last_round=200).stop_code is StopCode.RATE_CAP


# -- settings: QEMU's ranges, and what cannot go together ---------------------------------------
@pytest.mark.parametrize("bad,message", [
    ({"throttle_initial": 0}, "from 1 to 99"),
    ({"throttle_increment": 100}, "from 1 to 99"),
    ({"max_throttle": 100}, "from 1 to 99"),
    ({"throttle_trigger_threshold": 101}, "from 1 to 100"),
    ({"dirty_limit_bytes_per_second": 5e5}, "at least 1MB"),
    ({"dirty_limit_period_seconds": 2.0}, "from 1ms to 1s"),
    ({"auto_converge": True, "dirty_limit_bytes_per_second": 1e7}, "cannot be used together"),
    ({"on_timeout": "retry"}, "not one of"),
    ({"completion_timeout_seconds": 5, "completion_timeout_per_gib_seconds": 5}, "not both"),
    ({"progress_timeout_seconds": 0}, "must be positive"),
    ({"adaptive_rate": True}, "xen-legacy"),
])
def test_settings_refuse_what_qemu_refuses(bad, message):
    with pytest.raises(ConfigError, match=message):
        MigrationSettings(**bad)


def test_convergence_settings_round_trip():
    s = MigrationSettings(policy="qemu", auto_converge=True, throttle_initial=30,
                          throttle_tailslow=True, completion_timeout_per_gib_seconds=10.0,
                          on_timeout="pause", progress_timeout_seconds=4.0,
                          subtract_fixed_downtime=True)
    assert MigrationSettings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("args,message", [
    (["migrate", "--throttle-initial", "0"], "--throttle-initial must be >= 1"),
    (["migrate", "--max-throttle", "100"], "--max-throttle must be 1..99"),
    (["migrate", "--throttle-trigger-threshold", "x"], "whole number"),
    (["migrate", "--dirty-limit"], "expected one argument"),
    (["migrate", "--dirty-limit", "10MB", "--auto-converge"], "cannot be used together"),
    (["migrate", "--completion-timeout", "10s/MiB"], "10s/GiB"),
    (["migrate", "--on-timeout", "never"], "invalid choice"),
    (["migrate", "--adaptive-rate"], "use --policy xen-legacy"),
])
def test_bad_convergence_options_are_one_line_and_exit_2(tmp_path, args, message):
    assert message in one_line_error(run(*args, home=tmp_path, check_rc=None))


# -- the vCPU's throttle --------------------------------------------------------------------------
@pytest.fixture
def hv():
    return Hypervisor("t", 32 * MiB)


def run_vcpu(hv, spec: WorkloadSpec, seconds: float, **throttle) -> VCPU:
    dom = hv.create_domain(f"g{time.monotonic_ns()}", 4 * MiB, "p2m")
    vcpu = VCPU(dom, make_workload(spec, dom.data_pages))
    vcpu.set_throttle(**throttle)
    vcpu.start()
    time.sleep(seconds)
    vcpu.stop()
    assert vcpu.error is None
    return vcpu


@pytest.mark.inprocess
def test_a_throttled_vcpu_sleeps_after_every_slice_and_logs_each_sleep(hv):
    vcpu = run_vcpu(hv, WorkloadSpec("uniform", 0, seed=1), 0.5, cpu_percentage=50)
    sleeps = vcpu.throttle_sleeps()
    assert len(sleeps) >= 3
    # 50 %: 10 ms after each slice (the last one may have been cut short by the stop)
    assert all(end - start >= 0.010 - 1e-6 for start, end in sleeps[:-1])
    assert vcpu.throttle_sleep_seconds_total == pytest.approx(
        sum(e - s for s, e in sleeps), abs=1e-3)


@pytest.mark.inprocess
def test_throttled_time_earns_the_workload_no_budget(hv):
    rate = 5000.0
    vcpu = run_vcpu(hv, WorkloadSpec("uniform", rate, seed=2), 0.6, cpu_percentage=80)
    wl = vcpu.workload
    slept = vcpu.throttle_sleep_seconds_total
    assert slept > 0
    # The workload's clock ran only while the vCPU did: what it wrote fits that time.
    walls, _ = vcpu.log.arrays()
    assert wl.running_seconds <= (walls[-1] - walls[0]) - slept + 0.02
    assert wl.pages_written_total <= rate * wl.running_seconds + 1 + 1


@pytest.mark.inprocess
def test_an_idle_vcpu_is_not_slowed_by_a_dirty_limit(hv):
    idle = run_vcpu(hv, WorkloadSpec("idle"), 0.3, ring_pages=64, ring_full_sleep_seconds=1.0)
    assert idle.dirty_limit_sleep_seconds_total == 0 and not idle.throttle_sleeps()
    busy = run_vcpu(hv, WorkloadSpec("uniform", 0, seed=3), 0.3, ring_pages=64,
                    ring_full_sleep_seconds=0.05)
    assert busy.dirty_limit_sleep_seconds_total > 0 and busy.throttle_sleeps()


@pytest.mark.inprocess
def test_a_pause_ends_a_throttle_sleep(hv):
    dom = hv.create_domain("p", 4 * MiB, "p2m")
    vcpu = VCPU(dom, make_workload(WorkloadSpec("uniform", 0, seed=4), dom.data_pages))
    vcpu.set_throttle(cpu_percentage=99)            # 990 ms asleep after every slice
    vcpu.start()
    try:
        deadline = time.monotonic() + 5
        while not vcpu._sleeping.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        hv.pause("p")
        assert vcpu.wait_awake(timeout=0.5)          # long before the 990 ms are over
        (start, end), = vcpu.throttle_sleeps()
        assert end - start < 0.5
    finally:
        vcpu.stop()


def test_throttle_sleeps_are_not_gaps_the_guest_saw():
    """The progress log: writes, a throttle sleep of 400 ms, writes, a real stall of 50 ms."""
    vcpu = VCPU.__new__(VCPU)
    from workloads.progresslog import ProgressLog
    vcpu.log = ProgressLog()
    t = 1000.0
    for i in range(10):
        vcpu.log.record(t + i * 0.005, i)
    vcpu.log.record_sleep(t + 0.045, t + 0.445, 9)
    vcpu.log.record(t + 0.450, 10)
    vcpu.log.record(t + 0.500, 11)                  # a 50 ms stall
    assert vcpu.longest_gap(t, t + 0.5) == pytest.approx(0.05)
    # A sleep under way as the window ends (the pause came mid-sleep) is no gap either.
    vcpu.log.record_sleep(t + 0.5, t + 1.5, 11)
    assert vcpu.longest_gap(t, t + 1.0) == pytest.approx(0.05)


# -- migrations of a guest that dirties faster than the link drains it -------------------------
def non_converging(in_process, **settings):
    """A 4 MiB guest writing 8000 pages/s (32 MB/s) over an 8 MiB/s link: qemu's pre-copy
    cannot converge on its own."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 4 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 8000, seed=1)))
    wait_progress(tb.host("host-0"), "vm")
    time.sleep(0.3)
    s = MigrationSettings(**{"policy": "qemu", "link_bytes_per_second": 8 * MiB,
                             "max_iterations": 12, **settings})
    return tb, tb.migrate("vm", "host-1", s)


def hopeless(in_process, **settings):
    """A 1 MiB guest writing 8000 pages/s over a 1 MiB/s link: it re-dirties its pages many
    times faster than they go, even slowed several-fold by a loaded machine, so qemu's
    pre-copy cannot converge; throttled to 99 % (80 writes/s) it does."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 1 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 8000, seed=1)))
    wait_progress(tb.host("host-0"), "vm")
    time.sleep(0.3)
    s = MigrationSettings(**{"policy": "qemu", "link_bytes_per_second": 1 * MiB,
                             "max_iterations": 10, **settings})
    return tb, tb.migrate("vm", "host-1", s)


def counters_add_up(tb, host: str, guest: str = "vm") -> None:
    """Nothing lost: the guest's per-page counters add up to the writes its workload made."""
    h = tb.host(host)
    h.call("pause_guest", guest)
    try:
        written = h.call("guest_status", guest)["pages_written_total"]
        assert int(np.sum(h.call("guest_counters", guest))) == written
    finally:
        h.call("unpause_guest", guest)


def test_without_auto_converge_it_stops_on_the_cap(in_process):
    tb, r = hopeless(in_process)
    assert r.status == "completed" and r.stop_code == "max-iterations", r.table()
    assert all(x["cpu_throttle_percentage"] == 0 for x in r.rounds)
    assert r.convergence is None and r.guest_cost["throttled_seconds"] == 0


def test_with_auto_converge_it_converges(in_process):
    tb, r = hopeless(in_process, auto_converge=True, throttle_initial=50,
                     throttle_increment=49)
    assert r.status == "completed" and r.stop_code == "fits-downtime", r.table()
    live = [x["cpu_throttle_percentage"] for x in r.rounds if not x["final"]]
    assert live[0] == 0 and live[-1] in (50, 99)
    assert all(b >= a for a, b in zip(live, live[1:], strict=False))
    assert r.convergence["cpu_throttle_percentage_max"] >= 50
    assert r.guest_cost["throttled_seconds"] > 0
    assert r.integrity.verified
    counters_add_up(tb, "host-1")
    frames_exact(tb)


def test_auto_converge_applies_under_the_xen_policies_too(in_process):
    """The trigger runs at the CLEAN that ends each round: rounds of a second close a rate
    period each, and the throttle follows."""
    tb, r = hopeless(in_process, policy="xen", max_iterations=8, auto_converge=True,
                     throttle_initial=50)
    assert r.status == "completed"
    assert max(x["cpu_throttle_percentage"] for x in r.rounds) >= 50, r.table()
    assert r.guest_cost["throttled_seconds"] > 0


def test_dirty_limit_slows_a_writing_guest(in_process):
    """A guest writing as fast as its vCPU can (hundreds of MB/s, far above the quota and
    its 25 MB/s tolerance, however loaded the machine) is slept by the dirty ring."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 8 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 0, seed=1)))
    time.sleep(0.3)
    r = tb.migrate("vm", "host-1", MigrationSettings(
        policy="qemu", link_bytes_per_second=8 * MiB, max_iterations=6,
        dirty_limit_bytes_per_second=1e6, dirty_limit_period_seconds=0.5))
    assert r.status == "completed" and r.integrity.verified, r.table()
    assert r.convergence["dirty_limit_throttle_seconds"] > 0
    assert sum(x["dirty_limit_throttle_seconds"] for x in r.rounds) > 0
    assert r.guest_cost["throttled_seconds"] > 0
    frames_exact(tb)


@pytest.mark.inprocess
def test_a_throttle_sleep_cut_by_the_pause_is_no_gap(hv):
    """The guest's last sign of life on the source is where its sleep ended, at the pause or
    after it, and the sleep itself is no gap: the guest-observed downtime counts the pause."""
    dom = hv.create_domain("q", 4 * MiB, "p2m")
    vcpu = VCPU(dom, make_workload(WorkloadSpec("uniform", 2000, seed=5), dom.data_pages))
    vcpu.set_throttle(cpu_percentage=99)
    vcpu.start()
    try:
        deadline = time.monotonic() + 5
        while not vcpu._sleeping.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        slept_from = time.time()
        hv.pause("q")
        paused_at = time.time()
        assert vcpu.wait_awake(timeout=2.0)
        assert vcpu.last_progress_wall >= slept_from
        (start, end), = vcpu.throttle_sleeps()
        assert end >= min(paused_at, start + throttle_sleep_seconds(99)) - 0.002
        assert vcpu.longest_gap(start, paused_at) == 0.0
    finally:
        vcpu.stop()


def test_a_throttled_guest_migrates_whole(in_process):
    """A guest throttled at 95 % (190 ms asleep after every 10 ms slice) when it migrates:
    the pause cuts a sleep short, the copy is whole, and the guest runs on."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 4 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 2000, seed=1)))
    tb.host("host-0").service.throttle_guest("vm", cpu_percentage=95)
    time.sleep(0.5)
    r = tb.migrate("vm", "host-1", MigrationSettings())
    assert r.status == "completed" and r.integrity.verified
    assert r.guest_observed_downtime_seconds is not None
    assert r.guest_cost["throttled_seconds"] > 0
    wait_progress(tb.host("host-1"), "vm")
    counters_add_up(tb, "host-1")


def test_the_throttle_shows_in_progress_and_on_a_real_metrics_scrape(in_process):
    """While auto-converge throttles, progress says cpu_throttle_percentage and the host's
    /metrics says migbed_migration_cpu_throttle_ratio, scraped over HTTP."""
    import threading

    from test_metrics import Samples, scrape
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 1 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 8000, seed=1)))
    time.sleep(0.3)
    endpoint = tb.hosts["host-0"].service.metrics_endpoint()
    seen, ratios, done = [], [], threading.Event()

    def watch():
        while not done.is_set():
            s = Samples(scrape(endpoint))
            if s.has("migbed_migration_cpu_throttle_ratio", guest="vm"):
                ratios.append(s.get("migbed_migration_cpu_throttle_ratio", guest="vm"))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = tb.migrate("vm", "host-1", MigrationSettings(
            policy="qemu", link_bytes_per_second=1 * MiB, max_iterations=8,
            auto_converge=True, throttle_initial=60, throttle_increment=20),
            on_progress=lambda p: seen.append(p.cpu_throttle_percentage))
    finally:
        done.set()
        watcher.join()
    assert r.status == "completed"
    assert 60 in seen
    assert any(x == pytest.approx(0.6) for x in ratios)       # the first step, as a ratio
    assert not Samples(scrape(endpoint)).has("migbed_migration_cpu_throttle_ratio", guest="vm")


# -- each timeout path leaves the guest where it should be, nothing lost ----------------------
def test_completion_timeout_abort_leaves_the_guest_on_its_source(in_process):
    tb, r = hopeless(in_process, completion_timeout_seconds=1.0)
    assert (r.status, r.stop_code) == ("cancelled", "completion-timeout"), r.table()
    assert tb.where("vm") == "host-0"
    wait_progress(tb.host("host-0"), "vm")
    counters_add_up(tb, "host-0")
    frames_exact(tb)


def test_completion_timeout_per_gib(in_process):
    tb, r = hopeless(in_process, completion_timeout_per_gib_seconds=1024.0)   # 1 s a MiB
    assert (r.status, r.stop_code) == ("cancelled", "completion-timeout")
    assert tb.where("vm") == "host-0"


def test_progress_timeout_aborts_a_migration_that_makes_none(in_process):
    tb, r = non_converging(in_process, progress_timeout_seconds=1.0)
    assert (r.status, r.stop_code) == ("cancelled", "no-progress"), r.table()
    assert tb.where("vm") == "host-0"
    counters_add_up(tb, "host-0")
    frames_exact(tb)


def test_completion_timeout_pause_finishes_as_stop_and_copy(in_process):
    tb, r = hopeless(in_process, completion_timeout_seconds=1.0, on_timeout="pause")
    assert (r.status, r.stop_code) == ("completed", "paused"), r.table()
    assert r.integrity.verified and tb.where("vm") == "host-1"
    counters_add_up(tb, "host-1")
    frames_exact(tb)


def test_completion_timeout_postcopy_switches_and_finishes(in_process):
    """KubeVirt's completion timeout with post-copy allowed: the switch, then every page."""
    tb, r = hopeless(in_process, completion_timeout_seconds=1.0, on_timeout="postcopy")
    assert (r.status, r.stop_code) == ("completed", "postcopy"), r.table()
    assert "completion-timeout" in r.stop_reason
    assert r.postcopy is not None and r.integrity.verified
    assert tb.where("vm") == "host-1"
    counters_add_up(tb, "host-1")
    frames_exact(tb)


def test_the_throttle_goes_when_the_migration_ends(in_process):
    tb, r = hopeless(in_process, auto_converge=True, throttle_initial=60,
                     throttle_increment=10, completion_timeout_seconds=6.0)
    assert r.status == "cancelled" and r.convergence["cpu_throttle_percentage_max"] >= 60, \
        r.table()
    vcpu = tb.host("host-0").service.vcpus["vm"]
    assert vcpu.cpu_percentage == 0


# -- the fixed downtime, measured for the host pair ---------------------------------------------
def test_fixed_downtime_is_measured_per_host_pair(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 4 * MiB, "p2m"))
    s = MigrationSettings(policy="qemu", latency_seconds=0.005, subtract_fixed_downtime=True)
    first = tb.migrate("vm", "host-1", s)
    fixed = first.model["fixed_downtime"]
    assert fixed["basis"].startswith("1.5 x")
    assert fixed["seconds"] == pytest.approx(1.5 * fixed["round_trip_seconds"])
    assert fixed["round_trip_seconds"] >= 2 * 0.005
    tb.migrate("vm", "host-0", s)
    again = tb.migrate("vm", "host-1", s)
    fixed = again.model["fixed_downtime"]
    assert fixed["basis"].startswith("hand-over")
    assert fixed["seconds"] > 0
    assert MigrationSettings(policy="qemu").make_policy(0.1).fixed_downtime_seconds == 0.0
    assert MigrationSettings(policy="qemu", subtract_fixed_downtime=True) \
        .make_policy(0.1).budget_seconds == pytest.approx(0.2)


def test_adaptive_rate_paces_xen_legacys_first_round(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 8 * MiB, "p2m"))
    r = tb.migrate("vm", "host-1", MigrationSettings(policy="xen-legacy", adaptive_rate=True))
    assert r.status == "completed"
    assert r.rounds[0]["throughput_bytes_per_second"] <= 100e6 / 8 * 1.05


# -- the model follows the same schedule ----------------------------------------------------------
def test_the_model_says_when_auto_converge_converges_and_at_what_throttle():
    # A guest whose memory has content: a fresh (zero) one goes in one cheap pass.
    kw = dict(guest_memory_bytes=4 * MiB, workload=WorkloadSpec("uniform", 8000, fill="random"),
              link_bytes_per_second=8 * MiB, policy="qemu",
              policy_settings={"max_iterations": 12})
    plain = predict(**kw)
    assert not plain.converged and plain.stop_code == "max-iterations"
    spec = ThrottleSpec(initial=60, increment=20)
    with_aid = predict(**kw, auto_converge=spec)
    assert with_aid.converged and with_aid.stop_code == "fits-downtime"
    steps = [pct for _, pct in with_aid.throttle_schedule]
    assert steps and steps[0] == 60
    assert all(b - a == 20 or b == 99 for a, b in zip(steps, steps[1:], strict=False))
    assert with_aid.cpu_throttle_percentage == steps[-1]
    assert with_aid.total_time_seconds < plain.total_time_seconds


def test_the_model_follows_dirty_limit():
    """Quota 10 MB/s on a guest writing 82 MB/s over 12 MiB/s: the rule's sleep brings it
    under what the link drains; 50 MB/s stops adjusting within the tolerance, and does not."""
    from cluster.model.throttle_model import DirtyLimitSpec
    kw = dict(guest_memory_bytes=16 * MiB,
              workload=WorkloadSpec("uniform", 20000, fill="random"),
              link_bytes_per_second=12 * MiB, policy="qemu",
              policy_settings={"max_iterations": 15})
    tight = predict(**kw, dirty_limit=DirtyLimitSpec(10e6))
    loose = predict(**kw, dirty_limit=DirtyLimitSpec(50e6))
    assert tight.converged and not loose.converged
    assert tight.dirty_limit_schedule and loose.dirty_limit_schedule
    assert tight.dirty_limit_schedule[-1][1] > loose.dirty_limit_schedule[-1][1]
    with pytest.raises(ConfigError):
        predict(**kw, dirty_limit=DirtyLimitSpec(10e6), auto_converge=ThrottleSpec())


# -- the ready sweeps ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["auto-converge-step", "dirty-limit-quota", "convergence-aids"])
def test_ready_convergence_scenarios_load_and_round_trip(name):
    from pathlib import Path

    from cluster.sweep.scenario import Scenario, load_scenario
    sc = load_scenario(Path(__file__).parent.parent / "scenarios" / f"{name}.toml")
    assert Scenario.from_toml(sc.to_toml()) == sc
    settings = [sc.specs(p)[1] for p in sc.points()]
    if name == "auto-converge-step":
        assert {s.throttle_increment for s in settings} == {5, 10, 20}
        assert all(s.auto_converge for s in settings)
    elif name == "dirty-limit-quota":
        assert {s.dirty_limit_bytes_per_second for s in settings} == {10e6, 20e6, 50e6}
    else:
        aids = {(s.auto_converge, s.dirty_limit_bytes_per_second, s.on_timeout)
                for s in settings}
        assert aids == {(False, None, "abort"), (True, None, "abort"),
                        (False, 20e6, "abort"), (False, None, "pause")}


def test_an_unknown_aid_is_refused_in_one_line():
    from cluster.sweep.scenario import Scenario
    with pytest.raises(ConfigError, match="is not an aid"):
        Scenario.from_toml('name = "x"\n[axes]\naid = ["none", "magic"]\n')
