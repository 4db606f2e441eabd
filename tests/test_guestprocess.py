"""Process vCPUs: machine memory shared with a guest process, the kernel's dirty log over it
(userfaultfd write-protect + PAGEMAP_SCAN), pause at a batch boundary, death with the host."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from nodes.errors import ConfigError
from nodes.host.guestmain import frame_runs
from nodes.host.guestprocess import GuestProcess, check_map_count
from nodes.host.kerneldirty import KernelDirtyLog
from nodes.host.userfault import SIMULATE_ENV, KernelSupportError, expand_regions, kernel_support
from nodes.xen.hypervisor import Hypervisor
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024


def test_frame_runs_and_regions_expand_to_pages():
    runs = frame_runs(np.array([7, 8, 9, 3, 20, 21]))
    assert runs.tolist() == [[0, 7, 3], [3, 3, 1], [4, 20, 2]]
    regions = np.array([[0x1000, 0x3000], [0x5000, 0x6000]], np.uint64)
    assert expand_regions(regions, 0x1000, 4096).tolist() == [0, 1, 4]


def test_a_kernel_without_write_tracking_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(SIMULATE_ENV, "no PAGEMAP_SCAN")
    support = kernel_support()
    assert not support.dirty_log
    with pytest.raises(KernelSupportError) as exc:
        support.require()
    text = str(exc.value)
    assert "\n" not in text and "no PAGEMAP_SCAN" in text and "--vcpu thread works" in text
    hv = Hypervisor("h", 16 * MiB)
    dom = hv.create_domain("g", 1 * MiB, "vp")
    with pytest.raises(KernelSupportError):
        GuestProcess.launch(hv.memory, dom, WorkloadSpec("uniform", 100))


def test_a_guest_needing_too_many_mappings_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="vm.max_map_count") as exc:
        check_map_count("g", 10_000_000)
    assert "\n" not in str(exc.value)
    check_map_count("g", 100)


@pytest.mark.uffd
def test_the_probe_finds_write_tracking_here(uffd_kernel):
    assert uffd_kernel.dirty_log and uffd_kernel.reason == ""
    assert uffd_kernel.via


@pytest.mark.uffd
@pytest.mark.parametrize("mode,spec", [
    ("p==m", WorkloadSpec("uniform", 40_000, seed=1)),
    ("p2m", WorkloadSpec("uniform", 40_000, seed=2)),
    ("vp", WorkloadSpec("uniform", 40_000, seed=3)),
    ("vp", WorkloadSpec("hotset", 40_000, seed=4, write_bytes=512, fill="text")),
    ("vp", WorkloadSpec("sequential", 0, seed=5, write_bytes=4096)),
    ("p2m", WorkloadSpec("phased", 40_000, seed=6, busy_seconds=0.005, quiet_seconds=0.005)),
    ("vp", WorkloadSpec("scan", 40_000, seed=7)),
    ("vp", WorkloadSpec("idle", 0, seed=8)),
])
def test_the_kernel_logs_exactly_the_pages_the_guest_process_wrote(uffd_kernel, mode, spec):
    """Many rounds of run, pause, CLEAN: the kernel's pages are the workload's, in every
    memory mode over scattered frames; the host's own writes are not seen unless marked."""
    hv = Hypervisor("h", 64 * MiB, seed=9, superpages=False)
    hv.create_domain("other", 4 * MiB, "vp")             # frames scattered among another's
    dom = hv.create_domain("g", 8 * MiB, mode)
    if mode != "p==m":
        assert (np.diff(dom.p2m) != 1).mean() > 0.5, "scattered frames"
    with GuestProcess.launch(hv.memory, dom, spec, track_writes=True) as gp:
        gp.wait_running()
        gp.pause()
        log = KernelDirtyLog(gp.pid, gp.uffd, gp.base, dom.npages, hv.page_size)
        log.enable()
        gp.written_pages()                                  # before the log: forget
        totals = []
        for round_ in range(40):
            host_pages = np.array([round_, dom.data_pages - 1 - round_])
            hv.memory.words[dom.p2m[host_pages], 1] += np.uint64(1)
            gp.resume()
            time.sleep(0.002 + 0.001 * (round_ % 5))
            gp.pause()
            kernel = log.clean_pfns()
            wrote = gp.written_pages()
            assert kernel.tolist() == wrote.tolist(), f"round {round_}"
            totals.append(len(wrote))
        if spec.pattern in ("scan", "idle"):
            assert sum(totals) == 0, "a guest that writes nothing is logged writing nothing"
        else:
            assert sum(totals) > 200 and min(totals) >= 0
        log.mark(np.array([3, 5]))
        assert log.clean_pfns().tolist() == [3, 5], "the host marks its own writes"
        log.disable()
        log.close()
        # the workload's counters add up to its writes (the lost-write check), host's aside
        counters = int(hv.memory.words[dom.p2m[:dom.data_pages], 0].sum())
        assert counters == gp.ctl.pages_written_total


