"""A guest's virtual CPU: a daemon thread that runs one workload against one domain.

Why a thread of its own: the guest must keep dirtying memory *while* the migration sender
(in the same host process) copies it, exactly as a real guest does during pre-copy. The vCPU
takes `domain.lock` for each batch, so a pause, a mode switch or the final stop-and-copy sees
every batch wholly before or wholly after it.

The vCPU also records guest-side progress (wall-clock time, cumulative page writes) after every
batch, including the heartbeats of an idle guest, as guestperf's stress program logs its
progress and mig_mon pings its guest: downtime as the *guest* sees it is the longest stretch
without progress (`longest_gap`), and `first_progress_after` says when it ran again.
"""

import threading
import time

import numpy as np

from nodes.errors import GuestPaused
from workloads.guest import Guest
from workloads.patterns import DEFAULT_MAX_BATCH_PAGES, Workload

DEFAULT_HISTORY_ENTRIES = 8192
_PAUSE_POLL_SECONDS = 0.02


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
        self._stored = 0                       # records ever stored (ring index = stored % cap)
        self._latest: tuple[float, int] | None = None
        self._latest_stored = False
        self._lock = threading.Lock()

    def _store(self, wall: float, pages: int) -> None:
        i = self._stored % self.capacity_entries
        self._walls[i] = wall
        self._pages[i] = pages
        self._stored += 1

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
        with self._lock:
            n = min(self._stored, self.capacity_entries)
            start = self._stored - n
            idx = (start + np.arange(n)) % self.capacity_entries
            walls, pages = self._walls[idx], self._pages[idx]
            if self._latest is not None and not self._latest_stored:
                walls = np.append(walls, self._latest[0])
                pages = np.append(pages, self._latest[1])
            return walls, pages

    @property
    def latest(self) -> tuple[float, int] | None:
        with self._lock:
            return self._latest


class VCPU:
    """Runs `workload` on `domain` until `stop`; see the module docstring."""

    def __init__(self, domain: Guest, workload: Workload, tick_seconds: float = 0.001, *,
                 max_batch_pages: int = DEFAULT_MAX_BATCH_PAGES,
                 history_entries: int = DEFAULT_HISTORY_ENTRIES,
                 record_interval_seconds: float = 0.002):
        if tick_seconds < 0:
            raise ValueError(f"tick_seconds must be >= 0, got {tick_seconds}")
        self.domain = domain
        self.workload = workload
        self.tick_seconds = tick_seconds
        self.max_batch_pages = max_batch_pages
        self.log = ProgressLog(history_entries, record_interval_seconds)
        self.batches_total = 0
        self.resumes_total = 0
        self.error: BaseException | None = None   # what killed the thread, if anything did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"vCPU of {self.domain.name} already started")
        self._thread = threading.Thread(target=self._run, name=f"vcpu-{self.domain.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop the loop and join the thread; True if it has ended."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - kept for the owner to inspect
            self.error = exc

    def _loop(self) -> None:
        dom, wl = self.domain, self.workload
        need_resume = True                      # the first batch starts the workload's clock
        rate_limited = not wl.unlimited
        while not self._stop.is_set():
            if not dom.running.is_set():
                need_resume = True
                dom.running.wait(_PAUSE_POLL_SECONDS)
                continue
            with dom.lock:
                if not dom.is_running:
                    need_resume = True
                    written = None
                else:
                    now = time.monotonic()
                    if need_resume:
                        wl.resume(now)
                        self.resumes_total += 1
                        need_resume = False
                    try:
                        written = wl.write(dom, now, self.max_batch_pages)
                    except GuestPaused:
                        need_resume = True
                        written = None
            if written is None:
                time.sleep(self.tick_seconds)
                continue
            self.batches_total += 1
            self.log.record(time.time(), wl.progress_pages)
            if rate_limited or written == 0:
                time.sleep(self.tick_seconds)
            else:
                time.sleep(0)                   # let the migration sender have the GIL

    # -- progress ------------------------------------------------------------------------
    @property
    def pages_written_total(self) -> int:
        return self.workload.pages_written_total

    @property
    def progress_pages(self) -> int:
        """Pages the workload has gone through (its writes; a scan's reads)."""
        return self.workload.progress_pages

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
        """
        if end_wall <= start_wall:
            return 0.0
        walls, _ = self.log.arrays()
        inside = walls[(walls > start_wall) & (walls < end_wall)]
        bounds = np.concatenate(([start_wall], inside, [end_wall]))
        return float(np.diff(bounds).max())

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
