"""The migration report: what one migration measured, as a dict, JSON and a human table.

Field names carry their units (`_seconds`, `_bytes`, `_pages`); milliseconds appear only in
the human table. Every report describes itself: guest, hosts, profile, policy and settings.
It is composed of typed parts (`cluster.reportparts`: the wire's xbzrle and multifd blocks,
post-copy, convergence, the model), each writing itself under its JSON key, so the JSON is
the flat object it has always been.
"""

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.inputfile import read_json
from cluster.postcopy_control import apply_postcopy
from cluster.reportparts import (
    BLOCKS,
    ApplicationBlock,
    ConvergenceBlock,
    Integrity,
    ModelBlock,
    MultifdBlock,
    PostcopyBlock,
    XbzrleBlock,
    plain,
)
from cluster.reporttable import report_table
from cluster.wireblocks import multifd_block
from nodes.errors import ConfigError
from nodes.migration.guestinfo import GuestInfo
from nodes.phase import Outcome

if TYPE_CHECKING:
    from cluster.settle import Settlement
    from nodes.migration.settings import MigrationSettings


@dataclass
class MigrationReport:
    migration_id: str
    guest: str
    source: str
    destination: str
    policy: str
    status: Outcome                        # completed | failed | cancelled
    error: str | None = None
    profile: str | None = None
    page_size: int = 4096
    guest_memory_bytes: int = 0
    link_bytes_per_second: float | None = None
    rate_limit_bytes_per_second: float | None = None
    latency_seconds: float = 0.0
    downtime_limit_seconds: float | None = None
    modes: dict = field(default_factory=dict)      # before, during, after
    rounds: list = field(default_factory=list)
    stop_reason: str | None = None
    # Why pre-copy stopped, machine-readably: a `nodes.migration.decide.policy.StopCode` value
    # (dirty-threshold, last-round-threshold, fits-downtime, max-iterations, max-factor, and
    # the convergence aids' paused, postcopy, rate-cap); completion-timeout or no-progress
    # for a migration an operator's timeout cancelled; None when the migration did not
    # complete otherwise (its status and error say why).
    stop_code: str | None = None
    # The qemu policy's downtime limit when pre-copy stopped (--downtime-steps step it).
    downtime_limit_in_force_seconds: float | None = None
    total_time_seconds: float = 0.0
    downtime_seconds: float | None = None          # source pause -> destination resume
    downtime_source_seconds: float | None = None   # pause -> RESULT seen at the source
    guest_observed_downtime_seconds: float | None = None
    pages_sent_total: int = 0
    bytes_sent_total: int = 0
    # Of pages_sent_total: pages sent whole and zero pages (QEMU's normal and duplicate);
    # the rest went as XBZRLE deltas or, unchanged, not at all (the xbzrle block).
    normal_pages: int = 0
    zero_pages: int = 0
    # QEMU's xbzrle-cache block {cache_size, bytes, pages, cache_miss, cache_miss_rate,
    # encoding_rate, overflow}, and the multifd block {channels, bytes_per_channel,
    # compression, compression_level, compression_ratio, cpu_seconds {source, destination}};
    # None when not used (`cluster.wireblocks`).
    xbzrle: XbzrleBlock | None = None
    multifd: MultifdBlock | None = None
    # How long the guest's workload had run when the migration began: with the workload's
    # fill, the model's count of non-zero pages at the start.
    workload_running_seconds: float = 0.0
    # QEMU's dirty-sync-count: 1 after setup, one more at every bitmap sync (a CLEAN here),
    # the stop-and-copy's included, so it lines up with query-migrate's.
    dirty_sync_count: int = 0
    throughput_bytes_per_second: float = 0.0
    # Source-side seconds of setup, precopy, stop_and_copy, handover, verify and cleanup.
    phase_seconds: dict = field(default_factory=dict)
    # CPU seconds of the sender's and the receiver's threads: which side was the bottleneck.
    cpu_seconds: dict = field(default_factory=dict)
    integrity: Integrity = field(default_factory=Integrity)
    model: ModelBlock | None = None
    # Where the guest runs afterwards (None: nowhere, see guest_lost), and the faults injected
    # (`nodes.faults.spec`) with what became of them (`cluster.settle`).
    guest_host: str | None = None
    guest_lost: bool = False
    faults: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    # The guest's cost: its page-write rate before and during the migration, the slowdown
    # (1 - during / before) and the seconds its vCPU slept throttled.
    guest_cost: dict | None = None
    # The convergence aids' outcome: the last cpu-throttle-percentage, the highest, and the
    # seconds dirty-limit slept the vCPU (per round in `rounds`).
    convergence: ConvergenceBlock | None = None
    # The progress over time, a sample at every phase change and round end and at least
    # every 100 ms (`nodes.migration.progress.ProgressHistory`): what `migbed plot` draws.
    progress_history: list = field(default_factory=list)
    # Keys of a saved report this version does not know (a newer one's), kept as they were
    # and written back by `to_dict`.
    extra: dict = field(default_factory=dict)
    # The destination's clock minus the source's, measured over the data channel as NTP
    # does (`nodes.migration.clock`), good to +- clock_rtt_seconds / 2; the downtimes above
    # are taken with the destination's times brought onto the source's clock by it.
    clock_offset_seconds: float | None = None
    clock_rtt_seconds: float | None = None
    # Bytes sent while the guest ran on the source, while it was paused, and after a
    # post-copy switch (QEMU's precopy-bytes, downtime-bytes, postcopy-bytes): they add up
    # to bytes_sent_total.
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    # QEMU's postcopy-requests: pages the destination asked for (each page one request).
    postcopy_requests: int = 0
    # Post-copy (`cluster.postcopy_control.postcopy_block`; None when the migration did not switch).
    postcopy: PostcopyBlock | None = None
    # What ran the guest's vCPUs on the source (thread | process, how many), whose dirty log
    # its rounds read (emulated: the Xen model's; kernel: userfaultfd write-protect and
    # PAGEMAP_SCAN), and that log's shadow faults over every CLEAN.
    vcpu: str = "thread"
    vcpus: int = 1
    dirty_log: str = "emulated"
    shadow_faults: int = 0
    # Its queue entry (`cluster.scheduler`): times, wait, links, rates; None: not queued.
    schedule: dict | None = None
    # A program guest's application (`cluster.appfeel`; None for a pattern workload): its
    # ops and latencies before, during and after, brownout, blackout and its invariants.
    application: ApplicationBlock | None = None
    # guest_observed_downtime_seconds is the larger of these: the guest's gap across the
    # hand-over, and its longest on the source while the migration ran (its own stalls).
    guest_gap_across_handover_seconds: float | None = None
    guest_gap_on_source_seconds: float | None = None

    @classmethod
    def build(cls, migration_id: str, guest: str, source_host: str, destination_host: str,
              info: GuestInfo, settings: "MigrationSettings",
              settled: "Settlement") -> "MigrationReport":
        """The report, built once from both sides' results as the control plane settled
        them (`cluster.settle`); `info` is the guest's GUEST_INFO."""
        source, dest = settled.source, settled.destination
        status, error, verified = _outcome(source, dest, settings.verify)
        completed = status == Outcome.COMPLETED
        downtime = (source.resume_wall - source.pause_wall
                    if source.pause_wall and source.resume_wall else None)
        rounds = [r.to_dict() for r in source.rounds]
        total = source.total_time_seconds
        report = cls(
            migration_id=migration_id, guest=guest, source=source_host,
            destination=destination_host, policy=settings.policy, status=status, error=error,
            profile=source.profile, page_size=info.page_size, guest_memory_bytes=info.memory_bytes,
            link_bytes_per_second=settings.link_bytes_per_second,
            rate_limit_bytes_per_second=settings.rate_limit_bytes_per_second,
            latency_seconds=settings.latency_seconds,
            downtime_limit_seconds=settings.downtime_limit_seconds,
            modes={"before": info.mode_before, "during": info.mode_during,
                   "after": (dest.mode_after if dest is not None else None) if completed
                   else info.mode_before},
            rounds=rounds, stop_reason=source.stop_reason,
            stop_code=source.stop_code if completed or status == Outcome.CANCELLED else None,
            downtime_limit_in_force_seconds=source.downtime_limit_in_force_seconds,
            total_time_seconds=total, downtime_seconds=downtime,
            downtime_source_seconds=source.downtime_source_seconds,
            guest_observed_downtime_seconds=_guest_downtime(source, dest),
            pages_sent_total=source.pages_sent_total, bytes_sent_total=source.bytes_sent_total,
            normal_pages=sum(r.normal_pages for r in source.rounds),
            zero_pages=sum(r.zero_pages for r in source.rounds),
            xbzrle=XbzrleBlock.from_dict(source.wire.get("xbzrle")),
            multifd=multifd_block(source, dest),
            workload_running_seconds=source.workload_running_seconds,
            dirty_sync_count=source.dirty_sync_count, phase_seconds=dict(source.phase_seconds),
            throughput_bytes_per_second=source.bytes_sent_total / total if total else 0.0,
            cpu_seconds={"source": source.cpu_seconds if not source.source_lost else None,
                         "destination": dest.cpu_seconds if dest is not None else None},
            integrity=Integrity(verified, source.source_digest, source.destination_digest),
            guest_host=settled.guest_host, guest_lost=settled.guest_lost,
            faults=list(settled.faults), notes=list(settled.notes),
            guest_cost=source.guest_cost,
            convergence=_convergence(rounds, settings, source.guest_cost),
            progress_history=list(source.progress_history),
            clock_offset_seconds=source.clock_offset_seconds,
            clock_rtt_seconds=source.clock_rtt_seconds,
            precopy_bytes=source.precopy_bytes, downtime_bytes=source.downtime_bytes,
            postcopy_bytes=source.postcopy_bytes, postcopy_requests=source.postcopy_requests,
            vcpu=source.vcpu, vcpus=source.vcpus, dirty_log=source.dirty_log,
            shadow_faults=source.shadow_faults,
            guest_gap_across_handover_seconds=(
                dest.guest_observed_downtime_seconds if dest is not None else None),
            guest_gap_on_source_seconds=source.source_longest_gap_seconds)
        apply_postcopy(report, source, dest, settled)
        why = dest.error if dest is not None else None
        if not completed and why and why != report.error:
            report.notes.append(f"{destination_host} says: {why}")
        return report

    def to_dict(self) -> dict:
        d = {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        for key, value in copy.deepcopy(self.extra).items():
            if key == "integrity" and isinstance(value, dict):
                d["integrity"] = {**value, **d["integrity"]}
            else:
                d.setdefault(key, value)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "MigrationReport":
        """A report as `to_dict` wrote it, by this version or another: keys this version
        does not know go to `extra` (kept, not refused), keys an older one lacked take their
        defaults. A dict that is no report at all is a ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError("not a migration report (a JSON object is expected)")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(f"not a migration report: it has no {missing[0]!r}")
        known = {f.name for f in fields(cls)}
        extra = dict(data.get("extra") or {})
        kwargs = {}
        for key, value in data.items():
            if key in known and key != "extra":
                kwargs[key] = value
            elif key != "extra":
                extra[key] = value
        integrity = dict(kwargs.get("integrity") or {})
        known_integrity = {f.name for f in fields(Integrity)}
        unknown = {k: integrity.pop(k) for k in list(integrity) if k not in known_integrity}
        if unknown:
            extra["integrity"] = unknown
        kwargs["integrity"] = Integrity(**integrity)
        for key, block in BLOCKS.items():
            try:
                kwargs[key] = block.from_dict(kwargs.get(key))
            except TypeError:
                raise ConfigError(f"not a migration report: {key} is not an object") from None
        status = kwargs["status"]
        kwargs["status"] = Outcome(status) if status in OUTCOMES else status
        for key in ("rounds", "progress_history"):
            value = kwargs.get(key) or []
            if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                raise ConfigError(f"not a migration report: {key} is not a list of objects")
            kwargs[key] = value
        return cls(**kwargs, extra=extra)

    @classmethod
    def load(cls, path: str | Path) -> "MigrationReport":
        """A saved report: what `migbed migrate --json` (or `--output`) wrote, or one run
        of a sweep (`runs/*.json`, the report inside it). One-line ConfigError otherwise."""
        data = read_json(path, "a migration's report")
        if isinstance(data, dict) and isinstance(data.get("report"), dict):
            data = data["report"]                   # a sweep's run file
        elif isinstance(data, dict) and "report" in data and data["report"] is None:
            raise ConfigError(f"{path} is a sweep run that never got a report "
                              f"({data.get('error')})")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: not a migration report ({exc})") from None

    @property
    def live_rounds(self) -> int:
        return sum(1 for r in self.rounds if not r.get("final"))

    def pages_factor(self) -> float:
        """Pages sent over the guest's pages: Xen's 'Total pages sent= N (F x)'."""
        pages = self.guest_memory_bytes // self.page_size if self.page_size else 0
        return self.pages_sent_total / pages if pages else 0.0

    def table(self) -> str:
        """The report as a person reads it (`cluster.reporttable`)."""
        return report_table(self)


# What every report of every version has; anything else may be missing from an old one.
REQUIRED_KEYS = ("migration_id", "guest", "source", "destination", "policy", "status")
OUTCOMES = {o.value for o in Outcome}


def _outcome(source, dest, verify: bool) -> tuple[Outcome, str | None, bool | None]:
    """The migration's status and error as both sides ended it (a source that completed
    against a destination that did not is a failure), and whether the digests agree (None:
    not checked)."""
    status, error = source.status, source.error
    if status == Outcome.COMPLETED and dest is not None and not dest.completed:
        status, error = Outcome.FAILED, dest.error
    checked = verify and status == Outcome.COMPLETED and not source.source_lost
    verified = (source.source_digest is not None and source.source_digest
                == source.destination_digest) if checked else None
    return status, error, verified


def _convergence(rounds: list[dict], settings: "MigrationSettings",
                 cost: dict | None) -> ConvergenceBlock | None:
    """What the throttle did, when an aid was asked for: asked per round, and obtained."""
    if not (settings.auto_converge or settings.dirty_limit_bytes_per_second is not None):
        return None
    pcts = [r.get("cpu_throttle_percentage", 0) for r in rounds]
    live = [r for r in rounds if not r.get("final")]
    return ConvergenceBlock(
        aid="auto-converge" if settings.auto_converge else "dirty-limit",
        cpu_throttle_percentage=live[-1].get("cpu_throttle_percentage", 0) if live else 0,
        cpu_throttle_percentage_max=max(pcts, default=0),
        dirty_limit_throttle_seconds=sum(r.get("dirty_limit_throttle_seconds", 0.0)
                                         for r in rounds),
        cpu_throttle_obtained_percentage=(cost or {}).get("cpu_throttle_obtained_percentage"))


def _guest_downtime(source, dest) -> float | None:
    """The longest stretch without guest progress: across the hand-over, or on the source."""
    across = dest.guest_observed_downtime_seconds if dest is not None else None
    if across is None:
        return None
    return max(across, source.source_longest_gap_seconds or 0.0)
