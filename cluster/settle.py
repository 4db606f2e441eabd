"""Settling a migration when its sender has ended: both sides' results, whatever became of
the hosts, and where the guest is now. And, while it runs, the host kills its faults ask for.

`FaultControl` is made by `cluster.driver.run_migration` for every migration:

- while the migration runs, `poll(progress)` carries out the host kills its faults ask for
  (the sender waits at the fault's stage and shows it in its progress; see `nodes.faults`);
- when the sender has ended, `settle(pending)` collects both sides into a `Settlement`: a
  source that died (its guest died with it, unless the hand-over was done and the
  destination resumed it), or a hand-over whose RESULT never reached the source (the
  destination is asked whether it resumed the guest: if so the source drops its paused copy,
  if it failed or died the paused copy resumes on the source, and if it cannot tell in time
  the copy stays paused, as libxl leaves it). The settlement says where the guest ended up,
  whether it was lost, and what each fault did.

Every call here is bounded by the migration's `timeout_seconds`.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nodes.errors import ClusterError, MigbedError, MigrationStillRunning
from nodes.faults.spec import HOST_KILLS, FaultKind
from nodes.migration.clock import to_source_clock
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.progress import Progress
from nodes.migration.results import DestinationResult, SourceResult
from nodes.migration.settings import MigrationSettings
from nodes.phase import Outcome, Phase

VERDICT_ATTEMPTS = 3      # waits of timeout_seconds each for a destination still restoring
STATUS_POLL_SECONDS = 0.005


@dataclass
class Settlement:
    """Both sides of a migration as the control plane settled them, and where its guest is.
    `destination` is None when the destination died after it had resumed the guest."""

    source: SourceResult
    destination: DestinationResult | None
    guest_host: str | None = None
    guest_lost: bool = False
    notes: list[str] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)   # each fault and what became of it


class FaultControl:
    def __init__(self, src, dst, migration_id: str, guest: str, settings: MigrationSettings):
        self.src = src
        self.dst = dst
        self.mid = migration_id
        self.guest = guest
        self.settings = settings
        self.timeout = settings.timeout_seconds
        self._kills_left = sum(1 for f in settings.faults if FaultKind(f.kind) in HOST_KILLS)
        self._done: set[int] = set()
        self.killed: dict[str, dict] = {}      # host name -> {"role", "fault", "stage"}

    @property
    def armed(self) -> bool:
        """A host kill is still to come: poll the sender's progress often."""
        return self._kills_left > 0

    # -- while the migration runs ------------------------------------------------------------
    def poll(self, progress: Progress | None) -> None:
        f = progress.fault if progress else None
        if not f or f["index"] in self._done:
            return
        self._done.add(f["index"])
        self._kills_left -= 1
        if f["kind"] == FaultKind.KILL_DESTINATION.value:
            if f["stage"] == Phase.HANDOVER.value:
                # The guest belongs to the destination once it has resumed it: kill it then,
                # so the fault means the same thing every time (the guest dies with it).
                self._wait_destination_done()
            self._kill(self.dst, "destination", f)
            try:
                self.src.call("fault_done", self.mid, f["index"], timeout=self.timeout)
            except MigbedError:
                pass
        else:
            self._kill(self.src, "source", f)

    def _wait_destination_done(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                status = self.dst.call("incoming_status", self.mid, timeout=self.timeout)
            except MigbedError:
                return
            if status in (None, Outcome.COMPLETED, Outcome.FAILED):
                return
            time.sleep(STATUS_POLL_SECONDS)

    def _kill(self, handle, role: str, f: dict) -> None:
        try:
            handle.kill()
        except Exception:  # noqa: BLE001 - already dead is as good as killed
            pass
        self.killed[handle.name] = {"role": role, "fault": f["text"], "stage": f["stage"]}

    # -- when the sender has ended -------------------------------------------------------
    def settle(self, pending, info: GuestInfo,
               switched: "Callable[[FaultControl, SourceResult, GuestInfo], Settlement | None]"
               ) -> Settlement:
        """Both sides of the migration, whatever became of the hosts. `switched` settles a
        migration that switched to post-copy and returns None for any other
        (`cluster.postcopy_control.settle_switched`, handed in by the driver: post-copy builds on
        this module, not the other way round)."""
        try:
            source: SourceResult = pending.result(self.timeout)
        except ClusterError as exc:
            source = SourceResult(source_lost=True, mode_before=info.mode_before,
                                  error=f"source host {self.src.name} died during the "
                                        f"migration ({exc})")
        out = switched(self, source, info)
        if out is not None:
            out.faults = self._faults(out)
            return out
        verdict_needed = source.completed or source.source_lost or source.handover_unknown
        dest = self._verdict() if verdict_needed else self._abandon()
        out = Settlement(source, dest)
        if source.source_lost:
            self._settle_lost_source(out)
        elif source.handover_unknown:
            self._settle_handover(out)
        else:
            out.guest_host = self.dst.name if source.completed else self.src.name
        if out.source.completed and self.dst.name in self.killed:
            out.guest_host, out.guest_lost = None, True
            out.notes.append(f"destination host {self.dst.name} was killed after it had "
                             "resumed the guest: the guest died with it (the source had "
                             "rightly dropped its stale copy)")
            out.destination = None
        out.faults = self._faults(out)
        return out

    def _verdict(self) -> DestinationResult:
        """The destination's result, waiting (bounded) while it is still restoring."""
        last: Exception | None = None
        for _ in range(VERDICT_ATTEMPTS):
            try:
                return self.dst.call("incoming_report", self.mid, self.timeout,
                                     timeout=self.timeout * 2)
            except ClusterError as exc:
                return DestinationResult(host_dead=True,
                                         error=f"destination unreachable: {exc}")
            except MigrationStillRunning as exc:
                last = exc
            except MigbedError as exc:
                last = exc
                break
        return DestinationResult(status=Outcome.UNKNOWN,
                                 error=f"destination gave no verdict: {last}")

    def _abandon(self) -> DestinationResult:
        try:
            return (self.dst.call("abandon_incoming", self.mid, timeout=self.timeout * 2)
                    or DestinationResult())
        except Exception as exc:  # noqa: BLE001 - a dead destination must not hide the report
            return DestinationResult(host_dead=True, error=f"destination unreachable: {exc}")

    def _settle_lost_source(self, out: Settlement) -> None:
        dest, src, dst = out.destination, self.src, self.dst
        if dest.completed:
            timing = dest.source_timing or {}
            out.source = SourceResult(
                status=Outcome.COMPLETED, source_lost=True, mode_before=out.source.mode_before,
                pause_wall=timing.get("pause_wall"),
                resume_wall=to_source_clock(dest.resume_wall,
                                            timing.get("clock_offset_seconds")),
                clock_offset_seconds=timing.get("clock_offset_seconds"),
                clock_rtt_seconds=timing.get("clock_rtt_seconds"),
                destination_digest=dest.destination_digest)
            out.guest_host = dst.name
            out.notes.append(f"source host {src.name} died after the hand-over; the guest "
                             f"runs on {dst.name} (not verified: the source's copy died "
                             "with its host)")
        else:
            out.guest_lost = True
            out.notes.append(f"source host {src.name} died before the hand-over: the guest "
                             "died with it (no other copy ran)")

    def _settle_handover(self, out: Settlement) -> None:
        src, dst, source, dest = self.src, self.dst, out.source, out.destination
        why = source.error
        if dest.status == Outcome.UNKNOWN:
            out.notes.append(f"hand-over unresolved ({why}); {dst.name} gave no verdict in "
                             f"{VERDICT_ATTEMPTS} x {self.timeout:g} s, so {src.name} keeps "
                             f"the guest paused as {self.guest}--migratedaway")
            return
        resumed_there = dest.completed
        try:
            extra = src.call("resolve_handover", self.guest, source.mode_before,
                             resumed_there, timeout=self.timeout)
        except MigbedError as exc:
            out.notes.append(f"hand-over unresolved: {src.name} did not answer ({exc})")
            out.guest_host = dst.name if resumed_there else None
            out.guest_lost = not resumed_there
            return
        if resumed_there:
            source.status, source.error = Outcome.COMPLETED, None
            source.source_digest = extra["source_digest"]
            source.resume_wall = to_source_clock(dest.resume_wall,
                                                 source.clock_offset_seconds)
            source.destination_digest = dest.destination_digest
            out.guest_host = dst.name
            out.notes.append(f"hand-over unanswered ({why}); {dst.name} had resumed the guest, "
                             f"so {src.name} dropped its paused copy")
        else:
            source.resume_wall = extra["resume_wall"]
            out.guest_host = src.name
            out.notes.append(f"hand-over unanswered ({why}); {dst.name} did not resume the "
                             f"guest ({dest.error}), so it resumed on {src.name} from "
                             "its paused copy")

    def _faults(self, out: Settlement) -> list[dict]:
        """Each fault asked for, whether it fired, and the host it killed."""
        fired = {f["text"] for f in out.source.faults}
        if out.destination is not None:
            fired |= {f["text"] for f in out.destination.faults}
        faults = []
        for spec in self.settings.faults:
            text = spec.to_text()
            entry = {"fault": text, "fired": text in fired or any(
                k["fault"] == text for k in self.killed.values())}
            for host, k in self.killed.items():
                if k["fault"] == text:
                    entry["killed_host"] = host
            faults.append(entry)
        return faults
