"""Where pages land: the one object every page a destination receives goes through.

For each PAGE_DATA record (`land`): check its pfns and types against the guest's layout
(before a single byte lands), choose the buffers the pages go into, in chunks of 32 pages
(128 KiB, still in cache when hashed), have each chunk received, hash it as it lands, write it
to its frames, and mark its pfns received. A chunk inside one superpage extent lands straight in its frames (the
kernel copies it there from the socket) and is hashed where it lies; a chunk of scattered
frames lands in a staging buffer, is hashed there and then written to its frames. Page
tables arrive canonical: they are kept aside and written, made this host's (pfn -> mfn),
once the record is complete.

The walk goes one way, as QEMU's ram_load does: the receiver's loop asks the reader for the
next record and hands it to `land`; for a record whose pages are still on the socket
(`nodes.migration.receive.reader.IncomingPages`) the landing has the reader receive each chunk
straight into the buffers it chose (`IncomingPages.read_into`), and the reader never calls
back. A record laid out another way (msgpack allows several), or a multifd packet
decompressed, is decoded whole and poured into the same chunks: either way a page reaches
its frame by one path.

Zero pages (pfn words typed ZERO) write nothing into a frame that has never received a page
(a reserved frame is zero already), and zeros into one that has, as QEMU's multifd receiver
does with its received bitmap. XBZRLE deltas are applied onto the frame that holds the
page's previous copy, checked whole first, and the page hashed again.

After a post-copy switch (`begin_postcopy`) the guest runs here while pages still arrive, and
`received` is the truth of which are present (the guest's access path reads the same array):
a page lands at most once, into its frame only while it is missing (so no write the guest has
made since is ever overwritten); one already present is dropped (counted in `duplicates`); a
data page is marked present, and the waiting vCPUs told (`on_present`), as soon as its chunk
has landed, a page table once its record is complete. No XBZRLE delta comes after the switch
(QEMU turns XBZRLE off in post-copy).

The guest-wide state (hashes, which pages arrived, post-copy's) is the `Landing`'s; what one
reader is in the middle of (the record's pfns, its chunks, a staging buffer) is its
`RecordSink`'s, so several readers (multifd's channels) land into one guest at once;
the main reader's records land through a `RecordSink` the `Landing` keeps.
"""

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from nodes.errors import StreamError
from nodes.migration.receive.reader import IncomingPages
from nodes.migration.wire import records, xbzrle
from nodes.xen import pagetable
from nodes.xen.digest import digest, page_hashes
from nodes.xen.domain import Domain
from nodes.xen.memory import MachineMemory

if TYPE_CHECKING:
    from nodes.migration.wire.encoded import DeltaPages

RECV_CHUNK_PAGES = 32   # pages a chunk holds: 128 KiB, still in cache when hashed


