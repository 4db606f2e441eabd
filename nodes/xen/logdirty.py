"""Log-dirty mode: the hypervisor's record of which pfns a guest wrote, as Xen's shadow ops.

Operations and their Xen numbers: OFF (0), ENABLE_LOGDIRTY (2), CLEAN (11: return the bitmap
and reset it), PEEK (12: return it, keep it). `fault_count` counts shadow faults: the first
write to a page after enable or a CLEAN faults, because those throw the shadow tables away.
`dirty_count` is the number of distinct pages marked since the last CLEAN.
"""

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class ShadowOp(IntEnum):
    OFF = 0
    ENABLE_LOGDIRTY = 2
    CLEAN = 11
    PEEK = 12


@dataclass
class LogDirtyStats:
    fault_count: int
    dirty_count: int


class LogDirty:
    def __init__(self, npages: int):
        self.npages = npages
        self.enabled = False
        self.bitmap = np.zeros(npages, dtype=bool)
        self.fault_count = 0

    def enable(self) -> None:
        self.enabled = True
        self.bitmap[:] = False
        self.fault_count = 0

    def disable(self) -> None:
        self.enabled = False
        self.bitmap[:] = False

    def mark(self, pfns: np.ndarray) -> None:
        """Record writes to `pfns` (indices into the guest's pfn space)."""
        fresh = pfns[~self.bitmap[pfns]]
        if len(fresh):
            # Distinct pfns by sorting, not np.unique: its first call imports numpy.ma,
            # which stalled the guest's first write in VP mode for 12-17 ms.
            fresh = np.sort(fresh)
            self.fault_count += 1 + int(np.count_nonzero(fresh[1:] != fresh[:-1]))
            self.bitmap[fresh] = True

    def peek(self) -> tuple[np.ndarray, LogDirtyStats]:
        return self.bitmap.copy(), self.stats()

    def clean(self) -> tuple[np.ndarray, LogDirtyStats]:
        bitmap, stats = self.peek()
        self.bitmap[:] = False
        self.fault_count = 0
        return bitmap, stats

    def stats(self) -> LogDirtyStats:
        return LogDirtyStats(self.fault_count, int(np.count_nonzero(self.bitmap)))
