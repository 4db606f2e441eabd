"""Where pages leave: the one pipeline every page a source sends goes through.

Four stages per batch of up to 1024 pages (one PAGE_DATA record, as Xen's):

1. **select**: which of the pfns go now. Under the guest's lock: pages dirtied again since
   the round began are skipped when the policy says so (xen-legacy), and the pfns are
   looked up in the hypervisor's P2M.
2. **encode**: the record's buffers. Data pages are views of their machine frames (no copy:
   the socket reads them where they sit); page tables go canonical (mfn -> pfn), copied.
3. **send**: onto the link, which paces them (`nodes.migration.link`).
4. **account**: the round's and the progress's counters.

A live round reads pages while the guest writes them, as Xen's does: a page written while it
is being sent has its dirty bit set and goes again in the next round. Which pages a pass has
still to send is its `PassCursor`. Between batches the caller's hook runs (cancellation, fault
injection, the checks that cut a pass short).
"""

from collections.abc import Callable

import numpy as np

from nodes.migration import records
from nodes.migration.link import LinkSender
from nodes.migration.progress import Progress, RoundStats
from nodes.xen import pagetable
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor


class PageDataEncoder:
    """PAGE_DATA records straight from the frames; page tables canonicalised."""

    def __init__(self, hv: Hypervisor, dom: Domain):
        self.hv = hv
        self.dom = dom
        self.memory = hv.memory
        # Which pfns are page tables, once per migration: not in every round's path (the
        # final round's is inside the downtime).
        self.is_pt = np.zeros(dom.npages, dtype=bool)
        self.is_pt[dom.pt_pfns] = True

    def encode(self, pfns: np.ndarray, mfns: np.ndarray) -> list:
        memory = self.memory
        pt_rows = np.flatnonzero(self.is_pt[pfns])
        types = np.full(len(pfns), records.PageType.NOTAB, dtype=np.uint8)
        if not len(pt_rows):
            return records.encode_page_data(pfns, types, memory.buffers(mfns))
        types[pt_rows] = records.PageType.L1TAB
        alloc = self.hv.allocator
        tables = pagetable.canonicalise(memory.words[mfns[pt_rows]], self.dom.domid,
                                        alloc.owner, alloc.pfn, memory.page_shift)
        pages, at = [], 0
        for row, table in zip(pt_rows.tolist(), tables.view(np.uint8), strict=True):
            pages += memory.buffers(mfns[at:row])
            pages.append(table)
            at = row + 1
        pages += memory.buffers(mfns[at:])
        return records.encode_page_data(pfns, types, pages)


class PassCursor:
    """Which pages still go, and where the scan stands: QEMU's migration bitmap and its
    cursor. A pass scans the bitmap from pfn 0 to the end, sending what is marked; a bitmap
    sync (a CLEAN) marks more, ahead of the cursor (sent in this pass) or behind it (in the
    next). Xen's to-send list is the same thing with marks added only between passes."""

    def __init__(self, npages: int):
        self.unsent = np.ones(npages, dtype=bool)
        self.pending_pages = npages        # marks set, kept as a count: checked often
        self.cursor = 0

    @property
    def at_end(self) -> bool:
        return self.cursor >= len(self.unsent)

    def wrap(self) -> None:
        self.cursor = 0

    def mark(self, dirty: np.ndarray) -> int:
        """Mark the pages of a CLEANed bitmap; returns how many were not marked already."""
        fresh = int(np.count_nonzero(dirty & ~self.unsent))
        self.unsent |= dirty
        self.pending_pages += fresh
        return fresh

    def take_these(self, pfns: np.ndarray) -> np.ndarray:
        """Of `pfns` (distinct), those still marked, unmarked now: pages sent out of the
        scan's turn (post-copy's requested pages)."""
        wanted = pfns[self.unsent[pfns]]
        self.unsent[wanted] = False
        self.pending_pages -= len(wanted)
        return wanted

    def seek(self, pfn: int) -> None:
        """The scan goes on from `pfn` (post-copy: after the last requested page)."""
        self.cursor = min(max(0, pfn), len(self.unsent))

    def reset(self, unsent: np.ndarray) -> None:
        """Exactly these pages still go, the scan from pfn 0 (post-copy after a reconnect:
        every page the destination does not have)."""
        self.unsent[:] = unsent
        self.pending_pages = int(np.count_nonzero(unsent))
        self.cursor = 0

    def take(self, n: int) -> np.ndarray:
        """Up to `n` marked pfns from the cursor on, unmarked; the cursor moves past them."""
        unsent, total = self.unsent, len(self.unsent)
        got: list[np.ndarray] = []
        have = 0
        while have < n and self.cursor < total:
            stop = min(total, self.cursor + max(64 * n, 1 << 16))
            found = np.flatnonzero(unsent[self.cursor:stop])[:n - have] + self.cursor
            got.append(found)
            have += len(found)
            self.cursor = int(found[-1]) + 1 if have >= n else stop
        pfns = np.concatenate(got) if len(got) > 1 else (got[0] if got else
                                                          np.zeros(0, dtype=np.int64))
        unsent[pfns] = False
        self.pending_pages -= len(pfns)
        return pfns.astype(np.int64, copy=False)


class PagePipeline:
    """Select, encode, send, account: see the module docstring."""

    def __init__(self, hv: Hypervisor, dom: Domain, link: LinkSender, progress: Progress):
        self.dom = dom
        self.link = link
        self.progress = progress
        self.page_size = hv.page_size
        self.encoder = PageDataEncoder(hv, dom)

    def send(self, pfns: np.ndarray, rnd: RoundStats, *, skip_redirtied: bool = False,
             between: Callable[[], None] | None = None) -> None:
        """Send `pfns` in records of up to 1024 pages; `between()` runs after each one."""
        for i in range(0, len(pfns), records.MAX_BATCH_PAGES):
            self.send_batch(pfns[i:i + records.MAX_BATCH_PAGES], rnd, skip_redirtied,
                            left_pages=len(pfns) - i - records.MAX_BATCH_PAGES)
            if between is not None:
                between()

    def send_batch(self, pfns: np.ndarray, rnd: RoundStats, skip_redirtied: bool = False,
                   left_pages: int = 0) -> int:
        """One record of up to 1024 pages through all four stages; returns bytes sent."""
        batch, mfns = self.select(pfns, rnd, skip_redirtied)
        if not len(batch):
            return 0
        n = self.link.send(self.encoder.encode(batch, mfns))
        self.account(rnd, len(batch), n, left_pages)
        return n

    def select(self, batch: np.ndarray, rnd: RoundStats,
               skip_redirtied: bool) -> tuple[np.ndarray, np.ndarray]:
        """The batch's pfns that go now, and their machine frames."""
        dom = self.dom
        with dom.lock:
            if skip_redirtied:
                redirtied = dom.logdirty.bitmap[batch]
                if redirtied.any():
                    rnd.pages_skipped += int(np.count_nonzero(redirtied))
                    batch = batch[~redirtied]
            return batch, dom.p2m[batch]

    def account(self, rnd: RoundStats, pages: int, nbytes: int, left_pages: int) -> None:
        rnd.pages_sent += pages
        rnd.bytes_sent += nbytes
        p = self.progress
        p.pages_sent_total += pages
        p.bytes_sent_total = self.link.bytes_sent
        p.remaining_bytes = max(0, left_pages) * self.page_size