class Landing:
    """The landing of one incoming guest: it lands its main reader's records, and makes a
    `RecordSink` for each other reader."""

    def __init__(self, memory: MachineMemory, dom: Domain, verify: bool):
        self.memory = memory
        self.dom = dom
        self.verify = verify
        n = dom.npages
        self.hashes = np.zeros(n, dtype=np.uint64)
        self.received = np.zeros(n, dtype=bool)
        self.is_pt = np.zeros(n, dtype=bool)
        self.is_pt[dom.pt_pfns] = True
        self.pages_received = 0
        self.zero_hash = page_hashes(np.zeros((1, memory.page_size), np.uint8))[0]
        self._lock = threading.Lock()
        # Post-copy (see the module docstring): set by `begin_postcopy`.
        self.after_switch = False
        self.on_present: Callable[[np.ndarray], None] | None = None
        self.applied: np.ndarray | None = None    # times each page landed after the switch
        self.duplicates = 0                       # pages that arrived already present
        # Post-copy's native fault path lands pages too (`nodes.migration.postcopy.
        # nativefault`): then a page is claimed before it is written, by either, once.
        self.claimer: Callable[[np.ndarray], np.ndarray] | None = None
        self.unclaimer: Callable[[np.ndarray], None] | None = None
        self._main = RecordSink(self)

    def sink(self, on_present: Callable[[np.ndarray], None] | None = None) -> "RecordSink":
        """A sink of its own for another reader landing into this guest; after the switch
        its pages are told to `on_present` instead of the landing's own (post-copy's
        preempt channel times its faults apart)."""
        return RecordSink(self, on_present)

    # -- the main reader's records ------------------------------------------------------
    def land(self, pd: "records.PageData | IncomingPages") -> None:
        """A PAGE_DATA record of the main reader (`RecordSink.land`)."""
        self._main.land(pd)

    # -- post-copy -------------------------------------------------------------------------
    def begin_postcopy(self, discard: np.ndarray,
                       on_present: Callable[[np.ndarray], None]) -> int:
        """The switch: the pages of the discard set (dirtied since they were sent, or never
        sent) are missing from now on; every other page must have arrived. Returns how many
        pages that had arrived are discarded as stale."""
        unlisted = int(np.count_nonzero(~self.received & ~discard))
        if unlisted:
            raise StreamError(f"{unlisted} pages never arrived and are not in the discard set")
        stale = int(np.count_nonzero(self.received & discard))
        self.received[discard] = False
        self.applied = np.zeros(len(self.received), dtype=np.uint8)
        self.on_present = on_present
        self.after_switch = True
        return stale

    def missing_of(self, pfns: np.ndarray) -> np.ndarray:
        """After the switch: which of a record's pages are still missing; a record that
        names a page twice is refused (it would land twice)."""
        ordered = np.sort(pfns)
        if (ordered[1:] == ordered[:-1]).any():
            raise StreamError("a PAGE_DATA record names a page twice")
        if self.claimer is not None:
            return self.claimer(pfns)
        return ~self.received[pfns]

    def release(self, pfns: np.ndarray) -> None:
        """Claimed pages of a record that broke off before they landed: free again."""
        if self.unclaimer is not None and len(pfns):
            self.unclaimer(pfns[~self.received[pfns]])

    def present(self, pfns: np.ndarray,
                on_present: Callable[[np.ndarray], None] | None = None) -> None:
        """After the switch: these pages have landed and the guest may touch them (told to
        `on_present`, else the landing's own)."""
        if len(pfns):
            with self._lock:
                self.received[pfns] = True
                self.applied[pfns] += 1
            (on_present or self.on_present)(pfns)

    # -- what every sink does to the guest ---------------------------------------------------
    def arrived(self, pfns: np.ndarray) -> None:
        with self._lock:
            self.received[pfns] = True
            self.pages_received += len(pfns)

    def counted(self, pages: int, duplicates: int) -> None:
        """After the switch: a record's pages counted (its present ones are marked)."""
        with self._lock:
            self.pages_received += pages
            self.duplicates += duplicates

    def land_zero(self, pfns: np.ndarray,
                  on_present: Callable[[np.ndarray], None] | None = None) -> None:
        """Zero pages: nothing written where no page has landed yet, zeros where one has.
        After the switch only the missing ones land (their frames may hold a stale copy)."""
        if self.after_switch:
            fresh = self.missing_of(pfns)
            pfns, stale = pfns[fresh], int(np.count_nonzero(~fresh))
            self._zero(pfns)
            if self.verify:
                self.hashes[pfns] = self.zero_hash
            self.counted(len(pfns) + stale, stale)
            self.present(pfns, on_present)
            return
        self._zero(pfns[self.received[pfns]])
        if self.verify:
            self.hashes[pfns] = self.zero_hash
        self.arrived(pfns)

    def _zero(self, pfns: np.ndarray) -> None:
        """Zero the frames of `pfns` (resident already: reserved frames are populated
        before the stream, so writing them is no dearer than looking first)."""
        if len(pfns):
            self.memory.frames[self.dom.p2m[pfns]] = 0

    def land_deltas(self, dp: "DeltaPages") -> None:
        """A PAGE_XBZRLE record: each delta applied onto the page's previous copy."""
        if self.after_switch:
            raise StreamError("an XBZRLE delta after the post-copy switch")
        if self.is_pt[dp.pfns].any():
            raise StreamError("an XBZRLE delta for a page table")
        if not self.received[dp.pfns].all():
            raise StreamError("an XBZRLE delta for a page that never arrived whole")
        frames = self.memory.frames
        for pfn, delta in dp.deltas():
            xbzrle.apply(frames[self.dom.p2m[pfn]], delta)
        if self.verify:
            self.hashes[dp.pfns] = page_hashes(frames[self.dom.p2m[dp.pfns]])
        self.arrived(dp.pfns)

    # -- checks ---------------------------------------------------------------------------
    def check_types(self, pfns: np.ndarray, types: np.ndarray) -> np.ndarray:
        """Which of these pages with data are page tables; they must be the guest's own."""
        is_table = types == records.PageType.L1TAB
        if not np.array_equal(is_table, self.is_pt[pfns]):
            raise StreamError("page types do not match the guest's page-table layout")
        return is_table

    def tables_in(self, pages: np.ndarray) -> np.ndarray:
        """Canonical page tables (as received) made this host's: pfns become its mfns."""
        try:
            return pagetable.uncanonicalise(pages.view(np.uint64), self.dom.p2m,
                                            self.memory.page_shift)
        except ValueError as exc:
            raise StreamError(str(exc)) from None

    @property
    def missing_pages(self) -> int:
        return int(np.count_nonzero(~self.received))

    def digest(self) -> str | None:
        """The guest's digest from the pages as they landed; None when not verifying."""
        return digest(self.hashes) if self.verify else None


