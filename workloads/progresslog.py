"""A vCPU's progress log (`ProgressLog`): when the guest made progress, as guestperf's stress
program logs it, in a bounded ring; downtime as the guest sees it is the longest gap in it.
"""

import threading

import numpy as np

DEFAULT_HISTORY_ENTRIES = 8192

class ProgressLog:
    """A bounded ring of (wall seconds, cumulative pages) records, safe across threads.

    To cover long migrations in a fixed ring, steady progress is thinned: a record closer than
    `record_interval_seconds` to the last stored one is held back, but any gap longer than that
    interval is stored with both of its ends, so gaps above the interval are exact and shorter
    ones are reported as at most about twice the interval.
    """

    def __init__(self, capacity_entries: int = DEFAULT_HISTORY_ENTRIES,
                 record_interval_seconds: float = 0.002):
        if capacity_entries < 2:
            raise ValueError("a progress ring needs at least 2 entries")
        self.capacity_entries = capacity_entries
        self.record_interval_seconds = record_interval_seconds
        self._walls = np.zeros(capacity_entries, dtype=np.float64)
        self._pages = np.zeros(capacity_entries, dtype=np.int64)
        self._slept = np.zeros(capacity_entries, dtype=bool)   # a throttle sleep ends here
        self._stored = 0                       # records ever stored (ring index = stored % cap)
        self._latest: tuple[float, int] | None = None
        self._latest_stored = False
        self._lock = threading.Lock()

    def _store(self, wall: float, pages: int, slept: bool = False) -> None:
        i = self._stored % self.capacity_entries
        self._walls[i] = wall
        self._pages[i] = pages
        self._slept[i] = slept
        self._stored += 1

    def record_sleep(self, start_wall: float, end_wall: float, pages: int) -> None:
        """A throttle sleep from `start_wall` to `end_wall`: both ends are stored, the end
        marked, so no gap is read into the time the vCPU was throttled."""
        with self._lock:
            if self._latest is not None and not self._latest_stored:
                self._store(*self._latest)
            self._store(start_wall, pages)
            self._store(end_wall, pages, slept=True)
            self._latest = (end_wall, pages)
            self._latest_stored = True

    def record(self, wall: float, pages: int) -> None:
        with self._lock:
            latest = self._latest
            if latest is None:
                self._store(wall, pages)
                stored = True
            else:
                gap = wall - latest[0]
                if gap > self.record_interval_seconds and not self._latest_stored:
                    self._store(*latest)       # keep the gap's start exact
                last_stored_wall = self._walls[(self._stored - 1) % self.capacity_entries]
                stored = (gap > self.record_interval_seconds
                          or wall - last_stored_wall >= self.record_interval_seconds)
                if stored:
                    self._store(wall, pages)
            self._latest = (wall, pages)
            self._latest_stored = stored

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(walls, pages) in time order, the held-back latest record included."""
        walls, pages, _ = self.marked_arrays()
        return walls, pages

    def marked_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(walls, pages, slept): `slept[i]` says the stretch before record i was a
        throttle sleep."""
        with self._lock:
            n = min(self._stored, self.capacity_entries)
            start = self._stored - n
            idx = (start + np.arange(n)) % self.capacity_entries
            walls, pages, slept = self._walls[idx], self._pages[idx], self._slept[idx]
            if self._latest is not None and not self._latest_stored:
                walls = np.append(walls, self._latest[0])
                pages = np.append(pages, self._latest[1])
                slept = np.append(slept, False)
            return walls, pages, slept

    @property
    def wrapped(self) -> bool:
        """The ring has dropped its oldest records."""
        return self._stored > self.capacity_entries

    @property
    def latest(self) -> tuple[float, int] | None:
        with self._lock:
            return self._latest
