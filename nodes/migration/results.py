"""What each side of a migration says of it when it ends: `SourceResult` and
`DestinationResult`, typed, handed to the control plane as they are (Ray pickles them across
processes: they are control-plane values, never read from the data stream). The report
(`cluster.report.MigrationReport`) is built once from the two.
"""

from dataclasses import asdict, dataclass, field

from nodes.migration.progress import RoundStats
from nodes.phase import Outcome


@dataclass
class SourceResult:
    """The save side. Times in seconds; walls are `time.time()`, the rest monotonic spans."""

    status: Outcome = Outcome.FAILED
    error: str | None = None
    stop_reason: str | None = None
    stop_code: str | None = None           # a policy StopCode value; None if not completed
    # The qemu policy's downtime limit in force when the live rounds ended (stepped by
    # --downtime-steps); None for the policies without one.
    downtime_limit_in_force_seconds: float | None = None
    mode_before: str = ""
    mode_during: str = "vp"
    profile: str | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    pages_sent_total: int = 0
    bytes_sent_total: int = 0
    # QEMU's dirty-sync-count: 1 after setup, one more at every bitmap sync (CLEAN).
    dirty_sync_count: int = 0
    # As QEMU's total-time: start to the destination's RESULT (the guest runs there).
    total_time_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    pause_wall: float | None = None        # the guest paused here for stop-and-copy
    resume_wall: float | None = None       # it resumed: on the destination, or back here
    downtime_source_seconds: float | None = None   # pause to RESULT, as the source saw it
    # The destination's clock minus this one's, +- rtt / 2 (`nodes.migration.clock`); the
    # walls above are on this host's clock (the destination's resume brought onto it).
    clock_offset_seconds: float | None = None
    clock_rtt_seconds: float | None = None
    source_digest: str | None = None
    destination_digest: str | None = None
    faults: list[dict] = field(default_factory=list)
    # The peer host or the link went away (no ABORT), as this side saw it.
    connection_lost: bool = False
    # PERMISSION_TO_GO went out but no RESULT came: the control plane must settle it.
    handover_unknown: bool = False
    # The guest's longest stall while it still ran here (start to pause).
    source_longest_gap_seconds: float | None = None
    # Set by the control plane: the source host died during the migration.
    source_lost: bool = False
    # The fixed downtime the qemu budget subtracted (`nodes.migration.decide.fixeddowntime`: its
    # seconds, basis and the setup round trip); None when not asked for.
    fixed_downtime: dict | None = None
    # The guest's cost: its own page-write rate before the migration and while it ran here
    # during it, and the seconds its vCPU slept throttled (`nodes.host.service`).
    guest_cost: dict | None = None
    # The progress over time (`nodes.migration.progress.ProgressHistory.to_list`).
    progress_history: list[dict] = field(default_factory=list)
    # What crossed the wire beyond whole pages: the `xbzrle` and `multifd` blocks
    # (`PagePipeline.wire_stats`), each None when not used.
    wire: dict = field(default_factory=dict)
    # How long the guest's workload had run when the migration began (set by the host):
    # with the workload, what the model knows of its non-zero pages.
    workload_running_seconds: float = 0.0
    # Bytes sent while the guest ran here, while it was paused, and after a post-copy switch
    # (QEMU's precopy-bytes, downtime-bytes, postcopy-bytes): they add up to bytes_sent_total.
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    # Post-copy (`nodes.migration.postcopy`): the guest left at the switch; page requests
    # received (QEMU's postcopy-requests); the source's half of the report's `postcopy`
    # block; and whether the guest was lost (neither host has all of it).
    switched: bool = False
    postcopy_requests: int = 0
    postcopy: dict | None = None
    guest_lost: bool = False
    # What ran the guest's vCPUs here ("thread" | "process", and how many), and whose
    # dirty log the rounds read ("emulated": the access path's; "kernel": write-protect
    # and PAGEMAP_SCAN), with its shadow faults over every CLEAN (the kernel's: the pages
    # it reported written).
    vcpu: str = "thread"
    vcpus: int = 1
    dirty_log: str = "emulated"
    shadow_faults: int = 0

    @property
    def completed(self) -> bool:
        return self.status == Outcome.COMPLETED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rounds"] = [r.to_dict() for r in self.rounds]
        return d


@dataclass
class DestinationResult:
    """The restore side. `status` is waiting, receiving, ready, completed or failed (or
    unknown when the control plane got no verdict): an `Outcome`."""

    status: Outcome = Outcome.FAILED
    error: str | None = None
    mode_after: str | None = None
    resume_wall: float | None = None
    pages_received: int = 0
    bytes_received: int = 0
    source_timing: dict = field(default_factory=dict)   # the SOURCE_TIMING record
    last_progress_wall: float | None = None              # the guest's last sign of life there
    destination_digest: str | None = None
    faults: list[dict] = field(default_factory=list)
    connection_lost: bool = False
    cpu_seconds: float | None = None
    # The guest's own gap across the hand-over: its last progress there, first here.
    guest_observed_downtime_seconds: float | None = None
    # Set by the control plane: the destination host could not be reached.
    host_dead: bool = False
    # CPU seconds of the multifd channels' reader threads (None: no channels).
    multifd_cpu_seconds: float | None = None
    # Post-copy: the destination's half of the report's `postcopy` block (its guest's
    # faults, blocktime, latency histogram, mode and page rates during post-copy).
    postcopy: dict | None = None

    @property
    def completed(self) -> bool:
        return self.status == Outcome.COMPLETED

    def to_dict(self) -> dict:
        return asdict(self)
