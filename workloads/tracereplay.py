"""The `trace` workload: a guest's vCPU writes the pages a recorded program wrote
(`workloads.tracefile`), at the recorded times scaled by `trace_speed`, looping if asked.

Why: a real program's writes (a database, a sort, an interpreter) cannot be migrated as a
process here, but how they dirty memory can be replayed into any guest, on any algorithm.

Pages: the trace's distinct pages, compacted in order (the program's k-th lowest page is the
guest's data page k), so the guest needs only as many data pages as the trace touched. A
guest of several process vCPUs gives each its slice of the data pages, as it splits every
workload; vCPU i replays the trace's pages in its slice (`first_page`), on the same clock,
so together they write, interval by interval, what one vCPU would.

Time: interval i of the trace is written once the workload's running time (which stops while
the guest is paused, as every workload's does) times the speed reaches the previous
interval's end, its start (the recording's scan at its end saw its pages written during it);
a batch is at most `max_batch` pages, or LATE_BATCH_PAGES once the interval being written has
ended (the replay is late: fewer, larger batches, each one's fixed cost, some 45 us of numpy
calls, spread over more pages), the rest of the interval follows in the next one.
The position (interval, page within it, loops done) is the workload's state: it travels in
the vCPU context and the destination continues where the source stopped.

Content, like the recording's (its samples' figures, `workloads.tracestats`): a share of the
pages (the zero fraction, chosen by a hash of the page) are written with zeros and stay zero;
the others hold random bytes in their first page/ratio bytes (so they compress by the
recorded ratio; `fill` puts them there before the guest runs), and each write bumps the
page's counter and rewrites, in place (one of a few places per page), a run of random bytes
as long as the recorded XBZRLE delta. So
the sum of a trace guest's counters is not its write count (its zero pages count writes but
hold no counter).
"""

from functools import cache

import numpy as np

from nodes.errors import ConfigError
from workloads.content import COUNTER_BYTES
from workloads.guest import Guest
from workloads.spec import WorkloadSpec
from workloads.state import FILL_STREAM, generator
from workloads.tracefile import Trace, decode
from workloads.tracestats import content_figures, sorted_unique
from workloads.workload import DEFAULT_MAX_BATCH_PAGES, Workload

_HASH = np.uint64(0x9E3779B97F4A7C15)
OFFSET_CLASSES = 8
# A late replay's batch (a process vCPU's is 256 pages, `max_batch`): measured on this
# machine with the kernel's write-protect log on, a page written in batches of 256 took
# 1.30-1.44 us, of 1024 1.08-1.22 us; a pause waits for at most one batch (~1.3 ms).
LATE_BATCH_PAGES = 1024


@cache
def _replay_plan(data: bytes) -> tuple[Trace, np.ndarray, np.ndarray, float, float, float]:
    """(trace, compacted pages, interval offsets, zero fraction, compression ratio, delta
    bytes), decoded once per process for each trace's bytes."""
    trace = decode(data, "the guest's trace")
    compacted = np.searchsorted(sorted_unique(trace.pages), trace.pages)
    c = content_figures(trace)
    delta = c.xbzrle_delta_bytes if c.xbzrle_samples else float(trace.page_size)
    return (trace, compacted.astype(np.int64), trace.offsets, c.zero_fraction,
            c.compression_ratio, delta)


def trace_data_pages(data: bytes) -> int:
    """The data pages a guest replaying this trace needs: its distinct pages."""
    return int(_replay_plan(data)[1].max()) + 1 if len(_replay_plan(data)[1]) else 1


