"""GUEST_INFO, typed: what the destination needs of an arriving guest to reserve its frames
and check it can take it. The source builds it (`nodes.migration.send.sender.guest_info`), the
control plane hands it to the destination (`prepare_incoming`) and keeps it for the report;
it crosses the data stream as the GUEST_INFO record (`to_dict`), whose schema is in
`nodes.migration.wire.records`.
"""

from dataclasses import asdict, dataclass, fields

from nodes.errors import ConfigError

OPTIONAL = ("workload", "vcpu", "vcpus")       # an older source's GUEST_INFO lacks them
VCPU_KINDS = ("process", "thread")
# What a guest's spec may ask for: a kind, or `auto` (the host's default: a process where its
# kernel runs one, `nodes.host.vcpus.default_vcpu_kind`), which a host resolves on creation.
VCPU_AUTO = "auto"
SPEC_VCPU_KINDS = (VCPU_AUTO, *VCPU_KINDS)
MAX_VCPUS = 64                                  # a process guest's vCPU threads


def check_vcpus(vcpu: str, vcpus: int, kinds: tuple[str, ...] = VCPU_KINDS) -> None:
    """A guest's vCPUs: their kind (one of `kinds`) and how many (one ConfigError line
    otherwise)."""
    if vcpu not in kinds:
        raise ConfigError(f"unknown vCPU kind {vcpu!r}; use {', '.join(kinds)}")
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"a guest has 1 to {MAX_VCPUS} vCPUs, got {vcpus!r}")
    if vcpu == "thread" and vcpus != 1:
        raise ConfigError(f"--vcpus {vcpus} needs --vcpu process: a thread vCPU is one "
                          "thread of its host")


@dataclass(frozen=True)
class GuestInfo:
    migration_id: str
    name: str
    pages: int                      # the guest's pages, data and page tables
    data_pages: int
    page_table_pages: int
    page_size: int                  # bytes
    mode_before: str                # a `nodes.xen.profiles.Mode` value
    mode_during: str
    arch: str
    profile: str
    workload: dict | None = None    # its `WorkloadSpec.to_dict()`, for the model and the vCPU
    vcpu: str = "thread"            # what runs its vCPUs: "thread" or "process"
    vcpus: int = 1                  # how many (a process guest's threads)

    def __post_init__(self) -> None:
        check_vcpus(self.vcpu, self.vcpus)

    @property
    def memory_bytes(self) -> int:
        return self.pages * self.page_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GuestInfo":
        """GUEST_INFO as `to_dict` (or the wire's record) has it: a ConfigError that names
        the first missing key otherwise (keys it does not know are ignored)."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n not in OPTIONAL]
        if missing:
            raise ConfigError(f"bad guest info: no {missing[0]!r}")
        return cls(**{n: d[n] for n in names if n in d})
