"""Workload patterns and the vCPU, without Ray: real guest memory in a small Hypervisor.

Rate checks drive `write()` with a synthetic clock, so nothing here depends on how fast the
machine is; the few threaded tests only assert invariants (no write lost, none while paused).
"""

import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.errors import ConfigError, GuestPaused
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from workloads.measure import measure_rate
from workloads.patterns import (
    PhasedWorkload,
    SequentialWorkload,
    hot_pages,
    make_workload,
)
from workloads.progresslog import ProgressLog
from workloads.spec import PATTERNS, WorkloadSpec
from workloads.state import check_state_values
from workloads.vcpu import VCPU
from workloads.workload import Workload

MiB = 1 << 20


@pytest.fixture
def hv() -> Hypervisor:
    return Hypervisor(memory_bytes=32 * MiB)


def guest(hv: Hypervisor, name: str = "g1", size_bytes: int = 2 * MiB, mode: str = "p2m"):
    return hv.create_domain(name, size_bytes, mode)


def counters(dom) -> np.ndarray:
    """Word 0 of every data page, as the guest sees it."""
    pfns = np.arange(dom.data_pages, dtype=np.int64) + dom.pfn_base
    return dom.read_words(pfns, 0).astype(np.int64)


def drive(wl: Workload, dom, steps: int, step_seconds: float = 0.01, start: float = 0.0,
          max_batch: int = 4096) -> int:
    """Call write() at a synthetic clock start, start+step, ...; return pages written."""
    total = 0
    with dom.lock:
        for i in range(steps):
            total += wl.write(dom, start + i * step_seconds, max_batch)
    return total


def assert_sequential_edge(values: np.ndarray, position: int) -> None:
    """qtest's check: all counters equal except pages before the position, one higher."""
    base = int(values[position])
    assert np.all(values[:position] == base + 1)
    assert np.all(values[position:] == base)


# -- patterns -------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p not in ("idle", "scan")])
def test_writes_only_data_pages_and_counters_sum(hv, pattern):
    dom = guest(hv)
    tables_before = dom.page_tables().copy()
    other = guest(hv, "other")
    wl = make_workload(WorkloadSpec(pattern=pattern, rate_pages_per_second=0, seed=3),
                       dom.data_pages)
    written = drive(wl, dom, 20, max_batch=500)
    assert written == wl.pages_written_total > 0
    assert int(counters(dom).sum()) == written
    np.testing.assert_array_equal(dom.page_tables(), tables_before)
    assert hv.check_page_tables("g1") is None
    assert int(counters(other).sum()) == 0


def test_idle_writes_nothing(hv):
    dom = guest(hv)
    wl = make_workload(WorkloadSpec(pattern="idle"), dom.data_pages)
    assert drive(wl, dom, 50) == 0
    assert dom.pages_written_total == 0 and wl.pages_written_total == 0


def test_uniform_covers_all_pages(hv):
    dom = guest(hv)
    wl = make_workload(WorkloadSpec(pattern="uniform", seed=1), dom.data_pages)
    drive(wl, dom, 10, max_batch=2 * dom.data_pages)   # 20 writes per page on average
    assert np.all(counters(dom) > 0)


