"""The aids that make pre-copy finish, for one migration: QEMU's auto-converge and dirty-limit
(rules in `nodes.migration.decide.throttle`), the operators' timeouts (`nodes.migration.decide.timeouts`) and
Xen's adaptive rate (`nodes.migration.decide.adaptive`); and the check of their settings.

The live rounds call in at three points: `period_closed` at every bitmap sync that closes a
1 s rate period (where QEMU runs `migration_trigger_throttle`), `tick` between batches or
after every chunk (dirty-limit's own period, the timeouts: asked through the switch-over
arbiter, `nodes.migration.decide.switchover`, while the policy goes on), `round_done` as a round ends
(the per-round throttle figures). The throttle reaches the vCPU through the host's
`GuestRuntime.throttle_guest`; `release` lifts it however the migration ends, as QEMU's
cleanup stops the throttle.

Its settings are the `convergence` rows of the field table (`nodes.migration.fields`), held
and checked by `ConvergenceSettings`.
"""

from typing import Protocol

from nodes.errors import ConfigError
from nodes.migration.decide.adaptive import AdaptiveRate
from nodes.migration.decide.policy import Decision
from nodes.migration.decide.throttle import (
    MB,
    AutoConverge,
    DirtyLimit,
    ThrottleTrigger,
    dirty_rate_mb,
)
from nodes.migration.decide.timeouts import OnTimeout, Timeouts, completion_seconds
from nodes.migration.fields import settings_section
from nodes.migration.progress import Progress, RoundStats
from nodes.migration.runtime import GuestRuntime
from nodes.migration.send.dirtysync import SyncPeriod

_PERCENT_RANGES = {  # field: (QEMU's parameter, lowest, highest)
    "throttle_initial": ("cpu-throttle-initial", 1, 99),
    "throttle_increment": ("cpu-throttle-increment", 1, 99),
    "max_throttle": ("max-cpu-throttle", 1, 99),
    "throttle_trigger_threshold": ("throttle-trigger-threshold", 1, 100),
}


@settings_section("convergence")
class ConvergenceSettings:
    """The aids of one migration; its fields are the table's `convergence` rows."""

    def __post_init__(self) -> None:
        check_settings(self)


class ConvergenceInputs(Protocol):
    """What the aids read of a migration's settings: their section, the rate limit Xen's
    adaptive rate starts from, and whether stall detection switches (the progress timeout
    then gives way to it)."""

    convergence: ConvergenceSettings
    rate_limit_bytes_per_second: float | None
    switchover_on_stall_seconds: float | None


def check_settings(s: ConvergenceSettings) -> None:
    """Refuse what QEMU refuses (migrate_params_check, migrate_caps_check), in one line."""
    for name, (qemu, lo, hi) in _PERCENT_RANGES.items():
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{name.replace('_', '-')} ({qemu}) must be an integer "
                              f"from {lo} to {hi}, got {value!r}")
    for name in ("auto_converge", "throttle_tailslow", "adaptive_rate"):
        if not isinstance(getattr(s, name), bool):
            raise ConfigError(f"{name.replace('_', '-')} must be true or false")
    limit = s.dirty_limit_bytes_per_second
    if limit is not None and not limit >= MB:
        raise ConfigError(f"dirty limit must be at least 1MB (10^6 bytes) per second, as "
                          f"QEMU's vcpu-dirty-limit, got {limit!r}")
    if not 0.001 <= s.dirty_limit_period_seconds <= 1.0:
        raise ConfigError("dirty-limit period (x-vcpu-dirty-limit-period) must be from 1ms "
                          f"to 1s, got {s.dirty_limit_period_seconds!r} s")
    if s.auto_converge and limit is not None:
        raise ConfigError("auto-converge and dirty-limit cannot be used together (QEMU: "
                          "dirty-limit conflicts with auto-converge); choose one")
    OnTimeout.parse(s.on_timeout, "on-timeout")
    if s.completion_timeout_seconds is not None and \
            s.completion_timeout_per_gib_seconds is not None:
        raise ConfigError("give the completion timeout once: absolute (30s) or per GiB "
                          "(10s/GiB), not both")
    for name in ("completion_timeout_seconds", "completion_timeout_per_gib_seconds",
                 "progress_timeout_seconds"):
        value = getattr(s, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name.removesuffix('_seconds').replace('_', '-')} must be "
                              f"positive, got {value!r}")


