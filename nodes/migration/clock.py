"""How far the destination's clock is from the source's, measured over the data channel as
NTP does, so a downtime from a pause on one machine to a resume on another stays right.

The source sends CLOCK_PROBE {t1: its wall clock}; the destination stamps t2 as the record
arrives and t3 as it answers CLOCK_REPLY {t1, t2, t3}; the source stamps t4 on receipt. Then
(RFC 5905, section 8)

    offset = ((t2 - t1) + (t3 - t4)) / 2       the destination's clock minus the source's
    delay  = (t4 - t1) - (t3 - t2)             the round trip, the destination's time out

and the true offset lies within offset +- delay / 2 whatever the asymmetry of the two ways.
Of several exchanges the one with the least delay is kept (NTP's clock filter): the one least
disturbed by queueing. It runs at setup, when nothing else is in flight on the channel, so
the probes cost no downtime; clocks drift by parts per million, microseconds over a
migration of seconds. Every wall time the destination reports (its resume, its guest's
progress) is brought onto the source's clock with `to_source_clock` before a downtime is
taken from it.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodes.errors import StreamError

PROBES = 4


@dataclass(frozen=True)
class ClockSample:
    """One exchange: t1 source sends, t2 destination receives, t3 it answers, t4 source
    receives. Wall-clock seconds, each on its own host's clock."""

    t1: float
    t2: float
    t3: float
    t4: float

    @property
    def offset_seconds(self) -> float:
        return ((self.t2 - self.t1) + (self.t3 - self.t4)) / 2

    @property
    def delay_seconds(self) -> float:
        return (self.t4 - self.t1) - (self.t3 - self.t2)


@dataclass(frozen=True)
class ClockEstimate:
    """The destination's clock minus the source's (seconds), good to +- rtt / 2."""

    offset_seconds: float
    rtt_seconds: float
    samples: int

    @classmethod
    def best_of(cls, samples: list[ClockSample]) -> "ClockEstimate":
        """The least-delay sample (NTP's clock filter)."""
        if not samples:
            raise ValueError("a clock estimate needs at least one sample")
        best = min(samples, key=lambda s: s.delay_seconds)
        return cls(best.offset_seconds, max(0.0, best.delay_seconds), len(samples))


def measure(send: Callable[[dict], None], receive: Callable[[], dict],
            probes: int = PROBES) -> ClockEstimate:
    """The source's side: `probes` exchanges, one at a time (`send` a CLOCK_PROBE's fields,
    `receive` the CLOCK_REPLY's), each checked: it answers the probe it was sent."""
    samples = []
    for _ in range(probes):
        t1 = time.time()
        send({"t1": t1})
        reply = receive()
        t4 = time.time()
        t2, t3 = reply["t2"], reply["t3"]
        if reply["t1"] != t1 or not all(math.isfinite(t) for t in (t2, t3)) or t3 < t2:
            raise StreamError("CLOCK_REPLY does not answer the probe sent")
        samples.append(ClockSample(t1, t2, t3, t4))
    return ClockEstimate.best_of(samples)


def answer(probe: dict, received_wall: float, sent_wall: float) -> dict:
    """The destination's CLOCK_REPLY to `probe`: it arrived at `received_wall` and the reply
    leaves at `sent_wall`, both on the destination's clock."""
    return {"t1": probe["t1"], "t2": received_wall, "t3": sent_wall}


def to_source_clock(wall: float | None, offset_seconds: float | None) -> float | None:
    """A wall time of the destination's clock on the source's (unchanged when no offset was
    measured, or the offset sent was not a finite number)."""
    if wall is None or offset_seconds is None or not math.isfinite(offset_seconds):
        return wall
    return wall - offset_seconds