def test_hotset_concentrates_writes(hv):
    dom = guest(hv)
    spec = WorkloadSpec(pattern="hotset", hot_fraction=0.1, hot_share=0.9, seed=2)
    wl = make_workload(spec, dom.data_pages)
    hot = hot_pages(spec, dom.data_pages)
    assert hot == -(-dom.data_pages // 10)
    written = drive(wl, dom, 20, max_batch=1000)
    c = counters(dom)
    hot_share = c[:hot].sum() / written
    assert 0.85 < hot_share < 0.95
    assert c[hot:].sum() > 0          # the cold pages get the rest


def test_hot_pages_rounding():
    assert hot_pages(WorkloadSpec(pattern="hotset", hot_fraction=0.07), 100) == 7
    assert hot_pages(WorkloadSpec(pattern="hotset", hot_fraction=0.001), 10) == 1
    assert hot_pages(WorkloadSpec(pattern="hotset", hot_fraction=1.0), 10) == 10


@pytest.mark.parametrize("batch", [1, 7, 100, 511, 600, 2000])
def test_sequential_edge_invariant(hv, batch):
    dom = guest(hv)   # 2 MiB: 511 data pages, so some batches wrap or sweep several times
    wl = make_workload(WorkloadSpec(pattern="sequential"), dom.data_pages)
    assert isinstance(wl, SequentialWorkload)
    with dom.lock:
        for i in range(13):
            before = dom.pages_written_total
            wl.write(dom, float(i), batch)
            stored = dom.pages_written_total - before
            assert stored <= dom.data_pages     # one store per page per batch
            assert_sequential_edge(counters(dom), wl.position)
    assert int(counters(dom).sum()) == wl.pages_written_total == 13 * batch


def test_batches_have_distinct_pages():
    for pattern in ("uniform", "hotset", "sequential", "phased"):
        wl = make_workload(WorkloadSpec(pattern=pattern, seed=5), 300)
        for i in range(5):
            pages, inc = wl.take_batch(0.1 * i, 1000)   # phased: all in its busy phase
            assert len(np.unique(pages)) == len(pages)
            assert pages.min() >= 0 and pages.max() < 300
            assert int(inc.sum()) == 1000


# -- rate limiting (synthetic clock) ----------------------------------------------------------
def test_rate_limit_and_fractional_carry(hv):
    dom = guest(hv)
    wl = make_workload(WorkloadSpec(pattern="uniform", rate_pages_per_second=5000),
                       dom.data_pages)
    written = drive(wl, dom, 1539, step_seconds=0.0013)   # 2.0 s of running time
    assert abs(written - 5000 * 1538 * 0.0013) <= 1
    # Tiny steps earn less than a page each, yet the fractions add up.
    wl2 = make_workload(WorkloadSpec(pattern="uniform", rate_pages_per_second=300),
                        dom.data_pages)
    written2 = drive(wl2, dom, 1001, step_seconds=0.001)  # 1 s at 0.3 pages per call
    assert abs(written2 - 300) <= 1


def test_no_burst_after_pause(hv):
    dom = guest(hv)
    wl = make_workload(WorkloadSpec(pattern="uniform", rate_pages_per_second=1000),
                       dom.data_pages)
    assert abs(drive(wl, dom, 101, step_seconds=0.01) - 1000) <= 1   # t = 0..1 s
    hv.pause("g1")
    state_before = wl.get_state()
    with dom.lock, pytest.raises(GuestPaused):
        wl.write(dom, 50.0)
    assert wl.get_state() == state_before        # a paused write advances nothing
    hv.unpause("g1")
    wl.resume(100.0)
    with dom.lock:
        assert wl.write(dom, 100.002) <= 3       # 2 ms of budget, not 99 s
    # Even without resume(), a write refused while paused restarts the clock.
    hv.pause("g1")
    with dom.lock, pytest.raises(GuestPaused):
        wl.write(dom, 200.0)
    hv.unpause("g1")
    with dom.lock:
        assert wl.write(dom, 300.0) <= 1
        assert 9 <= wl.write(dom, 300.010) <= 11


def test_backlog_is_bounded(hv):
    dom = guest(hv)
    wl = make_workload(WorkloadSpec(pattern="uniform", rate_pages_per_second=1e6),
                       dom.data_pages)
    with dom.lock:
        wl.write(dom, 0.0, 100)
        assert wl.write(dom, 1.0, 100) == 100    # due 1e6, capped at one batch
        assert wl.budget_pages <= 100


def test_phased_rate_follows_running_clock(hv):
    dom = guest(hv)
    spec = WorkloadSpec(pattern="phased", rate_pages_per_second=1000, busy_seconds=1.0,
                        quiet_seconds=1.0, quiet_rate_fraction=0.1)
    wl = make_workload(spec, dom.data_pages)
    assert isinstance(wl, PhasedWorkload)
    busy = drive(wl, dom, 101, step_seconds=0.01)                  # running 0..1: busy
    quiet = drive(wl, dom, 100, step_seconds=0.01, start=1.01)     # running 1..2: quiet
    assert abs(busy - 1000) <= 1 and abs(quiet - 100) <= 1
    # A long pause does not move the phase clock: after it the guest is busy again.
    wl.resume(1000.0)
    busy2 = drive(wl, dom, 100, step_seconds=0.01, start=1000.01)
    assert abs(busy2 - 1000) <= 1
    # One call spanning several phases gets the integral: 2.5 periods at 1000 / 100.
    wl3 = make_workload(spec, 10_000)
    wl3.take_batch(0.0)
    pages, inc = wl3.take_batch(5.0, 100_000)
    assert abs(int(inc.sum()) - (3 * 1000 + 2 * 100)) <= 1


def test_phased_unlimited_quiet_phase():
    spec = WorkloadSpec(pattern="phased", busy_seconds=1.0, quiet_seconds=1.0,
                        quiet_rate_fraction=0.0)
    wl = make_workload(spec, 1000)
    assert len(wl.take_batch(0.5, 64)[0]) > 0
    assert len(wl.take_batch(1.5, 64)[0]) == 0
    assert len(wl.take_batch(2.5, 64)[0]) > 0


# -- state round trip ----------------------------------------------------------------------
def _roundtrip(state: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("rate", [0.0, 3000.0])
def test_state_round_trip_gives_same_future(pattern, rate):
    spec = WorkloadSpec(pattern=pattern, rate_pages_per_second=rate, seed=11,
                        busy_seconds=0.05, quiet_seconds=0.03, quiet_rate_fraction=0.25)
    a = make_workload(spec, 700)
    for i in range(7):
        a.take_batch(0.0137 * i, 333)
    state = a.get_state()
    check_state_values(state)
    b = make_workload(spec, 700, state=_roundtrip(state))
    assert b.get_state() == state
    a.resume(500.0)
    b.resume(500.0)
    for i in range(1, 30):
        now = 500.0 + 0.0071 * i
        pa, ia = a.take_batch(now, 333)
        pb, ib = b.take_batch(now, 333)
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(ia, ib)
    assert a.get_state() == b.get_state()


def test_restored_workload_writes_same_pages(hv):
    """Ten batches on one guest == five on a second guest + five more after restoring."""
    spec = WorkloadSpec(pattern="hotset", seed=4)
    whole, first, second = guest(hv, "whole"), guest(hv, "first"), guest(hv, "second")
    a = make_workload(spec, whole.data_pages)
    drive(a, whole, 10, max_batch=200)
    b = make_workload(spec, first.data_pages)
    drive(b, first, 5, max_batch=200)
    c = make_workload(spec, second.data_pages, state=_roundtrip(b.get_state()))
    drive(c, second, 5, max_batch=200, start=5 * 0.01)
    np.testing.assert_array_equal(counters(whole), counters(first) + counters(second))
    assert c.pages_written_total == a.pages_written_total == 2000
    assert int(counters(second).sum()) == 1000


def test_state_rejects_mismatch():
    a = make_workload(WorkloadSpec(pattern="uniform"), 100)
    with pytest.raises(ConfigError):
        make_workload(WorkloadSpec(pattern="uniform"), 99, state=a.get_state())
    with pytest.raises(ConfigError):
        make_workload(WorkloadSpec(pattern="hotset"), 100, state=a.get_state())
    with pytest.raises(ConfigError):
        check_state_values({"x": 2**64})
    with pytest.raises(ConfigError):
        check_state_values({"x": np.int64(1)})


# -- the vCPU thread ------------------------------------------------------------------------
def _wait_for(predicate, timeout_seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.inprocess
def test_vcpu_stops_writing_while_paused(hv):
    dom = guest(hv)
    wl = make_workload(WorkloadSpec(pattern="uniform"), dom.data_pages)
    vcpu = VCPU(dom, wl)
    vcpu.start()
    try:
        assert _wait_for(lambda: dom.pages_written_total > 0)
        hv.pause("g1")
        frozen_domain, frozen_workload = dom.pages_written_total, wl.pages_written_total
        paused_wall = time.time()
        time.sleep(0.15)
        assert dom.pages_written_total == frozen_domain
        assert wl.pages_written_total == frozen_workload
        assert vcpu.first_progress_after(paused_wall + 0.01) is None
        hv.unpause("g1")
        resumed_wall = time.time()
        assert _wait_for(lambda: dom.pages_written_total > frozen_domain)
        assert vcpu.resumes_total >= 2            # the start, and after the pause
        assert vcpu.longest_gap(paused_wall, resumed_wall) >= 0.14
        assert vcpu.first_progress_after(resumed_wall) is not None
    finally:
        assert vcpu.stop()
    assert vcpu.error is None
    assert int(counters(dom).sum()) == wl.pages_written_total


@pytest.mark.inprocess
def test_vcpu_idle_heartbeat(hv):
    dom = guest(hv)
    vcpu = VCPU(dom, make_workload(WorkloadSpec(pattern="idle"), dom.data_pages))
    vcpu.start()
    try:
        assert _wait_for(lambda: len(vcpu.progress()) >= 3)
    finally:
        vcpu.stop()
    assert vcpu.pages_written_total == 0 and dom.pages_written_total == 0
    assert vcpu.last_progress_wall is not None
    assert vcpu.achieved_rate(1.0) == 0.0


@pytest.mark.inprocess
def test_vcpu_vp_logdirty_marks_written_pages(hv):
    dom = guest(hv)
    hv.set_mode("g1", "vp")
    hv.shadow_op("g1", ShadowOp.ENABLE_LOGDIRTY)
    wl = make_workload(WorkloadSpec(pattern="hotset", rate_pages_per_second=20_000, seed=9),
                       dom.data_pages)
    vcpu = VCPU(dom, wl)
    vcpu.start()
    try:
        assert _wait_for(lambda: wl.pages_written_total >= 200)
    finally:
        assert vcpu.stop()
    bitmap, stats = hv.shadow_op("g1", ShadowOp.PEEK)
    written = counters(dom) > 0
    np.testing.assert_array_equal(bitmap[:dom.data_pages], written)
    assert not bitmap[dom.data_pages:].any()      # page tables are never written
    assert stats.dirty_count == int(written.sum()) > 0
    assert int(counters(dom).sum()) == wl.pages_written_total


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(delays_ms=st.lists(st.integers(0, 15), min_size=3, max_size=3),
       logdirty=st.booleans(), batch=st.sampled_from([64, 4096]))
@pytest.mark.inprocess
def test_mode_switch_under_running_vcpu_loses_no_write(delays_ms, logdirty, batch):
    hv = Hypervisor(memory_bytes=32 * MiB)
    dom = hv.create_domain("g", 2 * MiB, "p2m")
    wl = make_workload(WorkloadSpec(pattern="sequential"), dom.data_pages)
    vcpu = VCPU(dom, wl, max_batch_pages=batch)
    vcpu.start()
    try:
        time.sleep(delays_ms[0] / 1000)
        hv.set_mode("g", "vp")
        if logdirty:
            hv.shadow_op("g", ShadowOp.ENABLE_LOGDIRTY)
        time.sleep(delays_ms[1] / 1000)
        hv.set_mode("g", "p2m")
        time.sleep(delays_ms[2] / 1000)
    finally:
        assert vcpu.stop()
    assert vcpu.error is None
    values = counters(dom)
    assert int(values.sum()) == wl.pages_written_total
    if batch <= dom.data_pages:       # else a batch sweeps pages more than once, stored once
        assert dom.pages_written_total == wl.pages_written_total
    assert_sequential_edge(values, wl.position)


# -- progress log ---------------------------------------------------------------------------
def test_progress_log_thins_steady_runs_but_keeps_gaps():
    log = ProgressLog(capacity_entries=64, record_interval_seconds=0.01)
    walls = [i * 0.001 for i in range(100)] + [0.5 + i * 0.001 for i in range(50)]
    for i, w in enumerate(walls):
        log.record(w, i)
    w, p = log.arrays()
    assert len(w) < 30 and np.all(np.diff(w) > 0) and np.all(np.diff(p) > 0)
    assert w[-1] == walls[-1]
    gap_start = int(np.searchsorted(w, 0.5)) - 1
    assert w[gap_start] == pytest.approx(0.099) and w[gap_start + 1] == pytest.approx(0.5)
    # A small ring keeps the newest records.
    ring = ProgressLog(capacity_entries=4, record_interval_seconds=0.0)
    for i in range(10):
        ring.record(float(i), i)
    np.testing.assert_array_equal(ring.arrays()[1], [6, 7, 8, 9])



def test_longest_gap_reads_thinned_stretches_as_the_interval_at_most():
    """Steady 1 ms records thinned at 3 ms are stored ~4 ms apart: no gap of the guest, so
    read as 3 ms at most; a real 20 ms stall stays exact."""
    from workloads.progresslog import ProgressReadings

    class Reader(ProgressReadings):
        def __init__(self, log):
            self.log = log
    log = ProgressLog(capacity_entries=256, record_interval_seconds=0.003)
    walls = [i * 0.001 for i in range(40)] + [0.059 + i * 0.001 for i in range(40)]
    for i, w in enumerate(walls):
        log.record(w, i)
    stored, _ = log.arrays()
    assert np.diff(stored).max() > 0.0035, "thinning stored records further apart"
    r = Reader(log)
    assert r.longest_gap(0.0, 0.039) <= 0.003 + 1e-9
    assert r.longest_gap(0.0, 0.098) == pytest.approx(0.020)
    assert r.longest_gap(0.060, 0.098) <= 0.003 + 1e-9


def test_an_idle_wait_is_no_gap_and_no_throttle_sleep():
    """A paced vCPU's chosen wait (IDLE) reads as no gap and is not a throttle sleep; its
    late wake-up after the wait is a gap; a throttle sleep stays one."""
    from workloads.progresslog import IDLE, ProgressReadings

    class Reader(ProgressReadings):
        def __init__(self, log):
            self.log = log
    log = ProgressLog(capacity_entries=64, record_interval_seconds=0.0005)
    log.record(0.000, 0)
    log.record_sleep(0.001, 0.051, 10, IDLE)       # waited 50 ms as planned
    log.record(0.054, 20)                          # woke 3 ms late: a gap
    log.record_sleep(0.055, 0.075, 20)             # a throttle sleep
    log.record(0.076, 30)
    r = Reader(log)
    assert r.longest_gap(0.0, 0.076) == pytest.approx(0.003)
    assert r.throttle_sleeps() == [(0.055, 0.075)]

@pytest.mark.inprocess
def test_measure_rate_positive(hv):
    dom = guest(hv)
    rate = measure_rate(dom, WorkloadSpec(pattern="uniform", rate_pages_per_second=0), 0.1)
    assert rate > 0
    assert int(counters(dom).sum()) > 0
