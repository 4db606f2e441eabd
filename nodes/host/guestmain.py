"""Inside a guest process: map the guest's frames, make its userfaultfd, run its workload.

A process vCPU is a child of its host's zygote (`python -m nodes.host.guestmain`, started by
`nodes.host.guestprocess`): the zygote imports numpy and the workloads once, then forks one
guest per request, so their pages are shared and each guest costs little memory of its own.

The guest maps its frames of the host's memfd at one virtual range, pfn i at base + i pages,
the way its memory mode says: P==M its one contiguous machine run; P2M by its own P2M table,
which it coalesces into runs; VP by the runs the hypervisor built for it. One `mmap(MAP_FIXED)`
per run. Then it creates its userfaultfd (it belongs to this process's memory), registers the
range for async write-protect and hands the uffd to the host; the host drives dirty logging
from there (`nodes.host.kerneldirty`). A guest resumed by a post-copy switch is told which of
its pages are still missing: it maps the present ones at once (`register_postcopy`) and
registers the range for MISSING and MINOR faults instead, which the host's
`nodes.host.faultreader.FaultReader` reads and resolves.

The workload is the same `workloads` class a thread vCPU runs, over a `MappedGuest` whose
reads and writes are numpy over the mapping: no Python per page, and the kernel sees every
store. Its vCPUs are threads (`nodes.host.guestvcpu`: one per vCPU, each on its own pages,
parked at a batch boundary when told to pause through the control page,
`nodes.host.guestcontrol`); the main thread only watches the host, and the process exits
when its host's end of the socket closes (the host died, or stopped the guest: no orphan,
whichever thread of the host made it).
"""

import ctypes
import ctypes.util
import gc
import mmap
import os
import signal
import socket
import sys
import threading
import time
import traceback

# The zygote (this module run as a program) keeps OpenSSL out: numpy.random imports hashlib,
# whose `_hashlib` maps libcrypto, 1.45 MiB of the zygote's PSS (measured here) that its
# guests share; a guest hashes nothing, and hashlib falls back to its built-in algorithms.
if __name__ == "__main__":
    sys.modules.setdefault("_hashlib", None)

import numpy as np

from nodes.host.fdpass import PeerGone, recv_message, send_message
from nodes.host.guestcontrol import ControlPage, State
from nodes.host.guestvcpu import VCPUSet, split_pages
from nodes.host.userfault import MODE_MINOR, MODE_MISSING, MODE_WP, Uffd
from workloads.progresslog import IDLE
from workloads.spec import WorkloadSpec

_PROT_NONE, _PROT_RW = 0, 3
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 1, 2, 0x10, 0x20, 0x4000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_POPULATE_WRITE = 23                  # Linux 5.14


def frame_runs(p2m: np.ndarray) -> np.ndarray:
    """A P2M table (pfn -> mfn) as runs of frames adjacent in both: (k, 3) int64 rows of
    (first pfn, first mfn, frames). One mapping per run."""
    p2m = np.asarray(p2m, dtype=np.int64)
    if not len(p2m):
        return np.zeros((0, 3), np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(p2m) != 1) + 1))
    counts = np.diff(np.append(starts, len(p2m)))
    return np.stack([starts, p2m[starts], counts], axis=1)


def map_frames(memfd: int, runs: np.ndarray, npages: int, page_size: int) -> int:
    """Map the runs of the memfd's frames at pfn order in one fresh range: its address."""
    size = npages * page_size
    base = _libc.mmap(None, size, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE,
                      -1, 0)
    _check_map(base, "reserving the guest's range")
    for pfn, mfn, count in runs.tolist():
        at = _libc.mmap(base + pfn * page_size, count * page_size, _PROT_RW,
                        _MAP_SHARED | _MAP_FIXED, memfd, mfn * page_size)
        _check_map(at, f"mapping frames {mfn}..{mfn + count - 1}")
    return base


def pfn_runs(pfns: np.ndarray, cuts: np.ndarray | None = None) -> np.ndarray:
    """Sorted pfns as (k, 2) int64 rows of (first pfn, pages): one row per run of neighbours,
    and a new run at each pfn where `cuts` (one bool per pfn) is set."""
    pfns = np.asarray(pfns, dtype=np.int64)
    if not len(pfns):
        return np.zeros((0, 2), np.int64)
    jump = np.diff(pfns) != 1
    if cuts is not None:
        jump |= cuts[pfns[1:]]
    starts = np.concatenate(([0], np.flatnonzero(jump) + 1))
    return np.stack([pfns[starts], np.diff(np.append(starts, len(pfns)))], axis=1)