def trace_memory_bytes(data: bytes, page_size: int = 4096,
                       round_bytes: int = 2 << 20) -> int:
    """A replaying guest's memory: its data pages (the trace's distinct pages, compacted),
    its page tables (a generous bound), rounded up to 2 MiB."""
    pages = trace_data_pages(data)
    total = (pages + pages // 256 + 16) * page_size
    return -(-total // round_bytes) * round_bytes


def _tally_sorted(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draws as (distinct pages, ascending; how often each was drawn), by one sort: not
    `np.unique`, whose first call imports numpy.ma (17 ms here, more in a guest process
    forked from its zygote: a stall of the replay's first intervals)."""
    draws = np.sort(draws)
    first = np.ones(len(draws), bool)
    first[1:] = draws[1:] != draws[:-1]
    at = np.flatnonzero(first)
    return draws[at], np.diff(np.append(at, len(draws))).astype(np.uint64)


def _share(compacted: np.ndarray, offsets: np.ndarray, first: int,
           count: int) -> tuple[np.ndarray, np.ndarray]:
    """One vCPU's share of a replay plan: per interval, the pages in [first, first + count),
    from 0 (pages, offsets)."""
    mine = (compacted >= first) & (compacted < first + count)
    interval = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    counts = np.bincount(interval[mine], minlength=len(offsets) - 1)
    return compacted[mine] - first, np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


class TraceWorkload(Workload):
    """Replays `spec.trace_bytes` (see the module docstring)."""

    pattern = "trace"

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096, first_page: int | None = None):
        (self.trace, compacted, offsets, zero_fraction, ratio,
         delta) = _replay_plan(spec.trace_bytes)
        # One vCPU of several: its own pages, the guest's data pages [first, first + its
        # count), as its pages from 0; each interval's share of them at the interval's time.
        self.first = first_page or 0
        if first_page is None:
            self.compacted, self.offsets = compacted, offsets
            need = trace_data_pages(spec.trace_bytes)
        else:
            self.compacted, self.offsets = _share(compacted, offsets, first_page, data_pages)
            need = int(self.compacted.max()) + 1 if len(self.compacted) else 0
        self.counts = np.diff(self.offsets)
        if data_pages < need:
            raise ConfigError(f"the trace touches {need} pages; the guest has {data_pages} "
                              "data pages: give more memory (or none: it is sized from the "
                              "trace)")
        self.interval = 0              # next interval to write
        self.within = 0                # pages of it written already
        self.loops = 0
        super().__init__(spec, data_pages, state, page_size)
        self.zero_fraction = zero_fraction
        self.prefix_bytes = int(np.clip(page_size / max(ratio, 1.0), COUNTER_BYTES + 8,
                                        page_size))
        self.delta_bytes = int(np.clip(delta, 1, self.prefix_bytes - COUNTER_BYTES))
        # Per data page, once: kept zero or not, and its run's place (both a hash of the
        # page), so a batch looks them up instead of hashing (`_touch`).
        pages = np.arange(data_pages, dtype=np.int64)
        self._zero = self._zero_pages(pages)
        self._class = (((pages + self.first).astype(np.uint64) * _HASH) >> np.uint64(61)) \
            .astype(np.int8) % OFFSET_CLASSES
        # Woken at least twice a recorded interval, so each is written on time.
        self.max_wait_seconds = self.trace.interval_seconds / spec.trace_speed / 2

    # -- which pages, when --------------------------------------------------------------
    def _end_seconds(self, i: int) -> float:
        t = self.trace
        return float(t.times_seconds[i]) + self.loops * max(t.duration_seconds,
                                                            t.interval_seconds)

    def _due_in(self, i: int, at: float) -> int:
        """How many of interval i's pages are due at trace time `at`: all of them once the
        previous interval has ended (the recording's scan at its end saw them written
        during it, not at its end)."""
        start = self._end_seconds(i - 1) if i else max(
            0.0, self._end_seconds(0) - self.trace.interval_seconds)
        return int(self.offsets[i + 1] - self.offsets[i]) if at >= start else 0

    def take_batch(self, now: float,
                   max_batch: int = DEFAULT_MAX_BATCH_PAGES) -> tuple[np.ndarray, np.ndarray]:
        self._due_pages(now, max_batch)               # advances the running clock only
        at = self.running_seconds * self.spec.trace_speed
        n = len(self.trace.counts)
        if self.interval < n and at >= self._end_seconds(self.interval):
            max_batch = max(max_batch, LATE_BATCH_PAGES)
        parts, taken = [], 0
        while taken < max_batch and n:
            if self.interval >= n:
                if not self.spec.trace_loop:
                    break
                self.interval, self.within, self.loops = 0, 0, self.loops + 1
            first = self.offsets[self.interval]
            lo = first + self.within
            hi = min(first + self._due_in(self.interval, at), lo + max_batch - taken)
            if hi > lo:
                parts.append(self.compacted[lo:hi])
                taken += hi - lo
                self.within += hi - lo
            if first + self.within < self.offsets[self.interval + 1]:
                break                                   # the rest of it is not due yet
            self.interval, self.within = self.interval + 1, 0
        if not taken:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        pages, increments = _tally_sorted(np.concatenate(parts))
        self._advance(taken)
        return pages, increments

    # -- content ------------------------------------------------------------------------
    def _zero_pages(self, pages: np.ndarray) -> np.ndarray:
        """Which of `pages` (data page indices) the recording's zero share keeps zero."""
        if self.zero_fraction <= 0:
            return np.zeros(len(pages), bool)
        h = ((pages + self.first).astype(np.uint64) * _HASH) >> np.uint64(40)
        return h.astype(np.float64) / float(1 << 24) < self.zero_fraction

    def _touch(self, domain: Guest, pfns: np.ndarray, increments: np.ndarray) -> None:
        rel = pfns - domain.pfn_base
        if self.zero_fraction > 0:
            zero = self._zero[rel]
            if zero.any():
                domain.write_words(pfns[zero], 0, np.zeros(int(zero.sum()), np.uint64))
                keep = ~zero
                pfns, increments, rel = pfns[keep], increments[keep], rel[keep]
        n = len(pfns)
        if not n:
            return
        old = domain.read_words(pfns, 0)
        domain.write_words(pfns, 0, old + increments)
        # Each page rewrites the same run at every write (as a program updating a record in
        # place), so the change a migration sees between rounds is one run, however many
        # writes fell between: the recorded XBZRLE delta. The run's place is one of
        # OFFSET_CLASSES, by a hash of the page. The batch's runs are fresh random bytes
        # drawn at once, as the generator's raw 64-bit words (`Generator.bytes` costs ~7 us a
        # call and ~2 ns a byte here, the raw words ~0.4 ns: most of a batch's time was it),
        # and the pages in class order, so each class's pages take one slice of them.
        d = self.delta_bytes
        raw = self.content_rng.bit_generator.random_raw(-(-n * d // 8))
        data = raw.view(np.uint8)[:n * d].reshape(n, d)
        classes = self._class[rel]
        order = np.argsort(classes, kind="stable")
        ends = np.cumsum(np.bincount(classes, minlength=OFFSET_CLASSES)).tolist()
        pfns = pfns[order]
        room = self.prefix_bytes - COUNTER_BYTES - d
        lo = 0
        for c, hi in enumerate(ends):
            if hi > lo:
                offset = COUNTER_BYTES + (room * c // (OFFSET_CLASSES - 1) if room > 0 else 0)
                domain.write_bytes(pfns[lo:hi], offset, data[lo:hi])
            lo = hi

    def fill(self, domain: Guest) -> None:
        """The trace's non-zero pages hold random bytes in their first page/ratio bytes."""
        rng = generator(self.spec.seed, FILL_STREAM)
        pages = np.arange(trace_data_pages(self.spec.trace_bytes), dtype=np.int64)
        pages = pages[~self._zero_pages(pages)]
        width = self.prefix_bytes - COUNTER_BYTES
        with domain.lock:
            for start in range(0, len(pages), 1024):
                part = pages[start:start + 1024] + domain.pfn_base
                data = np.frombuffer(rng.bytes(len(part) * width), np.uint8)
                domain.write_bytes(part, COUNTER_BYTES, data.reshape(len(part), width))

    # -- state ---------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {**super().get_state(), "trace_interval": int(self.interval),
                "trace_within": int(self.within), "trace_loops": int(self.loops)}

    def _load_state(self, state: dict) -> None:
        super()._load_state(state)
        n = len(self.trace.counts)
        i, w = int(state.get("trace_interval", 0)), int(state.get("trace_within", 0))
        if not (0 <= i <= n and 0 <= w <= (int(self.counts[i]) if i < n else 0)):
            raise ConfigError(f"trace workload state: position {i}/{w} is outside the trace")
        self.interval, self.within = i, w
        self.loops = max(0, int(state.get("trace_loops", 0)))

    def describe(self) -> dict:
        return {**super().describe(), "trace_interval": self.interval,
                "trace_loops": self.loops}

