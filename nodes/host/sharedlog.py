"""A process vCPU's progress log in shared memory: the guest writes it, the host reads it.

Why shared: the guest's own record of when it ran is what its observed downtime is measured
from (the longest gap across a hand-over). Kept in the guest's process, the host would have
to ask for it, and the asking would sit in the very gap it measures. So the ring of
`workloads.progresslog.ProgressLog` lives in the control page (`nodes.host.guestcontrol`):
the same records, thinned the same way, read by the same `ProgressReadings` on the host.

One writer process (its vCPU threads serialised by the log's lock) and readers in another:
a sequence word around every change (a seqlock), so a reader retries a copy taken while a
record was being stored instead of reading half of one.
"""

import threading
import time

import numpy as np

from nodes.host.guestcontrol import LOG_ENTRIES, W_LOG, ControlPage
from workloads.progresslog import SLEPT, THINNED, ProgressLog

_SEQ, _STORED, _WALL, _PAGES, _FLAGS = range(W_LOG, W_LOG + 5)
_HAS_LATEST, _LATEST_STORED, _DROPPED = 1, 2, 4
# The log's words, in that order, for its native writer (`nodes.host.nativepacing`), whose
# flag bits are these too (a test holds its records to a `ProgressLog`'s).
LOG_WORDS = (_SEQ, _STORED, _FLAGS, _WALL, _PAGES)
_READ_TRIES = 1000
# Finer than a thread vCPU's 2 ms: a guest's 1 ms ticks are then all stored, every gap exact
# (its ring is twice a thread vCPU's, so it covers as long).
RECORD_INTERVAL_SECONDS = 0.0005


class SharedProgressLog(ProgressLog):
    """`ProgressLog` whose ring and counters are the control page's (see the module
    docstring); `record` and `record_sleep` in the guest, the readings on the host."""

    def __init__(self, ctl: ControlPage, record_interval_seconds: float = RECORD_INTERVAL_SECONDS):
        self.capacity_entries = LOG_ENTRIES
        self.record_interval_seconds = record_interval_seconds
        self._walls, self._pages, self._slept = ctl.log_walls, ctl.log_pages, ctl.log_slept
        # The writer stores through memoryviews: an item is a Python int or float there at a
        # fraction of a numpy scalar's cost, and a paced vCPU stores 3-4 records a batch.
        self._walls_mv, self._pages_mv, self._slept_mv = (
            memoryview(a) for a in (ctl.log_walls, ctl.log_pages, ctl.log_slept))
        self._u64, self._f64, self._i64 = ctl.u64, ctl.f64, ctl.i64
        self._lock = threading.RLock()      # the base takes it too, inside ours

    # -- the state ProgressLog keeps in attributes, here in shared words ------------------
    @property
    def _stored(self) -> int:
        return int(self._u64[_STORED])

    @_stored.setter
    def _stored(self, value: int) -> None:
        self._u64[_STORED] = value

    @property
    def _latest(self) -> tuple[float, int] | None:
        if not int(self._u64[_FLAGS]) & _HAS_LATEST:
            return None
        return float(self._f64[_WALL]), int(self._i64[_PAGES])

    @_latest.setter
    def _latest(self, value: tuple[float, int] | None) -> None:
        flags = int(self._u64[_FLAGS]) & ~_HAS_LATEST
        if value is not None:
            self._f64[_WALL], self._i64[_PAGES] = value
            flags |= _HAS_LATEST
        self._u64[_FLAGS] = flags

    @property
    def _latest_stored(self) -> bool:
        return bool(int(self._u64[_FLAGS]) & _LATEST_STORED)

    @_latest_stored.setter
    def _latest_stored(self, value: bool) -> None:
        self._set_flag(_LATEST_STORED, value)

    @property
    def _dropped(self) -> bool:
        return bool(int(self._u64[_FLAGS]) & _DROPPED)

    @_dropped.setter
    def _dropped(self, value: bool) -> None:
        self._set_flag(_DROPPED, value)

    def _set_flag(self, bit: int, value: bool) -> None:
        flags = int(self._u64[_FLAGS]) & ~bit
        self._u64[_FLAGS] = flags | (bit if value else 0)

    # -- the writer: every change inside an odd sequence number -----------------------------
    # `ProgressLog.record` and `record_sleep`, the same records and marks, on the shared words
    # read once each (the base's attribute state is properties here: ~30 Python calls a
    # batch, the bulk of a paced vCPU's own cost once its caches are cold after its wait).
    def _put(self, wall: float, pages: int, mark: int, flags: int) -> int:
        """Store one record (THINNED if records were dropped before it); the flags with
        DROPPED cleared, for the caller to write back."""
        u64 = self._u64
        stored = u64[_STORED]
        i = stored % self.capacity_entries
        self._walls_mv[i], self._pages_mv[i] = wall, pages
        self._slept_mv[i] = mark | (THINNED if flags & _DROPPED else 0)
        u64[_STORED] = stored + 1
        return flags & ~_DROPPED

    def record(self, wall: float, pages: int) -> None:
        interval = self.record_interval_seconds
        with self._lock:
            u64 = self._u64
            u64[_SEQ] += 1
            try:
                flags = u64[_FLAGS]
                stored = True
                if not flags & _HAS_LATEST:
                    flags = self._put(wall, pages, 0, flags)
                else:
                    latest_wall = self._f64[_WALL]
                    gap = wall - latest_wall
                    latest_stored = bool(flags & _LATEST_STORED)
                    if gap > interval and not latest_stored:
                        flags = self._put(latest_wall, self._i64[_PAGES], 0, flags)
                        latest_stored = True
                    last = self._walls_mv[(u64[_STORED] - 1) % self.capacity_entries]
                    stored = gap > interval or wall - last >= interval
                    if not latest_stored:
                        flags |= _DROPPED
                    if stored:
                        flags = self._put(wall, pages, 0, flags)
                self._f64[_WALL], self._i64[_PAGES] = wall, pages
                flags |= _HAS_LATEST | _LATEST_STORED
                u64[_FLAGS] = flags if stored else flags & ~_LATEST_STORED
            finally:
                u64[_SEQ] += 1

    def record_sleep(self, start_wall: float, end_wall: float, pages: int,
                     mark: int = SLEPT) -> None:
        with self._lock:
            u64 = self._u64
            u64[_SEQ] += 1
            try:
                flags = u64[_FLAGS]
                if flags & _HAS_LATEST and not flags & _LATEST_STORED:
                    flags = self._put(self._f64[_WALL], self._i64[_PAGES], 0, flags)
                flags = self._put(start_wall, pages, 0, flags)
                flags = self._put(end_wall, pages, mark, flags)
                self._f64[_WALL], self._i64[_PAGES] = end_wall, pages
                u64[_FLAGS] = flags | _HAS_LATEST | _LATEST_STORED
            finally:
                u64[_SEQ] += 1

    # -- the readers: a copy taken between two equal, even sequence numbers -------------------
    def mark_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._consistent(lambda: super(SharedProgressLog, self).mark_arrays())

    @property
    def latest(self) -> tuple[float, int] | None:
        return self._consistent(lambda: self._latest)

    def _consistent(self, read):
        for _ in range(_READ_TRIES):
            seq = int(self._u64[_SEQ])
            if seq % 2 == 0:
                out = read()
                if int(self._u64[_SEQ]) == seq:
                    return out
            time.sleep(0)
        return read()                   # a writer stuck mid-record (it died): take it as is

