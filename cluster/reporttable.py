"""A migration report as a person reads it: its table of rounds and the lines of each part
(the wire, post-copy, the application, the queue). Milliseconds appear only here."""

from typing import Any

from cluster.appfeel import application_lines
from cluster.postcopy_control import postcopy_lines
from cluster.scheduler import schedule_lines
from cluster.wireblocks import wire_lines
from nodes.units import format_bytes


def report_table(self: Any) -> str:
    """A migration report (`cluster.report.MigrationReport`, not imported: it imports this)
    as a person reads it."""
    ms = _ms
    lines = [
        f"migration {self.migration_id}: {self.guest} {self.source} -> {self.destination}"
        f"  [{self.status}]" + (f"  error: {self.error}" if self.error else ""),
        f"  policy {self.policy}, profile {self.profile}, guest "
        f"{format_bytes(self.guest_memory_bytes)}, link "
        f"{_rate(self.link_bytes_per_second)}, rate limit "
        f"{_rate(self.rate_limit_bytes_per_second)}, latency {ms(self.latency_seconds)}",
        f"  modes: {self.modes.get('before')} -> {self.modes.get('during')} -> "
        + (f"{self.modes['postcopy']} (post-copy, on the destination) -> "
           if "postcopy" in self.modes else "") + f"{self.modes.get('after')}"
        + f"; vCPUs: {self.vcpus} {self.vcpu}, dirty log {self.dirty_log} "
          f"({self.shadow_faults} shadow faults)",
        "  round     sent  skipped  dirtied   time       rate      dirty/s",
    ]
    for r in self.rounds:
        tag = "post" if r.get("postcopy") else "final" if r.get("final") else str(r["index"])
        lines.append(
            f"  {tag:>5} {r['pages_sent']:>8} {r['pages_skipped']:>8} "
            f"{r['pages_dirtied']:>8} {ms(r['duration_seconds']):>9} "
            f"{_rate(r['throughput_bytes_per_second']):>12} "
            f"{r['dirty_rate_pages_per_second']:>10.0f}")
    lines += _aid_lines(self)
    lines += wire_lines(self)
    lines += [
        f"  stop reason: {self.stop_reason} ({self.stop_code}); dirty-sync-count "
        f"{self.dirty_sync_count}",
        f"  total time {ms(self.total_time_seconds)}, downtime {ms(self.downtime_seconds)}"
        f" (source view {ms(self.downtime_source_seconds)}, guest saw "
        f"{ms(self.guest_observed_downtime_seconds)})",
        f"  total pages sent = {self.pages_sent_total} ({self.pages_factor():.2f}x), "
        f"{format_bytes(self.bytes_sent_total)} on the wire, "
        f"{_rate(self.throughput_bytes_per_second)}",
        f"  integrity: {_verdict(self.integrity.verified)}",
    ]
    lines += postcopy_lines(self)
    lines += application_lines(self)
    if self.phase_seconds:
        lines.append("  phases: " + ", ".join(f"{k.replace('_', '-')} {ms(v)}"
                                              for k, v in self.phase_seconds.items()))
    cpu = {k: v for k, v in self.cpu_seconds.items() if v is not None}
    if cpu:
        lines.append("  CPU: " + ", ".join(f"{k} {ms(v)}" for k, v in cpu.items()))
    for f in self.faults:
        lines.append(f"  fault {f['fault']}: {'fired' if f['fired'] else 'never reached'}"
                     + (f", killed {f['killed_host']}" if f.get("killed_host") else ""))
    lines += [f"  note: {n}" for n in self.notes] + schedule_lines(self.schedule)
    if self.faults or self.guest_lost:
        lines.append(f"  guest: {'LOST' if self.guest_lost else 'on ' + str(self.guest_host)}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _rate(bps: float | None) -> str:
    return "unlimited" if not bps else f"{format_bytes(bps)}/s"


def _verdict(v: bool | None) -> str:
    return {True: "verified (digests equal)", False: "MISMATCH", None: "not checked"}[v]


def _aid_lines(r: Any) -> list[str]:
    lines = []
    c = r.convergence
    if c and c.aid == "auto-converge":
        got = c.cpu_throttle_obtained_percentage
        lines.append("  auto-converge: cpu throttle per round "
                     + " ".join(str(x.get("cpu_throttle_percentage", 0)) for x in r.rounds
                                if not x.get("final")) + " %"
                     + (f" (the vCPU slept {got:.0f} % of its throttled time)"
                        if got is not None else ""))
    elif c:
        lines.append("  dirty-limit: the vCPU slept "
                     + " ".join(f"{x.get('dirty_limit_throttle_seconds', 0.0) * 1000:.0f}"
                                for x in r.rounds) + " ms per round"
                     + f" ({_ms(c.dirty_limit_throttle_seconds)} in all)")
    fixed = r.model.fixed_downtime if r.model is not None else None
    if fixed:
        lines.append(f"  fixed downtime subtracted from the budget: {_ms(fixed['seconds'])} "
                     f"({fixed['basis']})")
    g = r.guest_cost
    if g and g.get("write_rate_before_pages_per_second"):
        slow = g.get("slowdown")
        lines.append(f"  guest cost: {g['write_rate_before_pages_per_second']:.0f} -> "
                     f"{g['write_rate_during_pages_per_second'] or 0:.0f} page writes/s"
                     + (f" (slowdown {slow * 100:.0f} %)" if slow is not None else "")
                     + f", throttled {_ms(g.get('throttled_seconds'))}")
    return lines