class RecordSink:
    """One reader's landing of its records: the record under way, its chunks and a staging
    buffer of its own."""

    def __init__(self, landing: Landing,
                 on_present: Callable[[np.ndarray], None] | None = None):
        self.landing = landing
        self.on_present = on_present              # None: the landing's own
        self.memory = landing.memory
        self.dom = landing.dom
        self.staging = np.empty((RECV_CHUNK_PAGES, landing.memory.page_size), dtype=np.uint8)
        self.fresh: np.ndarray | None = None      # after the switch: the record's pages missing

    def buffers(self, pfns: np.ndarray, types: np.ndarray) -> list[list]:
        """The record's checked pfns, and writable chunks for its pages, in record order."""
        landing = self.landing
        zero = types == records.PageType.ZERO
        self.zero_pfns = pfns[zero]
        if landing.is_pt[self.zero_pfns].any():
            raise StreamError("a page table sent as a zero page")
        mask = records.data_mask(types)
        self.pfns = pfns[mask]
        self.is_table = landing.check_types(self.pfns, types[mask])
        self.mfns = mfns = self.dom.p2m[self.pfns]
        self.tables = np.flatnonzero(self.is_table)
        self.after_switch = landing.after_switch
        if self.after_switch:
            self.fresh = landing.missing_of(self.pfns)
        self.scratch = np.empty((len(self.tables), self.memory.page_size), dtype=np.uint8)
        return self._chunks(mfns)

    def _chunks(self, mfns: np.ndarray) -> list[list]:
        n = len(mfns)
        # A chunk lies in one run of frames if no break (a jump, or a page table) is in it;
        # after the switch, only if every page of it is still missing.
        jump = np.ones(n, dtype=bool)
        jump[1:] = np.diff(mfns) != 1
        jump[self.tables] = True
        jump[self.tables[self.tables + 1 < n] + 1] = True
        breaks = np.cumsum(jump)
        self.chunks: list[tuple[int, int, bool]] = []
        out = []
        frames = self.memory.frames
        for start in range(0, n, RECV_CHUNK_PAGES):
            stop = min(start + RECV_CHUNK_PAGES, n)
            whole = breaks[stop - 1] == breaks[start] and not self.is_table[start]
            if self.after_switch:
                whole = whole and bool(self.fresh[start:stop].all())
            self.chunks.append((start, stop, whole))
            if whole:
                out.append([frames[mfns[start]:mfns[start] + stop - start].reshape(-1)])
            else:
                out.append([self.staging[:stop - start].reshape(-1)])
        return out

    def landed(self, index: int) -> None:
        """Chunk `index` is filled: hash it while it is in cache, and put it in its frames."""
        start, stop, whole = self.chunks[index]
        landing = self.landing
        if whole:
            pages = self.memory.frames[self.mfns[start]:self.mfns[start] + stop - start]
        else:
            pages = self.staging[:stop - start]
        keep = self.fresh[start:stop] if self.after_switch else None
        if landing.verify:
            if keep is None:
                landing.hashes[self.pfns[start:stop]] = page_hashes(pages)
            elif keep.any():
                landing.hashes[self.pfns[start:stop][keep]] = page_hashes(pages[keep])
        tables = self.is_table[start:stop]
        if not whole:
            if tables.any():
                at = np.flatnonzero((self.tables >= start) & (self.tables < stop))
                self.scratch[at] = pages[tables]
            rows = ~tables if keep is None else ~tables & keep
            if rows.all():
                self.memory.write(self.mfns[start:stop], pages)
            elif rows.any():
                self.memory.write(self.mfns[start:stop][rows], pages[rows])
        if keep is not None:
            landing.present(self.pfns[start:stop][keep & ~tables], self.on_present)

    def done(self) -> None:
        """The whole record has arrived: page tables made this host's, pfns marked, zero
        pages landed."""
        landing = self.landing
        kept = self.fresh[self.tables] if self.after_switch else slice(None)
        if len(self.tables[kept]):
            self.memory.write(self.mfns[self.tables[kept]],
                              landing.tables_in(self.scratch[kept]).view(np.uint8))
        if self.after_switch:
            landing.present(self.pfns[self.tables[kept]], self.on_present)
            landing.counted(len(self.pfns), int(np.count_nonzero(~self.fresh)))
        else:
            landing.arrived(self.pfns)
        if len(self.zero_pfns):
            landing.land_zero(self.zero_pfns, self.on_present)

    # -- one record, one way ----------------------------------------------------------------
    def land(self, pd: "records.PageData | IncomingPages") -> None:
        """A PAGE_DATA record: its pages received straight into the chunks' buffers when
        they are still on the socket (`IncomingPages`), else (decoded whole by the reader, or
        a multifd packet decompressed) poured into the same chunks."""
        chunks = self.buffers(pd.pfns, pd.types)
        try:
            if isinstance(pd, IncomingPages):
                for index, chunk in enumerate(chunks):
                    pd.read_into(chunk)   # the kernel copies the pages there from the socket
                    self.landed(index)
                pd.end()
            else:
                flat, at = pd.pages.reshape(-1), 0
                for index, (buffer,) in enumerate(chunks):
                    buffer[:] = flat[at:at + len(buffer)]
                    at += len(buffer)
                    self.landed(index)
            self.done()
        except BaseException:
            if self.after_switch:
                self.landing.release(self.pfns[self.fresh])
            raise
