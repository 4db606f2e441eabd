"""`kvstore`: a memcached-like key-value store in the guest's memory, driven by a YCSB-like
client on its vCPU (`workloads.program` says why programs, and how they journal).

The store: a hash table (open addressing, linear probing, entries key + 1, 0 empty) that
finds each key's slot in the slab of values (`value_size` bytes each, rounded to words), the
items' metadata (version, checksum) and an LRU (a doubly linked list of int32 prev / next,
its head and tail in the journal) that every request moves its item to the head of, as
memcached's does. The client: `ops_per_second` requests (or as fast as it runs), a share
`get_ratio` of them gets and the rest sets, over keys drawn from a Zipf distribution of skew
`zipf` (YCSB's scrambled Zipfian: rank r is hit in proportion to 1 / (r + 1)^zipf, and the
ranks are scattered over the keys, so hot items are spread over the slab's pages).

A set writes the key's next version: its value is a function of (key, version)
(`value_words`), printable bytes, compressible as text is. So the store checks itself
(`check`): the hash table finds every key, each value is the one its version names and
matches its checksum, the LRU links every item once both ways, and the sets the journal
counted are the versions' sum.
"""

import numpy as np

from nodes.errors import ConfigError
from workloads.program import J_CURSOR, J_LOADED, Program, mix, splitmix
from workloads.spec import WorkloadSpec
from workloads.state import generator

C_LOADED_KEYS, C_HEAD, C_TAIL, C_SETS, C_GETS = range(5)
_META_WORDS = 2                       # version, checksum
_LOAD_KEYS = 1024                     # keys a load step builds
_MASK = np.uint64(0x3F3F3F3F3F3F3F3F)
_ASCII = np.uint64(0x4040404040404040)
_KEY_STREAM = 3                       # the scramble of ranks over keys


def value_words(keys: np.ndarray, versions: np.ndarray, words: int) -> np.ndarray:
    """The value of each (key, version): `words` uint64 of printable bytes."""
    seed = splitmix(splitmix(np.asarray(keys, np.uint64)) ^ np.asarray(versions, np.uint64))
    w = splitmix(seed[:, None] + np.arange(words, dtype=np.uint64)[None, :])
    return (w & _MASK) | _ASCII


