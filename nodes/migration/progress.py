"""What can be seen of a migration while it runs: its rounds, its progress, its phase clock,
and its progress over time.

`Progress` is what an operator polls (the CLI's round lines, /metrics, fault control, `migbed
top`); `RoundStats` is one round as the sender counted it; `PhaseClock` says where the time
went; `ProgressHistory` is the report's `progress_history`, as guestperf keeps one: samples
of the progress at every phase change and round end and at least every 100 ms between.
"""

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from nodes.phase import Phase


@dataclass
class RoundStats:
    index: int
    pages_sent: int = 0
    pages_skipped: int = 0
    pages_dirtied: int = 0
    bytes_sent: int = 0
    duration_seconds: float = 0.0
    final: bool = False
    # The throttle (`nodes.migration.decide.convergence`): auto-converge's percentage as the round
    # ended (QEMU's cpu-throttle-percentage), and the seconds dirty-limit slept the vCPU in it.
    cpu_throttle_percentage: int = 0
    dirty_limit_throttle_seconds: float = 0.0
    # Of pages_sent: those sent whole, and zero pages (QEMU's normal and duplicate); the
    # rest went as XBZRLE deltas or not at all (unchanged; see the report's xbzrle block).
    normal_pages: int = 0
    zero_pages: int = 0
    postcopy: bool = False      # the pages sent after a post-copy switch (then also final)

    def to_dict(self) -> dict:
        d = asdict(self)
        dur = self.duration_seconds
        d["dirty_rate_pages_per_second"] = self.pages_dirtied / dur if dur > 0 else 0.0
        d["throughput_bytes_per_second"] = self.bytes_sent / dur if dur > 0 else 0.0
        return d


@dataclass
class Progress:
    """What an operator sees of a running migration (polled by the CLI and the metrics).

    `status` is the phase the migration is in (a `Phase` value) until it ends, then one of
    completed, failed or cancelled."""

    migration_id: str
    guest: str
    status: str = Phase.SETUP.value
    round: int = 0
    pages_sent_total: int = 0
    bytes_sent_total: int = 0
    dirty_pages: int = 0
    remaining_bytes: int = 0
    expected_downtime_seconds: float | None = None
    # The qemu policy's downtime limit in force (it steps with --downtime-steps); None for
    # the policies without one.
    downtime_limit_seconds: float | None = None
    throughput_bytes_per_second: float = 0.0
    rounds: list = field(default_factory=list)
    fault: dict | None = None      # a host-kill fault the sender waits at (`nodes.faults`)
    # The throttle as QEMU's query-migrate shows it: cpu-throttle-percentage (0-99), and
    # dirty-limit's sleep per full dirty ring (us) with the vCPU's last measured MB/s.
    cpu_throttle_percentage: int = 0
    dirty_limit_throttle_time_per_round_us: int = 0
    dirty_limit_rate_mb_per_second: int | None = None
    # QEMU's dirty-pages-rate (over the last sync period of >= 1 s; before one closes, the
    # last round's); None until either is known.
    dirty_rate_pages_per_second: float | None = None
    started_wall: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)

    def snapshot(self) -> "Progress":
        """A copy of it now, for the control plane: the sender goes on changing this one
        (an in-process host hands its values over as they are, without pickling)."""
        return replace(self, rounds=list(self.rounds),
                       fault=dict(self.fault) if self.fault is not None else None)

    def round_done(self, rnd: RoundStats) -> None:
        self.rounds.append(rnd.to_dict())