def register_postcopy(uffd: Uffd, base: int, missing: np.ndarray, page_size: int) -> None:
    """Make the guest's range fault where its pages are missing (`missing`: one bool per
    pfn), before the guest runs a single instruction.

    MISSING and MINOR both: a missing page whose frame is a hole faults as MISSING, one whose
    frame holds a stale copy (or the landing's half-written page) as MINOR; the host resolves
    either with UFFDIO_CONTINUE once the whole page is in its frame, never before. A page
    faults until this process has a page-table entry for it, so the present pages are mapped
    first (MADV_POPULATE_WRITE, a run per call): they must never fault."""
    for pfn, count in pfn_runs(np.flatnonzero(~missing)).tolist():
        if _libc.madvise(base + pfn * page_size, count * page_size, _MADV_POPULATE_WRITE):
            err = ctypes.get_errno()
            raise OSError(err, f"mapping present pages {pfn}..{pfn + count - 1}: "
                          f"{os.strerror(err)}")
    uffd.register(base, len(missing) * page_size, MODE_MISSING | MODE_MINOR)


def _check_map(addr: int | None, what: str) -> None:
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class MappedGuest:
    """The `workloads.guest.Guest` protocol over the guest's own mapping of its frames (or a
    vCPU's slice of them, `part`)."""

    def __init__(self, name: str, frames: np.ndarray, data_pages: int, pfn_base: int,
                 written: np.ndarray | None, address: int):
        self.frames = frames
        self.address = address       # of frames[0] (the native paced loop writes there)
        self.words = frames.view(np.uint64)
        self.name, self.data_pages, self.pfn_base = name, data_pages, pfn_base
        self.lock = threading.RLock()
        self.running = threading.Event()
        self.running.set()
        self.written = written       # one byte a page, set where the workload wrote (tests)

    @classmethod
    def at(cls, name: str, base: int, npages: int, data_pages: int, pfn_base: int,
           page_size: int, written: np.ndarray | None) -> "MappedGuest":
        """The guest's whole mapping, pfn 0 at address `base`."""
        buf = (ctypes.c_uint8 * (npages * page_size)).from_address(base)
        frames = np.frombuffer(buf, np.uint8).reshape(npages, page_size)
        return cls(name, frames, data_pages, pfn_base, written, base)

    def part(self, lo: int, hi: int) -> "MappedGuest":
        """Data pages lo..hi-1 alone, as a guest of their own (one vCPU's share)."""
        return MappedGuest(self.name, self.frames[lo:hi], hi - lo, self.pfn_base + lo,
                           None if self.written is None else self.written[lo:hi],
                           self.address + lo * self.frames.shape[1])

    @property
    def is_running(self) -> bool:
        return True                  # a pause parks the whole loop, between batches

    def read_words(self, pfns: np.ndarray, word: int | np.ndarray) -> np.ndarray:
        return self.words[pfns - self.pfn_base if self.pfn_base else pfns, word]

    def write_words(self, pfns: np.ndarray, word: int | np.ndarray, values: np.ndarray) -> None:
        rel = pfns - self.pfn_base if self.pfn_base else pfns
        self.words[rel, word] = values
        if self.written is not None:
            self.written[rel] = 1

    def write_bytes(self, pfns: np.ndarray, offset: int, data: np.ndarray) -> None:
        rel = pfns - self.pfn_base
        self.frames[rel, offset:offset + data.shape[1]] = data
        if self.written is not None:
            self.written[rel] = 1


def _map_and_register(msg: dict, memfd: int) -> tuple[int, int, float, Uffd]:
    """Map the frames as the host said, make the uffd and register the range for async
    write-protect: (base, runs, seconds mapping took, uffd)."""
    npages, page_size = msg["npages"], msg["page_size"]
    t0 = time.perf_counter()
    runs = (frame_runs(np.frombuffer(msg["p2m"], np.int64)) if msg["p2m"] is not None
            else np.frombuffer(msg["runs"], np.int64).reshape(-1, 3))
    base = map_frames(memfd, runs, npages, page_size)
    os.close(memfd)
    map_seconds = time.perf_counter() - t0
    uffd = Uffd.create()
    if msg.get("missing") is not None:         # resumed by a post-copy switch
        missing = np.unpackbits(np.frombuffer(msg["missing"], np.uint8), count=npages)
        register_postcopy(uffd, base, missing.astype(bool), page_size)
    else:
        uffd.register(base, npages * page_size, MODE_WP)
    return base, len(runs), map_seconds, uffd


