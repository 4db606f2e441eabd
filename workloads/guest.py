"""What a workload needs of the guest it runs in, and nothing more.

Workloads write through the guest's own access path, so they see a guest the way its vCPU
does: a lock to hold across a batch (a pause or a mode switch lands wholly before or after
it), whether it runs, its data pages, word reads and writes by pfn, and byte writes (the
content beside the counter). The Xen model's
`nodes.xen.domain.Domain` is one; a test may bring another. Keeping this small protocol here
is what lets `workloads` stand on its own: it imports nothing of the model.
"""

import threading
from typing import Protocol

import numpy as np


class Guest(Protocol):
    name: str
    lock: threading.RLock
    running: threading.Event     # set while the guest runs; a vCPU waits on it while paused
    data_pages: int              # pages the workload may write: pfns pfn_base ..
    pfn_base: int

    @property
    def is_running(self) -> bool: ...

    def read_words(self, pfns: np.ndarray, word: int | np.ndarray) -> np.ndarray: ...

    def write_words(self, pfns: np.ndarray, word: int | np.ndarray,
                    values: np.ndarray) -> None: ...

    def write_bytes(self, pfns: np.ndarray, offset: int, data: np.ndarray) -> None:
        """Store `data` (one row of bytes per pfn) at byte `offset` of each page."""
        ...
