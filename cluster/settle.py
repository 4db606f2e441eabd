"""The control plane's side of a migration that meets a fault: carrying out host kills, and
settling what a dead host or an unanswered hand-over leaves behind.

`FaultControl` is made by `cluster.migration.run_migration` for every migration:

- while the migration runs, `poll(progress)` carries out the host kills its faults ask for
  (the sender waits at the fault's stage and shows it in its progress; see `nodes.faults.spec`);
- when the sender has ended, `settle(pending)` collects both sides, whatever happened: a
  source that died (its guest died with it, unless the hand-over was done and the
  destination resumed it), or a hand-over whose RESULT never reached the source (the
  destination is asked whether it resumed the guest: if so the source drops its paused copy,
  if it failed or died the paused copy resumes on the source, and if it cannot tell in time
  the copy stays paused, as libxl leaves it);
- `annotate(report)` writes where the guest ended up, whether it was lost, and what each
  fault did.

Every call here is bounded by the migration's `timeout_seconds`.
"""

import time
from dataclasses import dataclass, field

from nodes.errors import ClusterError, MigbedError
from nodes.faults.spec import HOST_KILLS, FaultKind
from nodes.migration.settings import MigrationSettings

VERDICT_ATTEMPTS = 3      # waits of timeout_seconds each for a destination still restoring
STATUS_POLL_SECONDS = 0.005


