"""The typed parts a migration report is composed of (as guestperf's Report of Hardware,
Scenario, Progress and Timings): the `Integrity` of the guest, what crossed the wire (`XbzrleBlock`, `MultifdBlock`), the
post-copy (`PostcopyBlock`), the convergence aids (`ConvergenceBlock`), the model beside
the measurement (`ModelBlock`) and what a program guest's application felt
(`ApplicationBlock`).

Each writes itself as the JSON object the report has always carried under its key (the same
keys in the same order) and reads itself back; keys it does not know (a newer version's) are
kept in `extra` and written back, keys an older version lacked take their defaults. A block
also answers `block["key"]` and `block.get("key")`, so a reader written against the JSON
shape (a script, a saved sweep) reads a built report and a loaded one alike.

This module imports nothing of `cluster`: the report, the settlement and the model all build
their part from here without importing each other.
"""

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self


@dataclass
class Integrity:
    """Whether the guest arrived whole: the digests of both copies."""

    verified: bool | None = None          # None: not checked (--no-verify, or failed run)
    source_digest: str | None = None
    destination_digest: str | None = None


@dataclass
class ReportBlock:
    """A block of the report: `to_dict` / `from_dict` in the JSON's own keys and order."""

    extra: dict = field(default_factory=dict, kw_only=True)

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    def to_dict(self) -> dict:
        d = {name: copy.deepcopy(getattr(self, name)) for name in self._names()}
        for key, value in self.extra.items():
            d.setdefault(key, copy.deepcopy(value))
        return d

    @classmethod
    def from_dict(cls, data: dict | None) -> Self | None:
        """The block as `to_dict` wrote it (None stays None: the report had no such block)."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} expects a JSON object, not {type(data).__name__}")
        known = set(cls._names())
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    # -- read as the JSON object it is written as ---------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in self._names():
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return key in self._names() or key in self.extra


@dataclass
class XbzrleBlock(ReportBlock):
    """QEMU's xbzrle-cache block (`nodes.migration.wire.xbzrle.XbzrleStats`)."""

    cache_size: int = 0
    bytes: int = 0
    pages: int = 0
    cache_miss: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    overflow: int = 0


@dataclass
class MultifdBlock(ReportBlock):
    """The multifd channels (`nodes.migration.send.multifd`); `compression_ratio` is page bytes
    before / after (None: nothing compressed); `cpu_seconds` of the channels' threads on
    each side, {source, destination}."""

    channels: int = 0
    bytes_per_channel: list[int] = field(default_factory=list)
    compression: str = "none"
    compression_level: int | None = None
    compression_ratio: float | None = None
    raw_bytes: int = 0
    compressed_bytes: int = 0
    syncs: int = 0
    cpu_seconds: dict[str, float | None] = field(default_factory=dict)


@dataclass
class PostcopyBlock(ReportBlock):
    """After a post-copy switch, from both sides (QEMU's names where it has them): when it
    switched, what was pushed and requested, the destination's faults and blocktime, the
    recoveries of a broken link, and the guest's page rate {before, during, after}."""

    switched_at_seconds: float | None = None
    downtime_qemu_seconds: float | None = None
    blocktime_seconds: float | None = None
    pages_requested: int | None = None
    pages_pushed: int | None = None
    requests_already_sent: int | None = None
    faults: int | None = None
    pages_faulted: int | None = None
    fault_latency_seconds: dict = field(default_factory=dict)
    fault_latency_mean_seconds: float | None = None
    discard_pages: int | None = None
    stale_pages: int | None = None
    pages_applied: int | None = None
    pages_applied_more_than_once: int | None = None
    duplicates_dropped: int | None = None
    recoveries: int = 0
    paused_seconds: float = 0.0
    guest_pages_per_second: dict[str, float | None] = field(default_factory=dict)
    # By channel (post-copy preempt, QEMU 8.0+): the bytes each carried after the switch
    # ({"main", "preempt"}) and each requested page's latency by the channel it landed from
    # ({channel: {fault_latency_seconds, fault_latency_mean_seconds, pages}}).
    channel_bytes: dict = field(default_factory=dict)
    fault_latency_by_channel: dict = field(default_factory=dict)
    preempt_channels: int = 0          # opened: at the switch, and after each recovery


@dataclass
class ConvergenceBlock(ReportBlock):
    """What the convergence aid did: the last cpu-throttle-percentage of a live round, the
    highest, the one the vCPU obtained, and the seconds dirty-limit slept the vCPU."""

    aid: str = ""                      # auto-converge | dirty-limit
    cpu_throttle_percentage: int = 0
    cpu_throttle_percentage_max: int = 0
    dirty_limit_throttle_seconds: float = 0.0
    # The cpu-throttle the vCPU obtained: its sleeps over its sleeps and the slices it ran
    # before them, in percent (None: no throttle ran).
    cpu_throttle_obtained_percentage: float | None = None


@dataclass
class ModelBlock(ReportBlock):
    """The analytic model beside the measurement (`cluster.model.block.model_block`): at the
    bandwidth it was given and why (`bandwidth_basis`), its prediction and the comparison
    with the run, the same at the nominal link, or the error that stopped it."""

    bandwidth_bytes_per_second: float | None = None
    bandwidth_basis: str | None = None
    resume_seconds: float = 0.0
    fixed_downtime: dict | None = None
    prediction: dict | None = None
    comparison: dict | None = None
    nominal: dict | None = None
    error: str | None = None


@dataclass
class ApplicationBlock(ReportBlock):
    """What a program guest's application felt (`cluster.appfeel`, issue 23): its operations
    per second and per-operation latency p50 / p99 {before, during, after} the migration,
    the brownout and blackout by the one definition (`workloads.brownout`), its 100 ms
    `samples` through the migration, and whether its own invariants held after it."""

    program: str = ""
    vcpus: int = 1
    start_wall: float | None = None
    end_wall: float | None = None
    after_seconds: float = 0.0
    baseline_ops_per_second: float | None = None
    before: dict = field(default_factory=dict)
    during: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    brownout_seconds: float | None = None
    brownout_depth: float | None = None
    brownout_worst: float | None = None
    blackout_seconds: float | None = None
    invariants_ok: bool | None = None
    invariants: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    error: str | None = None


# The report's typed blocks, by their JSON key.
BLOCKS: dict[str, type[ReportBlock]] = {
    "xbzrle": XbzrleBlock, "multifd": MultifdBlock, "model": ModelBlock,
    "convergence": ConvergenceBlock, "postcopy": PostcopyBlock,
    "application": ApplicationBlock}


def plain(value: Any) -> Any:
    """A report's field as JSON carries it: a block or the integrity as its object, the rest
    copied."""
    if isinstance(value, ReportBlock):
        return value.to_dict()
    if isinstance(value, Integrity):
        return asdict(value)
    return copy.deepcopy(value)
