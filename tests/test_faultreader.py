"""Real post-copy faults of a process guest: its missing pages fault (userfaultfd MISSING and
MINOR), the host's FaultReader asks for them once, a fake return path lands them through the
host's own mapping and CONTINUE maps them; the guest never reads a page half-written."""

import collections
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from nodes.host.faultreader import FaultReader, continue_pages
from nodes.host.fdpass import recv_message, send_message
from nodes.host.guestmain import frame_runs, pfn_runs
from nodes.host.userfault import Uffd, kernel_support
from nodes.xen.memory import MachineMemory

pytestmark = [pytest.mark.uffd, pytest.mark.inprocess]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PS = 4096
WORDS = PS // 8

# The guest: maps its frames, registers its missing pages as guestmain does, hands over its
# uffd, then on "go" runs threads that read and write pages (ctypes drops the GIL, so one
# thread blocked in a fault stops no other) and says what it saw.
GUEST = r"""
import ctypes, socket, sys, threading, time
import numpy as np
from nodes.host.fdpass import recv_message, send_message
from nodes.host.guestmain import map_frames, register_postcopy
from nodes.host.userfault import MODE_MISSING, Uffd
sock = socket.socket(fileno=int(sys.argv[1]))
msg, (memfd,) = recv_message(sock)
n, ps = msg["npages"], msg["page_size"]
base = map_frames(memfd, np.frombuffer(msg["runs"], np.int64).reshape(-1, 3), n, ps)
missing = np.unpackbits(np.frombuffer(msg["missing"], np.uint8), count=n).astype(bool)
uffd = Uffd.create()
if msg["mode"] == "minor":
    register_postcopy(uffd, base, missing, ps)
else:
    uffd.register(base, n * ps, MODE_MISSING)
send_message(sock, {"base": base}, [uffd.fd])
go, _ = recv_message(sock)
bad, times = [], []
def run(k):
    buf = ctypes.create_string_buffer(ps)
    order = list(go["reads"]) if go["ordered"] else np.random.default_rng(k).permutation(go["reads"]).tolist()
    for pfn in order:
        t0 = time.perf_counter_ns()
        ctypes.memmove(buf, base + pfn * ps, ps)
        times.append(time.perf_counter_ns() - t0)
        w = np.frombuffer(buf.raw, np.uint64)
        if not (w == np.uint64(pfn) * np.uint64(1000003) + np.arange(len(w), dtype=np.uint64)).all():
            bad.append(pfn)
    val = ctypes.c_uint64()
    for pfn in np.random.default_rng(100 + k).permutation(go["writes"]).tolist():
        val.value = 7_000_000 + 1000 * k + pfn
        ctypes.memmove(base + pfn * ps + 8 * (400 + k), ctypes.byref(val), 8)
threads = [threading.Thread(target=run, args=(k,)) for k in range(go["threads"])]
[t.start() for t in threads]
[t.join() for t in threads]
send_message(sock, {"bad": bad, "times_ns": times})
sock.recv(1)
"""


def pattern(pfns: np.ndarray) -> np.ndarray:
    return (pfns.astype(np.uint64)[:, None] * np.uint64(1000003)
            + np.arange(WORDS, dtype=np.uint64)[None, :])


@pytest.fixture
def minor_kernel():
    s = kernel_support()
    if not (s.dirty_log and s.missing_shmem and s.minor_shmem):
        if os.environ.get("CI"):
            pytest.fail(f"the uffd tier needs MISSING/MINOR faults on shmem: {s.reason}")
        pytest.skip(s.reason or "no MISSING/MINOR faults on shmem here")


class Guest:
    """A guest process over `npages` scattered frames of `mem`, `missing` pages absent:
    half of them holes, half stale copies (MINOR faults)."""

    def __init__(self, mem: MachineMemory, p2m: np.ndarray, missing: np.ndarray,
                 mode: str = "minor"):
        self.mem, self.p2m, self.missing = mem, p2m, missing
        present = np.flatnonzero(~missing)
        mem.words[p2m[present]] = pattern(present)
        gone = np.flatnonzero(missing)
        mem.words[p2m[gone[1::2]]] = np.uint64(0xDEAD)          # stale: MINOR faults
        for mfn in p2m[gone[0::2]].tolist():                     # holes: MISSING faults
            mem.discard(np.array([mfn]), np.array([1]))
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", GUEST, str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], cwd=ROOT)
        theirs.close()
        self.sock = ours
        ours.settimeout(30)
        send_message(ours, {"npages": len(p2m), "page_size": PS, "mode": mode,
                            "runs": frame_runs(p2m).tobytes(),
                            "missing": np.packbits(missing).tobytes()}, [mem.fd])
        reply, (fd,) = recv_message(ours)
        self.base = int(reply["base"])
        self.uffd = Uffd(fd, 0)
        self.map_starts = frame_runs(p2m)[:, 0]

    def go(self, reads: np.ndarray, writes: np.ndarray, threads: int,
           ordered: bool = False) -> None:
        send_message(self.sock, {"reads": reads.tolist(), "writes": writes.tolist(),
                                 "threads": threads, "ordered": ordered})

    def result(self) -> dict:
        return recv_message(self.sock)[0]

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()
        self.uffd.close()