def checksum(words: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """An item's checksum: the sum of its value's words (mod 2^64), xor its key."""
    return words.sum(axis=1, dtype=np.uint64) ^ np.asarray(keys, np.uint64)


class KVStore(Program):
    pattern = "kvstore"
    code = 1

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        super().__init__(spec, data_pages, state, page_size)
        self.vwords = -(-spec.value_size // 8)
        data_bytes = (data_pages - self.data_at) * page_size
        per_key = self.vwords * 8 + _META_WORDS * 8 + 8 + 2 * 8
        keys = spec.keys or data_bytes // 2 // per_key
        self.keys = int(keys)
        self.table_size = 1 << max(1, (2 * self.keys - 1).bit_length())
        need = self.keys * (self.vwords * 8 + _META_WORDS * 8 + 8) + self.table_size * 8
        if self.keys < 1 or need > data_bytes:
            raise ConfigError(f"kvstore: {self.keys} keys of {spec.value_size} B need "
                              f"{need} B, the guest has {data_bytes} B for data per vCPU; "
                              f"give fewer --keys or more memory")
        ranks = np.arange(1, self.keys + 1, dtype=np.float64)
        cdf = np.cumsum(ranks ** -spec.zipf)
        self.cdf = cdf / cdf[-1]
        self.rank_key = generator(spec.seed, _KEY_STREAM).permutation(self.keys)
        self.mask = self.table_size - 1

    def _layout(self, data: np.ndarray) -> None:
        k, vw, t = self.keys, self.vwords, self.table_size
        at = 0

        def take(nbytes: int, dtype: type) -> np.ndarray:
            nonlocal at
            view = data[at:at + nbytes].view(dtype)
            at += nbytes
            return view
        self.table = take(t * 8, np.int64)
        self.values = take(k * vw * 8, np.uint64).reshape(k, vw)
        self.meta = take(k * _META_WORDS * 8, np.uint64).reshape(k, _META_WORDS)
        self.prev = take(k * 4, np.int32)
        self.next = take(k * 4, np.int32)
        self.c = self.journal[J_CURSOR:J_CURSOR + 8]

    # -- building it ----------------------------------------------------------------------
    def _load(self) -> int:
        lo = int(self.c[C_LOADED_KEYS])
        hi = min(self.keys, lo + _LOAD_KEYS)
        keys = np.arange(lo, hi, dtype=np.int64)
        ones = np.ones(len(keys), np.uint64)
        words = value_words(keys, ones, self.vwords)
        self.values[lo:hi] = words
        self.meta[lo:hi, 0] = 1
        self.meta[lo:hi, 1] = checksum(words, keys)
        self.next[lo:hi] = keys - 1                 # the LRU: the newest loaded at its head
        self.prev[lo:hi] = keys + 1
        self._insert(keys)
        self.c[C_LOADED_KEYS] = hi
        if hi == self.keys:
            self.prev[self.keys - 1] = -1
            self.c[C_HEAD], self.c[C_TAIL] = self.keys - 1, 0
            self.journal[J_LOADED] = 1
        return (hi - lo) * (self.vwords + _META_WORDS + 2) * 8 // self.page_size + 1

    def _insert(self, keys: np.ndarray) -> None:
        """Put keys in the hash table, probing linearly, a vector of them at a time."""
        pos = (splitmix(keys.astype(np.uint64)) & np.uint64(self.mask)).astype(np.int64)
        pending = np.arange(len(keys))
        while len(pending):
            p = pos[pending]
            free = self.table[p] == 0
            _, first = np.unique(p, return_index=True)
            claim = np.zeros(len(p), bool)
            claim[first] = True
            claim &= free
            self.table[p[claim]] = keys[pending[claim]] + 1
            rest = pending[~claim]
            pos[rest] = (pos[rest] + 1) & self.mask
            pending = rest

    # -- the client's requests ------------------------------------------------------------
    def requests(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The client's next `n` requests as (keys, is-a-set), drawn as `_op` draws them."""
        u = self.rng.random((n, 2))
        return (self.rank_key[np.searchsorted(self.cdf, u[:, 0], side="left")],
                u[:, 1] >= self.spec.get_ratio)

    def _op(self) -> int:
        keys, sets = self.requests(1)       # drawn per request: a batch cut short by its
        key = int(keys[0])                  # time spends no draw it did not use
        slot = self._find(key)
        stores = self._bump(slot)
        if sets[0]:
            version = int(self.meta[slot, 0]) + 1
            k = np.array([key])
            words = value_words(k, np.array([version], np.uint64), self.vwords)
            self.values[slot] = words[0]
            self.meta[slot, 0] = version
            self.meta[slot, 1] = checksum(words, k)[0]
            self.c[C_SETS] += 1
            return stores + 1 + -(-self.vwords * 8 // self.page_size)
        self.values[slot, 0]                       # noqa: B018 - the get reads its value
        self.c[C_GETS] += 1
        return stores

    def _find(self, key: int) -> int:
        table, want = self.table, key + 1
        p = mix(key) & self.mask
        while True:
            e = int(table[p])
            if e == want:
                return key                           # the slab slot of a key is the key
            if e == 0:
                raise ConfigError(f"kvstore: key {key} is not in its hash table")
            p = (p + 1) & self.mask

    def _bump(self, slot: int) -> int:
        """Move `slot` to the LRU's head (memcached's bump); the pages it stored to."""
        c, prev, nxt = self.c, self.prev, self.next
        head = int(c[C_HEAD])
        if slot == head:
            return 0
        p, n = int(prev[slot]), int(nxt[slot])
        nxt[p] = n
        if n >= 0:
            prev[n] = p
        else:
            c[C_TAIL] = p
        prev[slot], nxt[slot] = -1, head
        prev[head] = slot
        c[C_HEAD] = slot
        return 3

    # -- its own invariants ---------------------------------------------------------------
    def check(self) -> dict:
        if not self.loaded:
            return {"ok": True, "checked": 0, "detail": "still loading"}
        k = self.keys
        keys = np.arange(k, dtype=np.int64)
        bad = []
        present = np.zeros(k + 1, bool)
        t = self.table[self.table > 0] - 1
        present[t[(t >= 0) & (t < k)]] = True
        if not present[:k].all() or len(t) != k:
            bad.append(f"the hash table holds {len(t)} entries for {k} keys")
        versions = self.meta[:, 0]
        want = value_words(keys, versions, self.vwords)
        wrong = np.flatnonzero((self.values != want).any(axis=1))
        if len(wrong):
            bad.append(f"{len(wrong)} values are not their version's (key {int(wrong[0])})")
        sums = np.flatnonzero(checksum(self.values, keys) != self.meta[:, 1])
        if len(sums):
            bad.append(f"{len(sums)} checksums fail (key {int(sums[0])})")
        if int(versions.astype(np.int64).sum()) - k != int(self.c[C_SETS]):
            bad.append(f"versions add to {int(versions.sum()) - k} sets, the journal "
                       f"counted {int(self.c[C_SETS])}")
        bad += self._check_lru()
        return {"ok": not bad, "checked": k, "detail": "; ".join(bad) or
                f"{k} keys: values, checksums, hash table, LRU and set count hold"}

    def _check_lru(self) -> list[str]:
        k, nxt, prev = self.keys, self.next[:self.keys], self.prev[:self.keys]
        order = np.empty(k, np.int64)
        at, seen = int(self.c[C_HEAD]), 0
        while at >= 0 and seen < k:
            order[seen] = at
            seen += 1
            at = int(nxt[at])
        if seen != k or at >= 0 or len(np.unique(order)) != k:
            return [f"the LRU walks {seen} of {k} items"]
        if int(order[-1]) != int(self.c[C_TAIL]) or (prev[order[1:]] != order[:-1]).any():
            return ["the LRU's back links disagree with its forward ones"]
        return []
