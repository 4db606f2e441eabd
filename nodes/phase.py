"""The phases of a migration and how it ends: the one vocabulary of progress, metric labels,
fault stages and the report (`Phase`, `Outcome`).

Users see the kebab-case values (`stop-and-copy` in `--fault kill-source@stop-and-copy`, in
the `phase` label of /metrics and in a migration's progress); JSON keys are derived from the
same members mechanically (`Phase.STOP_AND_COPY.key == "stop_and_copy"`).

A pre-copy migration passes setup, precopy, stop-and-copy and handover; a post-copy one
(`nodes.migration.postcopy`) passes setup, precopy (no live round at all for pure post-copy),
switch and postcopy. The source then verifies and cleans up (after the total time has ended,
as QEMU's total-time ends when the destination has the whole guest).
"""

from enum import StrEnum


class Phase(StrEnum):
    SETUP = "setup"                    # data channel open, shadow mode and log-dirty on
    PRECOPY = "precopy"                # live rounds: the guest runs while its pages go
    STOP_AND_COPY = "stop-and-copy"    # the guest paused, its last pages and vCPU sent
    HANDOVER = "handover"              # READY, PERMISSION_TO_GO, the resume, RESULT
    SWITCH = "switch"                  # post-copy: paused, discard set and vCPU sent, resumed there
    POSTCOPY = "postcopy"              # the guest runs on the destination while its pages arrive
    VERIFY = "verify"                  # the source hashes its frozen copy
    CLEANUP = "cleanup"                # the source destroys its copy

    @property
    def key(self) -> str:
        """The JSON key of the phase: `stop_and_copy`."""
        return self.value.replace("-", "_")

    @classmethod
    def parse(cls, text: str) -> "Phase":
        """A phase by its value or its JSON key."""
        return cls(text.replace("_", "-"))


# The phases that make up the total time (setup to the destination's RESULT): setup and
# precopy, then stop-and-copy and handover (pre-copy) or switch and postcopy (post-copy).
TIMED = (Phase.SETUP, Phase.PRECOPY, Phase.STOP_AND_COPY, Phase.HANDOVER, Phase.SWITCH,
         Phase.POSTCOPY)


class Outcome(StrEnum):
    """What a side's `status` says of a migration, typed. A `str` enum so the report's JSON,
    metric labels and saved reports keep the plain values, and compare equal to them."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "postcopy-paused"     # after a post-copy switch, the link is down
    UNKNOWN = "unknown"            # the control plane got no verdict from the destination
    # A destination's status before it ends (`nodes.migration.receive.receiver.Receiver`).
    WAITING = "waiting"
    RECEIVING = "receiving"
    READY = "ready"


class PausedEnd(StrEnum):
    """How the control plane ends a paused post-copy on its source, as it found the
    destination (`cluster.postcopy_control`, `nodes.migration.postcopy.postcopy_source.settle_paused`)."""

    COMPLETED = "completed"        # the destination has it all: its RESULT was lost
    RESUME = "resume"              # the destination never ran the guest: it resumes here
    LOST = "lost"                  # the destination died: neither host has the whole guest


# What a migration's status is once it has ended.
ENDED = (Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELLED)
