"""A process guest's post-copy faults, for real: the host thread that reads its userfaultfd,
asks the source for the pages, and maps them into the guest once they have landed.

Why MINOR faults resolved by UFFDIO_CONTINUE (and not MISSING + UFFDIO_COPY): the landing
already writes every page into its frame through the host's own mapping of the memfd, from
the socket straight into the frame when it can (`nodes.migration.receive.landing`); CONTINUE
then only installs the guest's page-table entries for what is in the page cache and wakes its
waiting threads: no second copy, one ioctl per run of pages. UFFDIO_COPY would need each page
in a buffer of the host's first and copies it again into the guest (and a page the host wrote
into the memfd no longer faults in MISSING mode at all). Measured here (REFERENCE.md, and
`tests/test_faultreader.py`'s microbenchmark): CONTINUE's round trip is the shorter one too.

The guest registers its range for MISSING *and* MINOR faults (`guestmain.register_postcopy`):
a missing page faults whether its frame is a hole (MISSING) or holds a stale or half-landed
copy (MINOR), and it stays unmapped in the guest until CONTINUE, which the host issues only
after the whole page is in its frame: the guest never sees a page half-written.

`FaultReader` is the `MissingPageFaults` of `nodes.migration.postcopy.pagefault` for a process
guest, as `PageFaults` is for a thread vCPU: the post-copy destination builds it by a factory,
hands `landed` to the landing as its `on_present`, and reads `outstanding` after a reconnect
and its measures (`latency` from the fault's read to the page landed, as a thread vCPU's
fault is timed, its CONTINUE then issued: QEMU 10.1's postcopy-latency log2 histogram;
`blocked_seconds` summed over the blocked threads' faults, QEMU's postcopy-blocktime, timed
from the fault's read as QEMU's fault thread does).

Its thread sleeps in epoll on the uffd, a stop eventfd and the guest's pidfd: no polling. A
guest that dies loses the post-copy (`lost`); `stop` ends the thread and closes what it
opened. Stop the guest before closing its uffd: closing it wakes every blocked thread onto
whatever its frames hold.
"""

import errno
import os
import select
import threading
import time

import numpy as np

from nodes.errors import GuestLost
from nodes.host.faultnative import NativeFaultPath
from nodes.host.guestmain import pfn_runs
from nodes.host.userfault import Uffd
from nodes.migration.postcopy.nativefault import NativeFaults
from nodes.migration.postcopy.pagefault import WAIT_POLL_SECONDS, FaultLatency, RequestPages

READ_BATCH = 64                 # fault messages read per read(2)
_GONE = (errno.ESRCH, errno.ENOENT)    # the guest's memory is gone: nothing left to map


def continue_pages(uffd: Uffd, base: int, page_size: int, pfns: np.ndarray,
                   map_starts: np.ndarray | None = None) -> int:
    """Map `pfns` (pages already in their frames) into the guest and wake its threads waiting
    on them: one UFFDIO_CONTINUE per run of neighbouring pfns within one of the guest's
    mappings (`map_starts`: one bool per pfn, set where a mapping begins; the kernel refuses
    a range that crosses one, ENOENT). Returns the ioctls made."""
    if len(pfns) == 1:                       # a fault's page alone: the common case
        uffd.continue_(base + int(pfns[0]) * page_size, page_size)
        return 1
    runs = pfn_runs(np.unique(pfns), map_starts)
    for pfn, count in runs.tolist():
        uffd.continue_(base + pfn * page_size, count * page_size)
    return len(runs)


