"""How one migration runs (`MigrationSettings`): a frozen dataclass that round-trips through
plain dicts (and so JSON and TOML) and travels to both hosts; the live objects (policy, link,
fault seams) are built from it.
"""

from dataclasses import asdict, dataclass, fields

from nodes.errors import ConfigError
from nodes.migration.policy import POLICIES, PrecopyPolicy, policy_for


def _from_dict(cls, data: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} settings: {', '.join(sorted(unknown))}")
    return cls(**data)


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
    # The qemu policy's budget minus the fixed part of the downtime (Cloud Hypervisor #8899);
    # off by default, because QEMU subtracts nothing.
    subtract_fixed_downtime: bool = False
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
        if rounds is not None or seconds is not None:
            object.__setattr__(self, "postcopy_allowed", True)
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

    def make_policy(self) -> PrecopyPolicy:
        return policy_for(self.policy, downtime_limit_seconds=self.downtime_limit_seconds,
                          fixed_downtime_seconds=self.fixed_downtime_seconds,
                          max_iterations=self.max_iterations)

    @property
    def fixed_downtime_seconds(self) -> float:
        """What the qemu policy subtracts from its budget: nothing, as QEMU, unless asked
        (`subtract_fixed_downtime`); then the hand-over's three crossings of the link (END,
        READY, PERMISSION_TO_GO)."""
        return 3 * self.latency_seconds if self.subtract_fixed_downtime else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MigrationSettings":
        return _from_dict(cls, data)
