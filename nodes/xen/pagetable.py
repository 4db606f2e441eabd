"""Guest page tables: L1 table pages whose entries hold machine frame numbers.

A P2M or VP guest of `n` pages keeps `ceil(n / entries_per_page)` L1 table pages at the top of
its pseudo-physical space; entry `i` (counting across tables) maps pfn `i` and holds
`(mfn << page_shift) | flags`. Because the entries hold MFNs, a migration must
*canonicalise* them (mfn -> pfn) on the way out and *uncanonicalise* them (pfn -> new mfn)
on the way in, exactly as Xen's save/restore does for PV guests.
"""

import numpy as np

PTE_PRESENT = 0x1
PTE_RW = 0x2
_NOT_OWNED = "page-table entry points at a frame the guest does not own"


def table_count(npages: int, entries_per_page: int) -> int:
    return -(-npages // entries_per_page)


def table_pfns(npages: int, entries_per_page: int) -> np.ndarray:
    """The pfns of the L1 table pages: the top `table_count` pfns of the guest."""
    k = table_count(npages, entries_per_page)
    return np.arange(npages - k, npages, dtype=np.int64)


def build(p2m: np.ndarray, page_shift: int, entries_per_page: int) -> np.ndarray:
    """Fresh L1 tables (k, entries_per_page) uint64 for a guest whose pfn i lives at p2m[i].

    Data pages are mapped read-write; the table pages themselves read-only, as Xen requires.
    """
    n = len(p2m)
    k = table_count(n, entries_per_page)
    flat = np.zeros(k * entries_per_page, dtype=np.uint64)
    flat[:n] = (p2m.astype(np.uint64) << np.uint64(page_shift)) | np.uint64(PTE_PRESENT | PTE_RW)
    flat[n - k:n] &= ~np.uint64(PTE_RW)
    return flat.reshape(k, entries_per_page)


def _split(tables: np.ndarray, page_shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shift = np.uint64(page_shift)
    present = (tables & np.uint64(PTE_PRESENT)) != 0
    frame = tables >> shift
    flags = tables & ((np.uint64(1) << shift) - np.uint64(1))
    return present, frame, flags


def canonicalise(tables: np.ndarray, domid: int, m2p_owner: np.ndarray, m2p_pfn: np.ndarray,
                 page_shift: int) -> np.ndarray:
    """Tables with every present entry's mfn replaced by the pfn the M2P table gives.

    Raises ValueError if an entry points at a frame `domid` does not own (Xen would mark the
    page broken; migbed refuses to send a stream it cannot restore).
    """
    present, frame, flags = _split(tables, page_shift)
    mfns = frame[present].astype(np.int64)
    if len(mfns) and (mfns.max() >= len(m2p_owner) or np.any(m2p_owner[mfns] != domid)):
        raise ValueError(_NOT_OWNED)
    out = tables.copy()
    out[present] = (m2p_pfn[mfns].astype(np.uint64) << np.uint64(page_shift)) | flags[present]
    return out


def uncanonicalise(tables: np.ndarray, p2m: np.ndarray, page_shift: int) -> np.ndarray:
    """Tables with every present entry's pfn replaced by this host's mfn for it."""
    present, frame, flags = _split(tables, page_shift)
    pfns = frame[present].astype(np.int64)
    if len(pfns) and pfns.max() >= len(p2m):
        raise ValueError("page-table entry points past the guest's last pfn")
    out = tables.copy()
    out[present] = (p2m[pfns].astype(np.uint64) << np.uint64(page_shift)) | flags[present]
    return out


def check(tables: np.ndarray, p2m: np.ndarray, page_shift: int) -> str | None:
    """None if entry i maps pfn i to p2m[i] for every pfn of the guest, else the first problem."""
    n = len(p2m)
    present, frame, _ = _split(tables.reshape(-1)[:n], page_shift)
    if not present.all():
        return f"pfn {int(np.flatnonzero(~present)[0])} is not mapped"
    bad = np.flatnonzero(frame.astype(np.int64) != p2m)
    if len(bad):
        i = int(bad[0])
        return f"pfn {i} maps mfn {int(frame[i])}, but the guest's frame is mfn {int(p2m[i])}"
    return None
