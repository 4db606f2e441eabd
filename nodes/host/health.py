"""A host's answers to the control plane about faults and its own health: where an incoming
migration stands, a fault carried out (`nodes.faults.spec`), a hand-over whose RESULT never
came (`cluster.settle`), this process's memory, and dying on purpose (`kill`). A mixin of
`nodes.host.service.HostService`, whose state it reads."""

import threading

from nodes.errors import ClusterError
from nodes.faults.at_source import SourceFaults
from nodes.host.overview import RecentMigrations
from nodes.host.process import process_stats
from nodes.migration.handover import resolve_handover
from nodes.migration.receive.receiver import Receiver
from nodes.xen.hypervisor import Hypervisor


class HostHealth:
    """What a host says of its faults and health; `HostService` holds the state."""

    name: str
    dead: bool
    hv: Hypervisor
    lock: threading.RLock
    incoming: dict[str, Receiver]
    recent: RecentMigrations
    _faults: dict[str, SourceFaults]
    _retired: dict

    def shutdown(self) -> None:
        raise NotImplementedError

    def incoming_status(self, migration_id: str) -> str | None:
        """waiting, receiving, ready, completed or failed; None if not expected here."""
        recv = self.incoming.get(migration_id)
        return recv.status if recv else None

    def fault_done(self, migration_id: str, index: int) -> bool:
        """The control plane has carried out fault `index`: the sender goes on."""
        seam = self._faults.get(migration_id)
        if seam is None:
            return False
        seam.release(index)
        return True

    def resolve_handover(self, name: str, mode_before: str, destination_resumed: bool) -> dict:
        """Settle a hand-over whose RESULT never came (see `nodes.migration.handover`)."""
        with self.lock:
            out = resolve_handover(self.hv, self, name, mode_before, destination_resumed)
            self._retired.pop(name, None)
            self.recent.handover_resolved(name, destination_resumed)
            return out

    def process_stats(self) -> dict:
        """This host's process: pid, resident memory and how much of it is this host's
        machine-memory arena (see `nodes.host.process`)."""
        return process_stats(self.hv.memory.frames)

    def kill(self) -> None:
        """Fault injection in one process: this host dies now, as a Ray node going away does.
        Its connections drop, its guests stop, its /metrics goes; every later call through
        a handle fails with ClusterError. (On Ray the actor is killed instead.)"""
        self.dead = True
        for seam in list(self._faults.values()):
            seam.kill()
        receivers = list(self.incoming.values())
        for recv in receivers:
            recv.kill()
        for recv in receivers:       # their restores end, their frames go (bounded wait)
            recv.wait(recv.settings.timeout_seconds)
        self.shutdown()

    def check_alive(self) -> None:
        if self.dead:
            raise ClusterError(f"host {self.name} is gone (killed)")