@dataclass
class Outcome:
    """Where a migration left its guest, as the control plane established it."""

    guest_host: str | None = None
    guest_lost: bool = False
    notes: list[str] = field(default_factory=list)


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
        self.outcome = Outcome()

    @property
    def armed(self) -> bool:
        """A host kill is still to come: poll the sender's progress often."""
        return self._kills_left > 0

    # -- while the migration runs ------------------------------------------------------------
    def poll(self, progress: dict | None) -> None:
        f = progress.get("fault") if progress else None
        if not f or f["index"] in self._done:
            return
        self._done.add(f["index"])
        self._kills_left -= 1
        if f["kind"] == FaultKind.KILL_DESTINATION.value:
            if f["stage"] == "after-handover":
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
            if status in (None, "completed", "failed"):
                return
            time.sleep(STATUS_POLL_SECONDS)

    def _kill(self, handle, role: str, f: dict) -> None:
        try:
            handle.kill()
        except Exception:  # noqa: BLE001 - already dead is as good as killed
            pass
        self.killed[handle.name] = {"role": role, "fault": f["text"], "stage": f["stage"]}

    # -- when the sender has ended -------------------------------------------------------
    def settle(self, pending, info: dict) -> tuple[dict, dict]:
        """Both sides of the migration, and `self.outcome`, whatever became of the hosts."""
        src, dst, out = self.src, self.dst, self.outcome
        try:
            source = pending.result(self.timeout)
        except ClusterError as exc:
            source = {"status": "failed", "source_lost": True,
                      "error": f"source host {src.name} died during the migration ({exc})",
                      "mode_before": info["mode_before"]}
        verdict_needed = (source["status"] == "completed" or source.get("source_lost")
                          or source.get("handover_unknown"))
        dest = (self._verdict() if verdict_needed else self._abandon())
        resumed_there = dest.get("status") == "completed"
        if source.get("source_lost"):
            if resumed_there:
                timing = dest.get("source_timing") or {}
                source = {"status": "completed", "error": None, "source_lost": True,
                          "pause_wall": timing.get("pause_wall"),
                          "resume_wall": dest.get("resume_wall"),
                          "destination_digest": dest.get("destination_digest")}
                out.guest_host = dst.name
                out.notes.append(f"source host {src.name} died after the hand-over; the guest "
                                 f"runs on {dst.name} (not verified: the source's copy died "
                                 "with its host)")
            else:
                out.guest_lost = True
                out.notes.append(f"source host {src.name} died before the hand-over: the guest "
                                 "died with it (no other copy ran)")
        elif source.get("handover_unknown"):
            self._settle_handover(source, dest, resumed_there)
        elif source["status"] == "completed":
            out.guest_host = dst.name
        else:
            out.guest_host = src.name
        if source["status"] == "completed" and dst.name in self.killed:
            out.guest_host, out.guest_lost = None, True
            out.notes.append(f"destination host {dst.name} was killed after it had resumed "
                             "the guest: the guest died with it (the source had rightly "
                             "dropped its stale copy)")
            dest = {}
        return source, dest

    def _verdict(self) -> dict:
        """The destination's report, waiting (bounded) while it is still restoring."""
        last: Exception | None = None
        for _ in range(VERDICT_ATTEMPTS):
            try:
                return self.dst.call("incoming_report", self.mid, self.timeout,
                                     timeout=self.timeout * 2)
            except ClusterError as exc:
                return {"status": "failed", "host_dead": True,
                        "error": f"destination unreachable: {exc}"}
            except MigbedError as exc:
                last = exc
                if "still running" not in str(exc):
                    break
        return {"status": "unknown", "error": f"destination gave no verdict: {last}"}

    def _abandon(self) -> dict:
        try:
            return self.dst.call("abandon_incoming", self.mid, timeout=self.timeout * 2) or {}
        except Exception as exc:  # noqa: BLE001 - a dead destination must not hide the report
            return {"status": "failed", "host_dead": True,
                    "error": f"destination unreachable: {exc}"}

    def _settle_handover(self, source: dict, dest: dict, resumed_there: bool) -> None:
        src, dst, out = self.src, self.dst, self.outcome
        why = source.get("error")
        if dest.get("status") == "unknown":
            out.notes.append(f"hand-over unresolved ({why}); {dst.name} gave no verdict in "
                             f"{VERDICT_ATTEMPTS} x {self.timeout:g} s, so {src.name} keeps "
                             f"the guest paused as {self.guest}--migratedaway")
            return
        try:
            extra = src.call("resolve_handover", self.guest, source["mode_before"],
                             resumed_there, timeout=self.timeout)
        except MigbedError as exc:
            out.notes.append(f"hand-over unresolved: {src.name} did not answer ({exc})")
            out.guest_host = dst.name if resumed_there else None
            out.guest_lost = not resumed_there
            return
        if resumed_there:
            source.update(status="completed", error=None, source_digest=extra["source_digest"],
                          resume_wall=dest.get("resume_wall"),
                          destination_digest=dest.get("destination_digest"))
            out.guest_host = dst.name
            out.notes.append(f"hand-over unanswered ({why}); {dst.name} had resumed the guest, "
                             f"so {src.name} dropped its paused copy")
        else:
            source["resume_wall"] = extra["resume_wall"]
            out.guest_host = src.name
            out.notes.append(f"hand-over unanswered ({why}); {dst.name} did not resume the "
                             f"guest ({dest.get('error')}), so it resumed on {src.name} from "
                             "its paused copy")

    # -- the report ---------------------------------------------------------------------------
    def annotate(self, report, source: dict, dest: dict) -> None:
        fired: dict[str, dict] = {}
        for f in (source.get("faults") or []) + (dest.get("faults") or []):
            fired[f["text"]] = f
        faults = []
        for spec in self.settings.faults:
            text = spec.to_text()
            entry = {"fault": text, "fired": text in fired or any(
                k["fault"] == text for k in self.killed.values())}
            for host, k in self.killed.items():
                if k["fault"] == text:
                    entry["killed_host"] = host
            faults.append(entry)
        report.faults = faults
        report.guest_host = self.outcome.guest_host
        report.guest_lost = self.outcome.guest_lost
        report.notes = list(self.outcome.notes)
        if source.get("source_lost"):
            report.integrity.verified = None     # the source's copy died: nothing to compare
        why = dest.get("error")
        if report.status != "completed" and why and why != report.error:
            report.notes.append(f"{self.dst.name} says: {why}")
