"""What the readers of a host's live state read of it: its /metrics collectors
(`nodes.host.collectors`, `nodes.host.metrics`) and `migbed top`'s snapshot
(`nodes.host.overview`). `nodes.host.service.HostService` satisfies it; they take this
Protocol instead of the service, which builds them, so none of them imports the service back.
"""

from typing import Protocol

from nodes.host.processvcpu import ProcessVCPU
from nodes.migration.receive.receiver import Receiver
from nodes.xen.hypervisor import Hypervisor
from workloads.spec import WorkloadSpec
from workloads.vcpu import VCPU


class HostView(Protocol):
    """A host as its scrape-time readers see it (they read, never change, these)."""

    name: str
    hv: Hypervisor
    workloads: dict[str, WorkloadSpec]      # guest -> its workload
    vcpus: dict[str, VCPU | ProcessVCPU]    # guest -> its vCPUs (an arriving guest has none)
    incoming: dict[str, Receiver]           # migration id -> its receiver here
    migration_counts: dict[str, int]        # started, and ended by status, as a source
    queue_counts: dict[str, int]            # the scheduler's queue here (`pacedrates`)
