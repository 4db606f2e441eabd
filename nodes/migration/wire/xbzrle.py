"""XBZRLE, as QEMU does it (migration/xbzrle.c, page_cache.c, ram.c `save_xbzrle_page`).

The cache is direct-mapped: `cache_bytes / page_size` slots (a power of two), page `pfn` in
slot `pfn & (slots - 1)`; each slot remembers its page, the page's bytes as last sent, and its
age, the dirty-sync-count when it was last used. An entry younger than `LIFETIME` (2) syncs is
not evicted by another page. XBZRLE starts after the first full pass (the cursor's first
wrap) and never runs before. For each page the sender would send whole:

- not cached (a miss): the page is copied into the cache if its slot allows (not during the
  stop-and-copy) and sent whole *from that copy*, so what the destination has is what the
  cache has; `cache_miss` counts it.
- cached (a hit; `pages` counts it): the page is copied, then encoded against the cached copy
  as alternating runs: the length of a run of unchanged bytes, the length of a run of changed
  bytes and those bytes (the new ones), lengths in ULEB128 of at most two bytes, the last
  unchanged run left out. An identical page encodes to nothing and nothing is sent. An
  encoding longer than a page is an `overflow`: the page goes whole. Unless identical, the
  cached copy becomes the new page (not during the stop-and-copy).
- a zero page found while XBZRLE runs replaces its own entry with zeros, as QEMU's
  `xbzrle_cache_zero_page` does, so the cache never holds what the destination no longer has.

`bytes` counts each delta with its two length bytes (QEMU adds a flag byte it needs and
migbed does not) and a page for each overflow; the rates are QEMU's, over the whole
migration once XBZRLE runs (query-migrate shows them over its last one-second period).

The encoder is vectorised over a batch of pages (numpy: a comparison, run edges, one scatter
of every changed byte): no Python loop per byte or per run. Decoding (`decode_runs`) follows
xbzrle_decode_buffer's checks exactly, on the destination.
"""

from dataclasses import dataclass

import numpy as np

from nodes.errors import StreamError

LIFETIME = 2                     # CACHED_PAGE_LIFETIME
IDENTICAL = 0
OVERFLOW = -1


@dataclass
class XbzrleStats:
    """query-migrate's xbzrle-cache block, counted as QEMU counts it."""

    cache_size: int
    page_size: int
    bytes: int = 0
    pages: int = 0               # hits: encoded, overflowed or identical
    cache_miss: int = 0
    overflow: int = 0
    pages_seen: int = 0          # every page the sender handled while XBZRLE ran

    def to_dict(self) -> dict:
        return {"cache_size": self.cache_size, "bytes": self.bytes, "pages": self.pages,
                "cache_miss": self.cache_miss,
                "cache_miss_rate": self.cache_miss / self.pages_seen if self.pages_seen else 0.0,
                "encoding_rate": (self.pages * self.page_size / self.bytes
                                  if self.bytes and self.pages else 0.0),
                "overflow": self.overflow}


class PageCache:
    """The direct-mapped cache (page_cache.c), vectorised over pages of distinct slots."""

    def __init__(self, cache_bytes: int, page_size: int, guest_pages: int):
        slots = cache_bytes // page_size
        # More slots than the guest has pages would never be used: page i always has slot i.
        used = min(slots, 1 << max(0, (guest_pages - 1).bit_length()))
        self.mask = used - 1
        self.data = np.empty((used, page_size), np.uint8)     # lazily backed by the kernel
        self.addr = np.full(used, -1, np.int64)
        self.age = np.zeros(used, np.int64)

    def slots(self, pfns: np.ndarray) -> np.ndarray:
        return pfns & self.mask

    def lookup(self, pfns: np.ndarray, slots: np.ndarray, generation: int) -> np.ndarray:
        """cache_is_cached: which pages are cached (their age becomes `generation`)."""
        hit = self.addr[slots] == pfns
        self.age[slots[hit]] = generation
        return hit

    def insert(self, pfns: np.ndarray, slots: np.ndarray, pages: np.ndarray,
               generation: int) -> np.ndarray:
        """cache_insert: which pages went in (a slot held by another page younger than
        LIFETIME syncs refuses)."""
        owner = self.addr[slots]
        ok = (owner == -1) | (owner == pfns) | (self.age[slots] + LIFETIME <= generation)
        s = slots[ok]
        self.data[s] = pages[ok]
        self.addr[s] = pfns[ok]
        self.age[s] = generation
        return ok


def _uleb(values: np.ndarray) -> np.ndarray:
    return 1 + (values >= 0x80)


