"""How one migration runs (`MigrationSettings`): frozen sections (the link, the switch-over,
the convergence aids, the wire, post-copy, the checks), each holding its rows of the field
table (`nodes.migration.fields`) and checking them once, as it is made. Settings round-trip
through plain flat dicts (and so JSON and TOML) and travel to both hosts; the live objects
(policy, link, fault seams) are built from them.

The flat names stay the API: `MigrationSettings(bandwidth...)` keywords, `settings.policy`,
`to_dict()`'s keys and `dataclasses.replace(settings, link_shared=True)` all use the table's
names; each reaches the section that holds it.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any

from nodes.errors import ConfigError
from nodes.faults.spec import FaultKind, as_faults
from nodes.migration.decide.convergence import ConvergenceSettings
from nodes.migration.decide.downtimesteps import parse_downtime_steps
from nodes.migration.decide.policy import POLICIES, PrecopyPolicy, policy_for
from nodes.migration.fields import MIGRATION_FIELDS, settings_section
from nodes.migration.wire.capabilities import WireSettings


@settings_section("link")
class LinkSettings:
    """The paced link: its speed, the migration's own rate limit, the latency, whether the
    source's uplink is shared (host evacuation), and the timeout of every wait across hosts.
    Rates in bytes per second (None: unlimited), times in seconds."""

    def __post_init__(self) -> None:
        for name in ("link_bytes_per_second", "rate_limit_bytes_per_second"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                what = "bandwidth" if name.startswith("link") else "rate limit"
                raise ConfigError(f"{what} must be positive, got {value}")
        if not self.latency_seconds >= 0:
            raise ConfigError(f"latency must be >= 0, got {self.latency_seconds}")
        if not self.timeout_seconds > 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout_seconds}")


@settings_section("switchover")
class SwitchoverSettings:
    """The pre-copy policy and its budget: the downtime limit, the cap on live rounds, and
    whether the qemu policy subtracts the fixed downtime (Cloud Hypervisor #8899; off, as
    QEMU subtracts nothing)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if not self.downtime_limit_seconds > 0:
            raise ConfigError(f"downtime limit must be positive, got {self.downtime_limit_seconds}")
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ConfigError(f"max iterations must be >= 0, got {self.max_iterations}")
        self._check_adapting()

    def _check_adapting(self) -> None:
        """Downtime steps, stall detection and the switch-over bandwidth are the qemu
        policy's (the others decide on no downtime limit)."""
        asked = [flag for flag, value in (
            ("--downtime-steps", self.downtime_steps),
            ("--downtime-step-delay", self.downtime_step_delay_seconds
             if self.downtime_step_delay_per_gib_seconds is None
             else self.downtime_step_delay_per_gib_seconds),
            ("--switchover-on-stall", self.switchover_on_stall_seconds),
            ("--switchover-bandwidth", self.switchover_bandwidth_bytes_per_second))
            if value is not None]
        if asked and self.policy != "qemu":
            raise ConfigError(f"{', '.join(asked)}: the qemu policy's (it switches over on a "
                              f"downtime limit); the {self.policy} policy has none: use "
                              "--policy qemu")
        for name in ("downtime_step_delay_seconds", "downtime_step_delay_per_gib_seconds",
                     "switchover_on_stall_seconds", "switchover_bandwidth_bytes_per_second"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name.removesuffix('_seconds').replace('_', '-')} must be "
                                  f"positive, got {value!r}")
        if self.downtime_step_delay_seconds is not None and \
                self.downtime_step_delay_per_gib_seconds is not None:
            raise ConfigError("give the downtime step delay once: absolute (2s) or per GiB "
                              "(75s/GiB), not both")
        if self.downtime_steps is not None:
            parse_downtime_steps(self.downtime_steps, "downtime steps")


