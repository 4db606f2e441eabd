"""The migration report: what one migration measured, as a dict, JSON and a human table.

Field names carry their units (`_seconds`, `_bytes`, `_pages`); milliseconds appear only in
the human table. Every report describes itself: guest, hosts, profile, policy and settings.
"""

import json
from dataclasses import asdict, dataclass, field

from nodes.units import format_bytes


@dataclass
class Integrity:
    verified: bool | None = None          # None: not checked (--no-verify, or failed run)
    source_digest: str | None = None
    destination_digest: str | None = None


@dataclass
class MigrationReport:
    migration_id: str
    guest: str
    source: str
    destination: str
    policy: str
    status: str                            # completed | failed | cancelled
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
    total_time_seconds: float = 0.0
    downtime_seconds: float | None = None          # source pause -> destination resume
    downtime_source_seconds: float | None = None   # pause -> RESULT seen at the source
    guest_observed_downtime_seconds: float | None = None
    pages_sent_total: int = 0
    bytes_sent_total: int = 0
    throughput_bytes_per_second: float = 0.0
    # Source-side seconds of setup, precopy, stop_and_copy, handover, verify and cleanup.
    phase_seconds: dict = field(default_factory=dict)
    # CPU seconds of the sender's and the receiver's threads: which side was the bottleneck.
    cpu_seconds: dict = field(default_factory=dict)
    integrity: Integrity = field(default_factory=Integrity)
    model: dict | None = None
    # Where the guest runs afterwards (None: nowhere, see guest_lost), and the faults injected
    # (`nodes.faults.spec`) with what became of them (`cluster.settle`).
    guest_host: str | None = None
    guest_lost: bool = False
    faults: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "MigrationReport":
        data = dict(data)
        data["integrity"] = Integrity(**data.get("integrity", {}))
        return cls(**data)

    @property
    def live_rounds(self) -> int:
        return sum(1 for r in self.rounds if not r.get("final"))

    def _factor(self) -> float:
        """Pages sent over the guest's pages: Xen's 'Total pages sent= N (F x)'."""
        pages = self.guest_memory_bytes // self.page_size if self.page_size else 0
        return self.pages_sent_total / pages if pages else 0.0

    def table(self) -> str:
        """The report as a person reads it."""
        ms = _ms
        lines = [
            f"migration {self.migration_id}: {self.guest} {self.source} -> {self.destination}"
            f"  [{self.status}]" + (f"  error: {self.error}" if self.error else ""),
            f"  policy {self.policy}, profile {self.profile}, guest "
            f"{format_bytes(self.guest_memory_bytes)}, link "
            f"{_rate(self.link_bytes_per_second)}, rate limit "
            f"{_rate(self.rate_limit_bytes_per_second)}, latency {ms(self.latency_seconds)}",
            f"  modes: {self.modes.get('before')} -> {self.modes.get('during')} -> "
            f"{self.modes.get('after')}",
            "  round     sent  skipped  dirtied   time       rate      dirty/s",
        ]
        for r in self.rounds:
            tag = "final" if r.get("final") else str(r["index"])
            lines.append(
                f"  {tag:>5} {r['pages_sent']:>8} {r['pages_skipped']:>8} "
                f"{r['pages_dirtied']:>8} {ms(r['duration_seconds']):>9} "
                f"{_rate(r['throughput_bytes_per_second']):>12} "
                f"{r['dirty_rate_pages_per_second']:>10.0f}")
        lines += [
            f"  stop reason: {self.stop_reason}",
            f"  total time {ms(self.total_time_seconds)}, downtime {ms(self.downtime_seconds)}"
            f" (source view {ms(self.downtime_source_seconds)}, guest saw "
            f"{ms(self.guest_observed_downtime_seconds)})",
            f"  total pages sent = {self.pages_sent_total} ({self._factor():.2f}x), "
            f"{format_bytes(self.bytes_sent_total)} on the wire, "
            f"{_rate(self.throughput_bytes_per_second)}",
            f"  integrity: {_verdict(self.integrity.verified)}",
        ]
        if self.phase_seconds:
            lines.append("  phases: " + ", ".join(f"{k.replace('_', '-')} {ms(v)}"
                                                  for k, v in self.phase_seconds.items()))
        cpu = {k: v for k, v in self.cpu_seconds.items() if v is not None}
        if cpu:
            lines.append("  CPU: " + ", ".join(f"{k} {ms(v)}" for k, v in cpu.items()))
        for f in self.faults:
            lines.append(f"  fault {f['fault']}: {'fired' if f['fired'] else 'never reached'}"
                         + (f", killed {f['killed_host']}" if f.get("killed_host") else ""))
        lines += [f"  note: {n}" for n in self.notes]
        if self.faults or self.guest_lost:
            lines.append(f"  guest: {'LOST' if self.guest_lost else 'on ' + str(self.guest_host)}")
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _rate(bps: float | None) -> str:
    return "unlimited" if not bps else f"{format_bytes(bps)}/s"


def _verdict(v: bool | None) -> str:
    return {True: "verified (digests equal)", False: "MISMATCH", None: "not checked"}[v]