class Convergence:
    """One migration's aids; see the module docstring."""

    def __init__(self, settings: ConvergenceInputs, runtime: GuestRuntime, guest: str,
                 page_size: int, guest_bytes: int, progress: Progress, t0: float):
        s = settings.convergence
        self.runtime, self.guest, self.page_size = runtime, guest, page_size
        self.progress = progress
        throttling = s.auto_converge or s.dirty_limit_bytes_per_second is not None
        self.trigger = ThrottleTrigger(s.throttle_trigger_threshold) if throttling else None
        self.auto = (AutoConverge(s.throttle_initial, s.throttle_increment, s.max_throttle,
                                  s.throttle_tailslow) if s.auto_converge else None)
        self.limit = (DirtyLimit(int(s.dirty_limit_bytes_per_second // MB), page_size)
                      if s.dirty_limit_bytes_per_second is not None else None)
        self.limit_period = s.dirty_limit_period_seconds
        self.limit_active = False
        self._limit_at: tuple[float, list[int]] | None = None   # period start, each vCPU's writes
        self.timeouts = Timeouts(
            completion_seconds(s.completion_timeout_seconds,
                               s.completion_timeout_per_gib_seconds, guest_bytes),
            s.on_timeout, s.progress_timeout_seconds, t0,
            stall_switches=settings.switchover_on_stall_seconds is not None)
        self.adaptive = (AdaptiveRate(settings.rate_limit_bytes_per_second)
                         if s.adaptive_rate else None)
        self._limit_sleep0 = 0.0
        self._touched = False

    @property
    def cpu_percentage(self) -> int:
        return self.auto.percentage if self.auto is not None else 0

    # -- the three call points ---------------------------------------------------------------
    def period_closed(self, period: SyncPeriod, now: float) -> None:
        """migration_trigger_throttle, at a sync that closed a rate period."""
        if self.trigger is None:
            return
        hot = self.trigger.observe(period, self.page_size)
        if hot is None:
            return
        if self.auto is not None:
            self.auto.throttle_down(hot)
            self.progress.cpu_throttle_percentage = self.auto.percentage
            self._throttle(cpu_percentage=self.auto.percentage)
        elif self.limit is not None and not self.limit_active:
            self.limit_active = True          # migration_dirty_limit_guest: the quota is set
            self._limit_at = (now, self._vcpu_pages())

    def tick(self, now: float, remaining_bytes: int | None) -> Decision | None:
        """Between batches: dirty-limit's period, then the timeouts (may raise)."""
        if self.limit_active and now - self._limit_at[0] >= self.limit_period:
            self._adjust_limit(now)
        if self.timeouts.armed:
            return self.timeouts.check(now, remaining_bytes)
        return None

    def round_done(self, rnd: RoundStats) -> None:
        """The round's throttle: its percentage at the end, the dirty-limit sleeps in it."""
        rnd.cpu_throttle_percentage = self.cpu_percentage
        if self.limit is not None:
            slept = self._vcpu()["dirty_limit_sleep_seconds"]
            rnd.dirty_limit_throttle_seconds = slept - self._limit_sleep0
            self._limit_sleep0 = slept

    def release(self) -> None:
        """The migration ended, however: the vCPU runs unthrottled again."""
        if self._touched:
            self.runtime.throttle_guest(self.guest)
            self._touched = False
        self.progress.cpu_throttle_percentage = 0

    # -- dirty-limit ---------------------------------------------------------------------------
    def _adjust_limit(self, now: float) -> None:
        """vcpu_dirty_rate_stat_collect + dirtylimit_process: each vCPU's own rate from its
        own page writes; the busiest one's sets the sleep every vCPU takes per ring."""
        start, pages0 = self._limit_at
        pages = self._vcpu_pages()
        current = max(dirty_rate_mb(p - p0, self.page_size, now - start)
                      for p, p0 in zip(pages, pages0, strict=True))
        self._limit_at = (now, pages)
        us = self.limit.adjust(current)
        self.progress.dirty_limit_throttle_time_per_round_us = us
        self.progress.dirty_limit_rate_mb_per_second = current
        self._throttle(ring_pages=self.limit.ring_pages, ring_full_sleep_seconds=us / 1e6)

    def _throttle(self, **kw) -> None:
        self.runtime.throttle_guest(self.guest, **kw)
        self._touched = True

    def _vcpu(self) -> dict:
        return self.runtime.vcpu_throttle_stats(self.guest)

    def _vcpu_pages(self) -> list[int]:
        """Each vCPU's page writes so far (one vCPU: the guest's)."""
        stats = self._vcpu()
        return list(stats.get("vcpu_pages_written") or [stats["pages_written_total"]])
