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

After a post-copy switch (`begin_postcopy`) the guest runs here while pages still arrive, and
`received` is the truth of which are present (the guest's access path reads the same array):
a page lands at most once, into its frame only while it is missing (so no write the guest has
made since is ever overwritten); one already present is dropped (counted in `duplicates`); a
data page is marked present, and the waiting vCPUs told (`on_present`), as soon as its chunk
has landed, a page table once its record is complete.
"""

from collections.abc import Callable

import numpy as np

from nodes.errors import StreamError
from nodes.migration import records
from nodes.migration.reader import RECV_CHUNK_PAGES
from nodes.xen import pagetable
from nodes.xen.digest import digest, page_hashes
from nodes.xen.domain import Domain
from nodes.xen.memory import MachineMemory


class Landing:
    """The landing of one incoming guest: the `PageSink` of its reader."""

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
        self.staging = np.empty((RECV_CHUNK_PAGES, memory.page_size), dtype=np.uint8)
        # Post-copy (see the module docstring): set by `begin_postcopy`.
        self.after_switch = False
        self.on_present: Callable[[np.ndarray], None] | None = None
        self.applied: np.ndarray | None = None    # times each page landed after the switch
        self.duplicates = 0                       # pages that arrived already present
        self.fresh: np.ndarray | None = None      # the record's pages still missing

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

    def _present(self, pfns: np.ndarray) -> None:
        if len(pfns):
            self.received[pfns] = True
            self.applied[pfns] += 1
            self.on_present(pfns)

    # -- the PageSink protocol -----------------------------------------------------------
    def buffers(self, pfns: np.ndarray, types: np.ndarray) -> list[list]:
        """The record's checked pfns, and writable chunks for its pages, in record order."""
        mask = records.data_mask(types)
        self.pfns = pfns[mask]
        self.is_table = self._check_types(self.pfns, types[mask])
        self.mfns = mfns = self.dom.p2m[self.pfns]
        self.tables = np.flatnonzero(self.is_table)
        if self.after_switch:
            self.fresh = self._missing_of(self.pfns)
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
        if whole:
            pages = self.memory.frames[self.mfns[start]:self.mfns[start] + stop - start]
        else:
            pages = self.staging[:stop - start]
        keep = self.fresh[start:stop] if self.after_switch else None
        if self.verify:
            if keep is None:
                self.hashes[self.pfns[start:stop]] = page_hashes(pages)
            elif keep.any():
                self.hashes[self.pfns[start:stop][keep]] = page_hashes(pages[keep])
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
            self._present(self.pfns[start:stop][keep & ~tables])

    def done(self) -> None:
        """The whole record has arrived: page tables made this host's, pfns marked."""
        kept = self.fresh[self.tables] if self.after_switch else slice(None)
        if len(self.tables[kept]):
            self.memory.write(self.mfns[self.tables[kept]],
                              self._tables_in(self.scratch[kept]).view(np.uint8))
        if self.after_switch:
            self._present(self.pfns[self.tables[kept]])
            self.duplicates += int(np.count_nonzero(~self.fresh))
        else:
            self.received[self.pfns] = True
        self.pages_received += len(self.pfns)

    # -- a record decoded whole --------------------------------------------------------------
    def land(self, pd: records.PageData) -> None:
        """A PAGE_DATA record the reader decoded into a buffer of its own, poured into the
        same chunks as a record received in place."""
        chunks = self.buffers(pd.pfns, pd.types)
        flat = pd.pages.reshape(-1)
        at = 0
        for index, (buffer,) in enumerate(chunks):
            buffer[:] = flat[at:at + len(buffer)]
            at += len(buffer)
            self.landed(index)
        self.done()

    # -- checks ---------------------------------------------------------------------------
    def _missing_of(self, pfns: np.ndarray) -> np.ndarray:
        """After the switch: which of a record's pages are still missing; a record that
        names a page twice is refused (it would land twice)."""
        ordered = np.sort(pfns)
        if (ordered[1:] == ordered[:-1]).any():
            raise StreamError("a PAGE_DATA record names a page twice")
        return ~self.received[pfns]

    def _check_types(self, pfns: np.ndarray, types: np.ndarray) -> np.ndarray:
        """Which of these pages with data are page tables; they must be the guest's own."""
        is_table = types == records.PageType.L1TAB
        if not np.array_equal(is_table, self.is_pt[pfns]):
            raise StreamError("page types do not match the guest's page-table layout")
        return is_table

    def _tables_in(self, pages: np.ndarray) -> np.ndarray:
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
