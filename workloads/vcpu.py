"""A guest's virtual CPU: a daemon thread that runs one workload against one domain.

Why a thread of its own: the guest must keep dirtying memory *while* the migration sender
(in the same host process) copies it, exactly as a real guest does during pre-copy. The vCPU
takes `domain.lock` for each batch, so a pause, a mode switch or the final stop-and-copy sees
every batch wholly before or wholly after it.

The vCPU also records guest-side progress (wall-clock time, cumulative page writes) after every
batch, including the heartbeats of an idle guest, as guestperf's stress program logs its
progress and mig_mon pings its guest: downtime as the *guest* sees it is the longest stretch
without progress (`longest_gap`), and `first_progress_after` says when it ran again.

A migration may throttle the vCPU (`set_throttle`), as QEMU's cpu-throttle does: after every
10 ms slice of running the vCPU sleeps p/(1-p) x 10 ms (`cpu_percentage` p), whatever it was
doing; with a dirty limit it also sleeps a set time each time it has written a dirty ring's
worth of pages (QEMU's dirty-limit sleeps a vCPU whose KVM dirty ring filled). Throttled
time earns the workload no rate budget: its clock restarts after every sleep. A pause ends a
sleep (QEMU's sleep loop stops when the vCPU is stopped). The progress log marks every
sleep, so the gaps the guest saw (`longest_gap`, the hand-over's) count the pause only.
"""

import threading
import time

from nodes.errors import GuestPaused
from workloads.guest import Guest
from workloads.progresslog import DEFAULT_HISTORY_ENTRIES, ProgressLog, ProgressReadings
from workloads.workload import DEFAULT_MAX_BATCH_PAGES, Workload

_PAUSE_POLL_SECONDS = 0.02
THROTTLE_SLICE_SECONDS = 0.010      # CPU_THROTTLE_TIMESLICE_NS: 10 ms of running per slice
_SLEEP_POLL_SECONDS = 0.001         # how often a throttle sleep looks for a pause or a stop


def throttle_sleep_seconds(cpu_percentage: int) -> float:
    """The sleep after each 10 ms slice at `cpu_percentage` (cpu_throttle_thread):
    p/(1-p) x 10 ms, plus QEMU's 1 ns against rounding; 0 when not throttled."""
    if cpu_percentage <= 0:
        return 0.0
    pct = min(cpu_percentage, 99) / 100
    return (int(pct / (1 - pct) * THROTTLE_SLICE_SECONDS * 1e9) + 1) / 1e9


