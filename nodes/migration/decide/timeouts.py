"""What operators do when pre-copy will not finish (KubeVirt, libvirt, guestperf): a completion
timeout, absolute or per GiB of guest memory (KubeVirt's completionTimeoutPerGiB), that then
aborts, switches to post-copy or pauses the guest to finish; and a progress timeout that
aborts when the remaining bytes have not reached a new low for that long (KubeVirt's
progressTimeout watermark).
"""

from enum import StrEnum

from nodes.errors import ConfigError, MigrationTimedOut
from nodes.migration.decide.policy import Action, Decision, StopCode
from nodes.migration.decide.stall import Watermark

GIB = 1 << 30


class OnTimeout(StrEnum):
    ABORT = "abort"          # the guest stays on its source; the migration is cancelled
    POSTCOPY = "postcopy"    # switch: the guest runs on the destination, pages follow
    PAUSE = "pause"          # stop the guest and finish as stop-and-copy (guestperf's pause)

    @classmethod
    def parse(cls, text: str, what: str = "--on-timeout") -> "OnTimeout":
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise ConfigError(f"{what}: {text!r} is not one of "
                              f"{', '.join(m.value for m in cls)}") from None


def completion_seconds(absolute: float | None, per_gib: float | None,
                       guest_bytes: int) -> float | None:
    """The completion timeout for a guest of `guest_bytes`: absolute, or per GiB."""
    if absolute is not None:
        return absolute
    if per_gib is not None:
        return per_gib * guest_bytes / GIB
    return None


class Timeouts:
    """Checked while pre-copy runs (`check`): a Decision to end it, or None to go on.
    An abort raises MigrationTimedOut (status cancelled, with its stop code).

    The progress timeout reads the one stall detector (`low`, a `Watermark`), which stall
    detection shares (`nodes.migration.decide.stall`); `stall_switches`: it is set too, and
    the switch wins, so no stall aborts."""

    def __init__(self, completion: float | None, on_timeout: OnTimeout | str,
                 progress: float | None, t0: float, low: Watermark | None = None,
                 stall_switches: bool = False):
        self.completion = completion
        self.on_timeout = OnTimeout(on_timeout)
        self.progress = None if stall_switches else progress
        self.t0 = t0
        self.low = Watermark(t0) if low is None else low

    @property
    def watermark(self) -> int | None:
        """The lowest remaining bytes seen."""
        return self.low.low

    @property
    def armed(self) -> bool:
        return self.completion is not None or self.progress is not None

    def check(self, now: float, remaining_bytes: int | None) -> Decision | None:
        """`remaining_bytes` None: not a moment to read the remaining bytes at (mid-pass
        under a policy that syncs only between passes); the watermark's age still counts."""
        if self.completion is not None and now - self.t0 >= self.completion:
            return self._completion_timeout()
        if self.progress is not None:
            before = self.low.low
            self.low.observe(now, remaining_bytes)
            if self.low.low == before and self.low.stalled(now, self.progress):
                raise MigrationTimedOut(
                    f"no progress: the remaining bytes have not dropped below "
                    f"{self.watermark} in {self.progress:g} s (--progress-timeout)",
                    StopCode.NO_PROGRESS.value)
        return None

    def _completion_timeout(self) -> Decision:
        why = f"not complete after {self.completion:g} s (--completion-timeout)"
        if self.on_timeout is OnTimeout.ABORT:
            raise MigrationTimedOut(f"cancelled: {why}", StopCode.COMPLETION_TIMEOUT.value)
        if self.on_timeout is OnTimeout.POSTCOPY:
            return Decision(Action.POSTCOPY, f"{why}: switching to post-copy",
                            StopCode.POSTCOPY)
        return Decision.stop(StopCode.PAUSED, f"{why}: guest paused to finish")
