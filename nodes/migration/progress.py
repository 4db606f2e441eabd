"""What can be seen of a migration while it runs: its rounds, its progress, its phase clock.

`Progress` is what an operator polls (the CLI's round lines, /metrics, fault control);
`RoundStats` is one round as the sender counted it; `PhaseClock` says where the time went.
"""

import time
from dataclasses import asdict, dataclass, field

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
    throughput_bytes_per_second: float = 0.0
    rounds: list = field(default_factory=list)
    fault: dict | None = None      # a host-kill fault the sender waits at (`nodes.faults`)

    def to_dict(self) -> dict:
        return asdict(self)

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
