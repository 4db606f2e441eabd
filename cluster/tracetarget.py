"""What `migbed trace record` scans (`cluster.tracerecord`): the traced program's region, the
pages of it written since the last scan (PAGEMAP_SCAN, protecting them again), and its memory
for the content samples (`cluster.tracesample`).

Why its own scan, not `PageScanner.written`: the region is not protected before use (that
would fill its page tables with markers up front: tens of ms and MiBs for a 1 GiB region), so
the kernel calls a never-touched page (a hole) written, and a fresh page the program only
read maps the shared zero page with no write-protect bit, which reads as written too. The
scan here takes only pages present (or swapped) and not the zero page: exactly those written
since the last scan, which it protects again; holes and zero pages stay as they are.
"""

import ctypes
import mmap
import os
import time

import numpy as np

from cluster.tracesample import ContentSampler
from nodes.host.userfault import (
    FEATURE_WP_ASYNC,
    MODE_WP,
    PAGE_BYTES,
    PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    PageScanner,
    Uffd,
    expand_regions,
)

# linux/fs.h's page categories that nodes.host.userfault does not name
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5            # the pte maps the shared zero page


class WrittenScanner(PageScanner):
    """PAGEMAP_SCAN for the pages written since the last scan, protecting them again (see
    the module docstring for why not holes or the zero page)."""

    def written_pages(self, start: int, end: int) -> np.ndarray:
        regions = self.scan(start, end, PM_SCAN_CHECK_WPASYNC | PM_SCAN_WP_MATCHING,
                            PAGE_IS_WRITTEN | PAGE_IS_PFNZERO, PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
                            inverted=PAGE_IS_PFNZERO, anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
        return expand_regions(regions, start)


class Target:
    """What is scanned: the program's current image's region (a new one after an exec),
    its uffd held here (a closed uffd ends tracking), its pagemap and memory open."""

    def __init__(self, uffd: int, base: int, length: int, pid: int, bump_at: int):
        self.uffd = -1
        self.scanner: WrittenScanner | None = None
        self.sampler: ContentSampler | None = None
        self.switch(uffd, base, length, pid, bump_at)

    def switch(self, uffd: int, base: int, length: int, pid: int, bump_at: int) -> None:
        self.close()
        self.uffd, self.base, self.end = uffd, base, base + length
        self.length, self.bump_at = length, bump_at
        self.scanner = WrittenScanner(pid)
        self.sampler = ContentSampler(pid, base, PAGE_BYTES)

    def written(self) -> np.ndarray:
        """The region's pages written since the last scan (page indices from its base)."""
        return self.scanner.written_pages(self.base, self.used_end())

    def used_end(self) -> int:
        """The end of the region handed out so far (its bump pointer, read from the
        program's memory, page-aligned up): scanning the untouched rest would cost the
        program's page-table lock for nothing. The whole region if it cannot be read."""
        raw = self.sampler.read(self.bump_at, 8)
        if len(raw) != 8:
            return self.end
        bump = int.from_bytes(raw, "little")
        if not self.base <= bump <= self.end:
            return self.end
        return min(self.end, -(-bump // PAGE_BYTES) * PAGE_BYTES + PAGE_BYTES)

    def close(self) -> None:
        if self.scanner is not None:
            self.scanner.close()
            self.sampler.close()
            self.samples = self.sampler.table() if not hasattr(self, "samples") else \
                np.concatenate((self.samples, self.sampler.table()))
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1


def write_fault_seconds(pages: int = 4096, tries: int = 3) -> float:
    """What one write to a write-protected page costs its writer here (the kernel resolves
    it, async), measured in this process: the floor of recording's cost, paid once per page
    and interval in which a program writes that page (best of `tries`)."""
    buf = mmap.mmap(-1, pages * PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    words = np.frombuffer(buf, np.uint64)[::PAGE_BYTES // 8]     # a word of each page
    uffd = Uffd.create(FEATURE_WP_ASYNC)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        uffd.register(base, pages * PAGE_BYTES, MODE_WP)
        words += 1                                              # every page present
        best = float("inf")
        for _ in range(tries):
            uffd.writeprotect(base, pages * PAGE_BYTES)
            t0 = time.perf_counter()
            words += 1                                          # a fault each
            t1 = time.perf_counter()
            words += 1                                          # none
            best = min(best, (t1 - t0) - (time.perf_counter() - t1))
        return max(best, 0.0) / pages
    finally:
        uffd.close()
        del words
        buf.close()
