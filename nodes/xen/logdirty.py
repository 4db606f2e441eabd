"""Log-dirty mode: the hypervisor's record of which pfns a guest wrote, as Xen's shadow ops.

Operations and their Xen numbers: OFF (0), ENABLE_LOGDIRTY (2), CLEAN (11: return the bitmap
and reset it), PEEK (12: return it, keep it). `fault_count` counts shadow faults: the first
write to a page after enable or a CLEAN faults, because those throw the shadow tables away.
`dirty_count` is the number of distinct pages marked since the last CLEAN.

`LogDirty` is the emulated log, marked by the access path (`nodes.xen.domain`). A guest whose
writes the access path does not see (a process vCPU) has another log with the same
operations, a `DirtyLog`, which its host installs as `Domain.logdirty`
(`nodes.host.kerneldirty`, the kernel's write-protect log): the hypervisor's shadow ops and
the migration read either the same way.
"""

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

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


class DirtyLog(Protocol):
    """What a log-dirty is to the hypervisor and the migration: `LogDirty`'s operations."""

    enabled: bool
    fault_count: int
    kind: str                   # "emulated" | "kernel": what the report names as dirty_log

    @property
    def bitmap(self) -> np.ndarray:
        """Pages marked since the last CLEAN, one bool each (read, not written)."""
        ...

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def mark(self, pfns: np.ndarray) -> None: ...

    def peek(self) -> tuple[np.ndarray, "LogDirtyStats"]: ...

    def clean(self) -> tuple[np.ndarray, "LogDirtyStats"]: ...

    def stats(self) -> "LogDirtyStats": ...


class LogDirty:
    kind = "emulated"

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
