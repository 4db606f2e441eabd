"""Auto-converge in the model: the throttle schedule the engine's own rules produce (and the
completion timeout, read by the engine's own `Timeouts` and consulted by the engine's own
switch-over arbiter as `ModelTimeouts`).

The model's bitmap syncs are counted by the engine's `SyncLog`; each one that closes a 1 s
rate period goes to the engine's `ThrottleTrigger`, and every second hot period steps the
engine's `AutoConverge` (`nodes.migration.decide.throttle`). A throttle of p leaves the vCPU running
1 - p of the time and the workload earns its budget only while running, so a region's
writes over a wall-clock stretch are those of (1 - p) x that stretch: the model advances a
guest clock at that pace and asks the workload for the pages it dirties on that clock.
"""

from dataclasses import dataclass, field

from nodes.errors import ConfigError, MigrationTimedOut
from nodes.migration.decide.policy import Decision
from nodes.migration.decide.throttle import (
    MB,
    AutoConverge,
    DirtyLimit,
    ThrottleTrigger,
    dirty_rate_mb,
)
from nodes.migration.decide.timeouts import Timeouts, completion_seconds
from nodes.migration.send.dirtysync import SyncPeriod


@dataclass(frozen=True)
class ThrottleSpec:
    """Auto-converge's parameters (MigrationSettings' names without the prefix)."""

    initial: int = 20
    increment: int = 10
    maximum: int = 99
    trigger_threshold: int = 50
    tailslow: bool = False

    @classmethod
    def from_settings(cls, settings) -> "ThrottleSpec | None":
        """From MigrationSettings; None when auto-converge is off."""
        if not settings.auto_converge:
            return None
        return cls(settings.throttle_initial, settings.throttle_increment,
                   settings.max_throttle, settings.throttle_trigger_threshold,
                   settings.throttle_tailslow)


@dataclass
class ModelThrottle:
    spec: ThrottleSpec
    page_size: int
    schedule: list = field(default_factory=list)     # (seconds, percentage) at each step

    def __post_init__(self) -> None:
        self.trigger = ThrottleTrigger(self.spec.trigger_threshold)
        self.auto = AutoConverge(self.spec.initial, self.spec.increment, self.spec.maximum,
                                 self.spec.tailslow)

    @property
    def percentage(self) -> int:
        return self.auto.percentage

    @property
    def running_share(self) -> float:
        """The share of wall time the vCPU runs at the current throttle."""
        return 1.0 - self.auto.percentage / 100

    def period_closed(self, period: SyncPeriod | None, now: float) -> None:
        if period is None:
            return
        hot = self.trigger.observe(period, self.page_size)
        if hot is not None:
            self.schedule.append((now, self.auto.throttle_down(hot)))

    def tick(self, now: float) -> None:
        """Auto-converge acts only at the syncs."""


def running_share(throttle: "ModelThrottle | None") -> float:
    return 1.0 if throttle is None else throttle.running_share


def timeout_decision(timeouts: "Timeouts | None", now: float) -> Decision | None:
    """The engine's completion timeout at the model's `now`: pause or post-copy stop the
    live rounds; abort is the model's ABORT (the engine cancels)."""
    if timeouts is None:
        return None
    try:
        return timeouts.check(now, None)
    except MigrationTimedOut as exc:
        return Decision.abort(str(exc))


@dataclass(frozen=True)
class ModelTimeouts:
    """The completion timeout as the switch-over arbiter (`nodes.migration.decide.switchover`)
    consults it in the model: at the model's clock, no remaining bytes read."""

    timeouts: Timeouts

    def tick(self, now: float, remaining_bytes: int | None) -> Decision | None:
        return timeout_decision(self.timeouts, now)


def timeouts_from(settings, guest_bytes: int) -> "Timeouts | None":
    """The completion timeout a MigrationSettings asks for, as the engine reads it."""
    seconds = completion_seconds(settings.completion_timeout_seconds,
                                 settings.completion_timeout_per_gib_seconds, guest_bytes)
    return None if seconds is None else Timeouts(seconds, settings.on_timeout, None, 0.0)


@dataclass(frozen=True)
class DirtyLimitSpec:
    """Dirty-limit's parameters: the quota (bytes/s of dirtied memory) and its period."""

    bytes_per_second: float
    period_seconds: float = 1.0
    trigger_threshold: int = 50

    @classmethod
    def from_settings(cls, settings) -> "DirtyLimitSpec | None":
        if settings.dirty_limit_bytes_per_second is None:
            return None
        return cls(settings.dirty_limit_bytes_per_second, settings.dirty_limit_period_seconds,
                   settings.throttle_trigger_threshold)


@dataclass
class ModelDirtyLimit:
    """Dirty-limit in the model, on the engine's own trigger and `DirtyLimit` rule: once the
    trigger fires, every period the vCPU's rate (its raw page-write rate times the share of
    time it is not asleep) goes to the rule, whose sleep per full ring sets the next share.
    The ring fills after `ring_pages` writes, at the raw rate."""

    spec: DirtyLimitSpec
    page_size: int
    raw_pages_per_second: float
    schedule: list = field(default_factory=list)     # (seconds, sleep per ring in us)

    def __post_init__(self) -> None:
        self.trigger = ThrottleTrigger(self.spec.trigger_threshold)
        self.limit = DirtyLimit(int(self.spec.bytes_per_second // MB), self.page_size)
        self.active_since: float | None = None
        self.last_adjust = 0.0
        self.percentage = 0                             # no cpu throttle: only ring sleeps

    @property
    def running_share(self) -> float:
        us = self.limit.throttle_us_per_full
        if not us or self.raw_pages_per_second <= 0:
            return 1.0
        fill = self.limit.ring_pages / self.raw_pages_per_second
        return fill / (fill + us / 1e6)

    def period_closed(self, period: SyncPeriod | None, now: float) -> None:
        if period is None or self.active_since is not None:
            return
        if self.trigger.observe(period, self.page_size) is not None:
            self.active_since = self.last_adjust = now

    def tick(self, now: float) -> None:
        """The dirty-rate thread's periods, caught up to `now`."""
        if self.active_since is None:
            return
        while now - self.last_adjust >= self.spec.period_seconds:
            self.last_adjust += self.spec.period_seconds
            current = dirty_rate_mb(int(self.raw_pages_per_second * self.running_share),
                                    self.page_size, 1.0)
            self.schedule.append((self.last_adjust, self.limit.adjust(current)))


def model_throttle(auto_converge: ThrottleSpec | None, dirty_limit: DirtyLimitSpec | None,
                   page_size: int, raw_rate: float) -> "ModelThrottle | ModelDirtyLimit | None":
    """The modelled guest's throttle for these settings (None: none)."""
    if auto_converge is not None and dirty_limit is not None:
        raise ConfigError("auto-converge and dirty-limit cannot be used together")
    if auto_converge is not None:
        return ModelThrottle(auto_converge, page_size)
    if dirty_limit is not None:
        return ModelDirtyLimit(dirty_limit, page_size, raw_rate)
    return None