def guest_main(sock: socket.socket) -> None:
    """One guest, from its setup message to its exit (see the module docstring). A guest
    launched parked (a migration's destination) has its vCPUs parked, given states later."""
    msg, fds = recv_message(sock)
    memfd, ctlfd = fds
    ctl = ControlPage(ctlfd, msg["npages"], msg["track_writes"])
    try:
        base, runs, map_seconds, uffd = _map_and_register(msg, memfd)
    except OSError as exc:
        ctl.set_state(State.FAILED)
        send_message(sock, {"error": str(exc)})
        return
    guest = MappedGuest.at(msg["name"], base, msg["npages"], msg["data_pages"],
                           msg["pfn_base"], msg["page_size"], ctl.written)
    states = msg["states"]
    parts = [guest.part(lo, hi) for lo, hi in split_pages(guest.data_pages, len(states))]
    try:
        vcpus = VCPUSet(ctl, parts, WorkloadSpec(**msg["workload"]), states,
                        msg["page_size"], msg["max_batch_pages"], msg["tick_seconds"])
    except BaseException as exc:
        ctl.set_state(State.FAILED)
        send_message(sock, {"error": f"{type(exc).__name__}: {exc}"})
        raise
    send_message(sock, {"pid": os.getpid(), "base": base, "runs": runs,
                        "map_seconds": map_seconds, "features": uffd.features,
                        "via": uffd.via}, [uffd.fd])
    vcpus.start()
    _serve_host(sock, uffd, base, msg["npages"], msg["page_size"])


def _serve_host(sock: socket.socket, uffd: Uffd, base: int, npages: int,
                page_size: int) -> None:
    """The main thread, while the vCPUs run on theirs: exit the moment the host's end of
    the socket closes (the host died, or stopped the guest) or it says anything but a
    request it knows: no orphan, whichever thread of the host made it.

    The one request: `postcopy` (a migration's destination switched to post-copy while this
    process was parked for it), its pages not yet arrived as a bitmap: the range leaves
    write-protect and is armed for faults as a process launched for the switch would arm it
    (`register_postcopy`), so the switch wakes this process instead of launching one
    (measured: a launch ~10 ms inside the switch's downtime)."""
    try:
        while True:
            msg, _ = recv_message(sock)
            if msg.get("op") != "postcopy":
                return
            try:
                missing = np.unpackbits(np.frombuffer(msg["missing"], np.uint8), count=npages)
                uffd.unregister(base, npages * page_size)
                register_postcopy(uffd, base, missing.astype(bool), page_size)
                send_message(sock, {"ok": True})
            except (OSError, ValueError) as exc:
                send_message(sock, {"error": str(exc)})
    except BaseException:  # noqa: BLE001 - the host gone or confused: exit, no orphan
        pass
    finally:
        os._exit(0)


# -- the zygote ---------------------------------------------------------------------------------
def warm_up(batches: int = 100, pages: int = 64, page_size: int = 4096) -> None:
    """Run a small guest's batch path in the zygote, before any fork: the interpreter has
    specialised its code by then (Python 3.11 rewrites a function's bytecode in place over
    its first calls), so each guest does not copy those pages to write them again."""
    buf = mmap.mmap(-1, pages * page_size)
    ctl = ControlPage.create(pages, False)
    try:
        guest = MappedGuest("warm-up", np.frombuffer(buf, np.uint8).reshape(pages, page_size),
                            pages, 0, None, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        vcpus = VCPUSet(ctl, [guest], WorkloadSpec("uniform", 1000.0, seed=1), [None],
                        page_size, 256, 0.001)
        vcpu, now = vcpus.vcpus[0], 0.0
        vcpu.wl.resume(now)
        for _ in range(batches):
            now += 0.064
            written = vcpu.wl.write(guest, now, 256)
            vcpus.batch_done(vcpu, written, written, False)
            vcpu._throttle(written)
            vcpus.log.record_sleep(now, now, vcpus.progress, IDLE)
        if vcpu.pacer is not None:
            # The native loop's Python side too: its plan, its call, its return. A throttle
            # hands back at the first wake-up (1 ms), so each run is one plan.
            ctl.set_throttle(1, 0, 0.0)
            for _ in range(10):
                vcpu._run_native()
            ctl.set_throttle(0, 0, 0.0)
    finally:
        ctl.close()


def zygote_main(fd: int) -> None:
    """Fork a guest per request on socket `fd` until the host closes it; reply its pid."""
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)       # guests are reaped by the kernel
    warm_up()
    gc.collect()
    # The imports' garbage handed back to the kernel (measured: 0.8 MiB of the zygote's
    # 16.8 MiB heap), so it is no page every guest shares and its memory counts.
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
    gc.freeze()                 # the heap stays shared: the collector leaves it untouched
    while True:
        try:
            _msg, fds = recv_message(sock)
        except PeerGone:
            return
        pid = os.fork()
        if pid == 0:
            sock.close()
            code = 0
            try:
                guest_main(socket.socket(fileno=fds[0]))
            except BaseException:               # noqa: BLE001 - reported, then exit
                traceback.print_exc()
                code = 1
            os._exit(code)
        for f in fds:
            os.close(f)
        send_message(sock, {"pid": pid})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--zygote":
        sys.exit("usage: python -m nodes.host.guestmain --zygote FD")
    zygote_main(int(sys.argv[2]))
