"""The fixed part of the downtime: what no page transfer can shrink (END crossing the link, the
destination's checks, READY, PERMISSION_TO_GO, the resume). Cloud Hypervisor #8899 asks that
the convergence check subtract it from the downtime budget; QEMU does not, so migbed does only
when asked (`subtract_fixed_downtime`).

It is measured for the host pair, not guessed: the source host keeps the hand-over of its
last completed migration to that destination, less the RESULT's way back (half a round trip);
before any, a round trip on this migration's own data channel at setup (SYNC, SYNC_ACK,
through the emulated link and its latency) gives the three one-way crossings, 1.5 round trips.
"""

import time
from dataclasses import asdict, dataclass

from nodes.migration.send.source_context import Channel
from nodes.migration.wire.records import RecordType as RT

MEASURED_HANDOVER = "hand-over of the last migration to this host"
ROUND_TRIP = "1.5 x the data channel's round trip at setup"


@dataclass(frozen=True)
class FixedDowntime:
    seconds: float
    basis: str
    round_trip_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def round_trip(channel: Channel, timeout: float) -> float:
    """A SYNC and its SYNC_ACK over the data channel, as the link carries them."""
    t0 = time.monotonic()
    channel.send_record(RT.SYNC)
    channel.link.flush(timeout)
    channel.reader.expect(RT.SYNC_ACK)
    return time.monotonic() - t0


def measure(channel: Channel, timeout: float, known_seconds: float | None) -> FixedDowntime:
    """The fixed downtime for this migration (`channel`: its data channel, after setup);
    `known_seconds` is what the last hand-over on this pair measured (None: none yet)."""
    rtt = round_trip(channel, timeout)
    if known_seconds is not None:
        return FixedDowntime(known_seconds, MEASURED_HANDOVER, rtt)
    return FixedDowntime(1.5 * rtt, ROUND_TRIP, rtt)


def handover_fixed_seconds(handover_seconds: float, round_trip_seconds: float) -> float:
    """What a completed hand-over says of the next one: its time less RESULT's way back."""
    return max(0.0, handover_seconds - round_trip_seconds / 2)