@pytest.mark.uffd
def test_the_kernel_logs_exactly_what_every_vcpu_of_a_guest_wrote(uffd_kernel):
    """Three vCPU threads of one process, each on its own pages: one log covers them all."""
    hv = Hypervisor("h", 64 * MiB, seed=3, superpages=False)
    dom = hv.create_domain("g", 8 * MiB, "vp")
    with GuestProcess.launch(hv.memory, dom, WorkloadSpec("hotset", 30_000, seed=1),
                             vcpus=3, track_writes=True) as gp:
        gp.wait_running()
        gp.pause()
        log = KernelDirtyLog(gp.pid, gp.uffd, gp.base, dom.npages, hv.page_size)
        log.enable()
        gp.written_pages()
        for round_ in range(20):
            gp.resume()
            time.sleep(0.003)
            gp.pause()
            assert log.clean_pfns().tolist() == gp.written_pages().tolist(), f"round {round_}"
        each = gp.ctl.vcpu_writes()
        assert len(each) == 3 and min(each) > 0 and sum(each) == gp.ctl.pages_written_total
        log.disable()
        log.close()


@pytest.mark.uffd
def test_pause_lands_at_a_batch_boundary(uffd_kernel):
    """A paused guest writes nothing until resumed. (How long a pause takes, within a
    millisecond as the issue asks, is a figure for the bench, never a test's assertion.)"""
    hv = Hypervisor("h", 64 * MiB, seed=2)
    dom = hv.create_domain("g", 16 * MiB, "vp")
    with GuestProcess.launch(hv.memory, dom, WorkloadSpec("uniform", 0, seed=1)) as gp:
        gp.wait_running()
        waits = []
        for _ in range(30):
            gp.resume()
            time.sleep(0.003)
            waits.append(gp.pause())
            written = gp.ctl.pages_written_total
            time.sleep(0.002)
            assert gp.ctl.pages_written_total == written, "a paused guest writes nothing"
        assert all(w >= 0 for w in waits) and len(waits) == 30