class FaultReader(NativeFaultPath):
    """The faults of one process guest resumed by a post-copy switch; see the module
    docstring. `received` is the landing's (True where a page has landed); `request` asks
    the source (the return path's `request`). `start` starts its thread."""

    fault_path = "uffd"         # real userfaultfd faults (the fault latency histogram's label)

    def __init__(self, uffd: Uffd, base: int, page_size: int, received: np.ndarray,
                 request: RequestPages, pid: int | None = None, name: str = "guest",
                 map_starts: np.ndarray | None = None):
        """`pid`: the guest's process (its death loses the post-copy); `map_starts`: the
        first pfn of each of its mappings (`GuestProcess.map_starts`), None for one."""
        self.uffd, self.base, self.page_size = uffd, base, page_size
        self.received = received
        self.cuts = None
        if map_starts is not None:
            self.cuts = np.zeros(len(received), dtype=bool)
            self.cuts[np.asarray(map_starts, dtype=np.int64)] = True
        self._request = request
        self.name = name
        n = len(received)
        self.cond = threading.Condition()
        self.asked_at = np.zeros(n, dtype=np.float64)   # first fault's read; 0: none
        self.waiters = np.zeros(n, dtype=np.int64)      # fault messages read, unresolved
        self.waited_since = np.zeros(n, dtype=np.float64)   # the sum of their read times
        self.latency = FaultLatency()
        self.blocked_seconds = 0.0
        self.faults = 0               # fault messages read (one per blocked thread)
        self.pages_requested = 0      # pages asked for (each once)
        self.local_faults = 0         # faults on pages already landed: mapped at once
        self.continues = 0            # UFFDIO_CONTINUE calls
        self.lost: str | None = None
        self.error: BaseException | None = None
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._pidfd = self._open_pidfd(pid)
        self._ep = select.epoll()
        for fd in (self.uffd.fd, self._stop_fd, self._pidfd):
            if fd >= 0:
                self._ep.register(fd, select.EPOLLIN)
        # The native fault path (`go_native`): its thread reads the faults instead, this one
        # the requests it leaves to the Python path (`_fwd_fd` says when).
        self._native: NativeFaults | None = None
        self._native_final: dict | None = None       # its counts once it has stopped
        self._fwd_fd = -1
        self.thread = threading.Thread(target=self._run, name=f"uffd-faults-{name}",
                                       daemon=True)

    @staticmethod
    def _open_pidfd(pid: int | None) -> int:
        if pid is None:
            return -1
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            return -1

    def start(self) -> "FaultReader":
        self.thread.start()
        return self

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        ep = self._ep
        try:
            while True:
                ready = {fd for fd, _ in ep.poll()}
                if self._stop_fd in ready:
                    return
                if self._pidfd in ready:
                    self.lose(f"the process of {self.name} exited")
                    return
                if self._fwd_fd in ready:
                    if not self._forwarded():
                        return
                    continue
                faults = self.uffd.read_faults(READ_BATCH)
                if len(faults) == 1:
                    self._faulted_one((faults[0].address - self.base) // self.page_size)
                elif faults:
                    self._faulted(np.fromiter((f.address for f in faults), np.int64,
                                              len(faults)))
        except BaseException as exc:  # noqa: BLE001 - the guest cannot go on without us
            self.error = exc
            self.lose(f"the fault reader of {self.name} failed: {exc}")
        finally:
            ep.close()

    def _faulted(self, addresses: np.ndarray) -> None:
        """Fault messages read: ask for the pages not asked for yet; map at once those that
        have landed since (their CONTINUE may have raced the fault)."""
        now = time.monotonic()
        pfns, counts = np.unique((addresses - self.base) // self.page_size, return_counts=True)
        with self.cond:
            self.faults += int(counts.sum())
            here = self.received[pfns]
            local, absent, waiting = pfns[here], pfns[~here], counts[~here]
            fresh = absent[self.asked_at[absent] == 0]
            self.asked_at[fresh] = now
            self.waiters[absent] += waiting
            self.waited_since[absent] += waiting * now
            self.pages_requested += len(fresh)
            self.local_faults += len(local)
        if len(local):
            self._continue(local)
        if len(fresh):
            self._request(fresh)

    def _faulted_one(self, pfn: int) -> None:
        """`_faulted` for one fault message, in scalars (numpy's per-call cost is most of a
        fault's time in the host otherwise)."""
        now = time.monotonic()
        with self.cond:
            self.faults += 1
            here = bool(self.received[pfn])
            fresh = not here and self.asked_at[pfn] == 0
            if here:
                self.local_faults += 1
            else:
                if fresh:
                    self.asked_at[pfn] = now
                    self.pages_requested += 1
                self.waiters[pfn] += 1
                self.waited_since[pfn] += now
        if here:
            self._continue(np.array([pfn]))
        elif fresh:
            self._request(np.array([pfn]))

    def _continue(self, pfns: np.ndarray) -> None:
        try:
            self.continues += continue_pages(self.uffd, self.base, self.page_size, pfns,
                                             self.cuts)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self.lose(f"the process of {self.name} exited")

    # -- what the landing and the engine call --------------------------------------------------
    def landed(self, pfns: np.ndarray) -> None:
        """The landing's `on_present`: `pfns` are whole in their frames (and marked received):
        map them into the guest, wake its threads, time their faults."""
        if not len(pfns):
            return
        native = self._native
        if native is not None:           # timed, mapped and woken by the native thread
            rc = native.landed(pfns)
            if rc == -1:
                self.lose(f"the process of {self.name} exited")
            elif rc:
                err = native.stats()["error"]
                raise OSError(err, f"UFFDIO_CONTINUE: {os.strerror(err)}")
            with self.cond:
                self.cond.notify_all()
            return
        # Timed as landed, before the CONTINUE (as a thread vCPU's fault is: `PageFaults`):
        # the ioctl wakes the guest within microseconds, but its return waits for the GIL
        # behind this host's other threads (the reader handling the guest's next fault),
        # which is no part of this fault's time: measured, 0.18 ms of the mean.
        now = time.monotonic()
        self._continue(pfns)
        if len(pfns) == 1:
            self._landed_one(int(pfns[0]), now)
            return
        with self.cond:
            asked = self.asked_at[pfns]
            hit = asked > 0
            if hit.any():
                self.latency.observe(now - asked[hit])
                self.asked_at[pfns[hit]] = 0
                waiters = self.waiters[pfns]
                self.blocked_seconds += float((waiters * now - self.waited_since[pfns]).sum())
                self.waiters[pfns] = 0
                self.waited_since[pfns] = 0
            self.cond.notify_all()

    def _landed_one(self, pfn: int, now: float) -> None:
        with self.cond:
            asked = float(self.asked_at[pfn])
            if asked > 0:
                self.latency.observe_one(now - asked)
                self.asked_at[pfn] = 0
                self.blocked_seconds += float(self.waiters[pfn] * now - self.waited_since[pfn])
                self.waiters[pfn] = 0
                self.waited_since[pfn] = 0
            self.cond.notify_all()

    def handle(self, pfns: np.ndarray) -> None:
        """The host itself needs `pfns` of the guest (its own access path found them
        missing): ask for those not asked for, and wait until all have landed."""
        native = self._native
        with self.cond:
            self._check_lost()
            if native is not None:
                fresh = native.ask(pfns)
            else:
                fresh = pfns[(self.asked_at[pfns] == 0) & ~self.received[pfns]]
                self.asked_at[fresh] = time.monotonic()
                self.pages_requested += len(fresh)
        if len(fresh):
            self._request(fresh)
        # A page the native thread lands wakes no condition here: looked at more often.
        wait = WAIT_POLL_SECONDS if native is None else 0.001
        with self.cond:
            while not self.received[pfns].all():
                self._check_lost()
                self.cond.wait(wait)

    def outstanding(self) -> np.ndarray:
        """Pages asked for that have not landed: asked for again after a reconnect."""
        with self.cond:
            return np.flatnonzero(self.asked_at > 0)

    def lose(self, why: str) -> None:
        """The post-copy cannot complete: the host stops waiting (the guest's owner stops
        its process; its threads stay blocked until then)."""
        with self.cond:
            if self.lost is None:
                self.lost = why
            self.cond.notify_all()

    def _check_lost(self) -> None:
        if self.lost is not None:
            raise GuestLost(self.lost)

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """End the thread and close what it opened (not the uffd: its owner's)."""
        if self._stop_fd < 0:
            return
        os.eventfd_write(self._stop_fd, 1)
        if self.thread.is_alive():
            self.thread.join(timeout_seconds)
        if self._native is not None:
            native = self._native
            native.stop_thread()
            self._native_final = native.stats()
            with self.cond:
                self._native = None
                self._fold_native()
            native.stop()
        os.close(self._stop_fd)
        self._stop_fd = -1
        if self._fwd_fd >= 0:
            os.close(self._fwd_fd)
            self._fwd_fd = -1
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def finish(self) -> None:
        """Every page has landed: stop reading and take the range out of post-copy's faults
        (the guest's owner may register it for dirty logging again)."""
        self.stop()
        npages = len(self.received)
        try:
            self.uffd.unregister(self.base, npages * self.page_size)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise

    def stats(self) -> dict:
        """PageFaults' keys, and what only real faults have."""
        with self.cond:
            st = self._fold_native()
            native = {} if st is None else {"native_fault_path": {
                "pages_landed": st["landed"], "duplicates_dropped": st["duplicates"],
                "bytes": st["bytes"], "channel_ended": bool(st["ended"]),
                "fault_latency_mean_seconds": (st["native_latency_sum"]
                                               / st["native_latency_count"]
                                               if st["native_latency_count"] else None)}}
            return {**native, "blocktime_seconds": self.blocked_seconds, "faults": self.faults,
                    "pages_faulted": self.pages_requested,
                    "fault_latency_seconds": self.latency.to_dict(),
                    "fault_latency_mean_seconds": self.latency.mean_seconds,
                    "faults_on_landed_pages": self.local_faults,
                    "continue_calls": self.continues, "fault_source": "userfaultfd"}


__all__ = ["FaultReader", "continue_pages"]
