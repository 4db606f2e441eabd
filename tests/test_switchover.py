"""Where the switch-over is decided: the qemu policy as QEMU's migration thread decides it
(windows, threshold, the sync rule, dirty-sync-count), fed synthetic streams of windows; then
the engine and the analytic model running the same rules on the same migrations."""

import pytest
from checks import frames_exact

from cluster.model import predict
from nodes.host.specs import GuestSpec
from nodes.migration.decide.policy import Action, PrecopyStats, QemuPolicy, StopCode
from nodes.migration.send.dirtysync import SyncLog
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
PAGE = 4096


def stats(pending_pages: int, iteration: int = 0) -> PrecopyStats:
    return PrecopyStats(iteration=iteration, dirty_count=pending_pages, total_written=0,
                        guest_pages=16384, page_size=PAGE)


def qemu(limit: float = 0.3) -> QemuPolicy:
    p = QemuPolicy(downtime_limit_seconds=limit)
    p.start(0.0, 0)
    return p


def test_the_threshold_is_zero_until_the_first_window_closes():
    p = qemu()
    assert p.threshold_bytes == 0
    assert p.decide(stats(1)).action is Action.CONTINUE, "one page pending: not before data"
    assert not p.wants_exact(0), "no sync below a threshold of 0"
    assert not p.window_closed(0.099, 10 * MiB, 0, False), "a window lasts 100 ms"
    assert p.threshold_bytes == 0
    assert p.window_closed(0.1, int(12.8 * MiB), 0, False)
    assert p.bandwidth_bytes_per_second == pytest.approx(128 * MiB)
    assert p.threshold_bytes == pytest.approx(128 * MiB * 0.3)


def test_nothing_pending_completes_even_before_the_first_window():
    d = qemu().decide(stats(0))
    assert d.action is Action.STOP_AND_COPY and d.stop_code is StopCode.FITS_DOWNTIME


def test_each_window_measures_only_its_own_bytes():
    p = qemu()
    assert p.window_closed(0.1, 10 * MiB, 0, False)
    assert p.window_closed(0.25, 10 * MiB + int(0.15 * 20 * MiB), 0, False)
    assert p.bandwidth_bytes_per_second == pytest.approx(20 * MiB)
    assert p.threshold_bytes == pytest.approx(20 * MiB * 0.3)


def test_the_sync_rule_estimate_below_then_exact_below():
    p = qemu()
    p.window_closed(0.1, int(12.8 * MiB), 0, False)          # threshold 38.4 MiB
    threshold_pages = p.threshold_bytes / PAGE
    above, below = int(threshold_pages) + 10, int(threshold_pages) - 10
    assert not p.wants_exact(above * PAGE), "estimate above: no sync"
    assert p.wants_exact(below * PAGE), "estimate below: sync"
    # After the sync the exact count decides: still below completes, above goes on.
    assert p.decide(stats(below)).action is Action.STOP_AND_COPY
    assert p.decide(stats(above)).action is Action.CONTINUE


def test_expected_downtime_as_qemu_computes_it():
    p = qemu(0.3)
    assert p.expected_downtime_seconds == 0.3, "starts at the downtime limit"
    p.window_closed(0.1, 10 * MiB, dirty_bytes_last_sync=5 * MiB, dirty_rate_known=False)
    assert p.expected_downtime_seconds == 0.3, "no dirty rate measured yet"
    p.window_closed(0.2, 20 * MiB, dirty_bytes_last_sync=5 * MiB, dirty_rate_known=True)
    assert p.expected_downtime_seconds == pytest.approx(5 * MiB / (100 * MiB))


def test_the_pass_cap_still_stops_a_guest_that_never_fits():
    p = QemuPolicy(downtime_limit_seconds=0.3, max_iterations=3)
    p.start(0.0, 0)
    d = p.decide(stats(10_000, iteration=3))
    assert d.action is Action.STOP_AND_COPY and d.stop_code is StopCode.MAX_ITERATIONS


def test_dirty_sync_count_is_one_after_setup_and_one_per_sync():
    log = SyncLog(PAGE, 100, now=0.0)
    assert log.count == 1 and log.dirty_bytes_last_sync == 100 * PAGE
    assert log.synced(0.5, dirtied_pages=10, pending_pages=40, bytes_sent=0) is None
    period = log.synced(1.2, dirtied_pages=20, pending_pages=30, bytes_sent=8 * MiB)
    assert log.count == 3 and log.dirty_bytes_last_sync == 30 * PAGE
    assert period.dirtied_pages == 30 and period.seconds == pytest.approx(1.2)
    assert log.dirty_pages_per_second == pytest.approx(25)


# -- the engine and the model, on the same migrations ------------------------------------------
@pytest.fixture
def pair(in_process):
    return in_process(hosts=2)


def test_qemu_switches_mid_pass_when_the_rest_fits(pair):
    """A 16 MiB idle guest whose memory has content at a 32 MiB/s rate limit: the pass takes
    0.5 s, and the switch comes once what is left fits 32 MiB/s x 300 ms, in the middle."""
    tb = pair
    tb.create("host-0", GuestSpec("m", 16 * MiB, workload=WorkloadSpec("idle", fill="random")))
    limit = 32 * MiB
    s = MigrationSettings(policy="qemu", rate_limit_bytes_per_second=limit)
    r = tb.migrate("m", "host-1", s)
    assert r.status == "completed" and r.integrity.verified
    pages = 16 * MiB // PAGE
    first, final = r.rounds[0], r.rounds[-1]
    assert r.live_rounds == 1 and 0 < first["pages_sent"] < pages, "the pass was cut short"
    assert first["pages_sent"] + final["pages_sent"] == pages, "idle: the rest, once"
    assert final["pages_sent"] * PAGE < limit * 0.3
    assert r.stop_code == "fits-downtime"
    assert r.dirty_sync_count == 3, "setup, the sync that found it fits, stop-and-copy"
    assert first["throughput_bytes_per_second"] < limit * 1.15, "QEMU's window budget"
    # The model, on the same settings, runs the same rules.
    m = predict(guest_memory_bytes=16 * MiB, workload=WorkloadSpec("idle", fill="random"),
                link_bytes_per_second=None, rate_limit_bytes_per_second=limit,
                policy="qemu")
    assert m.live_rounds == 1 and m.dirty_sync_count == 3
    assert m.rounds[0].pages_sent == pytest.approx(first["pages_sent"], rel=0.2)
    frames_exact(tb)


def test_xen_counts_its_cleans_as_syncs(pair):
    tb = pair
    tb.create("host-0", GuestSpec("x", 4 * MiB))
    r = tb.migrate("x", "host-1", MigrationSettings(policy="xen"))
    assert r.live_rounds == 1 and r.stop_code == "dirty-threshold"
    assert r.dirty_sync_count == 3, "setup, round 0's CLEAN, stop-and-copy's"
    m = predict(guest_memory_bytes=4 * MiB, workload=WorkloadSpec("idle"),
                link_bytes_per_second=512 * MiB, policy="xen")
    assert m.dirty_sync_count == r.dirty_sync_count


def test_a_guest_that_fits_at_once_is_still_sent_live_first(pair):
    tb = pair
    tb.create("host-0", GuestSpec("f", 8 * MiB, workload=WorkloadSpec("uniform", 2000)))
    r = tb.migrate("f", "host-1", MigrationSettings(policy="qemu",
                                                    link_bytes_per_second=256 * MiB))
    assert r.status == "completed" and r.integrity.verified
    assert r.live_rounds >= 1 and r.rounds[0]["pages_sent"] > 0
    assert r.stop_code == "fits-downtime"
