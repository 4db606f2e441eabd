"""What the model predicts and what it keeps while it runs: rounds, the prediction, the guest
as the model knows it, and the live rounds so far."""

from dataclasses import dataclass, field

from cluster.model.postcopy_model import MissingRange, PostcopyPrediction
from cluster.model.throttle_model import ModelThrottle
from cluster.model.workload import Region
from nodes.migration.decide.policy import StopCode

PAGES_PER_RECORD = 1024      # PAGE_DATA records carry up to 1024 pages (4 MiB)


@dataclass(frozen=True)
class ModelRound:
    """One round, in expected pages. The stop-and-copy round is last, with `final` True."""

    index: int
    pages_sent: float
    pages_skipped: float
    pages_dirtied: float          # distinct pages written during the round: the next one's dirty
    duration_seconds: float
    final: bool = False
    cpu_throttle_percentage: int = 0      # auto-converge's throttle as the round ended
    zero_pages: float = 0.0       # of pages_sent, zero pages (a pfn word each)
    postcopy: bool = False        # the pages sent after a post-copy switch (then also final)

    def to_dict(self) -> dict:
        return {"index": self.index, "pages_sent": self.pages_sent,
                "pages_skipped": self.pages_skipped, "pages_dirtied": self.pages_dirtied,
                "duration_seconds": self.duration_seconds, "final": self.final,
                "cpu_throttle_percentage": self.cpu_throttle_percentage,
                "zero_pages": self.zero_pages,
                "postcopy": self.postcopy}


@dataclass(frozen=True)
class ModelPrediction:
    policy: str
    rounds: tuple[ModelRound, ...]
    final_pages: float            # pages sent while paused
    stop_reason: str
    stop_code: str | None         # the policy's StopCode value (None: aborted)
    total_time_seconds: float     # first round to guest resumed, T_resume included
    downtime_seconds: float       # stop-and-copy at link speed + latency + T_resume
    pages_sent_total: float
    bytes_sent_total: float
    converged: bool               # stopped on the policy's own target, not a cap
    dirty_sync_count: int         # bitmap syncs, setup's and stop-and-copy's included
    lambda_ratio: float           # D / R: dirty bytes per second over the effective bandwidth
    bandwidth_bytes_per_second: float   # effective live bandwidth, min(link, rate limit)
    # Auto-converge: (seconds, percentage) at each throttle step, and the throttle at the end.
    throttle_schedule: tuple = ()
    cpu_throttle_percentage: int = 0
    # Dirty-limit: (seconds, sleep per full ring in us) at each adjustment.
    dirty_limit_schedule: tuple = ()
    zero_pages: float = 0.0       # of pages_sent_total, zero pages
    postcopy: PostcopyPrediction | None = None   # the switch and the push (None: pre-copy)

    @property
    def live_rounds(self) -> int:
        return sum(1 for r in self.rounds if not r.final)

    @property
    def postcopy_requests(self) -> float:
        """The page requests the model expects (its faults; 0 without a switch), under the
        report's name."""
        return self.postcopy.expected_faults if self.postcopy is not None else 0.0

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "rounds": [r.to_dict() for r in self.rounds],
            "live_rounds": self.live_rounds,
            "final_pages": self.final_pages,
            "stop_reason": self.stop_reason,
            "stop_code": self.stop_code,
            "total_time_seconds": self.total_time_seconds,
            "downtime_seconds": self.downtime_seconds,
            "pages_sent_total": self.pages_sent_total,
            "bytes_sent_total": self.bytes_sent_total,
            "converged": self.converged,
            "dirty_sync_count": self.dirty_sync_count,
            "lambda_ratio": self.lambda_ratio,
            "bandwidth_bytes_per_second": self.bandwidth_bytes_per_second,
            "throttle_schedule": [list(x) for x in self.throttle_schedule],
            "cpu_throttle_percentage": self.cpu_throttle_percentage,
            "dirty_limit_schedule": [list(x) for x in self.dirty_limit_schedule],
            "zero_pages": self.zero_pages,
            "postcopy": self.postcopy.to_dict() if self.postcopy is not None else None,
        }


@dataclass(frozen=True)
class Guest:
    """What the model knows of the guest and the wire before the first round."""

    guest_pages: int
    page_size: int
    regions: list[Region]
    wire_per_page: float          # bytes on the wire per page, record headers shared out
    seconds_per_page: float       # at the live rounds' rate
    zero_wire: float = 0.0        # bytes on the wire per zero page
    first_pass_seconds: float = 0.0   # round 0 (every page), its zero pages cheap
    first_pass_zero: float = 0.0      # zero pages round 0 sends (`pagetypes`)
    zero_at_start: float = 0.0        # zero pages before anything is sent


@dataclass
class PreCopy:
    """The live rounds so far, and how they ended."""

    dirty: float
    rounds: list[ModelRound] = field(default_factory=list)
    dirty_by_region: list[float] | None = None   # the next to-send set; None: every page
    total_written: float = 0.0
    elapsed: float = 0.0
    stop_reason: str = ""
    stop_code: StopCode | None = None
    converged: bool = False
    aborted: bool = False
    syncs: int = 1                # bitmap syncs so far, setup's included (dirty-sync-count)
    throttle: ModelThrottle | None = None
    sync: object | None = None    # the engine's SyncLog, for the throttle's periods
    sent_bytes: float = 0.0
    zero_pages: float = 0.0       # zero pages sent so far
    final_zero: float = 0.0       # zero pages left for the stop-and-copy
    missing: list[MissingRange] | None = None   # what a mid-pass switch leaves to send

    @property
    def last(self) -> ModelRound | None:
        return self.rounds[-1] if self.rounds else None


def round_bytes(guest: Guest, pages: float, zero: float) -> float:
    """Bytes on the wire of `pages` pages, `zero` of them zero pages (a pfn word each)."""
    return (pages - zero) * guest.wire_per_page + zero * guest.zero_wire
