"""Memory-dirtying patterns: what a guest's vCPU writes, and when.

Why this exists: a live migration is only as interesting as the memory the guest dirties while
it runs. The patterns here mirror the classic test loads: qtest's migration-test guest (bump a
counter in every page, in order: `sequential`), guestperf's stress program and mig_mon's random
mode (`uniform`), Clark et al.'s writable working set (`hotset`), and bursty loads that test a
policy's convergence (`phased`). `idle` writes nothing, but its vCPU still ticks; `scan` reads
every page in order and writes none, as a guest streaming through a cache does (what
post-copy's faults cost a reader).

Every page write is a real store through the guest's access path (`Guest.read_words` /
`Guest.write_words`, see `workloads.guest`), so it goes through the guest's mode: invisible to the hypervisor in P2M
mode, logged as dirty in VP mode with log-dirty on. Each write increments the 64-bit counter in
word 0 of its page, so after a migration the sum of the counters must equal the number of page
writes the workload made: no write lost, none duplicated.

A workload is deterministic: its page choice comes from a PCG64 generator seeded from the spec,
and its whole state (position, generator, budget carry, phase clock, totals) travels in a
migration record as plain msgpack-able values (`get_state`), so the copy resumed on the
destination writes exactly the pages the original would have written next.

Time is whatever the caller passes as `now` (monotonic seconds), so tests drive a synthetic
clock. The rate budget accrues only between calls while the guest runs: after a pause (or a
migration's downtime) `resume(now)` restarts the clock, so a paused guest never bursts to catch
up on time it did not run.
"""

import math

import numpy as np

from workloads.guest import Guest
from workloads.kvstore import KVStore
from workloads.matmul import MatMul
from workloads.sortjob import Sort
from workloads.spec import WORKLOADS, WorkloadSpec
from workloads.tracereplay import TraceWorkload
from workloads.triad import Stream
from workloads.workload import Workload


class IdleWorkload(Workload):
    """Writes nothing; its vCPU still ticks, so an idle guest shows progress."""

    pattern = "idle"

    def _select(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)


