"""How one migration runs (`MigrationSettings`): a frozen dataclass that round-trips through
plain dicts (and so JSON and TOML) and travels to both hosts; the live objects (policy, link,
fault seams) are built from it.
"""

from dataclasses import asdict, dataclass

from nodes.errors import ConfigError
from nodes.migration import wire
from nodes.migration.convergence import check_settings as check_convergence
from nodes.migration.policy import POLICIES, PrecopyPolicy, policy_for
from nodes.units import from_fields


@dataclass(frozen=True)
class MigrationSettings:
    """How one migration runs. Rates in bytes per second (None: unlimited), times in seconds."""

    policy: str = "xen"
    link_bytes_per_second: float | None = None
    latency_seconds: float = 0.0
    rate_limit_bytes_per_second: float | None = None
    downtime_limit_seconds: float = 0.3
    max_iterations: int | None = None
    verify: bool = True
    cancel_after_round: int | None = None
    timeout_seconds: float = 30.0
    # Faults to inject (`nodes.faults.spec`): FaultSpecs, or their dicts / text forms.
    faults: tuple = ()
    # The link is the source host's uplink, shared fairly by all its concurrent outgoing
    # migrations that set this (host evacuation); otherwise each migration has its own link.
    link_shared: bool = False
    # The qemu policy's budget minus the fixed part of the downtime (Cloud Hypervisor #8899),
    # as measured for this host pair at setup; off by default, because QEMU subtracts nothing.
    subtract_fixed_downtime: bool = False
    # Convergence aids (`nodes.migration.convergence`), with QEMU's names and defaults.
    auto_converge: bool = False
    throttle_initial: int = 20                 # cpu-throttle-initial, %
    throttle_increment: int = 10               # cpu-throttle-increment, %
    max_throttle: int = 99                     # max-cpu-throttle, %
    throttle_trigger_threshold: int = 50       # throttle-trigger-threshold, %
    throttle_tailslow: bool = False            # cpu-throttle-tailslow
    dirty_limit_bytes_per_second: float | None = None   # vcpu-dirty-limit (None: off)
    dirty_limit_period_seconds: float = 1.0    # x-vcpu-dirty-limit-period
    completion_timeout_seconds: float | None = None
    completion_timeout_per_gib_seconds: float | None = None   # KubeVirt's, per GiB of guest
    on_timeout: str = "abort"                  # abort | postcopy | pause
    progress_timeout_seconds: float | None = None
    adaptive_rate: bool = False                # xen-legacy's ADAPTIVE_SAVE
    # What crosses the wire (`nodes.migration.wire`, QEMU's names and defaults): zero-page
    # detection, XBZRLE with a cache of this many bytes (None: off), this many parallel
    # channels (None: multifd off) and their compression.
    zero_page_detection: str = "multifd"
    xbzrle_cache_bytes: int | None = None
    multifd_channels: int | None = None
    multifd_compression: str = "none"
    multifd_zlib_level: int = 1
    multifd_zstd_level: int = 1
    # Post-copy (`nodes.migration.postcopy`): QEMU's postcopy-ram capability (the switch may
    # be asked for while the migration runs: `migrate-postcopy`), implied by switching after
    # a number of live rounds (0: pure post-copy) or a time since the start; and the limit
    # on the background push after the switch (QEMU's max-postcopy-bandwidth; None:
    # unlimited). Requested pages always go at once, at the link's speed.
    postcopy_allowed: bool = False
    postcopy_after_rounds: int | None = None
    postcopy_after_seconds: float | None = None
    postcopy_bandwidth_bytes_per_second: float | None = None

    def __post_init__(self) -> None:
        from nodes.faults.spec import as_faults
        object.__setattr__(self, "faults", as_faults(self.faults))
        self._check_postcopy()
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        for name in ("link_bytes_per_second", "rate_limit_bytes_per_second"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                what = "bandwidth" if name.startswith("link") else "rate limit"
                raise ConfigError(f"{what} must be positive, got {value}")
        if not self.downtime_limit_seconds > 0:
            raise ConfigError(f"downtime limit must be positive, got {self.downtime_limit_seconds}")
        if not self.latency_seconds >= 0:
            raise ConfigError(f"latency must be >= 0, got {self.latency_seconds}")
        if not self.timeout_seconds > 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout_seconds}")
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ConfigError(f"max iterations must be >= 0, got {self.max_iterations}")
        if self.cancel_after_round is not None and self.cancel_after_round < 0:
            raise ConfigError(f"cancel-after-round must be >= 0, got {self.cancel_after_round}")
        check_convergence(self)
        wire.check(self)

    def _check_postcopy(self) -> None:
        rounds, seconds = self.postcopy_after_rounds, self.postcopy_after_seconds
        if rounds is not None and seconds is not None:
            raise ConfigError("switch to post-copy after a number of rounds or after a time, "
                              "not both")
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int)
                                   or rounds < 0):
            raise ConfigError(f"post-copy after N rounds needs a whole N >= 0, got {rounds!r}")
        if seconds is not None and not seconds >= 0:
            raise ConfigError(f"post-copy after a time needs seconds >= 0, got {seconds!r}")
        if rounds is not None or seconds is not None or self.on_timeout == "postcopy":
            object.__setattr__(self, "postcopy_allowed", True)     # each implies it
        bw = self.postcopy_bandwidth_bytes_per_second
        if bw is not None:
            if not bw > 0:
                raise ConfigError(f"post-copy bandwidth must be positive, got {bw}")
            if not self.postcopy_allowed:
                raise ConfigError("a post-copy bandwidth limits the push after a switch to "
                                  "post-copy: add --postcopy, --postcopy-after N or "
                                  "--postcopy-allowed")

    @property
    def postcopy_planned(self) -> bool:
        """The migration switches to post-copy by itself (after rounds or a time)."""
        return self.postcopy_after_rounds is not None or self.postcopy_after_seconds is not None

    @property
    def nominal_bytes_per_second(self) -> float | None:
        rates = [r for r in (self.link_bytes_per_second, self.rate_limit_bytes_per_second) if r]
        return min(rates) if rates else None

    def make_policy(self, fixed_downtime_seconds: float = 0.0) -> PrecopyPolicy:
        """The policy; `fixed_downtime_seconds` is what the qemu policy subtracts from its
        budget when `subtract_fixed_downtime` asks (measured at setup, `fixeddowntime`)."""
        return policy_for(self.policy, downtime_limit_seconds=self.downtime_limit_seconds,
                          fixed_downtime_seconds=(fixed_downtime_seconds
                                                  if self.subtract_fixed_downtime else 0.0),
                          max_iterations=self.max_iterations)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MigrationSettings":
        return from_fields(cls, data)
