"""The control plane's side of post-copy: settling a migration that switched, the report's
`postcopy` block. (Recovering a paused migration is `cluster.driver.recover_migration`.)

After the switch the guest runs on the destination and only the source has its missing
pages, so the outcomes are QEMU's:

- a host died: the guest is lost (neither host has all of it). The surviving host is told
  (`postcopy_lost` on a destination, `settle_paused ... lost` on a source), so its frames go.
- the link broke and did not come back within the timeout: `postcopy-paused`. The guest runs
  on the destination; `migbed migrate-recover` (`recover_migration`) resumes the migration
  once the link is back. A destination that finished anyway (its RESULT lost on the way), or
  one that never resumed the guest, is settled as such.
"""

from typing import Protocol

from cluster.reportparts import PostcopyBlock
from cluster.settle import FaultControl, Settlement
from nodes.errors import ClusterError, MigbedError
from nodes.migration.clock import to_source_clock
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.results import DestinationResult, SourceResult
from nodes.phase import Outcome, PausedEnd, Phase

POSTCOPY_STATES = (Phase.POSTCOPY.value, Outcome.PAUSED)
DEAD = "dead"


def settle_switched(control: FaultControl, source: SourceResult, info: GuestInfo
                    ) -> Settlement | None:
    """The settlement of a migration post-copy settles (`postcopy_outcome`), None for any
    other: what `FaultControl.settle` is handed by the driver, so that `cluster.settle`
    needs nothing of post-copy."""
    return settle_postcopy(control, source, info) if postcopy_outcome(control, source) else None


def postcopy_outcome(control: FaultControl, source: SourceResult) -> bool:
    """Whether post-copy settles this end: the migration switched and did not complete, or
    its source died while the destination runs the guest in post-copy."""
    if source.switched and not source.completed:
        return True
    return source.source_lost and destination_state(control) in POSTCOPY_STATES


def destination_state(control: FaultControl) -> str | None:
    try:
        return control.dst.call("incoming_status", control.mid, timeout=control.timeout)
    except ClusterError:
        return DEAD
    except MigbedError:
        return None


def settle_postcopy(control: FaultControl, source: SourceResult, info: GuestInfo) -> Settlement:
    if source.source_lost:
        return _source_died(control, source)
    if source.status == Outcome.PAUSED:
        return _paused(control, source)
    return _failed(control, source)


def _lost_note(what: str) -> str:
    return f"{what}: the guest is lost (after the post-copy switch neither host has all of it)"


def _source_died(control: FaultControl, source: SourceResult) -> Settlement:
    why = f"source host {control.src.name} died after the switch to post-copy"
    dest = _tell_destination_lost(control, why)
    source.switched, source.error, source.status = True, why, Outcome.FAILED
    source.pause_wall = (dest.source_timing or {}).get("pause_wall")
    source.resume_wall = to_source_clock(
        dest.resume_wall, (dest.source_timing or {}).get("clock_offset_seconds"))
    return Settlement(source, dest, None, True, [_lost_note(why)])


def _tell_destination_lost(control: FaultControl, why: str) -> DestinationResult:
    try:
        return (control.dst.call("postcopy_lost", control.mid, why, control.timeout,
                                 timeout=control.timeout * 2)
                or DestinationResult(error=why))
    except ClusterError as exc:
        return DestinationResult(host_dead=True, error=f"destination unreachable: {exc}")
    except MigbedError as exc:
        return DestinationResult(status=Outcome.UNKNOWN, error=str(exc))


def _settle_source(control: FaultControl, outcome: PausedEnd, why: str) -> SourceResult:
    return control.src.call("settle_paused", control.mid, outcome, why,
                            timeout=control.timeout * 2)


def _paused(control: FaultControl, source: SourceResult) -> Settlement:
    src, dst, guest = control.src, control.dst, control.guest
    state = destination_state(control)
    if state == DEAD:
        why = f"destination host {dst.name} died after the switch to post-copy"
        settled = _settle_source(control, PausedEnd.LOST, why)
        return Settlement(settled, DestinationResult(host_dead=True, error=why), None, True,
                          [_lost_note(why)])
    if state in POSTCOPY_STATES:
        dest = DestinationResult(status=Outcome.PAUSED, resume_wall=source.resume_wall)
        return Settlement(source, dest, dst.name, False, [
            f"post-copy paused: the guest runs on {dst.name}, a vCPU touching a missing page "
            f"waits; once the link is back run `migbed migrate-recover {guest}`"])
    if state == Outcome.COMPLETED:
        settled = _settle_source(control, PausedEnd.COMPLETED, "")
        dest = control._verdict()
        settled.destination_digest = dest.destination_digest
        settled.resume_wall = settled.resume_wall or to_source_clock(
            dest.resume_wall, settled.clock_offset_seconds)
        return Settlement(settled, dest, dst.name, False, [
            f"{dst.name} had completed the post-copy; its RESULT was lost on the broken link"])
    why = f"{dst.name} never resumed the guest ({state or 'gone'})"
    settled = _settle_source(control, PausedEnd.RESUME, why)
    return Settlement(settled, control._abandon(), src.name, False, [
        f"{why}: it resumes on {src.name} from its paused copy"])


