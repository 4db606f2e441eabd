"""Xen's adaptive save rate (xc_domain_save.c under `#ifdef ADAPTIVE_SAVE`, Xen 2.0 to 4.4;
the stock build does not define it, so it is off unless asked for, `--adaptive-rate`).

The sender starts at START_MBIT_RATE (100 Mbit/s; migbed: the admin's rate limit when one is
set); after every round, when the guest dirtied faster than the current rate, the rate is
raised to that dirty rate + 50 Mbit/s, capped at MAX_MBIT_RATE (500). Once at the cap, a round
that sent more than the one before ends the live rounds: dirtying outran even the fastest
rate. Rates are Mbit/s of 10^6 bits, as `print_stats` computes them. Xen paces in 100 KiB
bursts per slot; migbed's pacer keeps the same average rate without the bursts.

The switch-over arbiter (`nodes.migration.decide.switchover`) consults it between passes as a
`PacedRate`, which paces the sender at the rate it sets.
"""

from collections.abc import Callable, Sequence

from nodes.migration.decide.policy import Decision, StopCode
from nodes.migration.progress import RoundStats

MBIT = 1_000_000 / 8          # bytes per second in one Mbit/s
START_MBIT_RATE = 100
MAX_MBIT_RATE = 500


class AdaptiveRate:
    def __init__(self, admin_bytes_per_second: float | None = None):
        start = (admin_bytes_per_second / MBIT if admin_bytes_per_second
                 else START_MBIT_RATE)
        self.mbit_rate = int(min(start, MAX_MBIT_RATE))

    @property
    def bytes_per_second(self) -> float:
        return self.mbit_rate * MBIT

    @property
    def at_max(self) -> bool:
        return self.mbit_rate == MAX_MBIT_RATE

    def round_done(self, dirtied_pages: int, page_size: int, seconds: float) -> float:
        """print_stats after a round: raise the rate to the dirty rate + 50 if the guest
        dirtied faster than it. Returns the rate (bytes/s) for the next round."""
        wall_ms = seconds * 1000
        if wall_ms > 0:
            dirty_mbit = int(dirtied_pages * page_size / (wall_ms * (1000 / 8)))
            if dirty_mbit > self.mbit_rate:
                self.mbit_rate = min(dirty_mbit + 50, MAX_MBIT_RATE)
        return self.bytes_per_second

    def decide(self, sent_this_round: int, sent_last_round: int) -> Decision | None:
        """Before the next round: at the cap and sending more each round, stop."""
        if self.at_max and sent_this_round > sent_last_round:
            return Decision.stop(StopCode.RATE_CAP,
                                 f"at the adaptive rate's cap ({MAX_MBIT_RATE} Mbit/s) a "
                                 "round sent more than the one before")
        return None


class PacedRate:
    """The adaptive rate as the switch-over arbiter consults it before each pass: the stop, or
    the next round's rate set from the last round's dirtying and handed to `pace` (the
    link's `set_rate_limit`)."""

    def __init__(self, rate: AdaptiveRate, pace: Callable[[float], None]):
        self.rate = rate
        self.pace = pace

    def between_rounds(self, rounds: Sequence[RoundStats], page_size: int) -> Decision | None:
        if not rounds:
            return None
        last = rounds[-1]
        stop = self.rate.decide(last.pages_sent, rounds[-2].pages_sent) if len(rounds) > 1 \
            else None
        if stop is None:
            self.pace(self.rate.round_done(last.pages_dirtied, page_size,
                                           last.duration_seconds))
        return stop
