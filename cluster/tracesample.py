"""The recorder's content samples: a few of each scan's written pages, read from the program's
memory, reduced to the figures migration's page encodings depend on (zero page, compressed
size, XBZRLE delta against the page's previous sample), so a trace says how its program's
memory compresses without holding the memory.

Why sample and not copy: a busy program writes thousands of pages per 10 ms; reading them all
would slow it and fill the trace. Half of each interval's samples are pages sampled before
(their change since then is what XBZRLE would send), half are new ones (a cache of recent
samples, bounded, so memory stays small).
"""

import os
from collections import OrderedDict

import numpy as np
import zstandard

from nodes.migration.wire.xbzrle import OVERFLOW
from nodes.migration.wire.xbzrle import encode as xbzrle_encode
from workloads.tracefile import SAMPLE_DTYPE

SAMPLES_PER_INTERVAL = 8
CACHE_PAGES = 1024


class ContentSampler:
    """Reads sampled written pages of process `pid` (through /proc/PID/mem) right after each
    scan; `table()` is the trace's samples."""

    def __init__(self, pid: int, base: int, page_bytes: int,
                 per_interval: int = SAMPLES_PER_INTERVAL, seed: int = 0):
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self.page = page_bytes
        self.per_interval = per_interval
        self.rng = np.random.default_rng(seed)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.rows: list[tuple] = []
        self.zstd = zstandard.ZstdCompressor(level=1)
        self.base = base

    def read(self, address: int, n: int) -> bytes:
        """`n` bytes of the program's memory at `address` (fewer if it cannot be read)."""
        try:
            return os.pread(self.fd, n, address)
        except OSError:
            return b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def sample(self, interval: int, written: np.ndarray) -> None:
        """Sample some of `written` (sorted region page indices) of this interval: a batch,
        so its cost is a few syscalls and one vectorised XBZRLE encoding, whatever the
        interval's size (the recorder's CPU competes with the program's)."""
        if not len(written):
            return
        keys = np.fromiter(self.cache, np.int64, len(self.cache))
        at = np.searchsorted(written, keys)
        known = keys[(at < len(written)) & (written[np.minimum(at, len(written) - 1)] == keys)]
        half = self.per_interval // 2
        again = self.rng.choice(known, min(half, len(known)), replace=False) if len(known) \
            else np.zeros(0, np.int64)
        want = self.per_interval - len(again)
        fresh = written[self.rng.integers(0, len(written), want)] if want else again[:0]
        pages = sorted(set(again.tolist()) | set(fresh.tolist()))
        raws = [(page, self.read(self.base + page * self.page, self.page)) for page in pages]
        raws = [(page, raw) for page, raw in raws if len(raw) == self.page]
        if raws:
            self._figures(interval, raws)

    def _figures(self, interval: int, raws: list[tuple[int, bytes]]) -> None:
        """The rows of these pages' samples; the pages enter the cache of recent samples."""
        data = np.frombuffer(b"".join(raw for _, raw in raws), np.uint8).reshape(-1, self.page)
        zero = ~data.any(axis=1)
        olds = [self.cache.pop(page, None) for page, _ in raws]
        had = [i for i, old in enumerate(olds) if old is not None]
        delta = np.full(len(raws), -1, np.int64)
        if had:
            lengths, _ = xbzrle_encode(np.stack([olds[i] for i in had]), data[had])
            delta[had] = np.where(lengths == OVERFLOW, self.page + 1, lengths)
        for i, (page, raw) in enumerate(raws):
            compressed = 0 if zero[i] else len(self.zstd.compress(raw))
            self.cache[page] = data[i]
            self.rows.append((interval, page, int(zero[i]), compressed, int(delta[i])))
        while len(self.cache) > CACHE_PAGES:
            self.cache.popitem(last=False)

    def table(self) -> np.ndarray:
        return np.array(self.rows, SAMPLE_DTYPE) if self.rows else np.zeros(0, SAMPLE_DTYPE)