def _failed(control: FaultControl, source: SourceResult) -> Settlement:
    if not source.guest_lost:   # the destination had confirmed it all: only this side failed
        return Settlement(source, control._verdict(), control.dst.name, False,
                          [f"{control.dst.name} has the whole guest; the source failed "
                           f"after it had: {source.error}"])
    state = destination_state(control)
    why = f"the post-copy could not complete ({source.error})"
    dest = (_tell_destination_lost(control, why) if state in POSTCOPY_STATES
            else control._verdict() if state != DEAD
            else DestinationResult(host_dead=True, error=f"{control.dst.name} died"))
    return Settlement(source, dest, None, True, [_lost_note(why)])


# -- the report -------------------------------------------------------------------------------
class PostcopyReport(Protocol):
    """What the post-copy parts of a report read and set of it (a `cluster.report.
    MigrationReport`, which builds them: a Protocol so that this module needs not import
    the report back)."""

    status: str
    destination: str
    modes: dict
    postcopy: PostcopyBlock | None
    precopy_bytes: int
    downtime_bytes: int
    postcopy_bytes: int
    postcopy_requests: int


def postcopy_block(source: SourceResult,
                   dest: DestinationResult | None) -> PostcopyBlock | None:
    """The report's `postcopy` block (None when the migration did not switch), from both
    sides: QEMU's names where it has them."""
    d = (dest.postcopy if dest is not None else None) or {}
    if not (source.switched or d):
        return None
    s = source.postcopy or {}
    return PostcopyBlock.from_dict({
        "switched_at_seconds": s.get("switched_at_seconds"),
        "downtime_qemu_seconds": s.get("downtime_qemu_seconds"),
        "blocktime_seconds": d.get("blocktime_seconds"),
        "pages_requested": s.get("pages_requested"),
        "pages_pushed": s.get("pages_pushed"),
        "requests_already_sent": s.get("requests_already_sent"),
        "faults": d.get("faults"),
        # the pages the destination asked for, each once (one latency sample each when it
        # lands); the source's postcopy_requests misses any still in flight when it ended
        "pages_faulted": d.get("pages_faulted"),
        "fault_latency_seconds": d.get("fault_latency_seconds") or {},
        "fault_latency_mean_seconds": d.get("fault_latency_mean_seconds"),
        "discard_pages": d.get("discard_pages"),
        "stale_pages": d.get("stale_pages"),
        "pages_applied": d.get("pages_applied"),
        "pages_applied_more_than_once": d.get("pages_applied_more_than_once"),
        "duplicates_dropped": d.get("duplicates_dropped"),
        "recoveries": s.get("recoveries", 0),
        # how long the destination waited for its source to come back (the source may notice
        # a stall only when it ends)
        "paused_seconds": d.get("paused_seconds", s.get("paused_seconds", 0.0)),
        "guest_pages_per_second": {"before": s.get("guest_rate_before"),
                                   "during": d.get("guest_rate_during"),
                                   "after": d.get("guest_rate_after")},
        "channel_bytes": s.get("channel_bytes") or {},
        "preempt_channels": s.get("preempt_channels", 0),
        "fault_latency_by_channel": d.get("fault_latency_by_channel") or {},
    })


def apply_postcopy(report: PostcopyReport, source: SourceResult,
                   dest: DestinationResult | None, settled: Settlement) -> None:
    """The post-copy parts of a report being built: its block, and `modes` gaining the
    destination's mode while pages were missing."""
    block = postcopy_block(source, dest)
    report.postcopy = block
    if block is None:
        return
    mode = ((dest.postcopy if dest is not None else None) or {}).get("mode", "vp")
    report.modes["postcopy"] = mode
    if report.status != Outcome.COMPLETED:
        report.modes["after"] = (None if settled.guest_lost else
                                 mode if settled.guest_host == report.destination
                                 else report.modes["before"])


def postcopy_lines(report: PostcopyReport) -> list[str]:
    """The report's table lines of post-copy (and of the bytes by stage)."""
    lines = [f"  bytes: precopy {report.precopy_bytes}, downtime {report.downtime_bytes}, "
             f"postcopy {report.postcopy_bytes}"]
    b = report.postcopy
    if b is None:
        return lines
    ms = _ms
    rates = b.guest_pages_per_second
    lines += [
        f"  post-copy: switched at {ms(b.switched_at_seconds)} (QEMU's downtime "
        f"{ms(b.downtime_qemu_seconds)}), {report.postcopy_requests} page requests, "
        f"{b.pages_requested} pages sent on request, {b.pages_pushed} pushed",
        f"  post-copy: vCPU blocked {ms(b.blocktime_seconds)} in {b.faults} faults, "
        f"mean fault latency {ms(b.fault_latency_mean_seconds)}; guest pages/s before "
        f"{_rate(rates['before'])}, during {_rate(rates['during'])}, after "
        f"{_rate(rates['after'])}"]
    if b.channel_bytes.get("preempt"):
        lat = b.fault_latency_by_channel
        lines.append("  post-copy preempt: " + ", ".join(
            f"{ch} {b.channel_bytes.get(ch, 0)} bytes, {lat.get(ch, {}).get('pages', 0)} "
            f"faulted pages at {ms(lat.get(ch, {}).get('fault_latency_mean_seconds'))} mean"
            for ch in ("main", "preempt")))
    if b.recoveries or b.paused_seconds:
        lines.append(f"  post-copy: paused {ms(b.paused_seconds)}, "
                     f"{b.recoveries} recover{'y' if b.recoveries == 1 else 'ies'}")
    return lines


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"