def encode(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, bytes]:
    """xbzrle_encode_buffer of each row of `new` against the same row of `old` ((k, page)
    uint8, a page a multiple of 8 bytes): (lengths, deltas back to back), a length IDENTICAL
    (0) for an unchanged page and OVERFLOW (-1) for one whose delta would be longer than
    the page. Words are compared first, bytes only inside the words that changed."""
    k, size = new.shape
    lengths = np.zeros(k, np.int64)
    changed_words = old.view(np.uint64) != new.view(np.uint64)
    dense = np.flatnonzero(changed_words.sum(axis=1) > size // 64)
    if len(dense):              # pages rewritten widely: most overflow, and say so cheaply
        over = dense[_surely_overflows(old[dense], new[dense])]
        lengths[over] = OVERFLOW
        changed_words[over] = False
    word_row, word = np.nonzero(changed_words)
    if not len(word):
        return lengths, b""
    xor = old.view(np.uint64)[word_row, word] ^ new.view(np.uint64)[word_row, word]
    which, byte = np.nonzero(xor.view(np.uint8).reshape(-1, 8))
    row, pos = word_row[which], word[which] * 8 + byte      # every changed byte, in order
    opens = np.ones(len(pos), bool)
    opens[1:] = (row[1:] != row[:-1]) | (pos[1:] != pos[:-1] + 1)
    first_byte = np.flatnonzero(opens)
    run_row, start = row[first_byte], pos[first_byte]
    changed_len = np.diff(np.append(first_byte, len(pos)))
    first = np.ones(len(start), bool)
    first[1:] = run_row[1:] != run_row[:-1]
    before = np.empty_like(start)
    before[1:] = start[:-1] + changed_len[:-1]
    before[first] = 0
    unchanged_len = start - before                   # the unchanged run before each one
    piece = _uleb(unchanged_len) + _uleb(changed_len) + changed_len
    lengths += np.bincount(run_row, weights=piece, minlength=k).astype(np.int64)
    # QEMU checks `d + 2 > dlen` before it scans each unchanged run, the trailing one too
    # (which it then drops): a delta within two bytes of the page, with unchanged bytes
    # after its last changed run, overflows there.
    last = np.ones(len(start), bool)
    last[:-1] = run_row[:-1] != run_row[1:]
    trailing = run_row[last][start[last] + changed_len[last] < size]
    lengths[trailing[lengths[trailing] + 2 > size]] = OVERFLOW
    lengths[lengths > size] = OVERFLOW
    keep = lengths[run_row] > 0
    if not keep.any():
        return lengths, b""
    z, n, st = unchanged_len[keep], changed_len[keep], start[keep]
    hz, hn = _uleb(z), _uleb(n)
    total = hz + hn + n
    at = np.cumsum(total) - total
    out = np.empty(int(total.sum()), np.uint8)
    for value, where, two in ((z, at, hz == 2), (n, at + hz, hn == 2)):
        out[where] = (value & 0x7F) | (two << 7)
        out[where[two] + 1] = value[two] >> 7
    kept_bytes = lengths[row] > 0
    out[np.repeat(at + hz + hn - st, n) + pos[kept_bytes]] = new[row[kept_bytes],
                                                                 pos[kept_bytes]]
    return lengths, out.tobytes()


def _surely_overflows(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Rows whose delta cannot fit a page: its changed bytes and two bytes of lengths per
    changed run (at least one each) are more than the page already."""
    changed = old != new
    runs = np.count_nonzero(changed[:, 1:] & ~changed[:, :-1], axis=1) + changed[:, 0]
    return np.count_nonzero(changed, axis=1) + 2 * runs > new.shape[1]


def decode_runs(delta: memoryview | bytes, size: int) -> list[tuple[int, int, int]]:
    """The runs of one page's delta as (page offset, delta offset, length), checked as
    xbzrle_decode_buffer checks them: StreamError for any delta QEMU refuses."""
    src = bytes(delta)
    slen = len(src)
    runs = []
    i = d = 0
    while i < slen:
        if slen - i < 2:
            raise StreamError("XBZRLE delta ends inside a run")
        count, used = _uleb_decode(src, i)
        if i and not count:
            raise StreamError("XBZRLE delta has an empty unchanged run")
        i += used
        d += count
        if d > size or slen - i < 2:
            raise StreamError("XBZRLE delta runs past its page")
        count, used = _uleb_decode(src, i)
        if not count:
            raise StreamError("XBZRLE delta has an empty changed run")
        i += used
        if d + count > size or i + count > slen:
            raise StreamError("XBZRLE delta runs past its page")
        runs.append((d, i, count))
        d += count
        i += count
    return runs


def _uleb_decode(src: bytes, i: int) -> tuple[int, int]:
    b = src[i]
    if not b & 0x80:
        return b, 1
    if src[i + 1] & 0x80:
        raise StreamError("XBZRLE run length longer than 14 bits")
    return (b & 0x7F) | (src[i + 1] << 7), 2


def apply(page: np.ndarray, delta: memoryview | bytes) -> None:
    """Decode `delta` onto `page` (its previous bytes), checked whole before a byte lands."""
    runs = decode_runs(delta, len(page))
    src = np.frombuffer(bytes(delta), np.uint8)
    for at, src_at, n in runs:
        page[at:at + n] = src[src_at:src_at + n]


@dataclass
class Split:
    """What XBZRLE makes of a batch of data pages: which go whole (some from the cache's
    copy), which as deltas, and how many are identical (nothing sent)."""

    whole: np.ndarray                 # bool per page: sent whole in PAGE_DATA
    copies: dict                      # page index -> the cached copy to send it from
    delta_index: np.ndarray           # page indices sent as deltas, in record order
    delta_lengths: np.ndarray
    delta_data: bytes
    identical: int


class XbzrleEncoder:
    """The sender's XBZRLE stage: the cache, the counters, and a batch split (see the module
    docstring). `generation()` is the dirty-sync-count now (`nodes.migration.send.dirtysync`)."""

    def __init__(self, cache_bytes: int, frames: np.ndarray, guest_pages: int, generation):
        page_size = frames.shape[1]
        self.frames = frames
        self.cache = PageCache(cache_bytes, page_size, guest_pages)
        self.stats = XbzrleStats(cache_bytes, page_size)
        self.generation = generation
        self.started = False          # after the first full pass

    def zeroed(self, pfns: np.ndarray) -> None:
        """Zero pages found while XBZRLE runs: their cache entries become zeros."""
        if not self.started or not len(pfns):
            return
        self.stats.pages_seen += len(pfns)
        for group in _distinct_slots(self.cache.slots(pfns)):
            zeros = np.zeros((len(group), self.frames.shape[1]), np.uint8)
            self.cache.insert(pfns[group], self.cache.slots(pfns[group]), zeros,
                              self.generation())

    def split(self, pfns: np.ndarray, mfns: np.ndarray, last_stage: bool) -> Split:
        n = len(pfns)
        out = Split(np.ones(n, bool), {}, np.zeros(0, np.int64), np.zeros(0, np.int64), b"", 0)
        self.stats.pages_seen += n
        deltas = []
        for group in _distinct_slots(self.cache.slots(pfns)):
            deltas.append(self._group(group, pfns, mfns, last_stage, out))
        kept = [d for d in deltas if d is not None]
        if kept:
            out.delta_index = np.concatenate([d[0] for d in kept])
            out.delta_lengths = np.concatenate([d[1] for d in kept])
            out.delta_data = b"".join(d[2] for d in kept)
        return out

    def _group(self, group: np.ndarray, pfns: np.ndarray, mfns: np.ndarray, last_stage: bool,
               out: Split):
        """Pages of distinct slots, one cache operation each, as QEMU handles them in turn."""
        cache, stats, gen = self.cache, self.stats, self.generation()
        slots = cache.slots(pfns[group])
        hit = cache.lookup(pfns[group], slots, gen)
        miss = group[~hit]
        stats.cache_miss += len(miss)
        if len(miss) and not last_stage:
            inserted = cache.insert(pfns[miss], slots[~hit], self.frames[mfns[miss]], gen)
            for i, slot in zip(miss[inserted].tolist(), slots[~hit][inserted].tolist(),
                               strict=True):
                out.copies[i] = cache.data[slot]       # sent as cached: what the cache has
        hits, hit_slots = group[hit], slots[hit]
        stats.pages += len(hits)
        if not len(hits):
            return None
        current = self.frames[mfns[hits]]                # a snapshot: the guest may write on
        lengths, data = encode(cache.data[hit_slots], current)
        if not last_stage:
            changed = lengths != IDENTICAL
            cache.data[hit_slots[changed]] = current[changed]
        over = lengths == OVERFLOW
        stats.overflow += int(over.sum())
        stats.bytes += int(over.sum()) * self.frames.shape[1]
        if not last_stage:                               # whole, as now cached
            for i, slot in zip(hits[over].tolist(), hit_slots[over].tolist(), strict=True):
                out.copies[i] = cache.data[slot]
        sent = lengths > 0
        stats.bytes += int(lengths[sent].sum()) + 2 * int(sent.sum())
        out.identical += int(np.count_nonzero(lengths == IDENTICAL))
        out.whole[hits[~over]] = False
        return hits[sent], lengths[sent], data


def _distinct_slots(slots: np.ndarray):
    """Indices of `slots` in groups whose slots are distinct, each group in order and the
    groups in the order QEMU would reach their pages (a page's first slot-mate first)."""
    remaining = np.arange(len(slots))
    while len(remaining):
        _, first = np.unique(slots[remaining], return_index=True)
        first.sort()
        yield remaining[first]
        taken = np.zeros(len(remaining), bool)
        taken[first] = True
        remaining = remaining[~taken]
