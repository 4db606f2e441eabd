"""Where a fault fires on the destination: refuse-memory when frames are reserved, and
delay-restore before READY (stop-and-copy) or before the resume (handover)."""

import threading
from collections.abc import Iterable

from nodes.errors import MigrationError, OutOfFramesError
from nodes.faults.spec import DESTINATION_KINDS, FaultKind, FaultSpec
from nodes.faults.stats import FaultStats
from nodes.phase import Phase


class DestinationFaults:
    """refuse-memory at prepare; delay-restore before READY or before the resume."""

    def __init__(self, faults: Iterable[FaultSpec], stats: FaultStats | None = None):
        self.faults = [f for f in faults if FaultKind(f.kind) in DESTINATION_KINDS]
        self.stats = stats
        self.fired: list[dict] = []
        self._interrupt = threading.Event()

    def _take(self, kind: FaultKind, stage: Phase) -> FaultSpec | None:
        for f in self.faults:
            if f.kind == kind.value and f.matches(stage):
                self.faults.remove(f)
                self.fired.append({**f.to_dict(), "text": f.to_text(), "fired": True,
                                   "side": "destination"})
                if self.stats is not None:
                    self.stats.count_injected(f)
                return f
        return None

    def check_memory(self, host: str, guest: str, pages: int) -> None:
        if self._take(FaultKind.REFUSE_MEMORY, Phase.SETUP) is not None:
            raise OutOfFramesError(f"{host} refuses memory for {guest} ({pages} frames): "
                                   "injected fault refuse-memory@setup", needed_frames=pages)

    def delay(self, stage: Phase) -> None:
        f = self._take(FaultKind.DELAY_RESTORE, stage)
        if f is not None and self._interrupt.wait(f.duration_seconds):
            raise MigrationError(f"restore abandoned during an injected "
                                 f"{f.duration_seconds:g} s delay")

    def interrupt(self) -> None:
        self._interrupt.set()
