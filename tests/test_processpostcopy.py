"""Post-copy and hybrid migration of a process guest, with real faults: at the switch the
destination's guest process runs with its missing pages registered with userfaultfd, the host's
`FaultReader` asks the source for what it faults on and maps each page once it has landed;
every migration verifies and the guest goes on writing. A post-copy whose source dies loses
the guest and leaves no process or frame; a cut link pauses it and `recover` completes it."""

import time

import pytest
from checks import frames_exact, wait_progress
from test_processguest import counters_hold, guest_processes

from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
LINK = 64 * MiB
PATTERNS = ("uniform", "hotset", "sequential")


@pytest.fixture
def pair(in_process, uffd_kernel):
    return in_process(hosts=2, host_memory_bytes=64 * MiB)


def process_guest(tb, pattern: str, name: str = "g") -> None:
    """A process guest with content (so the push, which sends zero pages for nothing, does
    not land every page before the guest touches one)."""
    spec = WorkloadSpec(pattern, 20000, seed=3, hot_fraction=0.1, busy_seconds=0.05,
                        quiet_seconds=0.05, fill="random")
    tb.create("host-0", GuestSpec(name, 4 * MiB, workload=spec, vcpu="process"))
    time.sleep(0.05)


def postcopy(after: int, **kw) -> MigrationSettings:
    kw = {"link_bytes_per_second": LINK, "timeout_seconds": 5.0,
          "postcopy_bandwidth_bytes_per_second": 8 * MiB, **kw}
    return MigrationSettings(postcopy_after_rounds=after, **kw)


def switched_and_verified(r, tb, pattern: str) -> None:
    assert r.status == "completed", (r.error, r.notes)
    assert r.stop_code == "postcopy" and r.integrity.verified is True
    assert (r.vcpu, r.dirty_log) == ("process", "kernel")
    b = r.postcopy
    assert b["pages_applied"] == b["discard_pages"], "every missing page landed"
    assert b["pages_applied_more_than_once"] == 0 and b["duplicates_dropped"] == 0
    assert b["pages_requested"] + b["pages_pushed"] == b["discard_pages"], "each page once"
    # One latency sample per page the destination asked for and saw land; the source counts
    # only the requests it read before its push ended (a request in flight when the page
    # lands by push is timed here but not counted there).
    assert sum(b["fault_latency_seconds"].values()) <= b["pages_faulted"]
    assert r.postcopy_requests <= b["pages_faulted"]
    dst = tb.host("host-1")
    status = dst.call("guest_status", "g")
    assert status["mode"] == "p2m" and status["state"] == "running" and not status["migrating"]
    assert status["vcpu"] == "process"
    assert tb.where("g") == "host-1"
    wait_progress(dst, "g")
    counters_hold(dst, "g")
    frames_exact(tb)


@pytest.mark.uffd
@pytest.mark.parametrize("pattern", PATTERNS)
def test_pure_postcopy_of_a_process_guest_faults_for_real(pair, pattern):
    tb = pair
    process_guest(tb, pattern)
    r = tb.migrate("g", "host-1", postcopy(0))
    switched_and_verified(r, tb, pattern)
    assert r.live_rounds == 0 and r.postcopy["discard_pages"] == 1024
    assert r.postcopy["faults"] > 0 and r.postcopy_requests > 0, "the guest faulted"
    assert r.postcopy["fault_latency_mean_seconds"] > 0


@pytest.mark.uffd
@pytest.mark.parametrize("pattern", PATTERNS)
def test_hybrid_of_a_process_guest(pair, pattern):
    tb = pair
    process_guest(tb, pattern)
    r = tb.migrate("g", "host-1", postcopy(1, link_bytes_per_second=16 * MiB,
                                           downtime_limit_seconds=0.001))
    switched_and_verified(r, tb, pattern)
    assert r.live_rounds == 1


@pytest.mark.uffd
def test_a_process_guest_migrates_again_after_its_postcopy(pair):
    """After the post-copy its range is dirty-logged again: a pre-copy back verifies."""
    tb = pair
    process_guest(tb, "uniform")
    switched_and_verified(tb.migrate("g", "host-1", postcopy(0)), tb, "uniform")
    r = tb.migrate("g", "host-0", MigrationSettings(link_bytes_per_second=4 * LINK,
                                                    downtime_limit_seconds=0.01))
    assert r.status == "completed" and r.integrity.verified is True, r.error
    assert tb.where("g") == "host-0"
    wait_progress(tb.host("host-0"), "g")
    frames_exact(tb)


@pytest.mark.uffd
def test_a_postcopy_whose_source_dies_loses_the_guest_and_leaks_nothing(pair):
    tb = pair
    process_guest(tb, "hotset")
    before = guest_processes()
    r = tb.migrate("g", "host-1", postcopy(0, timeout_seconds=1.0,
                                           faults=("kill-source@postcopy",)))
    assert r.status == "failed" and r.guest_lost and r.guest_host is None
    assert "g" not in tb.host("host-1").service.guest_frames()
    deadline = time.monotonic() + 5
    while guest_processes() - before:       # the destination's (prepared, then relaunched)
        assert time.monotonic() < deadline, "a guest process left behind"
        time.sleep(0.05)
    frames_exact(tb)


@pytest.mark.uffd
def test_a_cut_link_pauses_a_process_guest_and_recover_completes_it(pair):
    tb = pair
    process_guest(tb, "uniform")
    r = tb.migrate("g", "host-1", postcopy(0, timeout_seconds=1.0,
                                           faults=("cut-link@postcopy",)))
    assert r.status == "postcopy-paused" and r.guest_host == "host-1", r.error
    r = tb.recover("g")
    b = r.postcopy
    assert r.status == "completed" and r.integrity.verified and b["recoveries"] == 1
    assert b["pages_applied"] == b["discard_pages"] and b["pages_applied_more_than_once"] == 0
    wait_progress(tb.host("host-1"), "g")
    counters_hold(tb.host("host-1"), "g")
    frames_exact(tb)



@pytest.mark.uffd
def test_the_switch_arms_the_parked_process_instead_of_launching_one(pair, monkeypatch):
    """The destination's process, launched parked when the stream opened, is the one that
    runs after the switch: one launch for the migration, none inside the switch."""
    from nodes.host.guestprocess import GuestProcess
    tb = pair
    process_guest(tb, "uniform")
    launches = []
    real = GuestProcess.launch.__func__

    def counted(cls, *a, **kw):
        launches.append(kw.get("missing") is not None)
        return real(cls, *a, **kw)
    monkeypatch.setattr(GuestProcess, "launch", classmethod(counted))
    switched_and_verified(tb.migrate("g", "host-1", postcopy(0)), tb, "uniform")
    assert launches == [False], "launched once, parked, at the stream's start"