class VCPU(ProgressReadings):
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
        # The throttle a migration set (`set_throttle`), and the sleeps it cost so far.
        self.cpu_percentage = 0
        self.ring_pages = 0
        self.ring_full_sleep_seconds = 0.0
        self.throttle_sleep_seconds_total = 0.0
        self.dirty_limit_sleep_seconds_total = 0.0
        self.throttled_run_seconds_total = 0.0     # the slices run before those sleeps
        self._slice_start = 0.0
        self._ring_written = 0
        self._sleeping = threading.Event()
        self._sleep_started: tuple[float, bool] | None = None   # (monotonic, dirty-limit?)
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

    def set_throttle(self, cpu_percentage: int = 0, ring_pages: int = 0,
                     ring_full_sleep_seconds: float = 0.0) -> None:
        """Throttle the vCPU: `cpu_percentage` (0-99) of every slice asleep (auto-converge);
        a sleep of `ring_full_sleep_seconds` every `ring_pages` page writes (dirty-limit).
        All zero: unthrottled."""
        if not 0 <= cpu_percentage <= 99:
            raise ValueError(f"cpu_percentage must be 0-99, got {cpu_percentage}")
        if ring_pages < 0 or ring_full_sleep_seconds < 0:
            raise ValueError("ring_pages and ring_full_sleep_seconds must be >= 0")
        if cpu_percentage and not self.cpu_percentage:
            self._slice_start = time.monotonic()
        self.cpu_percentage = int(cpu_percentage)
        self.ring_pages = int(ring_pages)
        self.ring_full_sleep_seconds = float(ring_full_sleep_seconds)

    def wait_awake(self, timeout: float = 0.05) -> bool:
        """Wait (bounded) until no throttle sleep is under way; a paused guest's sleep ends
        within a poll, so its log shows where the sleep ended before anyone reads it."""
        deadline = time.monotonic() + timeout
        while self._sleeping.is_set() and time.monotonic() < deadline:
            time.sleep(_SLEEP_POLL_SECONDS)
        return not self._sleeping.is_set()

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
                    dirtied = wl.pages_written_total
                    try:
                        written = wl.write(dom, now, self.max_batch_pages)
                        dirtied = wl.pages_written_total - dirtied
                    except GuestPaused:
                        need_resume = True
                        written = None
            if written is None:
                time.sleep(self.tick_seconds)
                continue
            self.batches_total += 1
            self.log.record(time.time(), wl.progress_pages)
            self._throttle(dirtied)             # a reader (`scan`) dirties no ring
            if rate_limited or written == 0:
                time.sleep(self.tick_seconds)
            else:
                time.sleep(0)                   # let the migration sender have the GIL

    # -- the throttle ----------------------------------------------------------------------
    def _throttle(self, written: int) -> None:
        """After a batch: the slice's sleep once 10 ms have run; the dirty ring's sleep once
        a ring's worth of pages has been written."""
        pct = self.cpu_percentage
        ran = time.monotonic() - self._slice_start
        if pct and ran >= THROTTLE_SLICE_SECONDS:
            self.throttled_run_seconds_total += ran
            self.throttle_sleep_seconds_total += self._sleep(throttle_sleep_seconds(pct))
        ring = self.ring_pages
        if ring and written:
            self._ring_written += written
            if self._ring_written >= ring:
                self._ring_written %= ring
                if self.ring_full_sleep_seconds:
                    self.dirty_limit_sleep_seconds_total += self._sleep(
                        self.ring_full_sleep_seconds, dirty_limit=True)

    NO_THROTTLE_STATS = {"pages_written_total": 0, "throttle_sleep_seconds": 0.0,
                         "dirty_limit_sleep_seconds": 0.0, "throttled_run_seconds": 0.0}

    def throttle_stats(self) -> dict:
        """Page writes so far and the seconds slept throttled, a sleep under way included;
        `throttled_run_seconds`: the slices run before auto-converge's sleeps, so the
        throttle obtained is sleep / (sleep + run)."""
        return {"pages_written_total": int(self.pages_written_total),
                "throttled_run_seconds": self.throttled_run_seconds_total,
                "throttle_sleep_seconds": (self.throttle_sleep_seconds_total
                                           + self.sleeping_seconds(dirty_limit=False)),
                "dirty_limit_sleep_seconds": (self.dirty_limit_sleep_seconds_total
                                              + self.sleeping_seconds(dirty_limit=True))}

    def sleeping_seconds(self, dirty_limit: bool) -> float:
        """How long the throttle sleep under way (of that kind) has lasted so far."""
        started = self._sleep_started
        if started is None or started[1] != dirty_limit:
            return 0.0
        return max(0.0, time.monotonic() - started[0])

    def _sleep(self, seconds: float, dirty_limit: bool = False) -> float:
        """Sleep `seconds` throttled, ended early by a pause or a stop; logged and marked,
        and the workload's clock restarted so the sleep earns it no budget."""
        dom = self.domain
        self._sleeping.set()
        start_wall, t0 = time.time(), time.monotonic()
        self._sleep_started = (t0, dirty_limit)
        end = t0 + seconds
        try:
            while not self._stop.is_set() and dom.running.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, _SLEEP_POLL_SECONDS))
            slept = time.monotonic() - t0
            self.log.record_sleep(start_wall, start_wall + slept, self.workload.progress_pages)
        finally:
            self._sleep_started = None
            self._sleeping.clear()
        with dom.lock:
            self.workload.resume(time.monotonic())
        self._slice_start = time.monotonic()
        return slept

    # -- progress ------------------------------------------------------------------------
    @property
    def pages_written_total(self) -> int:
        return self.workload.pages_written_total

    @property
    def progress_pages(self) -> int:
        """Pages the workload has gone through (its writes; a scan's reads)."""
        return self.workload.progress_pages

    @property
    def slept_seconds_total(self) -> float:
        """Seconds this vCPU has slept throttled, auto-converge's and dirty-limit's."""
        return self.throttle_sleep_seconds_total + self.dirty_limit_sleep_seconds_total

