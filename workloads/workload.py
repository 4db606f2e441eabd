"""The base of every workload (`Workload`): the rate budget, the phase clock, the state that
travels in a migration record, and the one write path through the guest's access path. The
patterns that choose pages are in `workloads.patterns`; the module docstring there says why
they exist and what a write is.
"""

import math
from typing import ClassVar

import numpy as np

from nodes.errors import ConfigError, GuestPaused
from workloads.content import COUNTER_BYTES, content, fill
from workloads.guest import Guest
from workloads.spec import WorkloadSpec
from workloads.state import (
    CONTENT_STREAM,
    FILL_STREAM,
    STATE_FORMAT,
    generator,
    generator_from_text,
    generator_text,
)

DEFAULT_MAX_BATCH_PAGES = 4096
TALLY_BINCOUNT_PAGES = 1 << 13     # `_tally` counts draws below this in an array of counts (64 KiB)


class Workload:
    """Base class: the rate budget, the phase clock, the state and the write path.

    Subclasses choose pages (`_select`); the base decides how many are due (`_due_pages`) and
    stores them (`write`). One batch is a set of distinct page indices with per-page
    increments, so a page drawn twice in one batch is stored once with +2, never twice.
    """

    pattern: ClassVar[str] = ""

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        if spec.pattern != self.pattern:
            raise ConfigError(f"{type(self).__name__} runs {self.pattern!r}, spec asks for "
                              f"{spec.pattern!r}; use make_workload")
        if not isinstance(data_pages, int | np.integer) or data_pages < 0:
            raise ConfigError(f"data_pages must be a non-negative integer, got {data_pages!r}")
        data_pages = int(data_pages)
        if data_pages == 0 and spec.pattern != "idle":
            raise ConfigError(f"a {spec.pattern} workload needs at least one data page")
        if spec.write_bytes > page_size:
            raise ConfigError(f"write bytes {spec.write_bytes} exceed the page size "
                              f"({page_size} B); give at most {page_size}")
        self.spec = spec
        self.data_pages = data_pages
        self.page_size = page_size
        self.rng = np.random.Generator(np.random.PCG64(spec.seed))
        # What the writes put beside the counter, from a generator of its own: the pages a
        # workload picks do not depend on how many bytes it writes.
        self.content_rng = generator(spec.seed, CONTENT_STREAM)
        self.pages_written_total = 0
        self.budget_pages = 0.0        # fractional (and bounded backlog) carry of the rate budget
        self.running_seconds = 0.0     # phase clock: running time seen by write() since start
        self.position = 0              # next page of a sequential sweep
        self._clock_seconds: float | None = None  # `now` of the last call; None: not started
        if state is not None:
            self._load_state(state)

    # The longest a vCPU may wait for its next batch when none is due (None: as its pacing
    # says, up to 100 ms): a trace replay's next interval must not be waited past.
    max_wait_seconds: float | None = None

    # -- rate ----------------------------------------------------------------------------
    @property
    def rate_pages_per_second(self) -> float:
        return self.spec.rate_pages_per_second

    @property
    def progress_pages(self) -> int:
        """The pages the workload has gone through: its writes (`scan`: its reads). The
        vCPU logs this as the guest's progress."""
        return self.pages_written_total

    @property
    def unlimited(self) -> bool:
        return self.spec.unlimited

    def _accrued_pages(self, t0_seconds: float, t1_seconds: float) -> float:
        """Page budget accrued over running time [t0, t1] (phased overrides)."""
        return self.rate_pages_per_second * (t1_seconds - t0_seconds)

    def _unlimited_share(self) -> float:
        """Fraction of a full batch an unlimited workload writes now (phased overrides)."""
        return 1.0

    def resume(self, now: float) -> None:
        """Restart the clock at `now`: time since the last call (a pause) earns no budget.

        Only the fractional part of the budget survives, so no backlog is written in a burst.
        """
        self._clock_seconds = float(now)
        self.budget_pages = math.fmod(self.budget_pages, 1.0)

    def _due_pages(self, now: float, max_batch: int) -> int:
        """Advance the clock to `now` and return how many page writes are due (<= max_batch)."""
        now = float(now)
        if self._clock_seconds is None:
            self.resume(now)
        elapsed_seconds = max(0.0, now - self._clock_seconds)
        self._clock_seconds = max(now, self._clock_seconds)
        t0 = self.running_seconds
        self.running_seconds = t0 + elapsed_seconds
        if self.spec.pattern == "idle" or max_batch <= 0:
            return 0
        if self.unlimited:
            share = self._unlimited_share()
            if share >= 1.0:
                return max_batch
            self.budget_pages += max_batch * share
        else:
            self.budget_pages += self._accrued_pages(t0, self.running_seconds)
        n = min(int(self.budget_pages), max_batch)
        self.budget_pages -= n
        # A vCPU that falls behind (a slow batch, a busy GIL) may catch up by at most one batch.
        self.budget_pages = min(self.budget_pages, float(max_batch))
        return n

    # -- page choice ---------------------------------------------------------------------
    def _select(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` page writes as (distinct page indices int64, increments uint64 summing to n)."""
        raise NotImplementedError

    @staticmethod
    def _tally(draws: np.ndarray, bound: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Draws as (distinct pages, ascending; how often each was drawn). `bound` (draws
        all below it, or 0: unknown): up to TALLY_BINCOUNT_PAGES it is counted in one pass,
        three numpy calls where `np.unique` makes a dozen (a process vCPU's batch is mostly
        such calls: measured ~15 us of its ~35 us warm), the same result."""
        if 0 < bound <= TALLY_BINCOUNT_PAGES:
            counts = np.bincount(draws)
            pages = counts.nonzero()[0]
            return pages.astype(np.int64, copy=False), counts[pages].astype(np.uint64)
        pages, counts = np.unique(draws, return_counts=True)
        return pages.astype(np.int64, copy=False), counts.astype(np.uint64)

    def take_batch(self, now: float,
                   max_batch: int = DEFAULT_MAX_BATCH_PAGES) -> tuple[np.ndarray, np.ndarray]:
        """The batch due at `now`, advancing the workload as if it had been written.

        Returns (distinct data-page indices, per-page increments). `write` uses this; tests
        use it to compare two workloads without a guest.
        """
        n = self._due_pages(now, max_batch)
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        pages, increments = self._select(n)
        self._advance(n)
        return pages, increments

    def _advance(self, n: int) -> None:
        """`n` more page accesses made (writes; a reader counts reads)."""
        self.pages_written_total += n

    # -- the write path ------------------------------------------------------------------
    def write(self, domain: Guest, now: float, max_batch: int = DEFAULT_MAX_BATCH_PAGES) -> int:
        """Write the pages due at `now` into `domain`; return the number of page writes
        (a reader, `scan`: the pages it read).

        The caller holds `domain.lock`, so choosing pages and storing them is atomic against a
        pause or a mode switch. A paused guest raises GuestPaused before anything advances, and
        the clock restarts on the next call (no catch-up burst even without `resume`).
        """
        with domain.lock:
            if not domain.is_running:
                self._clock_seconds = None
                raise GuestPaused(f"{domain.name} is not running")
            if domain.data_pages < self.data_pages:
                raise ConfigError(f"{domain.name} has {domain.data_pages} data pages, the "
                                  f"workload writes {self.data_pages}")
            pages, increments = self.take_batch(now, max_batch)
            if len(pages) == 0:
                return 0
            self._touch(domain, pages + domain.pfn_base if domain.pfn_base else pages,
                        increments)
            return int(increments.sum())

    def _touch(self, domain: Guest, pfns: np.ndarray, increments: np.ndarray) -> None:
        """Bump each page's counter by its increment (and, with write_bytes, fresh content
        after it); the caller holds `domain.lock`."""
        old = domain.read_words(pfns, 0)
        if self.spec.write_bytes <= COUNTER_BYTES:
            domain.write_words(pfns, 0, old + increments)
            return
        data = np.empty((len(pfns), self.spec.write_bytes), np.uint8)
        data[:, :COUNTER_BYTES] = (old + increments).astype("<u8")[:, None].view(np.uint8)
        data[:, COUNTER_BYTES:] = content(self.spec.fill, self.content_rng, len(pfns),
                                          self.spec.write_bytes - COUNTER_BYTES)
        domain.write_bytes(pfns, 0, data)

    def fill(self, domain: Guest) -> None:
        """What the guest's data pages hold before the workload starts (`spec.fill`, see
        `workloads.content.fill`); word 0 stays 0, so the lost-write check still holds."""
        fill(domain, self.spec.fill, generator(self.spec.seed, FILL_STREAM),
             self.data_pages, self.page_size)

    # -- state ---------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Everything needed to continue elsewhere, as msgpack-able str/int/float values.

        The monotonic clock is not included (it means nothing on another host): the restored
        workload starts its clock on its first `resume`/`write`.
        """
        return {
            "format": STATE_FORMAT,
            "pattern": self.pattern,
            "data_pages": self.data_pages,
            "seed": self.spec.seed,
            "rng": generator_text(self.rng),
            "content_rng": generator_text(self.content_rng),
            "pages_written_total": int(self.pages_written_total),
            "budget_pages": float(self.budget_pages),
            "running_seconds": float(self.running_seconds),
            "position": int(self.position),
        }

    def restore(self, state: dict) -> None:
        """Continue from `state` (`get_state` of a workload of the same spec elsewhere): a
        vCPU made before its context arrived takes it this way."""
        self._load_state(state)
        self._clock_seconds = None

    def _load_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ConfigError(f"workload state must be a dict, got {type(state).__name__}")
        need = ("format", "pattern", "data_pages", "rng", "pages_written_total",
                "budget_pages", "running_seconds", "position")
        missing = [k for k in need if k not in state]
        if missing:
            raise ConfigError(f"workload state lacks {', '.join(missing)}")
        if state["format"] != STATE_FORMAT:
            raise ConfigError(f"workload state format {state['format']!r} is not supported "
                              f"(this build reads {STATE_FORMAT})")
        if state["pattern"] != self.pattern:
            raise ConfigError(f"workload state is for {state['pattern']!r}, not {self.pattern!r}")
        if state["data_pages"] != self.data_pages:
            raise ConfigError(f"workload state is for {state['data_pages']} data pages, the "
                              f"guest has {self.data_pages}")
        self.rng = generator_from_text(state["rng"], "generator")
        if "content_rng" in state:
            self.content_rng = generator_from_text(state["content_rng"], "content generator")
        self.pages_written_total = int(state["pages_written_total"])
        self.budget_pages = float(state["budget_pages"])
        self.running_seconds = float(state["running_seconds"])
        position = int(state["position"])
        if not 0 <= position < max(self.data_pages, 1):
            raise ConfigError(f"workload state position {position} is outside 0.."
                              f"{self.data_pages - 1}")
        self.position = position

    def describe(self) -> dict:
        return {"pattern": self.pattern, "data_pages": self.data_pages,
                "rate_pages_per_second": self.rate_pages_per_second,
                "pages_written_total": self.pages_written_total,
                "running_seconds": self.running_seconds}