class PhaseClock:
    """Where a migration's time went, phase by phase (a failed migration ends early), as
    QEMU reports setup-time beside total-time: each `end(phase)` closes the phase that began
    where the last one ended. `seconds` is keyed by `Phase.key` (`stop_and_copy`)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self._last = t0
        self.seconds: dict[str, float] = {}
        self._ends: dict[Phase, float] = {}

    def end(self, phase: Phase, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.seconds[phase.key] = now - self._last
        self._ends[phase] = self._last = now
        return now

    def ended_at(self, phase: Phase) -> float | None:
        """When `phase` ended (monotonic), None if it never did."""
        return self._ends.get(phase)


# -- the progress over time ---------------------------------------------------------------------
SAMPLE_SECONDS = 0.05        # a sample this long after the last: so never 100 ms without one
RATE_WINDOW_SECONDS = 0.1    # a sample's rates are over the samples of the last 100 ms or more
MIN_RATE_SECONDS = 0.02      # (or since the start, once that is this long)
MIN_SLEEP_SECONDS = 1e-4     # a wait never spins on a sample due a rounding error from now
MAX_SAMPLES = 4000           # then every other plain sample goes, and the period doubles

# What a sample holds, in this order: counters are cumulative, the rest as they were then.
SAMPLE_FIELDS = ("t_seconds", "phase", "round", "event", "bytes_sent_total",
                 "pages_sent_total", "remaining_bytes", "dirty_rate_pages_per_second",
                 "expected_downtime_seconds", "guest_pages_written_total")


class ProgressHistory:
    """A migration's progress over time, sampled on the sender's own thread (no thread of
    its own): at every event (a phase begins, a round ends, the pause, the resume, the
    end) and, between them, at batch boundaries and in the link's pacing waits
    (`wait`) once `period` has passed, so a slow link's long sends are sampled too.

    A sample is the progress as it stood (`SAMPLE_FIELDS`); `to_list` adds the rates, each
    over the trailing `RATE_WINDOW_SECONDS` or more: `throughput_bytes_per_second` and the
    guest's own `guest_page_write_rate_pages_per_second` (None where the guest's writes could
    not be seen from the source: after it resumed on the destination). Bounded: past
    `max_samples` every other sample without an event goes and the period doubles."""

    def __init__(self, t0: float, period: float = SAMPLE_SECONDS, max_samples: int = MAX_SAMPLES):
        self.t0 = t0
        self.period = period
        self.max_samples = max_samples
        self._rows: list[tuple] = []
        self._last = -math.inf

    def __len__(self) -> int:
        return len(self._rows)

    def due(self, now: float) -> bool:
        return now - self._last >= self.period

    def add(self, now: float, event: str | None, values: dict) -> None:
        """A sample at monotonic `now` (events may come late: they go in time order)."""
        row = (now - self.t0, *(event if k == "event" else values.get(k)
                                for k in SAMPLE_FIELDS[1:]))
        if self._rows and row[0] < self._rows[-1][0]:
            bisect.insort(self._rows, row, key=lambda r: r[0])
        else:
            self._rows.append(row)
        self._last = max(self._last, now)
        if len(self._rows) > self.max_samples:
            self._thin()

    def _thin(self) -> None:
        kept, plain = [], 0
        for row in self._rows:
            if row[3] is not None or plain % 2 == 0:
                kept.append(row)
            if row[3] is None:
                plain += 1
        self._rows = kept
        self.period *= 2

    def wait(self, seconds: float, sample: Callable[[float], None],
             sleep: Callable[[float], object] = time.sleep) -> None:
        """Sleep `seconds` (a link's pacing wait), calling `sample(seconds_left)` whenever
        one is due; a `sleep` that returns true (an Event's `wait`) ends it early."""
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            left = end - now
            if self.due(now):
                sample(max(0.0, left))
            if left <= 0:
                return
            if sleep(min(left, max(self._last + self.period - now, MIN_SLEEP_SECONDS))):
                return

    def to_list(self) -> list[dict]:
        """The samples as dicts, oldest first, with their trailing-window rates."""
        out = []
        for i, row in enumerate(self._rows):
            d = dict(zip(SAMPLE_FIELDS, row, strict=True))
            prev = self._rows[self._window_start(i)]
            dt = row[0] - prev[0]
            if dt < MIN_RATE_SECONDS:
                dt = 0.0                      # too short a span for a rate (the first ms)
            d["throughput_bytes_per_second"] = ((row[4] - prev[4]) / dt
                                                if dt > 0 and None not in (row[4], prev[4])
                                                else None)
            d["guest_page_write_rate_pages_per_second"] = (
                (row[9] - prev[9]) / dt if dt > 0 and None not in (row[9], prev[9]) else None)
            out.append(d)
        return out

    def _window_start(self, i: int) -> int:
        """The latest sample at least RATE_WINDOW_SECONDS before sample `i` (else the
        first), whose counters the rates of `i` are taken against."""
        t = self._rows[i][0] - RATE_WINDOW_SECONDS
        j = bisect.bisect_right(self._rows, t, key=lambda r: r[0], hi=i) - 1
        return max(j, 0)
