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
        """Sample some of `written` (region page indices) of this interval."""
        if not len(written):
            return
        known = np.array([p for p in written[:4096].tolist() if p in self.cache], np.int64)
        half = self.per_interval // 2
        again = self.rng.choice(known, min(half, len(known)), replace=False) if len(known) \
            else np.zeros(0, np.int64)
        fresh = self.rng.choice(written, min(self.per_interval - len(again), len(written)),
                                replace=False)
        for page in np.unique(np.concatenate((again, fresh))).tolist():
            self._one(interval, int(page))

    def _one(self, interval: int, page: int) -> None:
        try:
            raw = os.pread(self.fd, self.page, self.base + page * self.page)
        except OSError:
            return                              # gone (freed, or the program exited)
        if len(raw) != self.page:
            return
        data = np.frombuffer(raw, np.uint8)
        zero = not data.any()
        compressed = 0 if zero else len(self.zstd.compress(raw))
        delta = -1
        old = self.cache.pop(page, None)
        if old is not None:
            lengths, _ = xbzrle_encode(old[None, :], data[None, :])
            delta = self.page + 1 if lengths[0] == OVERFLOW else int(lengths[0])
        self.cache[page] = data
        while len(self.cache) > CACHE_PAGES:
            self.cache.popitem(last=False)
        self.rows.append((interval, page, int(zero), compressed, delta))

    def table(self) -> np.ndarray:
        return np.array(self.rows, SAMPLE_DTYPE) if self.rows else np.zeros(0, SAMPLE_DTYPE)