HOST_SCRIPT = """
import sys, time
from nodes.xen.hypervisor import Hypervisor
from nodes.host.guestprocess import GuestProcess, zygote
from workloads.spec import WorkloadSpec
hv = Hypervisor("h", 64 * 1024 * 1024)
gps = [GuestProcess.launch(hv.memory, hv.create_domain(f"g{i}", 4 * 1024 * 1024, "vp"),
                           WorkloadSpec("uniform", 1000)) for i in range(2)]
print(zygote().proc.pid, *[g.pid for g in gps], flush=True)
time.sleep(60)
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.uffd
def test_killing_the_host_leaves_no_guest_process(uffd_kernel):
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        pids = [int(p) for p in host.stdout.readline().split()]
        assert len(pids) == 3 and not any(gone(p) for p in pids)
        host.send_signal(signal.SIGKILL)
        host.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(gone(p) for p in pids):
            time.sleep(0.02)
        assert all(gone(p) for p in pids), "a guest process outlived its host"
    finally:
        host.kill()


def _touch_in_thread(addr: int, out: list) -> threading.Thread:
    """Read 8 bytes at `addr` in a thread, through ctypes (which drops the GIL: a thread
    blocked in a page fault must not hold it)."""
    import ctypes

    def run():
        buf = ctypes.create_string_buffer(8)
        ctypes.memmove(buf, addr, 8)
        out.append(int.from_bytes(buf.raw, "little"))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _faults(uffd, timeout: float = 2.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = uffd.read_faults()
        if got:
            return got
        time.sleep(0.001)
    return []


@pytest.mark.uffd
def test_missing_and_minor_faults_on_machine_memory_are_read_and_resolved(uffd_kernel):
    """Post-copy's two ways on memfd memory: MISSING faults filled by UFFDIO_COPY, MINOR
    faults (the page is in the memfd already, written by the host) mapped by CONTINUE."""
    import mmap

    from nodes.host.userfault import MODE_MINOR, MODE_MISSING, Uffd
    from nodes.xen.memory import MachineMemory
    if not (uffd_kernel.missing_shmem and uffd_kernel.minor_shmem):
        pytest.skip("no MISSING/MINOR faults on shmem here")
    ps = 4096
    mem = MachineMemory(64 * ps)
    view = mmap.mmap(mem.fd, 64 * ps, flags=mmap.MAP_SHARED)
    base = np.frombuffer(view, np.uint8).ctypes.data
    uffd = Uffd.create()
    try:
        uffd.register(base, 32 * ps, MODE_MISSING)
        uffd.register(base + 32 * ps, 32 * ps, MODE_MINOR)
        seen: list[int] = []
        t = _touch_in_thread(base + 5 * ps, seen)
        faults = _faults(uffd)
        assert [f.address for f in faults] == [base + 5 * ps] and seen == []
        page = np.zeros(ps, np.uint8)
        page[:8] = np.frombuffer((1234).to_bytes(8, "little"), np.uint8)
        assert uffd.copy(base + 5 * ps, page.ctypes.data, ps) == ps
        t.join(2)
        assert seen == [1234] and mem.words[5, 0] == 1234, "the copy landed in the memfd"
        mem.words[40, 0] = 99                   # the host's write: in the page cache now
        t = _touch_in_thread(base + 40 * ps, seen)
        faults = _faults(uffd)
        assert [f.address for f in faults] == [base + 40 * ps]
        uffd.continue_(base + 40 * ps, ps)
        t.join(2)
        assert seen == [1234, 99]
    finally:
        uffd.close()


@pytest.mark.uffd
def test_without_capabilities_the_probe_goes_through_dev_userfaultfd(uffd_kernel):
    """vm.unprivileged_userfaultfd=0 refuses userfaultfd(2) to a process without
    CAP_SYS_PTRACE; /dev/userfaultfd (its owner may open it) still gives one."""
    import shutil
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not os.access("/dev/userfaultfd", os.R_OK):
        pytest.skip("needs root (to drop capabilities), setpriv and /dev/userfaultfd")
    code = "from nodes.host.userfault import kernel_support as k; s = k(); print(s.dirty_log, s.via)"
    out = subprocess.run([setpriv, "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c",
                          code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        unprivileged = f.read().strip() == "1"
    want = "userfaultfd(2)" if unprivileged else "/dev/userfaultfd"
    assert out.stdout.strip().split(maxsplit=1) == ["True", want]


def test_the_shared_progress_log_stores_what_a_progress_log_stores():
    """The guest's log writes the control page's words itself (its cheap path); a reader in
    another mapping reads the very records, marks and latest a `ProgressLog` keeps."""
    from nodes.host.guestcontrol import LOG_ENTRIES, ControlPage
    from nodes.host.sharedlog import RECORD_INTERVAL_SECONDS, SharedProgressLog
    from workloads.progresslog import IDLE, SLEPT, ProgressLog

    rng = np.random.default_rng(5)
    ctl = ControlPage.create(16)
    try:
        shared, plain = SharedProgressLog(ctl), ProgressLog(LOG_ENTRIES, RECORD_INTERVAL_SECONDS)
        reader = SharedProgressLog(ControlPage(ctl.fd, 16, False))
        wall, pages = 100.0, 0
        for _ in range(LOG_ENTRIES + 3000):              # it wraps
            wall += float(rng.choice([0.0001, 0.0003, 0.0006, 0.002, 0.05]))
            pages += int(rng.integers(0, 70))
            if rng.random() < 0.3:
                end, mark = wall + float(rng.choice([0.0005, 0.064])), int(rng.choice([SLEPT, IDLE]))
                shared.record_sleep(wall, end, pages, mark)
                plain.record_sleep(wall, end, pages, mark)
                wall = end
            else:
                shared.record(wall, pages)
                plain.record(wall, pages)
        for got, want in zip(reader.mark_arrays(), plain.mark_arrays(), strict=True):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        assert reader.latest == plain.latest and reader.wrapped and plain.wrapped
    finally:
        ctl.close()