class FakeLanding:
    """The return path and the landing: requested pages queue up; a thread lands them
    (first half, a pause, second half: a window for a half-written page to show) through
    the host's mapping, marks them received, then `on_present` (CONTINUE). A push thread
    lands every missing page in pfn order meanwhile."""

    def __init__(self, mem: MachineMemory, p2m: np.ndarray, received: np.ndarray):
        self.mem, self.p2m, self.received = mem, p2m, received
        self.requested: list[np.ndarray] = []
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.on_present = None

    def request(self, pfns: np.ndarray) -> bool:
        self.requested.append(pfns.copy())
        self.queue.put(pfns.copy())
        return True

    def land(self, pfns: np.ndarray) -> None:
        with self.lock:
            fresh = pfns[~self.received[pfns]]
            if not len(fresh):
                return
            words = pattern(fresh)
            self.mem.words[self.p2m[fresh], :WORDS // 2] = words[:, :WORDS // 2]
            time.sleep(0.0002)
            self.mem.words[self.p2m[fresh], WORDS // 2:] = words[:, WORDS // 2:]
            self.received[fresh] = True
            self.on_present(fresh)

    def serve(self) -> threading.Thread:
        def run():
            while (pfns := self.queue.get()) is not None:
                self.land(pfns)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def push(self, pages_per_step: int = 4, pause: float = 0.002) -> threading.Thread:
        def run():
            for start in range(0, len(self.received), pages_per_step):
                time.sleep(pause)
                self.land(np.arange(start, min(start + pages_per_step, len(self.received))))
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


def open_fds() -> collections.Counter:
    """What this process's descriptors are open on, counted: compared before and after a
    test, a leak is one more of anything (a uffd, a pidfd, a socket); a descriptor some
    earlier test's garbage closes meanwhile is none."""
    out: collections.Counter = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[os.readlink(f"/proc/self/fd/{fd}")] += 1
        except OSError:            # the listing's own, closed by now
            pass
    return out


def no_fd_leaked(before: collections.Counter) -> bool:
    return not (open_fds() - before)


def scattered(npages: int, nframes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(nframes)[:npages].astype(np.int64)


def test_pfn_runs():
    assert pfn_runs(np.array([1, 2, 3, 7, 9, 10])).tolist() == [[1, 3], [7, 1], [9, 2]]
    assert pfn_runs(np.array([], np.int64)).shape == (0, 2)
    cuts = np.zeros(12, bool)
    cuts[[2, 10]] = True
    assert pfn_runs(np.array([1, 2, 3, 9, 10]), cuts).tolist() == [[1, 1], [2, 2], [9, 1],
                                                                   [10, 1]]


def test_faulting_threads_read_whole_pages_and_each_is_asked_for_once(minor_kernel):
    """4 guest threads read and write every page, in their own orders, while pages are
    requested and pushed: each missing page asked for at most once, none asked for that was
    there, every read saw the page whole, every write kept, the histogram filled."""
    n = 256
    mem = MachineMemory(1024 * PS)
    p2m = scattered(n, 1024, 1)
    missing = np.zeros(n, bool)
    missing[np.random.default_rng(2).permutation(n)[:160]] = True
    fds = open_fds()
    guest = Guest(mem, p2m, missing)
    received = ~missing
    land = FakeLanding(mem, p2m, received)
    reader = FaultReader(guest.uffd, guest.base, PS, received, land.request,
                         pid=guest.proc.pid, name="g", map_starts=guest.map_starts).start()
    land.on_present = reader.landed
    server = land.serve()
    try:
        writes = np.arange(0, n, 5)
        guest.go(np.setdiff1d(np.arange(n), writes), writes, threads=4)
        pusher = land.push(pages_per_step=8, pause=0.003)
        out = guest.result()
        pusher.join(10)
        assert out["bad"] == [], "a page was read before it had landed whole"
        asked = np.concatenate(land.requested) if land.requested else np.zeros(0, np.int64)
        assert len(asked) == len(np.unique(asked)), "a page was asked for twice"
        assert missing[asked].all(), "a present page was asked for"
        assert len(asked) > 10 and reader.pages_requested == len(asked)
        assert received.all() and not len(reader.outstanding())
        want = pattern(writes)
        for k in range(4):
            want[:, 400 + k] = 7_000_000 + 1000 * k + writes
        assert (mem.words[p2m[writes]] == want).all(), "a guest's write was lost"
        st = reader.stats()
        assert st["faults"] >= len(asked) and st["blocktime_seconds"] > 0
        assert sum(st["fault_latency_seconds"].values()) == len(asked)
        assert st["fault_latency_mean_seconds"] > 0 and reader.error is None
        # CONTINUE again over pages all mapped now: each skipped (EEXIST), none fails
        cuts = np.zeros(n, bool)
        cuts[guest.map_starts] = True
        assert continue_pages(guest.uffd, guest.base, PS, np.arange(n), cuts) == n
    finally:
        land.queue.put(None)
        server.join(5)
        reader.stop()
        guest.close()
    assert not reader.thread.is_alive() and no_fd_leaked(fds), "a thread or fd leaked"


def test_a_guest_that_dies_while_blocked_stops_the_reader_and_loses_the_postcopy(minor_kernel):
    mem = MachineMemory(128 * PS)
    p2m = np.arange(64, dtype=np.int64)
    missing = np.ones(64, bool)
    fds = open_fds()
    guest = Guest(mem, p2m, missing)
    asked: list = []
    reader = FaultReader(guest.uffd, guest.base, PS, ~missing, asked.append,
                         pid=guest.proc.pid, name="g").start()
    try:
        guest.go(np.arange(64), np.zeros(0, np.int64), threads=2)
        deadline = time.monotonic() + 10
        while not asked and time.monotonic() < deadline:
            time.sleep(0.005)
        assert asked, "the blocked guest's fault was read and asked for"
        guest.proc.kill()
        reader.thread.join(5)
        assert not reader.thread.is_alive() and "exited" in (reader.lost or "")
        reader.landed(asked[0])        # a landing after the death: no error, nothing mapped
    finally:
        reader.stop()
        guest.close()
    assert no_fd_leaked(fds)


def test_a_cancelled_postcopy_stops_the_reader_cleanly(minor_kernel):
    mem = MachineMemory(128 * PS)
    p2m = np.arange(32, dtype=np.int64)
    missing = np.ones(32, bool)
    fds = open_fds()
    guest = Guest(mem, p2m, missing)
    asked: list = []
    reader = FaultReader(guest.uffd, guest.base, PS, ~missing, asked.append,
                         pid=guest.proc.pid).start()
    try:
        guest.go(np.arange(32), np.zeros(0, np.int64), threads=3)
        deadline = time.monotonic() + 10
        while not asked and time.monotonic() < deadline:
            time.sleep(0.005)
        reader.lose("cancelled")
        t0 = time.monotonic()
        reader.stop()
        assert time.monotonic() - t0 < 10 and not reader.thread.is_alive()   # bounded, not timed
        assert reader.lost == "cancelled" and len(reader.outstanding()) >= 1
        assert guest.proc.poll() is None, "the guest is still blocked, its owner stops it"
    finally:
        guest.close()
    assert no_fd_leaked(fds)


def _round_trips(mode: str, npages: int) -> np.ndarray:
    """The guest's touch of each page, one thread, pfn order, the first half missing,
    resolved inline by the reader's thread (MINOR: write the frame, CONTINUE, through
    FaultReader) or by a raw MISSING + UFFDIO_COPY loop (every page missing then)."""
    mem = MachineMemory((npages + 64) * PS)
    p2m = np.arange(npages, dtype=np.int64)
    missing = np.arange(npages) < npages // 2
    guest = Guest(mem, p2m, missing, "missing" if mode == "missing" else "minor")
    received = ~missing
    src = pattern(np.arange(npages))
    if mode == "missing":
        mem.discard(np.array([0]), np.array([npages // 2]))

    def request(pfns):
        mem.words[p2m[pfns]] = src[pfns]
        received[pfns] = True
        reader.landed(pfns)
    reader = FaultReader(guest.uffd, guest.base, PS, received, request, pid=guest.proc.pid)
    stop = threading.Event()
    if mode == "minor":
        reader.start()
    else:
        threading.Thread(target=_bare, args=(guest, mem, src, stop, mode), daemon=True).start()
    try:
        guest.go(np.arange(npages if mode != "missing" else npages // 2), np.zeros(0, np.int64),
                 threads=1, ordered=True)
        out = guest.result()
        assert out["bad"] == []
        return np.array(out["times_ns"]) / 1e9
    finally:
        reader.stop()
        stop.set()
        guest.close()


def _bare(guest: Guest, mem: MachineMemory, src: np.ndarray, stop: threading.Event,
          mode: str) -> None:
    """Faults resolved as bare as Python allows: MISSING by UFFDIO_COPY from a host buffer,
    or MINOR by a write into the frame and UFFDIO_CONTINUE (no FaultReader)."""
    import select
    ep = select.epoll()
    ep.register(guest.uffd.fd, select.EPOLLIN)
    while not stop.is_set():
        if ep.poll(0.1):
            for f in guest.uffd.read_faults():
                pfn = (f.address - guest.base) // PS
                if mode == "missing":
                    guest.uffd.copy(guest.base + pfn * PS, src[pfn].ctypes.data, PS)
                else:
                    mem.words[pfn] = src[pfn]
                    guest.uffd.continue_(guest.base + pfn * PS, PS)
    ep.close()


def test_microbenchmark_fault_round_trip(minor_kernel, capsys):
    """Touch -> fault read -> frame written -> CONTINUE -> touch returns, against the same
    touch of a present page (REFERENCE.md, in C: 3.4 us for MINOR + CONTINUE, 4.4 us for
    MISSING + COPY)."""
    n = 2000
    minor = _round_trips("minor", n)
    copy = _round_trips("missing", n)
    bare = _round_trips("minor-bare", n)
    med = {"minor": minor[:n // 2], "present": minor[n // 2:], "copy": copy,
           "bare": bare[:n // 2]}
    med = {k: float(np.median(v)) * 1e6 for k, v in med.items()}
    p90 = float(np.percentile(minor[:n // 2], 90)) * 1e6
    with capsys.disabled():
        print(f"\nfault round trip, guest touch of a 4 KiB page (median us): MINOR+CONTINUE "
              f"through FaultReader {med['minor']:.1f} (p90 {p90:.1f}), bare loops: "
              f"MINOR+CONTINUE {med['bare']:.1f}, MISSING+COPY {med['copy']:.1f}; "
              f"present page {med['present']:.1f}")
    assert med["minor"] < 2000


def test_a_launched_guest_runs_its_workload_through_real_faults(minor_kernel):
    """GuestProcess.launch(missing=...): the workload (uniform, counters in word 0) resumes
    with half its pages absent, faults them in through the FaultReader while they are also
    pushed, and no write is lost: the counters add up to what it wrote."""
    from nodes.host.guestprocess import GuestProcess
    from nodes.xen.hypervisor import Hypervisor
    from workloads.spec import WorkloadSpec
    hv = Hypervisor("h", 64 * 1024 * 1024, seed=3, superpages=False)
    hv.create_domain("other", 4 * 1024 * 1024, "vp")
    dom = hv.create_domain("g", 4 * 1024 * 1024, "vp")
    n, p2m = dom.npages, dom.p2m
    source = hv.memory.words[p2m].copy()
    source[:dom.data_pages, 0] = np.arange(dom.data_pages) % 5      # counters so far
    missing = np.zeros(n, bool)
    missing[np.random.default_rng(4).permutation(dom.data_pages)[:dom.data_pages // 2]] = True
    hv.memory.words[p2m[~missing]] = source[~missing]
    hv.memory.words[p2m[missing]] = np.uint64(0xBAD)                # stale copies
    received = ~missing
    lock = threading.Lock()

    def land(pfns):
        with lock:
            fresh = pfns[~received[pfns]]
            hv.memory.words[p2m[fresh]] = source[fresh]
            received[fresh] = True
            reader.landed(fresh)
    with GuestProcess.launch(hv.memory, dom, WorkloadSpec("uniform", 20_000, seed=5),
                             missing=missing) as gp:
        reader = FaultReader(gp.uffd, gp.base, hv.page_size, received, land, pid=gp.pid,
                             name="g", map_starts=gp.map_starts).start()
        try:
            gp.wait_running()
            time.sleep(0.1)
            for start in range(0, n, 16):                      # the background push
                land(np.arange(start, min(start + 16, n)))
            time.sleep(0.1)
            gp.pause(timeout_seconds=30)   # what is tested is that no write is lost, not
            # how soon a vCPU is scheduled to park on a loaded machine (1 s missed once)
            assert received.all() and reader.pages_requested > 0 and reader.error is None
            counters = int(hv.memory.words[p2m[:dom.data_pages], 0].sum())
            before = int(source[:dom.data_pages, 0].sum())
            assert counters - before == gp.ctl.pages_written_total > 0, "a write was lost"
            reader.finish()
        finally:
            reader.stop()
