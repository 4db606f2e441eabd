"""Specs of the host runtime: what a host is (`HostConfig`) and what a guest is (`GuestSpec`).

Frozen dataclasses that round-trip through plain dicts (JSON, TOML, actor calls); the live
objects (the hypervisor, its domains, their vCPUs) are built from them by `nodes.host.service`.
"""

from dataclasses import asdict, dataclass, field

from nodes.errors import ConfigError
from nodes.migration.guestinfo import SPEC_VCPU_KINDS, VCPU_AUTO, check_vcpus
from nodes.units import from_fields
from nodes.xen.hypervisor import DEFAULT_RESERVED_BYTES, check_guest_name
from nodes.xen.profiles import DEFAULT_PROFILE, Mode
from workloads.spec import WorkloadSpec
from workloads.tracereplay import trace_memory_bytes


@dataclass(frozen=True)
class HostConfig:
    name: str = "host-0"
    memory_bytes: int = 512 * 1024 * 1024
    page_size: int = 4096
    reserved_bytes: int = DEFAULT_RESERVED_BYTES
    profile: str = DEFAULT_PROFILE
    dom0_memory_bytes: int | None = None
    address: str = "127.0.0.1"       # where this host's data channels listen
    seed: int = 0
    superpages: bool = True          # guests' frames in 2 MiB extents (False: 4 KiB scatter)
    metrics_port: int | None = None  # where /metrics is served (0: a free port; None: not)
    metrics_address: str = "127.0.0.1"
    data_ports: tuple[int, int] | None = None   # listen for migrations in this range (None: any)

    def __post_init__(self) -> None:
        if self.data_ports is not None:
            low, high = self.data_ports
            if not 1 <= low <= high <= 65535:
                raise ConfigError(f"data ports must be LOW-HIGH within 1-65535, got "
                                  f"{low}-{high}")
            object.__setattr__(self, "data_ports", (int(low), int(high)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HostConfig":
        return from_fields(cls, data)


@dataclass(frozen=True)
class GuestSpec:
    name: str
    memory_bytes: int
    mode: str = "p2m"
    dma: bool = False
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    # What runs its vCPUs: "thread" (a thread of its host writing through the Xen model's
    # access path), "process" (a guest process writing its mapped frames, logged by the
    # kernel: `nodes.host.processvcpu`) or "auto" (the host's default, resolved when it
    # creates the guest: `nodes.host.vcpus.default_vcpu_kind`), and how many (a process
    # guest's threads).
    vcpu: str = VCPU_AUTO
    vcpus: int = 1

    def __post_init__(self) -> None:
        check_guest_name(self.name)
        check_vcpus(self.vcpu, self.vcpus, SPEC_VCPU_KINDS)
        if isinstance(self.workload, dict):
            object.__setattr__(self, "workload", WorkloadSpec.from_dict(self.workload))
        if self.workload.pattern == "trace":
            check_trace_guest(self)
        if not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ConfigError(f"guest memory must be a positive number of bytes, got "
                              f"{self.memory_bytes!r}")
        object.__setattr__(self, "mode", Mode.parse(self.mode).value)
        if self.workload.is_program and self.vcpu == "thread":
            raise ConfigError(f"{self.workload.pattern} is a program workload: it runs on "
                              f"process vCPUs only (give --vcpu process)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GuestSpec":
        return from_fields(cls, data)


def check_trace_guest(spec: GuestSpec) -> None:
    """Memory 0 (or None) means: sized from the trace. (Several vCPUs, process ones, each
    replay their own share of its pages: `workloads.tracereplay`.)"""
    if spec.memory_bytes in (0, None):
        object.__setattr__(spec, "memory_bytes", trace_memory_bytes(spec.workload.trace_bytes))
