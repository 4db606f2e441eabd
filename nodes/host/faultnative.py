"""The native fault path as a process guest's `FaultReader` drives it (mixed into
`nodes.host.faultreader.FaultReader`): handing its faults to the native thread of
`nodes.migration.postcopy.nativefault` (`go_native`), passing on the requests that thread
leaves to the Python path, the landing's claims, a broken link's detach and a recovery's
reattach, and the thread's counts folded into the reader's own, so the report's figures
(faults, pages requested, blocktime, the latency histogram) are the same whichever path ran.

Why apart: the reader's own path (its thread, its bookkeeping) stays as it was, and this is
what only the native path adds.
"""

import os
import select
import threading

import numpy as np

from nodes.migration.postcopy.nativefault import NativeFaults
from nodes.migration.postcopy.pagefault import FaultLatency, RequestPages


class NativeFaultPath:
    """What `FaultReader` holds for the native path: `_native` (None: the Python path),
    `_native_final` (its counts once it stopped) and `_fwd_fd` (the eventfd it signals)."""

    uffd: "object"
    name: str
    received: np.ndarray
    cond: threading.Condition
    latency: FaultLatency
    _ep: select.epoll
    _request: RequestPages
    _native: NativeFaults | None
    _native_final: dict | None
    _fwd_fd: int

    def lose(self, why: str) -> None: ...

    def go_native(self, native: NativeFaults) -> None:
        """From now on the native thread reads the guest's faults and lands the pages of
        its channel (before the guest runs: no fault is read twice); this thread passes on
        the requests it leaves to the Python path."""
        self._ep.unregister(self.uffd.fd)
        self._native = native
        self._ep.register(self._fwd_fd, select.EPOLLIN)
        native.start()

    def native_fwd_fd(self) -> int:
        """The eventfd the native thread signals (made once, closed by `stop`)."""
        if self._fwd_fd < 0:
            self._fwd_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._fwd_fd

    def _forwarded(self) -> bool:
        """Requests the native thread left here, asked for; False once it has ended
        (the guest gone, or an error: the post-copy is lost)."""
        try:
            os.eventfd_read(self._fwd_fd)
        except BlockingIOError:
            pass
        native = self._native
        if native is None:
            return True
        pfns = native.drain()
        while len(pfns):
            self._request(pfns)
            pfns = native.drain()
        st = native.stats()
        if st["gone"] or st["error"]:
            why = (f"the process of {self.name} exited" if st["gone"] else
                   f"the native fault path of {self.name} failed: {os.strerror(st['error'])}")
            self.lose(why)
            return False
        return True

    def claim(self, pfns: np.ndarray) -> np.ndarray:
        """The landing's claim (native path): which of `pfns` it now owns and lands."""
        native = self._native
        return native.claim(pfns) if native is not None else ~self.received[pfns]

    def unclaim(self, pfns: np.ndarray) -> None:
        native = self._native
        if native is not None:
            native.unclaim(pfns)

    def native_stats(self) -> dict | None:
        native = self._native
        return native.stats() if native is not None else self._native_final

    def native_final(self) -> bool:
        """The native thread ran and has stopped."""
        return self._native is None and self._native_final is not None

    def reattach_native(self, fd: int) -> None:
        """A recovered link's fault channel, to the native thread (the descriptor its)."""
        native = self._native
        if native is None:
            os.close(fd)
            return
        native.reattach(fd)

    def detach_native(self) -> None:
        """The link broke: the fault channel goes, its requests go the Python way."""
        native = self._native
        if native is not None:
            native.detach()

    def _fold_native(self) -> dict | None:
        """The native thread's counts as this reader's own (it read every fault since
        `go_native`, before which there were none): the report's figures stay whole."""
        native = self._native
        st = native.stats() if native is not None else self._native_final
        if st is None:
            return None
        self.faults, self.pages_requested = st["faults"], st["pages_requested"]
        self.local_faults, self.continues = st["local_faults"], st["continues"]
        self.blocked_seconds = st["blocked_seconds"]
        self.latency.counts[:] = st["counts"]
        self.latency.sum_seconds = st["latency_sum"]
        self.latency.count = int(st["counts"].sum())
        return st