@settings_section("postcopy")
class PostcopySettings:
    """QEMU's postcopy-ram capability (the switch may be asked for while the migration runs:
    `migrate-postcopy`), implied by switching after a number of live rounds (0: pure
    post-copy) or a time since the start; and the limit on the background push after the
    switch (QEMU's max-postcopy-bandwidth; None: unlimited)."""

    def __post_init__(self) -> None:
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
            object.__setattr__(self, "postcopy_allowed", True)     # each implies it
        if self.postcopy_preempt and not self.postcopy_allowed:
            raise ConfigError("--postcopy-preempt sends requested pages on a channel of their "
                              "own after a post-copy switch: add --postcopy, --postcopy-after "
                              "N or --postcopy-allowed")
        bw = self.postcopy_bandwidth_bytes_per_second
        if bw is not None:
            if not bw > 0:
                raise ConfigError(f"post-copy bandwidth must be positive, got {bw}")
            if not self.postcopy_allowed:
                raise ConfigError("a post-copy bandwidth limits the push after a switch to "
                                  "post-copy: add --postcopy, --postcopy-after N or "
                                  "--postcopy-allowed")


@settings_section("checks")
class CheckSettings:
    """What a run injects and checks: faults (`nodes.faults.spec`: FaultSpecs, or their dicts
    or text forms), a cancel after live round N (the abort path), the memory check."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", as_faults(self.faults))
        if self.cancel_after_round is not None and self.cancel_after_round < 0:
            raise ConfigError(f"cancel-after-round must be >= 0, got {self.cancel_after_round}")


# Section -> its class, in the order they are made (post-copy after convergence: a completion
# timeout that switches implies post-copy).
SECTIONS: dict[str, type] = {"checks": CheckSettings, "link": LinkSettings,
                             "switchover": SwitchoverSettings,
                             "convergence": ConvergenceSettings, "wire": WireSettings,
                             "postcopy": PostcopySettings}
FLAT_NAMES: dict[str, str] = {f.name: f.section for f in MIGRATION_FIELDS if f.is_field}


@dataclass(frozen=True, init=False)
class MigrationSettings:
    """How one migration runs, in sections. Made from the table's flat names
    (`MigrationSettings(policy="qemu", multifd_channels=2)`), from sections, or both (flat
    names then change the given sections: what `dataclasses.replace` does)."""

    checks: CheckSettings
    link: LinkSettings
    switchover: SwitchoverSettings
    convergence: ConvergenceSettings
    wire: WireSettings
    postcopy: PostcopySettings

    def __init__(self, **settings: Any) -> None:
        given = {name: settings.pop(name) for name in SECTIONS if name in settings}
        unknown = sorted(set(settings) - set(FLAT_NAMES))
        if unknown:
            raise TypeError(f"MigrationSettings got an unexpected keyword argument "
                            f"{unknown[0]!r}")
        for name, cls in SECTIONS.items():
            own = {k: v for k, v in settings.items() if FLAT_NAMES[k] == name}
            if name == "postcopy" and self.convergence.on_timeout == "postcopy":
                own["postcopy_allowed"] = True      # switching on a timeout implies it
            base = given.get(name)
            section = cls(**own) if base is None else replace(base, **own) if own else base
            object.__setattr__(self, name, section)
        self._check_across()

    def _check_across(self) -> None:
        """What two sections must agree on, checked once all are made."""
        if self.adaptive_rate and self.policy != "xen-legacy":
            raise ConfigError(f"adaptive rate is xen-legacy's (xc_domain_save's ADAPTIVE_SAVE); "
                              f"the {self.policy} policy has none: use --policy xen-legacy")
        for f in self.faults:
            if f.kind == FaultKind.CUT_CHANNEL and not f.channel < (self.multifd_channels or 0):
                raise ConfigError(f"{f.to_text()} needs a multifd channel {f.channel}: give "
                                  f"--multifd-channels {f.channel + 1} or more")
        if self.multifd_channels is not None and self.postcopy_allowed:
            raise ConfigError("multifd channels and post-copy cannot be used together (QEMU's "
                              "multifd does not support post-copy before 10.1): drop "
                              "--multifd-channels or the post-copy options")

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
        """The flat dict of the table's names (faults as their dicts)."""
        return {k: v for name in SECTIONS for k, v in asdict(getattr(self, name)).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "MigrationSettings":
        unknown = set(data) - set(FLAT_NAMES)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} settings: {', '.join(sorted(unknown))}")
        return cls(**data)


def _flat(name: str, section: str) -> property:
    return property(lambda self: getattr(getattr(self, section), name),
                    doc=f"`{section}.{name}`, by its flat name")


for _name, _section in FLAT_NAMES.items():      # settings.policy is settings.switchover.policy
    setattr(MigrationSettings, _name, _flat(_name, _section))
