"""Stall detection, an input of the switch-over arbiter (`nodes.migration.decide.switchover`,
its `stall_minimum` rule), as KubeVirt's VEP 248: when the remaining bytes have not reached a
new low for a while, waiting longer will not make pre-copy converge, so switch over, and do it
where the remaining bytes are at a local minimum rather than wherever the stall was noticed.

One detector, the `Watermark` (the lowest remaining bytes seen and when), serves both this and
the progress timeout (`nodes.migration.decide.timeouts`), which aborts on the same stall; when
both are set, the switch wins (the timeout then never aborts).

The local minimum: the remaining bytes the arbiter reads fall as a pass sends its pages and
rise when a sync marks what was dirtied meanwhile (a sawtooth). Once stalled, the switch comes
at the first reading that does not fall after one that fell: a rise (the reading before it
was the local minimum; the pages the sync just marked were pending at that minimum already,
unmarked, so switching right after it sends what switching at it would have) or a flat
floor. So the switch is at most one reading, one pass when readings come a pass apart, after
the local minimum.
"""

from nodes.migration.decide.policy import Decision, StopCode


class Watermark:
    """The lowest remaining bytes seen (`low`, None before a reading) and when (`low_at`,
    the start until then) on the decisions' clock."""

    def __init__(self, t0: float):
        self.low: int | None = None
        self.low_at = t0

    def observe(self, now: float, remaining_bytes: int | None) -> None:
        if remaining_bytes is not None and (self.low is None or remaining_bytes < self.low):
            self.low, self.low_at = remaining_bytes, now

    def stalled(self, now: float, seconds: float) -> bool:
        """No new low for `seconds`."""
        return now - self.low_at >= seconds


class StallSwitch:
    """Switch over at the next local minimum once the watermark has stalled for `seconds`."""

    def __init__(self, watermark: Watermark, seconds: float):
        if not seconds > 0:
            raise ValueError(f"stall duration must be positive, got {seconds!r}")
        self.watermark = watermark
        self.seconds = seconds
        self.armed_at: float | None = None      # when the stall was declared
        self._last: int | None = None           # the reading before
        self._moved = 0                         # its last move: -1 fell, 1 rose (0: none)

    def decide(self, now: float, remaining_bytes: int | None) -> Decision | None:
        """A stop at a local minimum after the stall, else None (unreadable bytes: None)."""
        if remaining_bytes is None:
            return None
        self.watermark.observe(now, remaining_bytes)
        last, self._last = self._last, remaining_bytes
        moved = 0 if last is None else (remaining_bytes > last) - (remaining_bytes < last)
        before = self._moved
        if moved:
            self._moved = moved
        if self.armed_at is None:
            if not self.watermark.stalled(now, self.seconds):
                return None
            self.armed_at = now
        if last is None or moved < 0:
            return None                          # still falling: the minimum is ahead
        if before > 0:
            return None                          # rising, or a plateau after a rise: wait
        return Decision.stop(
            StopCode.STALL_MINIMUM,
            f"no new low of the remaining bytes ({self.watermark.low}) for "
            f"{self.seconds:g} s (--switchover-on-stall): switched at a local minimum "
            f"({last} bytes)")
