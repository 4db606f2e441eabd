"""A vCPU's progress log (`ProgressLog`): when the guest made progress, as guestperf's stress
program logs it, in a bounded ring; downtime as the guest sees it is the longest gap in it.
"""

import threading

import numpy as np

DEFAULT_HISTORY_ENTRIES = 8192
# A record's marks: a throttle sleep ends here; records were dropped before it; an idle wait
# the vCPU chose ends here (a paced vCPU between its batches: no gap, no throttle either).
SLEPT, THINNED, IDLE = 1, 2, 4

class ProgressLog:
    """A bounded ring of (wall seconds, cumulative pages) records, safe across threads.

    To cover long migrations in a fixed ring, steady progress is thinned: a record closer than
    `record_interval_seconds` to the last stored one is held back, but any gap longer than that
    interval is stored with both of its ends, so gaps above the interval are exact. A stored
    record that follows records held back and dropped is marked (`THINNED`): every gap inside
    that stretch was at most the interval, so `longest_gap` reads it as the interval at most,
    not as the stretch (which reached twice the interval: a guest's steady 1 ms ticks read as
    gaps of 2-4 ms, measured, the bulk of a guest-observed downtime).
    """

    def __init__(self, capacity_entries: int = DEFAULT_HISTORY_ENTRIES,
                 record_interval_seconds: float = 0.002):
        if capacity_entries < 2:
            raise ValueError("a progress ring needs at least 2 entries")
        self.capacity_entries = capacity_entries
        self.record_interval_seconds = record_interval_seconds
        self._walls = np.zeros(capacity_entries, dtype=np.float64)
        self._pages = np.zeros(capacity_entries, dtype=np.int64)
        self._slept = np.zeros(capacity_entries, dtype=np.uint8)   # marks: SLEPT | THINNED
        self._stored = 0                       # records ever stored (ring index = stored % cap)
        self._latest: tuple[float, int] | None = None
        self._latest_stored = False
        self._dropped = False       # records held back and dropped since the last stored one
        self._lock = threading.Lock()

    def _store(self, wall: float, pages: int, mark: int = 0) -> None:
        i = self._stored % self.capacity_entries
        self._walls[i] = wall
        self._pages[i] = pages
        self._slept[i] = mark | (THINNED if self._dropped else 0)
        self._dropped = False
        self._stored += 1

    def record_sleep(self, start_wall: float, end_wall: float, pages: int,
                     mark: int = SLEPT) -> None:
        """A throttle sleep (or, `mark` IDLE, an idle wait) from `start_wall` to `end_wall`:
        both ends are stored, the end marked, so no gap is read into the time the vCPU was
        throttled or chose to wait."""
        with self._lock:
            if self._latest is not None and not self._latest_stored:
                self._store(*self._latest)
            self._store(start_wall, pages)
            self._store(end_wall, pages, mark=mark)
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
                latest_stored = self._latest_stored
                if gap > self.record_interval_seconds and not latest_stored:
                    self._store(*latest)       # keep the gap's start exact
                    latest_stored = True
                last_stored_wall = self._walls[(self._stored - 1) % self.capacity_entries]
                stored = (gap > self.record_interval_seconds
                          or wall - last_stored_wall >= self.record_interval_seconds)
                if not latest_stored:
                    self._dropped = True       # the held-back latest goes unstored
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
        walls, pages, marks = self.mark_arrays()
        return walls, pages, (marks & SLEPT).astype(bool)

    def mark_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(walls, pages, marks): `marks[i]` holds SLEPT (the stretch before record i was a
        throttle sleep) and THINNED (records were dropped inside it, each gap there at most
        the interval)."""
        with self._lock:
            n = min(self._stored, self.capacity_entries)
            start = self._stored - n
            idx = (start + np.arange(n)) % self.capacity_entries
            walls, pages, marks = self._walls[idx], self._pages[idx], self._slept[idx]
            if self._latest is not None and not self._latest_stored:
                walls = np.append(walls, self._latest[0])
                pages = np.append(pages, self._latest[1])
                marks = np.append(marks, np.uint8(THINNED if self._dropped else 0))
            return walls, pages, marks.astype(np.uint8)

    @property
    def wrapped(self) -> bool:
        """The ring has dropped its oldest records."""
        return self._stored > self.capacity_entries

    @property
    def latest(self) -> tuple[float, int] | None:
        with self._lock:
            return self._latest


class ProgressReadings:
    """What is read off a vCPU's progress log (`log`) and its page count (`progress_pages`):
    downtime as the guest saw it, its rates, its throttle sleeps. A thread vCPU
    (`workloads.vcpu.VCPU`) and a process vCPU's host side (`nodes.host.processvcpu`) both
    read their logs this way, so a guest's figures mean the same whichever kind runs it."""

    log: ProgressLog

    @property
    def progress_pages(self) -> int:
        raise NotImplementedError

    def throttle_sleeps(self, since_wall: float | None = None) -> list[tuple[float, float]]:
        """The throttle sleeps in the progress log, (start wall, end wall), oldest first."""
        walls, _, slept = self.log.marked_arrays()
        ends = np.flatnonzero(slept[1:]) + 1
        out = [(float(walls[i - 1]), float(walls[i])) for i in ends]
        return [s for s in out if since_wall is None or s[1] >= since_wall]

    def progress(self, since_wall: float | None = None) -> list[tuple[float, int]]:
        """(wall seconds, cumulative page writes) records, oldest first, from `since_wall`."""
        walls, pages = self.log.arrays()
        if since_wall is not None:
            keep = walls >= since_wall
            walls, pages = walls[keep], pages[keep]
        return [(float(w), int(p)) for w, p in zip(walls, pages, strict=True)]

    @property
    def last_progress_wall(self) -> float | None:
        latest = self.log.latest
        return None if latest is None else latest[0]

    def first_progress_after(self, wall: float) -> float | None:
        """Wall time of the first progress record strictly after `wall`, or None."""
        walls, _ = self.log.arrays()
        i = int(np.searchsorted(walls, wall, side="right"))
        return float(walls[i]) if i < len(walls) else None

    def longest_gap(self, start_wall: float, end_wall: float) -> float:
        """The longest stretch of [start_wall, end_wall] with no progress record, in seconds.

        Consecutive records inside the window bound the gaps; the window's edges count as
        bounds too, so a vCPU that made no progress at all in the window gives its length.
        A throttle sleep is no gap: the guest was slowed, not stopped; nor is an idle wait
        the vCPU chose (only its overrun, which is stored as one).
        """
        if end_wall <= start_wall:
            return 0.0
        walls, _, marks = self.log.mark_arrays()
        if self.log.wrapped and len(walls):
            start_wall = max(start_wall, float(walls[0]))   # older records are gone
        keep = (walls > start_wall) & (walls < end_wall)
        after = np.flatnonzero(walls >= end_wall)
        closing = np.append(marks[keep], marks[after[0]] if len(after) else 0)
        bounds = np.concatenate(([start_wall], walls[keep], [end_wall]))
        gaps = np.diff(bounds)
        thinned = (closing & THINNED) != 0
        gaps[thinned] = np.minimum(gaps[thinned], self.log.record_interval_seconds)
        gaps[(closing & (SLEPT | IDLE)) != 0] = 0.0
        return float(gaps.max())

    def write_rate(self, start_wall: float, end_wall: float) -> float | None:
        """Page writes per second between two wall times, read off the progress log (None:
        the log does not cover the window)."""
        walls, pages = self.log.arrays()
        if len(walls) < 2 or end_wall <= start_wall:
            return None
        start_wall = max(start_wall, float(walls[0]))
        if end_wall - start_wall <= 0:
            return None
        written = np.interp([start_wall, end_wall], walls, pages)
        return float(written[1] - written[0]) / (end_wall - start_wall)

    def cost(self, start_wall: float, end_wall: float, pages_at_start: int,
             rate_before: float | None, slept_seconds: float) -> dict:
        """What a migration from `start_wall` to `end_wall` cost this guest: its page rate
        (writes; a `scan`'s reads) before it (`rate_before`, read when it started) and during
        it (its pages since `pages_at_start`, the vCPU stopped or paused at `end_wall`), the slowdown
        (1 - during / before; None for a guest that wrote nothing before), and the seconds
        it slept throttled."""
        span = end_wall - start_wall
        during = (self.progress_pages - pages_at_start) / span if span > 0 else None
        slowdown = (1 - during / rate_before) if rate_before and during is not None else None
        return {"write_rate_before_pages_per_second": rate_before,
                "write_rate_during_pages_per_second": during,
                "slowdown": slowdown, "throttled_seconds": slept_seconds}


    def achieved_rate(self, window_seconds: float = 1.0) -> float:
        """Page writes per second over the last `window_seconds` of progress records."""
        walls, pages = self.log.arrays()
        if len(walls) < 2:
            return 0.0
        i = int(np.searchsorted(walls, walls[-1] - window_seconds, side="left"))
        i = min(i, len(walls) - 2)
        span_seconds = float(walls[-1] - walls[i])
        if span_seconds <= 0:
            return 0.0
        return float(pages[-1] - pages[i]) / span_seconds

    def rate_between(self, start_wall: float, end_wall: float) -> float | None:
        """Pages per second of progress (writes; a scan's reads) over [start_wall,
        end_wall], from the progress log: the pages reached by each edge are those of the
        last record at or before it (the first record for an edge before the log begins, as a
        vCPU resumed on a destination starts from the progress it carried). None when the
        window is empty or the log holds nothing before its end."""
        if end_wall <= start_wall:
            return None
        walls, pages = self.log.arrays()
        j = int(np.searchsorted(walls, end_wall, side="right")) - 1
        if j < 0:
            return None
        i = max(0, int(np.searchsorted(walls, start_wall, side="right")) - 1)
        return float(pages[j] - pages[i]) / (end_wall - start_wall)