class UniformWorkload(Workload):
    """Random pages over all data pages (guestperf's stress / mig_mon's random mode)."""

    pattern = "uniform"

    def _select(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self._tally(self.rng.integers(0, self.data_pages, n, dtype=np.int64),
                           self.data_pages)


class HotsetWorkload(Workload):
    """A writable working set: the first ceil(hot_fraction x pages) pages get hot_share of
    the writes, the rest go uniformly over the cold pages (Clark et al.'s WWS)."""

    pattern = "hotset"

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        super().__init__(spec, data_pages, state, page_size)
        self.hot_pages = hot_pages(spec, self.data_pages)
        self.cold_pages = self.data_pages - self.hot_pages

    def _select(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cold_pages == 0:
            return self._tally(self.rng.integers(0, self.hot_pages, n, dtype=np.int64),
                               self.hot_pages)
        n_hot = int(self.rng.binomial(n, self.spec.hot_share))
        draws = np.empty(n, dtype=np.int64)
        draws[:n_hot] = self.rng.integers(0, self.hot_pages, n_hot, dtype=np.int64)
        draws[n_hot:] = self.rng.integers(self.hot_pages, self.data_pages, n - n_hot,
                                          dtype=np.int64)
        return self._tally(draws, self.data_pages)


class SequentialWorkload(Workload):
    """qtest's migration-test guest: sweep pages 0..N-1 in order, wrapping, bumping each
    page's counter. At any moment the counters are all equal except one edge: the pages
    before the position are one higher."""

    pattern = "sequential"

    def _select(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        d, p = self.data_pages, self.position
        self.position = (p + n) % d
        if n <= d - p:                          # no wrap
            return np.arange(p, p + n, dtype=np.int64), np.ones(n, dtype=np.uint64)
        if n <= d:                              # one wrap: two runs, still distinct pages
            pages = np.concatenate((np.arange(p, d, dtype=np.int64),
                                    np.arange(0, n - (d - p), dtype=np.int64)))
            return pages, np.ones(n, dtype=np.uint64)
        # More than one sweep in a batch: every page once per full sweep, plus the remainder
        # from the position on; still one store per page.
        sweeps, rest = divmod(n, d)
        increments = np.full(d, sweeps, dtype=np.uint64)
        extra = (p + np.arange(rest, dtype=np.int64)) % d
        increments[extra] += np.uint64(1)
        return np.arange(d, dtype=np.int64), increments


class PhasedWorkload(UniformWorkload):
    """Bursty: busy_seconds at the rate, then quiet_seconds at rate x quiet_rate_fraction,
    repeating; uniform pages. The phase clock counts running time only (not pauses)."""

    pattern = "phased"

    @property
    def period_seconds(self) -> float:
        return self.spec.busy_seconds + self.spec.quiet_seconds

    def _busy_time_until(self, t_seconds: float) -> float:
        """Busy running time in [0, t]."""
        if self.spec.quiet_seconds == 0:
            return t_seconds
        cycles, into = divmod(t_seconds, self.period_seconds)
        return cycles * self.spec.busy_seconds + min(into, self.spec.busy_seconds)

    def in_busy_phase(self) -> bool:
        if self.spec.quiet_seconds == 0:
            return True
        return math.fmod(self.running_seconds, self.period_seconds) < self.spec.busy_seconds

    def _accrued_pages(self, t0_seconds: float, t1_seconds: float) -> float:
        busy = self._busy_time_until(t1_seconds) - self._busy_time_until(t0_seconds)
        busy = min(max(busy, 0.0), t1_seconds - t0_seconds)
        quiet = (t1_seconds - t0_seconds) - busy
        rate = self.rate_pages_per_second
        return rate * busy + rate * self.spec.quiet_rate_fraction * quiet

    def _unlimited_share(self) -> float:
        # Unlimited: a full batch per call while busy, that fraction of one while quiet.
        return 1.0 if self.in_busy_phase() else self.spec.quiet_rate_fraction


class ScanWorkload(SequentialWorkload):
    """Reads pages 0..N-1 in order, wrapping, and writes none: a guest streaming through a
    cache. Its rate is page reads per second; its memory (and so its counters) never change,
    so a migration of it must leave every counter as it was."""

    pattern = "scan"

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        self.pages_read_total = 0
        super().__init__(spec, data_pages, state, page_size)

    @property
    def progress_pages(self) -> int:
        return self.pages_read_total

    def _advance(self, n: int) -> None:
        self.pages_read_total += n

    def _touch(self, domain: Guest, pfns: np.ndarray, increments: np.ndarray) -> None:
        domain.read_words(pfns, 0)          # reads only: its counters never change

    def get_state(self) -> dict:
        return {**super().get_state(), "pages_read_total": int(self.pages_read_total)}

    def _load_state(self, state: dict) -> None:
        super()._load_state(state)
        self.pages_read_total = int(state.get("pages_read_total", 0))

    def describe(self) -> dict:
        return {**super().describe(), "pages_read_total": self.pages_read_total}


WORKLOAD_CLASSES: dict[str, type[Workload]] = {
    cls.pattern: cls for cls in (IdleWorkload, UniformWorkload, HotsetWorkload,
                                 SequentialWorkload, PhasedWorkload, ScanWorkload,
                                 KVStore, Stream, Sort, MatMul,
                                 TraceWorkload)
}
assert set(WORKLOAD_CLASSES) == set(WORKLOADS)


def hot_pages(spec: WorkloadSpec, data_pages: int) -> int:
    """Size of a hotset's hot set: ceil(hot_fraction x data_pages), at least 1 page."""
    # The small epsilon keeps 0.07 x 100 = 7.000000000000001 from becoming 8 pages.
    return min(data_pages, max(1, math.ceil(spec.hot_fraction * data_pages - 1e-9)))


def make_workload(spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                  page_size: int = 4096, first_page: int | None = None) -> Workload:
    """The workload `spec` describes over `data_pages` pages of `page_size` bytes, fresh or
    restored from `state`. `first_page`: these are one vCPU's pages of a guest of several,
    from the guest's data page `first_page`; a trace replays its own share of the trace's
    pages (every other workload is split by its spec, `nodes.host.guestvcpu.vcpu_spec`)."""
    if first_page is not None and spec.pattern == TraceWorkload.pattern:
        return TraceWorkload(spec, data_pages, state, page_size, first_page=first_page)
    return WORKLOAD_CLASSES[spec.pattern](spec, data_pages, state, page_size)
