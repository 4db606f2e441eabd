"""What a migration needs of its host beside the hypervisor: the guests' vCPUs.

The host runtime (`nodes.host.service.HostService`) is one; the engine knows only this.
"""

from typing import Protocol

from nodes.migration.guestinfo import GuestInfo
from nodes.migration.postcopy.pagefault import FaultsFactory
from nodes.xen.domain import Domain


class GuestRuntime(Protocol):
    def workload_spec(self, name: str) -> dict | None:
        """The guest's workload spec as a dict (None: it runs none)."""
        ...

    def vcpu_config(self, name: str) -> dict:
        """{"vcpu": "thread" | "process", "vcpus": N}: what runs the guest's vCPUs here."""
        ...

    def pages_written(self, name: str) -> int | None:
        """The guest's own page writes so far (its vCPU's counter); None: it has no vCPU
        here. Read while it runs, for the progress history's guest write rate."""
        ...

    def vcpu_context(self, name: str) -> dict:
        """The VCPU_CONTEXT record's fields: where the workload stands, its last progress."""
        ...

    def stop_guest(self, name: str) -> None:
        """The guest has left this host: stop its vCPU."""
        ...

    def start_guest(self, dom: Domain, info: GuestInfo, context: dict) -> None:
        """Make an arriving guest's vCPU (of `info`'s workload and kind) from the context
        its source sent; it runs once the guest does (it waits while the guest is paused
        or still arriving)."""
        ...

    def prepare_guest(self, dom: Domain, info: GuestInfo) -> None:
        """Make an arriving guest's vCPU before its context comes, parked until the guest
        runs; `start_guest` then only gives it the context (a post-copy switch does not
        wait for a thread to start)."""
        ...

    def postcopy_faults(self, dom: Domain, info: GuestInfo) -> FaultsFactory | None:
        """Who will handle the faults of an arriving guest resumed by a post-copy switch
        (`PostcopyDestination`'s `make_faults`): None for the engine's own (`PageFaults`,
        a thread vCPU's); a process guest's host relaunches its process at the switch with
        its missing pages registered and reads their real faults."""
        ...

    def discard_guest(self, name: str) -> None:
        """A guest that never ran here (its restore failed): its vCPU goes."""
        ...

    def throttle_guest(self, name: str, cpu_percentage: int = 0, ring_pages: int = 0,
                       ring_full_sleep_seconds: float = 0.0) -> None:
        """Slow the guest's vCPU (`nodes.migration.decide.convergence`): `cpu_percentage` of every
        10 ms slice asleep (auto-converge), and a sleep of `ring_full_sleep_seconds` each
        `ring_pages` page writes (dirty-limit). All zero: unthrottled."""
        ...

    def vcpu_throttle_stats(self, name: str) -> dict:
        """The guest's vCPU so far: `pages_written_total` (and, for a guest of several
        vCPUs, each one's in `vcpu_pages_written`), and the seconds it slept throttled
        (`throttle_sleep_seconds`, `dirty_limit_sleep_seconds`)."""
        ...

    def measured_fixed_downtime(self, destination: str) -> float | None:
        """The fixed downtime the last completed migration from here to `destination`
        measured (`nodes.migration.decide.fixeddowntime`); None before the first."""
        ...
