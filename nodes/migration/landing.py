"""Where pages land: the one object every page a destination receives goes through.

For each PAGE_DATA record: check its pfns and types against the guest's layout (before a
single byte lands), hand out the buffers the pages go into, in chunks of 32 pages (128 KiB,
still in cache when hashed), hash each chunk as it lands, write it to its frames, and mark
its pfns received. A chunk inside one superpage extent lands straight in its frames (the
kernel copies it there from the socket) and is hashed where it lies; a chunk of scattered
frames lands in a staging buffer, is hashed there and then written to its frames. Page
tables arrive canonical: they are kept aside and written, made this host's (pfn -> mfn),
once the record is complete.

The reader (`nodes.migration.reader.RecordReader`) fills the chunks from the socket; a record
laid out another way (msgpack allows several) is decoded whole and poured into the same
chunks by `land`: either way a page reaches its frame by one path.

Zero pages (pfn words typed ZERO) write nothing into a frame that has never received a page
(a reserved frame is zero already), and zeros into one that has, as QEMU's multifd receiver
does with its received bitmap. XBZRLE deltas are applied onto the frame that holds the
page's previous copy, checked whole first, and the page hashed again.

The guest-wide state (hashes, which pages arrived) is the `Landing`'s; what one reader is
in the middle of (the record's pfns, its chunks, a staging buffer) is its `RecordSink`'s, so
several readers (multifd's channels) land into one guest at once. `Landing` is itself the
sink of the main reader.
"""

import threading
from typing import TYPE_CHECKING

import numpy as np

from nodes.errors import StreamError
from nodes.migration import records, xbzrle
from nodes.migration.reader import RECV_CHUNK_PAGES
from nodes.xen import pagetable
from nodes.xen.digest import digest, page_hashes
from nodes.xen.domain import Domain
from nodes.xen.memory import MachineMemory

if TYPE_CHECKING:
    from nodes.migration.encoded import DeltaPages


class Landing:
    """The landing of one incoming guest: the `PageSink` of its main reader, and the maker of
    a `RecordSink` for each other one."""

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
        self._main = RecordSink(self)

    def sink(self) -> "RecordSink":
        """A sink of its own for another reader landing into this guest."""
        return RecordSink(self)

    # -- the PageSink protocol, for the main reader -----------------------------------------
    def buffers(self, pfns: np.ndarray, types: np.ndarray) -> list[list]:
        return self._main.buffers(pfns, types)

    def landed(self, index: int) -> None:
        self._main.landed(index)

    def done(self) -> None:
        self._main.done()

    def land(self, pd: records.PageData) -> None:
        self._main.land(pd)

    # -- what every sink does to the guest ---------------------------------------------------
    def arrived(self, pfns: np.ndarray) -> None:
        with self._lock:
            self.received[pfns] = True
            self.pages_received += len(pfns)

    def land_zero(self, pfns: np.ndarray) -> None:
        """Zero pages: nothing written where no page has landed yet, zeros where one has."""
        again = pfns[self.received[pfns]]
        if len(again):
            mfns = self.dom.p2m[again]
            touched = self.memory.frames[mfns].any(axis=1)
            self.memory.frames[mfns[touched]] = 0
        if self.verify:
            self.hashes[pfns] = self.zero_hash
        self.arrived(pfns)

    def land_deltas(self, dp: "DeltaPages") -> None:
        """A PAGE_XBZRLE record: each delta applied onto the page's previous copy."""
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
    """One reader's landing of its records (the `PageSink` of a reader): the record under way,
    its chunks and a staging buffer of its own."""

    def __init__(self, landing: Landing):
        self.landing = landing
        self.memory = landing.memory
        self.dom = landing.dom
        self.staging = np.empty((RECV_CHUNK_PAGES, landing.memory.page_size), dtype=np.uint8)

    def buffers(self, pfns: np.ndarray, types: np.ndarray) -> list[list]:
        """The record's checked pfns, and writable chunks for its pages, in record order."""
        zero = types == records.PageType.ZERO
        self.zero_pfns = pfns[zero]
        if self.landing.is_pt[self.zero_pfns].any():
            raise StreamError("a page table sent as a zero page")
        mask = records.data_mask(types)
        self.pfns = pfns[mask]
        self.is_table = self.landing.check_types(self.pfns, types[mask])
        self.mfns = mfns = self.dom.p2m[self.pfns]
        self.tables = np.flatnonzero(self.is_table)
        self.scratch = np.empty((len(self.tables), self.memory.page_size), dtype=np.uint8)
        n = len(mfns)
        # A chunk lies in one run of frames if no break (a jump, or a page table) is in it.
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
            self.chunks.append((start, stop, whole))
            if whole:
                out.append([frames[mfns[start]:mfns[start] + stop - start].reshape(-1)])
            else:
                out.append([self.staging[:stop - start].reshape(-1)])
        return out

    def landed(self, index: int) -> None:
        """Chunk `index` is filled: hash it while it is in cache, and put it in its frames."""
        start, stop, whole = self.chunks[index]
        if whole:
            pages = self.memory.frames[self.mfns[start]:self.mfns[start] + stop - start]
        else:
            pages = self.staging[:stop - start]
        if self.landing.verify:
            self.landing.hashes[self.pfns[start:stop]] = page_hashes(pages)
        if whole:
            return
        tables = self.is_table[start:stop]
        if tables.any():
            at = np.flatnonzero((self.tables >= start) & (self.tables < stop))
            self.scratch[at] = pages[tables]
            self.memory.write(self.mfns[start:stop][~tables], pages[~tables])
        else:
            self.memory.write(self.mfns[start:stop], pages)

    def done(self) -> None:
        """The whole record has arrived: page tables made this host's, pfns marked, zero
        pages landed."""
        if len(self.tables):
            self.memory.write(self.mfns[self.tables],
                              self.landing.tables_in(self.scratch).view(np.uint8))
        self.landing.arrived(self.pfns)
        if len(self.zero_pfns):
            self.landing.land_zero(self.zero_pfns)

    # -- a record decoded whole --------------------------------------------------------------
    def land(self, pd: records.PageData) -> None:
        """A PAGE_DATA record the reader decoded into a buffer of its own (or a multifd
        packet decompressed), poured into the same chunks as a record received in place."""
        chunks = self.buffers(pd.pfns, pd.types)
        flat = pd.pages.reshape(-1)
        at = 0
        for index, (buffer,) in enumerate(chunks):
            buffer[:] = flat[at:at + len(buffer)]
            at += len(buffer)
            self.landed(index)
        self.done()
