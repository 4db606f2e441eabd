"""A host's post-copy control calls (mixed into `nodes.host.service.HostService`): what an
operator and the control plane ask of a post-copy migration while it runs.

- `start_postcopy` (the source): QEMU's migrate-start-postcopy, `migbed migrate-postcopy`;
  the live rounds switch at their next decision.
- `migrate_recover` (the source): a migration paused after its switch (the link broke and
  did not come back within the timeout) goes on: the operator says the link is back.
- `settle_paused` (the source): the control plane settles a paused migration whose
  destination died (the guest is lost), finished anyway, or never resumed the guest.
- `postcopy_lost` (the destination): the source died after the switch; the guest is lost.
"""

import time
from typing import TYPE_CHECKING

from nodes.errors import MigrationError, MigrationStillRunning
from nodes.migration.postcopy.postcopy_source import settle_paused
from nodes.phase import PausedEnd

if TYPE_CHECKING:
    from nodes.migration.receive.receiver import Receiver
    from nodes.migration.results import DestinationResult, SourceResult
    from nodes.migration.send.sender import Sender

# How long after its post-copy the destination watches its guest, for the page rate after.
AFTER_WINDOW_SECONDS = 0.2


class PostcopyControl:
    """The post-copy calls of a host (see the module docstring); HostService holds the
    state they read: `_senders`, `_paused`, `incoming`, `vcpus`."""

    # -- the source ---------------------------------------------------------------------------
    def migration_of(self, guest: str) -> str | None:
        """The id of the migration under way (or paused) that moves `guest` from here."""
        with self.lock:
            for mid, sender in self._senders.items():
                if sender.session.guest == guest:
                    return mid
        return None

    def switched(self, migration_id: str) -> bool:
        sender = self._senders.get(migration_id)
        pc = sender.switch.postcopy if sender is not None else None
        return pc is not None and pc.switched

    def start_postcopy(self, migration_id: str) -> str:
        """Ask the migration to switch to post-copy (QEMU's migrate-start-postcopy)."""
        sender: Sender | None = self._senders.get(migration_id)
        if sender is None:
            raise MigrationError(f"no migration {migration_id} runs from {self.name}")
        pc = sender.switch.postcopy
        if pc is None:
            raise MigrationError(f"the migration of {sender.session.guest} was started without "
                                 "post-copy allowed: start it with --postcopy-allowed (QEMU "
                                 "needs the postcopy-ram capability for this too)")
        if pc.switched:
            return "already in post-copy"
        pc.ask()
        return "asked: the switch comes at the live rounds' next decision"

    def paused_migrations(self) -> list[dict]:
        """Every post-copy migration paused here: id, guest, GUEST_INFO and settings."""
        with self.lock:
            return [{"migration_id": mid, "guest": sender.session.guest, "info": info,
                     "settings": sender.session.settings}
                    for mid, (sender, _, info) in self._paused.items()]

    def migrate_recover(self, migration_id: str) -> "SourceResult":
        """Resume a paused post-copy (the link is back); blocks until it ends or pauses."""
        sender, start_wall, info = self._take_paused(migration_id)
        result = sender.resume()
        return self._sender_ended(migration_id, sender.session.guest, sender, result, start_wall,
                                  info)

    def settle_paused(self, migration_id: str, outcome: PausedEnd, why: str) -> "SourceResult":
        """End a paused post-copy as the control plane found it: `lost` (its destination
        died: the stale copy here goes), `completed` (the destination has the whole guest:
        verify and clean up here), `resume` (the destination never resumed: it runs here)."""
        sender, start_wall, info = self._take_paused(migration_id)
        result = settle_paused(sender, outcome, why)
        return self._sender_ended(migration_id, sender.session.guest, sender, result, start_wall,
                                  info)

    def _take_paused(self, migration_id: str) -> tuple:
        with self.lock:
            entry = self._paused.pop(migration_id, None)
        if entry is None:
            raise MigrationError(f"no paused post-copy migration {migration_id} on {self.name}")
        return entry

    def postcopy_rate_before(self, vcpu, start_wall: float, result: "SourceResult") -> None:
        """The guest's page rate on its source before the switch, for the report."""
        if result.postcopy is not None and result.pause_wall:
            result.postcopy["guest_rate_before"] = vcpu.rate_between(start_wall,
                                                                     result.pause_wall)

    # -- the destination ---------------------------------------------------------------------------
    def postcopy_lost(self, migration_id: str, why: str, timeout: float = 30.0
                      ) -> "DestinationResult | None":
        """The source died after the switch: the guest here cannot complete; it goes."""
        recv: Receiver | None = self.incoming.get(migration_id)
        if recv is None:
            return None
        recv.lose(why)
        if not recv.wait(timeout):
            raise MigrationStillRunning(f"incoming migration {migration_id} did not end in "
                                        f"{timeout:g} s after its guest was lost")
        return self.incoming_report(migration_id, timeout)

    def postcopy_rates(self, recv: "Receiver", result: "DestinationResult") -> None:
        """The guest's own page rate while its pages arrived and right after (the cost of
        its faults), from its vCPU's progress log; waits (bounded) for the window after."""
        pc = result.postcopy
        vcpu = self.vcpus.get(recv.name)
        if pc is None or vcpu is None or not pc.get("end_wall"):
            return
        start, end = pc["resume_wall"], pc["end_wall"]
        pc["guest_rate_during"] = vcpu.rate_between(start, end)
        wait = min(end + AFTER_WINDOW_SECONDS - time.time(), AFTER_WINDOW_SECONDS)
        if wait > 0:            # bounded: a clock that jumps must not hold the report
            time.sleep(wait)
        pc["guest_rate_after"] = vcpu.rate_between(end, end + AFTER_WINDOW_SECONDS)
