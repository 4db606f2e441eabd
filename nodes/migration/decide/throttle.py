"""QEMU's rules for slowing a guest that dirties faster than pre-copy sends: the trigger
(ram.c `migration_trigger_throttle`), auto-converge's schedule (`mig_throttle_guest_down`,
cpu-throttle.c) and dirty-limit's per-vCPU adjustment (system/dirtylimit.c). Arithmetic
only, no clock and no guest, so the engine and the analytic model run the very same rules.

Units are QEMU's: percentages are integers (0-99), dirty rates in dirty-limit are integer
MB/s. migbed takes MB as 10^6 bytes (the option's unit); QEMU's own rate counters shift by 20
bits (MiB), which makes a migbed quota about 5 % tighter than QEMU's of the same number.
"""

from dataclasses import dataclass

from nodes.migration.send.dirtysync import SyncPeriod

CPU_THROTTLE_PCT_MIN = 1          # cpu_throttle_set clamps to 1..99
CPU_THROTTLE_PCT_MAX = 99
DIRTYLIMIT_TOLERANCE_RANGE_MB = 25
DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT = 50
DIRTYLIMIT_THROTTLE_PCT_MAX = 99
DIRTY_RING_PAGES = 4096           # KVM's dirty-ring-size, in entries (pages), as usually set
# QEMU 9.2+: with auto-converge, a bitmap sync is forced when none came for 5 s, so a long
# pass still closes rate periods (CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS).
FORCED_SYNC_SECONDS = 5.0
MB = 10**6


def forced_sync_due(auto_converge: bool, now: float, last_sync_at: float) -> bool:
    """QEMU 9.2+: with auto-converge (not dirty-limit), a sync when none came for 5 s; the
    engine and the model both ask this."""
    return auto_converge and now - last_sync_at >= FORCED_SYNC_SECONDS


@dataclass(frozen=True)
class Hot:
    """What the trigger measured over one period (bytes), for the throttle's step."""

    bytes_dirty_period: int
    bytes_dirty_threshold: int


class ThrottleTrigger:
    """migration_trigger_throttle: evaluated once per rate period (a bitmap sync at least 1 s
    after the last period closed). A period is hot when the bytes dirtied in it exceed
    `threshold_pct` % of the bytes sent in it; every second hot period fires (the counter is
    reset when it fires, and a cold period leaves it as it is)."""

    def __init__(self, threshold_pct: int = 50):
        self.threshold_pct = threshold_pct
        self.dirty_rate_high_count = 0

    def observe(self, period: SyncPeriod, page_size: int) -> Hot | None:
        """The period just closed; returns what it measured when the throttle fires."""
        bytes_dirty = period.dirtied_pages * page_size
        threshold = period.sent_bytes * self.threshold_pct // 100
        if bytes_dirty > threshold:
            self.dirty_rate_high_count += 1
            if self.dirty_rate_high_count >= 2:
                self.dirty_rate_high_count = 0
                return Hot(bytes_dirty, threshold)
        return None


class AutoConverge:
    """The cpu-throttle schedule: `initial` % when the trigger first fires, then +`increment`
    each time, capped at `maximum`. With `tailslow`, the step is at most what would bring the
    dirty rate down to the trigger's threshold (cpu_now x threshold / dirtied)."""

    def __init__(self, initial: int = 20, increment: int = 10, maximum: int = 99,
                 tailslow: bool = False):
        self.initial, self.increment, self.maximum = initial, increment, maximum
        self.tailslow = tailslow
        self.percentage = 0               # cpu_throttle_get_percentage; 0: not throttling

    def throttle_down(self, hot: Hot) -> int:
        """mig_throttle_guest_down; returns the new percentage."""
        now = self.percentage
        if not now:
            new = self.initial
        else:
            step = self.increment
            if self.tailslow:
                cpu_now = 100 - now
                cpu_ideal = int(cpu_now * (hot.bytes_dirty_threshold * 1.0
                                           / hot.bytes_dirty_period))
                step = min(cpu_now - cpu_ideal, self.increment)
            new = min(now + step, self.maximum)
        self.percentage = max(CPU_THROTTLE_PCT_MIN, min(new, CPU_THROTTLE_PCT_MAX))
        return self.percentage


class DirtyLimit:
    """One vCPU under dirty-limit (`dirtylimit_adjust_throttle`): every period the vCPU's
    measured dirty rate (`current`, MB/s) is compared with the quota; within 25 MB/s nothing
    changes; beyond, the sleep the vCPU takes each time its dirty ring fills
    (`throttle_us_per_full`) moves linearly when the error is over 50 %, else by a tenth of
    the ring's fill time; capped at 99 x the fill time. The fill time is the ring's size over
    the highest rate seen."""

    def __init__(self, quota_mb_per_second: int, page_size: int,
                 ring_pages: int = DIRTY_RING_PAGES):
        self.quota = quota_mb_per_second
        self.ring_pages = ring_pages
        self.ring_mib = (ring_pages * page_size) >> 20     # qemu_target_pages_to_MiB
        self.throttle_us_per_full = 0
        self.max_dirtyrate = 0
        self.current = 0

    def ring_full_time_us(self, current: int) -> int:
        self.max_dirtyrate = max(self.max_dirtyrate, current)
        return self.ring_mib * 1000000 // self.max_dirtyrate

    def adjust(self, current: int) -> int:
        """A period's measured rate in; the sleep per full ring (us) out."""
        self.current = current
        quota = self.quota
        if abs(quota - current) <= DIRTYLIMIT_TOLERANCE_RANGE_MB:
            return self.throttle_us_per_full
        if current == 0:
            self.throttle_us_per_full = 0
            return 0
        full_us = self.ring_full_time_us(current)
        lo, hi = min(quota, current), max(quota, current)
        if (hi - lo) * 100 // hi > DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT:
            if quota < current:
                sleep_pct = (current - quota) * 100 // current
                self.throttle_us_per_full += int(full_us * sleep_pct / (100 - sleep_pct))
            else:
                sleep_pct = (quota - current) * 100 // quota
                self.throttle_us_per_full -= int(full_us * sleep_pct / (100 - sleep_pct))
        elif quota < current:
            self.throttle_us_per_full += full_us // 10
        else:
            self.throttle_us_per_full -= full_us // 10
        self.throttle_us_per_full = max(0, min(self.throttle_us_per_full,
                                               full_us * DIRTYLIMIT_THROTTLE_PCT_MAX))
        return self.throttle_us_per_full


def dirty_rate_mb(pages: int, page_size: int, seconds: float) -> int:
    """A vCPU's dirty rate as dirty-limit reads it: integer MB/s."""
    if seconds <= 0:
        return 0
    return int(pages * page_size / seconds / MB)
