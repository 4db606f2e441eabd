"""What a program's client felt, logged in the guest's own memory (`AppLog`): its completed
operations in 10 ms bins and its per-operation latencies in 100 ms windows.

Why in guest memory: the log then travels with the guest, so after a migration the
destination's copy holds the whole story (before, during on the source, the blackout, after on
the destination) on the guest's own clock, and nothing has to be asked of either host while
the migration runs (the asking would sit in the very gap it measures). It costs the guest what
a real application's statistics cost: a few words per batch, one page every few seconds.

Layout (uint64 words of the log's pages): word 0 the bins opened so far, word 1 the windows
opened, word 2 the last completion (wall ns); from word 8 a ring of `BINS` bins of 4 words
(bin index = wall ns // 10 ms, ops completed, first | last completion's ns into the bin packed
as two 32-bit halves, the longest gap inside the bin in ns), then a ring of `WINDOWS` windows
of 24 words (window index = wall ns // 100 ms, ops, sum of latencies ns, the longest latency
ns, then `BUCKETS` uint32 latency buckets, two per octave from 1 us). The reader
(`read_applog`) takes a copy of the words and never trusts a length it did not bound.
"""

import math

import numpy as np

BIN_NS = 10_000_000                 # the 10 ms bins
WINDOW_NS = 100_000_000             # latency windows of 100 ms
BINS = 4096                         # 41 s of bins
WINDOWS = 512                       # 51 s of windows
BUCKETS = 40                        # 1 us .. 1 s, two buckets per octave
_BIN_WORDS, _WIN_WORDS, _HEAD = 4, 24, 8
_BIN_AT = _HEAD
_WIN_AT = _BIN_AT + BINS * _BIN_WORDS
LOG_WORDS = _WIN_AT + WINDOWS * _WIN_WORDS


def applog_pages(page_size: int) -> int:
    """Pages the log takes in a program's memory."""
    return math.ceil(LOG_WORDS * 8 / page_size)


def latency_bucket(lat_ns: np.ndarray) -> np.ndarray:
    """The bucket of each latency: 0 below 1 us, then two per octave, the last open."""
    us = np.maximum(np.asarray(lat_ns, np.float64), 1.0) / 1000.0
    return np.clip(np.floor(2 * np.log2(np.maximum(us, 1.0))), 0, BUCKETS - 1).astype(np.int64)


def bucket_seconds(bucket: np.ndarray) -> np.ndarray:
    """A bucket's latency as one figure: its geometric middle, in seconds."""
    return 1e-6 * 2.0 ** ((np.asarray(bucket, np.float64) + 0.5) / 2)


class AppLog:
    """The writer, in the guest: `record` a batch's completions (see the module docstring)."""

    def __init__(self, words: np.ndarray):
        if len(words) < LOG_WORDS:
            raise ValueError(f"an application log needs {LOG_WORDS} words, got {len(words)}")
        self.w = words[:LOG_WORDS]
        self.bins = self.w[_BIN_AT:_WIN_AT].reshape(BINS, _BIN_WORDS)
        self.wins = self.w[_WIN_AT:].reshape(WINDOWS, _WIN_WORDS)
        self.hist = self.wins[:, 4:].view(np.uint32)

    def record(self, done_ns: np.ndarray, lat_ns: np.ndarray) -> None:
        """Operations completed at wall `done_ns` (ascending) after `lat_ns` each."""
        if not len(done_ns):
            return
        done_ns = np.asarray(done_ns, np.int64)
        self._bins(done_ns)
        self._windows(done_ns, np.asarray(lat_ns, np.int64))
        self.w[2] = int(done_ns[-1])

    def _slot(self, ring: np.ndarray, count_word: int, index: int) -> int:
        """The ring's row of `index`: the newest if it is that one, else a fresh row."""
        opened = int(self.w[count_word])
        if opened and int(ring[(opened - 1) % len(ring), 0]) == index:
            return (opened - 1) % len(ring)
        i = opened % len(ring)
        ring[i] = 0
        ring[i, 0] = index
        self.w[count_word] = opened + 1
        return i

    def _bins(self, done_ns: np.ndarray) -> None:
        idx = done_ns // BIN_NS
        last = int(self.w[2])
        for b in np.unique(idx).tolist():
            t = done_ns[idx == b]
            into = t - b * BIN_NS
            row = self.bins[self._slot(self.bins, 0, b)]
            gaps = np.diff(t)
            inner = int(gaps.max()) if len(gaps) else 0
            if int(row[1]):                      # the bin was open: from its last to ours
                inner = max(inner, int(t[0]) - last)
            else:
                row[2] = int(into[0])
            row[2] = (int(row[2]) & 0xFFFFFFFF) | (int(into[-1]) << 32)
            row[1] = int(row[1]) + len(t)
            row[3] = max(int(row[3]), inner)
            last = int(t[-1])

    def _windows(self, done_ns: np.ndarray, lat_ns: np.ndarray) -> None:
        idx = done_ns // WINDOW_NS
        buckets = latency_bucket(lat_ns)
        for wdx in np.unique(idx).tolist():
            sel = idx == wdx
            i = self._slot(self.wins, 1, wdx)
            slot = self.wins[i]
            slot[1] = int(slot[1]) + int(sel.sum())
            slot[2] = int(slot[2]) + int(lat_ns[sel].sum())
            slot[3] = max(int(slot[3]), int(lat_ns[sel].max()))
            self.hist[i] += np.bincount(buckets[sel], minlength=BUCKETS).astype(np.uint32)


def read_applog(words: np.ndarray) -> dict:
    """A copy of a log's contents, oldest first: `bins` (k, 5) int64 of (bin index, ops,
    first ns, last ns, longest inner gap ns) and `windows`: (k, 4) int64 of (window index,
    ops, latency sum ns, longest ns) with `hist` (k, BUCKETS) int64."""
    w = np.array(words[:LOG_WORDS], dtype=np.uint64)
    bins = w[_BIN_AT:_WIN_AT].reshape(BINS, _BIN_WORDS).astype(np.int64)
    wins = w[_WIN_AT:].reshape(WINDOWS, _WIN_WORDS)
    b_order = _ring_order(int(w[0]), BINS)
    w_order = _ring_order(int(w[1]), WINDOWS)
    b = bins[b_order]
    packed = b[:, 2].astype(np.uint64)
    out_bins = np.stack([b[:, 0], b[:, 1], (packed & np.uint64(0xFFFFFFFF)).astype(np.int64),
                         (packed >> np.uint64(32)).astype(np.int64), b[:, 3]], axis=1)
    win = wins[w_order]
    return {"bins": out_bins, "windows": win[:, :4].astype(np.int64),
            "hist": win[:, 4:].copy().view(np.uint32).astype(np.int64)}


def _ring_order(opened: int, size: int) -> np.ndarray:
    """The rows of a ring written `opened` times, oldest first (a count beyond any real
    one, from a torn copy, reads as full)."""
    n = min(max(opened, 0), size)
    return (max(opened, 0) - n + np.arange(n)) % size
