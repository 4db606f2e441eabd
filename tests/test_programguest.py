"""Program workloads in guest processes (issue 23): each program's state survives a migration
(it continues there, its own invariants hold, its report carries what its application felt),
by pre-copy and, for the key-value store, by post-copy; the kernel's dirty log catches every
page each program changes."""

import time

import numpy as np
import pytest

from cluster.timeline import timeline_figure
from nodes.host.guestprocess import GuestProcess
from nodes.host.kerneldirty import KernelDirtyLog
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.xen.hypervisor import Hypervisor
from workloads.spec import PROGRAMS, WorkloadSpec

MiB = 1024 * 1024


@pytest.fixture
def pair(in_process, uffd_kernel):
    return in_process(hosts=2, host_memory_bytes=64 * MiB)


def wait_ops(host, name: str, more_than: int, timeout: float = 20.0) -> int:
    """The guest's completed operations, once above `more_than` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while (ops := host.call("guest_status", name)["progress_pages_total"]) <= more_than:
        assert time.monotonic() < deadline, f"{name} completed no operation on {host.name}"
        time.sleep(0.01)
    return ops


@pytest.mark.uffd
@pytest.mark.parametrize("program,algorithm,vcpus", [(p, "precopy", 1) for p in PROGRAMS]
                         + [("kvstore", "postcopy", 1), ("sort", "precopy", 2)])
def test_a_program_migrates_and_its_state_survives(pair, program, algorithm, vcpus):
    tb = pair
    tb.create("host-0", GuestSpec("g", 4 * MiB, "p2m", vcpu="process", vcpus=vcpus,
                                  workload=WorkloadSpec(program, ops_per_second=3000, seed=2)))
    wait_ops(tb.host("host-0"), "g", 900)           # 0.3 s: a whole 100 ms window before
    settings = {"link_bytes_per_second": 64 * MiB}
    if algorithm == "postcopy":
        settings["postcopy_after_rounds"] = 0
    report = tb.migrate("g", "host-1", MigrationSettings(**settings),
                        application_after_seconds=0.2)
    assert report.status == "completed", report.error
    assert report.integrity.verified is True
    if algorithm == "postcopy":
        assert report.postcopy is not None
    app = report.application
    assert app is not None and app.error is None and app.program == program
    assert app.invariants_ok is True, app.invariants
    assert app.vcpus == vcpus and len(app.invariants) == vcpus
    assert app.before["ops"] > 0 and app.after["ops"] > 0, (app.before, app.after, app.samples)
    assert app.blackout_seconds is not None and app.blackout_seconds > 0
    assert app.samples and any(s.get("app_ops_per_second") for s in report.progress_history)
    ops = wait_ops(tb.host("host-1"), "g", 0)
    wait_ops(tb.host("host-1"), "g", ops)             # it goes on there
    again = tb.host("host-1").call("guest_application", "g")
    assert again["ok"], again["checks"]
    assert again["ops_total"] >= ops
    if (program, algorithm) == ("kvstore", "precopy"):      # the timeline draws it
        fig = timeline_figure([report])
        assert fig.findobj(lambda a: a.get_gid() == "app-ops")
    text = tb.host("host-1").service.metrics.render().decode()     # in-process host
    assert 'migbed_guest_app_operations_total{guest="g"' in text
    assert 'migbed_migration_app_blackout_seconds_count{guest="g"' in text


@pytest.mark.uffd
@pytest.mark.parametrize("program", PROGRAMS)
def test_the_kernel_logs_every_page_a_program_changes(uffd_kernel, program):
    """Rounds of run, pause, CLEAN: every page whose bytes changed in a round is in the
    kernel's log of that round (a program stores through numpy, not a write path)."""
    hv = Hypervisor("h", 32 * MiB, seed=4, superpages=False)
    dom = hv.create_domain("g", 4 * MiB, "vp")
    frames = hv.memory.frames
    with GuestProcess.launch(hv.memory, dom, WorkloadSpec(program, seed=1)) as gp:
        gp.wait_running()
        time.sleep(0.05)
        gp.pause()
        log = KernelDirtyLog(gp.pid, gp.uffd, gp.base, dom.npages, hv.page_size)
        log.enable()
        changed_total = 0
        for round_ in range(8):
            before = frames[dom.p2m].copy()
            gp.resume()
            time.sleep(0.01)
            gp.pause()
            logged = set(log.clean_pfns().tolist())
            changed = np.flatnonzero((frames[dom.p2m] != before).any(axis=1))
            assert set(changed.tolist()) <= logged, f"round {round_}: a change not logged"
            changed_total += len(changed)
        assert changed_total > 0, "the program changed memory"
        log.disable()
        log.close()
