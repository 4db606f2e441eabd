"""What a migration needs of its host beside the hypervisor: the guests' vCPUs.

The host runtime (`nodes.host.service.HostService`) is one; the engine knows only this.
"""

from typing import Protocol

from nodes.xen.domain import Domain


class GuestRuntime(Protocol):
    def workload_spec(self, name: str) -> dict | None:
        """The guest's workload spec as a dict (None: it runs none)."""
        ...

    def vcpu_context(self, name: str) -> dict:
        """The VCPU_CONTEXT record's fields: where the workload stands, its last progress."""
        ...

    def stop_guest(self, name: str) -> None:
        """The guest has left this host: stop its vCPU."""
        ...

    def start_guest(self, dom: Domain, workload: dict | None, context: dict) -> None:
        """Make an arriving guest's vCPU from the context its source sent; it runs once the
        guest does (it waits while the guest is paused or still arriving)."""
        ...

    def prepare_guest(self, dom: Domain, workload: dict | None) -> None:
        """Make an arriving guest's vCPU before its context comes, parked until the guest
        runs; `start_guest` then only gives it the context (a post-copy switch does not
        wait for a thread to start)."""
        ...

    def discard_guest(self, name: str) -> None:
        """A guest that never ran here (its restore failed): its vCPU goes."""
        ...
