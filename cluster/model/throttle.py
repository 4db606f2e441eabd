"""Auto-converge in the model: the throttle schedule the engine's own rules produce (and the
completion timeout, read by the engine's own `Timeouts`).

The model's bitmap syncs are counted by the engine's `SyncLog`; each one that closes a 1 s
rate period goes to the engine's `ThrottleTrigger`, and every second hot period steps the
engine's `AutoConverge` (`nodes.migration.throttle`). A throttle of p leaves the vCPU running
1 - p of the time and the workload earns its budget only while running, so a region's
writes over a wall-clock stretch are those of (1 - p) x that stretch: the model advances a
guest clock at that pace and asks the workload for the pages it dirties on that clock.
"""

from dataclasses import dataclass, field

from nodes.errors import MigrationTimedOut
from nodes.migration.dirtysync import SyncPeriod
from nodes.migration.policy import Decision
from nodes.migration.throttle import AutoConverge, ThrottleTrigger
from nodes.migration.timeouts import Timeouts, completion_seconds


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


def timeouts_from(settings, guest_bytes: int) -> "Timeouts | None":
    """The completion timeout a MigrationSettings asks for, as the engine reads it."""
    seconds = completion_seconds(settings.completion_timeout_seconds,
                                 settings.completion_timeout_per_gib_seconds, guest_bytes)
    return None if seconds is None else Timeouts(seconds, settings.on_timeout, None, 0.0)
