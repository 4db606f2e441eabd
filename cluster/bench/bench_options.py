"""What a bench run measures and how big: its sections and sizes."""

from dataclasses import asdict, dataclass

from nodes.errors import ConfigError

MiB = 1024 * 1024
SECTIONS = ("throughput", "downtime", "dirtying", "stages", "wire", "startup", "scale",
            "postcopy", "process", "density")


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how big. Sizes in bytes, times in seconds."""

    repeats: int = 5
    guest_memory_bytes: int = 256 * MiB
    downtime_guest_memory_bytes: int = 64 * MiB
    dirty_guest_memory_bytes: int = 64 * MiB
    dirty_seconds: float = 1.0
    startup_hosts: tuple[int, ...] = (2, 8, 32)
    startup_one_node_per_host_hosts: tuple[int, ...] = (8,)   # the layout before, beside
    startup_guests_per_host: int = 4
    startup_repeats: int = 3
    scale_hosts: int = 8
    scale_host_memory_bytes: int = 256 * MiB
    scale_racks: tuple[int, ...] = (1, 4)       # hosts evacuated at once
    scale_guests_per_host: int = 4
    scale_guest_memory_bytes: int = 16 * MiB
    scale_dirty_rate_pages_per_second: float = 2000.0
    hosts_per_node: int | None = None   # None: the bench's layouts (see runner, startup)
    wire_guest_memory_bytes: int = 64 * MiB
    process_guest_memory_bytes: int = 32 * MiB   # the process section's guests (each kind)
    density_guests_per_host: int = 4            # on every host of the bench's cluster
    density_repeats: int = 2
    density_settle_seconds: float = 1.0         # guests running before the window opens
    density_seconds: float = 3.0                # the window CPU is measured over
    hosts: int = 3
    host_memory_bytes: int = 640 * MiB
    sections: tuple[str, ...] = SECTIONS
    in_process: bool = False
    quick: bool = False
    superpages: bool = True         # hosts give guests 2 MiB extents (False: frame by frame)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown bench section {unknown[0]!r}; use some of "
                              f"{', '.join(SECTIONS)}")
        if self.repeats < 1 or self.startup_repeats < 1:
            raise ConfigError("repeats must be >= 1")
        if self.density_guests_per_host < 1 or self.density_repeats < 1:
            raise ConfigError("density guests per host and repeats must be >= 1")
        if self.hosts < 2:
            raise ConfigError("the bench needs at least 2 hosts")
        if any(n < 1 for n in self.startup_hosts + self.startup_one_node_per_host_hosts):
            raise ConfigError("start-up host counts must be >= 1")
        if any(not 1 <= r < self.scale_hosts for r in self.scale_racks):
            raise ConfigError(f"scale racks must be 1..{self.scale_hosts - 1} hosts (of "
                              f"{self.scale_hosts}), got {self.scale_racks}")

    @classmethod
    def quick_options(cls, **overrides) -> "BenchOptions":
        """Tiny sizes: proves every section runs, measures nothing worth reading."""
        tiny = dict(repeats=1, guest_memory_bytes=8 * MiB, downtime_guest_memory_bytes=4 * MiB,
                    dirty_guest_memory_bytes=4 * MiB, dirty_seconds=0.05, startup_hosts=(2,),
                    startup_one_node_per_host_hosts=(), startup_guests_per_host=1,
                    startup_repeats=1, scale_hosts=3, scale_host_memory_bytes=64 * MiB,
                    scale_racks=(1, 2), scale_guests_per_host=2,
                    scale_guest_memory_bytes=4 * MiB,
                    wire_guest_memory_bytes=4 * MiB, process_guest_memory_bytes=4 * MiB,
                    density_guests_per_host=1, density_settle_seconds=0.1,
                    density_seconds=0.3,
                    host_memory_bytes=128 * MiB, quick=True)
        return cls(**{**tiny, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchOptions":
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})
