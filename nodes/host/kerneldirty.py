"""Log-dirty for a process guest, by the kernel: userfaultfd write-protect (async) and
PAGEMAP_SCAN over the guest process's page tables.

This is what shadow paging's dirty log is on a real hypervisor: every page of the guest is
write-protected; its first write faults, the fault is resolved at once (by the kernel, in
WP_ASYNC mode: no one waits) and the page is marked written; CLEAN reads the marks and
protects the pages again. The operations are Xen's (`nodes.xen.logdirty.ShadowOp`) and so is
the shape of the answer, a bitmap by pfn and `LogDirtyStats`, so a migration reads this log
as it reads the emulated one: ENABLE protects the whole range, CLEAN scans with reset, PEEK
scans without, OFF lifts the protection.

The guest maps pfn i at `base + i` pages (`nodes.host.guestmain`), so a written address is
its pfn (relative to the guest's first). What the kernel cannot see: writes through another
mapping of the same frames, which is how the host writes guest memory (fill, page tables, a
landing). The host marks those itself (`mark`), as the emulated log's access path does.
`fault_count` is the number of pages the kernel reported written (each cost the guest one
write-protect fault) since the last CLEAN; `pages_reported_total` counts them over every
CLEAN, the migration's shadow-fault count.

The host installs it as the guest's `Domain.logdirty` (`nodes.xen.logdirty.DirtyLog`), so the
hypervisor's shadow ops and the migration's CLEANs reach it where they reach the emulated log;
`bitmap` (what the page pipeline reads to skip a page dirtied again before it went) scans
without resetting.
"""

import numpy as np

from nodes.errors import DomainStateError
from nodes.host.userfault import PageScanner, Uffd
from nodes.xen.logdirty import LogDirtyStats


class KernelDirtyLog:
    """The dirty log of the guest process `pid`, whose pfn 0 is at `base` there."""

    kind = "kernel"

    def __init__(self, pid: int, uffd: Uffd, base: int, npages: int, page_size: int):
        self.scanner = PageScanner(pid)
        self.uffd = uffd
        self.base, self.npages, self.page_size = base, npages, page_size
        self.end = base + npages * page_size
        self.enabled = False
        self.marked = np.zeros(npages, dtype=bool)   # host-marked, and peeked pages
        self.fault_count = 0
        self.scans_total = 0
        self.pages_reported_total = 0

    @property
    def bitmap(self) -> np.ndarray:
        """Pages marked since the last CLEAN: the host's marks and the kernel's, unreset."""
        if not self.enabled:
            return self.marked.copy()
        out = self.marked.copy()
        out[self.written(reset=False)] = True
        return out

    def close(self) -> None:
        self.scanner.close()

    def enable(self) -> None:
        """Write-protect every page: from now on each first write is logged."""
        self.uffd.writeprotect(self.base, self.npages * self.page_size)
        self.enabled = True
        self.marked[:] = False
        self.fault_count = 0

    def disable(self) -> None:
        """Lift the protection (no more write faults) and forget the log."""
        if self.enabled:
            self.uffd.writeprotect(self.base, self.npages * self.page_size, protect=False)
        self.enabled = False
        self.marked[:] = False

    def mark(self, pfns: np.ndarray) -> None:
        """Pages the host wrote through its own mapping (the kernel did not see them)."""
        if self.enabled:
            self.marked[pfns] = True

    def written(self, reset: bool) -> np.ndarray:
        """The pfns the guest wrote since the last reset, sorted (kernel's view only)."""
        if not self.enabled:
            raise DomainStateError("log-dirty is not enabled")
        pfns = self.scanner.written(self.base, self.end, reset)
        self.scans_total += 1
        return pfns

    def peek(self) -> tuple[np.ndarray, LogDirtyStats]:
        """The bitmap so far, the log kept (the pages stay unprotected until a CLEAN)."""
        pfns = self.written(reset=False)
        self.marked[pfns] = True
        return self.marked.copy(), LogDirtyStats(self.fault_count + len(pfns),
                                                 int(np.count_nonzero(self.marked)))

    def clean(self) -> tuple[np.ndarray, LogDirtyStats]:
        """The bitmap of pages written since the last CLEAN, and the log reset."""
        pfns = self.written(reset=True)
        self.fault_count += len(pfns)
        self.pages_reported_total += len(pfns)
        self.marked[pfns] = True
        bitmap, stats = self.marked.copy(), self.stats()
        self.marked[:] = False
        self.fault_count = 0
        return bitmap, stats

    def clean_pfns(self) -> np.ndarray:
        """CLEAN, as the sorted pfns written (host marks included)."""
        bitmap, _ = self.clean()
        return np.flatnonzero(bitmap)

    def stats(self) -> LogDirtyStats:
        return LogDirtyStats(self.fault_count, int(np.count_nonzero(self.marked)))
