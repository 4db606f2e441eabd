"""Where pages leave: the one pipeline every page a source sends goes through.

Four stages per batch of up to 1024 pages (one PAGE_DATA record, as Xen's):

1. **select**: which of the pfns go now. Under the guest's lock: pages dirtied again since
   the round began are skipped when the policy says so (xen-legacy), and the pfns are
   looked up in the hypervisor's P2M.
2. **encode**: the record's buffers. Data pages are views of their machine frames (no copy:
   the socket reads them where they sit); page tables go canonical (mfn -> pfn), copied.
   Zero pages (`nodes.migration.wire.zeropage`, unless the channels look for them) go as pfn
   words typed ZERO with no data; with XBZRLE (`nodes.migration.wire.xbzrle`, after the first
   full pass) the pages it has cached go as deltas (PAGE_XBZRLE), or not at all when
   unchanged, and the rest from the cache's copy.
3. **send**: onto the link, which paces them (`nodes.migration.send.link`), or, with multifd
   (`nodes.migration.send.multifd`), in packets of 128 pages to the next idle channel.
4. **account**: the round's and the progress's counters, pages by type.

A live round reads pages while the guest writes them, as Xen's does: a page written while it
is being sent has its dirty bit set and goes again in the next round. Which pages a pass has
still to send is its `PassCursor`; the end of each pass is where XBZRLE starts and where the
channels sync. Between batches the caller's hook runs (cancellation, fault injection, the
checks that cut a pass short).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from nodes.migration.progress import Progress, RoundStats
from nodes.migration.send.link import LinkSender
from nodes.migration.wire import encoded, records
from nodes.migration.wire.zeropage import zero_frames
from nodes.xen import pagetable
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor

if TYPE_CHECKING:
    from nodes.migration.settings import MigrationSettings
    from nodes.migration.wire.channel import Ticket


class PageDataEncoder:
    """PAGE_DATA records straight from the frames; page tables canonicalised; zero pages
    typed ZERO; pages given in `copies` (row -> buffer) sent from there instead."""

    def __init__(self, hv: Hypervisor, dom: Domain):
        self.hv = hv
        self.dom = dom
        self.memory = hv.memory
        # Which pfns are page tables, once per migration: not in every round's path (the
        # final round's is inside the downtime).
        self.is_pt = np.zeros(dom.npages, dtype=bool)
        self.is_pt[dom.pt_pfns] = True

    def types(self, pfns: np.ndarray, zero: np.ndarray | None = None) -> np.ndarray:
        types = np.full(len(pfns), records.PageType.NOTAB, dtype=np.uint8)
        types[self.is_pt[pfns]] = records.PageType.L1TAB
        if zero is not None:
            types[zero] = records.PageType.ZERO
        return types

    def page_buffers(self, pfns: np.ndarray, mfns: np.ndarray, types: np.ndarray,
                     copies: dict | None = None) -> list:
        """The buffers of the pages that carry data, in order: frames where they sit,
        canonical page tables, and the given copies."""
        memory = self.memory
        has_data = records.data_mask(types)
        special = types == records.PageType.L1TAB
        if copies:
            special = special.copy()
            special[list(copies)] = True
        rows = np.flatnonzero(special & has_data)
        if not len(rows) and has_data.all():
            return memory.buffers(mfns)
        tables = {}
        pt_rows = np.flatnonzero(types == records.PageType.L1TAB)
        if len(pt_rows):
            alloc = self.hv.allocator
            canon = pagetable.canonicalise(memory.words[mfns[pt_rows]], self.dom.domid,
                                           alloc.owner, alloc.pfn, memory.page_shift)
            tables = dict(zip(pt_rows.tolist(), canon.view(np.uint8), strict=True))
        pages, at = [], 0
        for row in [*rows.tolist(), len(pfns)]:
            plain = np.flatnonzero(has_data[at:row]) + at
            pages += memory.buffers(mfns[plain])
            if row < len(pfns):
                pages.append(tables[row] if row in tables else copies[row])
            at = row + 1
        return pages

    def encode(self, pfns: np.ndarray, mfns: np.ndarray, zero: np.ndarray | None = None,
               copies: dict | None = None) -> list:
        types = self.types(pfns, zero)
        return records.encode_page_data(pfns, types,
                                        self.page_buffers(pfns, mfns, types, copies))


class PassCursor:
    """Which pages still go, and where the scan stands: QEMU's migration bitmap and its
    cursor. A pass scans the bitmap from pfn 0 to the end, sending what is marked; a bitmap
    sync (a CLEAN) marks more, ahead of the cursor (sent in this pass) or behind it (in the
    next). Xen's to-send list is the same thing with marks added only between passes.

    `on_pass_end` is told once per pass, when the scan has found its last page (before the
    caller closes the round): `passes` counts the passes that reached the end."""

    def __init__(self, npages: int, on_pass_end: Callable[[], None] | None = None):
        self.unsent = np.ones(npages, dtype=bool)
        self.pending_pages = npages        # marks set, kept as a count: checked often
        self.cursor = 0
        self.passes = 0
        self.on_pass_end = on_pass_end
        self._ended = False

    @property
    def at_end(self) -> bool:
        return self.cursor >= len(self.unsent)

    def wrap(self) -> None:
        if self.at_end:
            self.end_pass()
        self.cursor = 0
        self._ended = False

    def end_pass(self) -> None:
        """The scan reached the end of memory with every page of the pass handed out."""
        if self._ended or not self.at_end:
            return
        self._ended = True
        self.passes += 1
        if self.on_pass_end is not None:
            self.on_pass_end()

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
        if not len(pfns):
            self.end_pass()                # nothing more in this pass: it has ended
        return pfns.astype(np.int64, copy=False)


class PagePipeline:
    """Select, encode, send, account: see the module docstring. `xbzrle` (an
    `XbzrleEncoder`), `channels` (multifd's `SourceChannels`) and `find_zero` (True: the
    sender finds zero pages) are the optional stages."""

    @classmethod
    def for_migration(cls, hv: Hypervisor, dom: Domain, link: LinkSender, progress: Progress,
                      settings: "MigrationSettings", ticket: "Ticket",
                      generation: Callable[[], int]) -> "PagePipeline":
        """The pipeline `settings` ask for: zero-page detection, XBZRLE (its cache ages by
        `generation()`, the dirty-sync-count), or multifd channels to `ticket`, which then
        stand in for `link` (`pipeline.link`)."""
        from nodes.migration.send.multifd import SourceChannels
        from nodes.migration.wire import capabilities as wire
        from nodes.migration.wire.xbzrle import XbzrleEncoder
        pipeline = cls(hv, dom, link, progress,
                       find_zero=wire.zero_detection_in_sender(settings.wire))
        if settings.xbzrle_cache_bytes is not None:
            wire.check_page_size_for_xbzrle(hv.page_size)
            pipeline.xbzrle = XbzrleEncoder(settings.xbzrle_cache_bytes, hv.memory.frames,
                                            dom.npages, generation)
        if settings.multifd_channels is not None:
            pipeline.channels = pipeline.link = SourceChannels(
                link, ticket, settings.multifd_channels, hv.memory,
                timeout=settings.timeout_seconds, latency=settings.latency_seconds,
                find_zero=wire.zero_detection_in_channels(settings.wire),
                codec=None if settings.multifd_compression == "none"
                else settings.multifd_compression,
                level=wire.compression_level(settings.wire),
                buffers_of=pipeline.encoder.page_buffers)
        return pipeline

    def wire_stats(self) -> dict:
        """What crossed the wire, for the result: the xbzrle and multifd blocks."""
        return {"xbzrle": self.xbzrle.stats.to_dict() if self.xbzrle is not None else None,
                "multifd": self.channels.stats() if self.channels is not None else None}

    def __init__(self, hv: Hypervisor, dom: Domain, link: LinkSender, progress: Progress, *,
                 find_zero: bool = False, xbzrle=None, channels=None):
        self.dom = dom
        self.link = link
        self.progress = progress
        self.page_size = hv.page_size
        self.memory = hv.memory
        self.encoder = PageDataEncoder(hv, dom)
        self.find_zero = find_zero
        self.xbzrle = xbzrle
        self.channels = channels
        self.after_switch = False        # post-copy: pages go whole or zero, never as deltas
        self.cursor = PassCursor(dom.npages, self.pass_ended)

    def pass_ended(self) -> None:
        """A pass has handed out its last page: XBZRLE starts (after the first), and every
        channel syncs (QEMU's multifd_send_sync_main), so no page of the next pass lands
        before this one's."""
        if self.xbzrle is not None:
            self.xbzrle.started = True
        if self.channels is not None:
            self.channels.sync()

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
        """One record of up to 1024 pages through all four stages; returns bytes sent (by
        this thread: multifd's channels count theirs as they send them)."""
        batch, mfns, running = self.select(pfns, rnd, skip_redirtied)
        if not len(batch):                 # all skipped: the pass may still have ended
            if self.cursor.at_end:
                self.cursor.end_pass()
            return 0
        zero = np.zeros(len(batch), bool)
        if self.find_zero:
            zero = zero_frames(self.memory, mfns) & ~self.encoder.is_pt[batch]
        rnd.zero_pages += int(np.count_nonzero(zero))
        if self.channels is not None:
            n = self._to_channels(batch, mfns, zero, rnd)
        else:
            whole, copies, deltas = ~zero, {}, []
            if self.xbzrle is not None and self.xbzrle.started and not self.after_switch:
                whole, copies, deltas = self._xbzrle(batch, mfns, zero, not running)
            rnd.normal_pages += int(np.count_nonzero(whole))
            keep = np.flatnonzero(whole | zero)
            buffers = deltas
            if len(keep):
                at = {int(np.searchsorted(keep, i)): c for i, c in copies.items()}
                buffers = self.encoder.encode(batch[keep], mfns[keep], zero[keep], at) + deltas
            n = self.link.send(buffers) if buffers else 0
        self.account(rnd, len(batch), n, left_pages)
        if self.cursor.at_end:
            self.cursor.end_pass()
        return n

    def _xbzrle(self, batch: np.ndarray, mfns: np.ndarray, zero: np.ndarray,
                last_stage: bool) -> tuple[np.ndarray, dict, list]:
        """The XBZRLE stage: zero pages refresh their cache entries; the other data pages
        go whole (some from the cache's copy), as deltas, or not at all when unchanged.
        Returns (whole, copies by row, the PAGE_XBZRLE record's buffers)."""
        self.xbzrle.zeroed(batch[zero])
        data = ~self.encoder.is_pt[batch] & ~zero
        rows = np.flatnonzero(data)
        split = self.xbzrle.split(batch[rows], mfns[rows], last_stage)
        whole = ~data & ~zero                      # page tables always go whole
        whole[rows[split.whole]] = True
        copies = {int(rows[i]): c for i, c in split.copies.items()}
        if not len(split.delta_index):
            return whole, copies, []
        return whole, copies, encoded.encode_xbzrle(batch[rows[split.delta_index]],
                                                    split.delta_lengths, split.delta_data)

    def _to_channels(self, batch: np.ndarray, mfns: np.ndarray, zero: np.ndarray,
                     rnd: RoundStats) -> int:
        """multifd: the zero pages the sender found go on the main channel (as QEMU's
        legacy detection does), the rest to the channels in packets (which find their own
        zero pages when they look for them, and count what they send)."""
        n = 0
        if zero.any():
            z = np.flatnonzero(zero)
            n = self.channels.main.send(self.encoder.encode(batch[z], mfns[z], zero[z]))
            batch, mfns = batch[~zero], mfns[~zero]
        if len(batch):
            self.channels.dispatch(batch, mfns, self.encoder.types(batch), rnd)
        return n

    def select(self, batch: np.ndarray, rnd: RoundStats,
               skip_redirtied: bool) -> tuple[np.ndarray, np.ndarray, bool]:
        """The batch's pfns that go now, their machine frames, and whether the guest runs
        (a paused guest is QEMU's last stage: XBZRLE updates nothing then)."""
        dom = self.dom
        with dom.lock:
            if skip_redirtied:
                redirtied = dom.logdirty.bitmap[batch]
                if redirtied.any():
                    rnd.pages_skipped += int(np.count_nonzero(redirtied))
                    batch = batch[~redirtied]
            return batch, dom.p2m[batch], dom.is_running

    def account(self, rnd: RoundStats, pages: int, nbytes: int, left_pages: int) -> None:
        if self.channels is not None:          # the channels' threads count into it too
            with self.channels.lock:
                rnd.pages_sent += pages
                rnd.bytes_sent += nbytes
        else:
            rnd.pages_sent += pages
            rnd.bytes_sent += nbytes
        p = self.progress
        p.pages_sent_total += pages
        p.bytes_sent_total = self.link.bytes_sent
        p.remaining_bytes = max(0, left_pages) * self.page_size
