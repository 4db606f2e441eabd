"""A post-copy destination's missing-page faults: the handler the guest's access path calls
(`Domain.on_missing`) and what it measures.

The vCPU touches pages that have not arrived (`Domain.present` is the landing's `received`):
its batch's missing pages are asked for at once, one request record for all of them, each page
counted as one request as QEMU counts host pages, and the vCPU waits, holding the guest's
lock, until every one of them has landed. The landing does not need that lock; it tells
`landed` which pages it has just made present, which wakes the vCPU and times each requested
page from its request to its landing (QEMU 10.1's postcopy-latency and its log2 histogram).
The time the vCPU spent waiting is QEMU's postcopy-blocktime. A page already asked for is not
asked for again; what is still outstanding is asked for again on a new connection after a
broken link (`outstanding`). If the guest is lost (`lose`), a waiting vCPU stops with
`GuestLost`.

A process guest faults for real (userfaultfd): its faults are read by the host's
`nodes.host.faultreader.FaultReader`, which does what `PageFaults` does (asks through a
`RequestPages`, is told `landed`, keeps `outstanding`, measures into `FaultLatency`), so both
are `MissingPageFaults` to the post-copy destination, which makes one by a factory.
"""

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from nodes.errors import GuestLost

FIRST_BUCKET_SECONDS = 1e-6       # QEMU 10.1's histogram: log2 buckets from 1 us
LATENCY_BUCKETS = 24              # 1 us .. 2^23 us (8.4 s), and one beyond
WAIT_POLL_SECONDS = 0.5           # a waiting vCPU looks whether the guest is lost this often


def latency_bounds() -> list[float]:
    """The upper bounds of the latency histogram's buckets, in seconds (the last: +Inf)."""
    return [FIRST_BUCKET_SECONDS * 2 ** i for i in range(LATENCY_BUCKETS)] + [float("inf")]


class FaultLatency:
    """Request-to-landed times of requested pages: a log2 histogram from 1 us, their sum
    and count."""

    def __init__(self) -> None:
        self.counts = np.zeros(LATENCY_BUCKETS + 1, dtype=np.int64)
        self.sum_seconds = 0.0
        self.count = 0

    def observe(self, seconds: np.ndarray) -> None:
        ratio = np.maximum(seconds, 0.0) / FIRST_BUCKET_SECONDS
        index = np.ceil(np.log2(np.maximum(ratio, 1.0))).astype(np.int64)
        np.add.at(self.counts, np.minimum(index, LATENCY_BUCKETS), 1)
        self.sum_seconds += float(seconds.sum())
        self.count += len(seconds)

    def observe_one(self, seconds: float) -> None:
        """One time, without numpy's per-call cost (a single fault's page: the common case)."""
        ratio = max(seconds, 0.0) / FIRST_BUCKET_SECONDS
        self.counts[min(math.ceil(math.log2(max(ratio, 1.0))), LATENCY_BUCKETS)] += 1
        self.sum_seconds += seconds
        self.count += 1

    @property
    def mean_seconds(self) -> float | None:
        return self.sum_seconds / self.count if self.count else None

    def to_dict(self) -> dict[str, int]:
        """Bucket upper bound (seconds, as text) -> count, up to the last non-empty one."""
        used = np.flatnonzero(self.counts)
        if not len(used):
            return {}
        bounds = latency_bounds()
        return {("+Inf" if b == float("inf") else f"{b:g}"): int(n)
                for b, n in zip(bounds[:used[-1] + 1], self.counts[:used[-1] + 1],
                                strict=True)}


class RequestPages(Protocol):
    """Ask the source for these pages (one REQ_PAGES record or a few): the return path's
    `request`. False (or an exception-free no-op) while the link is down: the pages stay
    outstanding and are asked for again after a reconnect."""

    def __call__(self, pfns: np.ndarray) -> bool | None: ...


class MissingPageFaults(Protocol):
    """What the post-copy destination needs of whoever handles its guest's faults: a thread
    vCPU's `PageFaults`, or a process guest's `nodes.host.faultreader.FaultReader`.
    `fault_path` says which (the fault latency histogram's label): "emulated" or "uffd"."""

    fault_path: str
    latency: FaultLatency
    asked_at: np.ndarray          # per pfn: when it was asked for (0: not outstanding)
    blocked_seconds: float
    faults: int
    lost: str | None

    def handle(self, pfns: np.ndarray) -> None: ...

    def landed(self, pfns: np.ndarray) -> None: ...

    def outstanding(self) -> np.ndarray: ...

    def lose(self, why: str) -> None: ...

    def finish(self) -> None:
        """Every page has landed: no fault will come again."""
        ...

    def stop(self) -> None:
        """The post-copy failed and the guest is gone: end what reads its faults."""
        ...

    def stats(self) -> dict: ...


FaultsFactory = Callable[[np.ndarray, RequestPages], MissingPageFaults]


class PageFaults:
    """The handler of the guest's accesses to missing pages; see the module docstring.
    `request(pfns)` sends one request for those pages (it may fail while the link is down:
    they stay outstanding)."""

    fault_path = "emulated"     # the Xen model's access path: a thread vCPU's faults

    def __init__(self, received: np.ndarray, request: RequestPages):
        self.received = received
        self._request = request
        self.cond = threading.Condition()
        self.asked_at = np.zeros(len(received), dtype=np.float64)   # 0: not outstanding
        self.latency = FaultLatency()
        self.blocked_seconds = 0.0
        self.faults = 0              # times a vCPU blocked
        self.pages_requested = 0     # pages asked for (each once)
        self.lost: str | None = None

    def handle(self, pfns: np.ndarray) -> None:
        """The guest touched `pfns`, missing: ask for them and wait until all have landed
        (the caller, the vCPU, holds the guest's lock)."""
        t0 = time.monotonic()
        with self.cond:
            self._check_lost()
            fresh = pfns[(self.asked_at[pfns] == 0) & ~self.received[pfns]]
            self.asked_at[fresh] = t0
            self.pages_requested += len(fresh)
            self.faults += 1
        if len(fresh):
            self._request(fresh)
        with self.cond:
            try:
                while not self.received[pfns].all():
                    self._check_lost()
                    self.cond.wait(WAIT_POLL_SECONDS)
            finally:
                self.blocked_seconds += time.monotonic() - t0

    def landed(self, pfns: np.ndarray) -> None:
        """The landing has just made `pfns` present (after marking them received)."""
        with self.cond:
            asked = self.asked_at[pfns]
            hit = asked > 0
            if hit.any():
                self.latency.observe(time.monotonic() - asked[hit])
                self.asked_at[pfns[hit]] = 0
            self.cond.notify_all()

    def outstanding(self) -> np.ndarray:
        """Pages asked for that have not landed: asked for again after a reconnect."""
        with self.cond:
            return np.flatnonzero(self.asked_at > 0)

    def lose(self, why: str) -> None:
        """The guest is lost: every waiting vCPU stops (GuestLost), none waits again."""
        with self.cond:
            self.lost = why
            self.cond.notify_all()

    def _check_lost(self) -> None:
        if self.lost is not None:
            raise GuestLost(self.lost)

    def finish(self) -> None:
        """Nothing to end: the vCPU thread waited on the landing itself."""

    def stop(self) -> None:
        """Nothing to end (see `finish`)."""

    def stats(self) -> dict:
        with self.cond:
            return {"blocktime_seconds": self.blocked_seconds, "faults": self.faults,
                    "pages_faulted": self.pages_requested,
                    "fault_latency_seconds": self.latency.to_dict(),
                    "fault_latency_mean_seconds": self.latency.mean_seconds}
