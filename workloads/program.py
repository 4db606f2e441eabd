"""Workloads that are programs (`Program`): a key-value store, STREAM, a sort, a matrix
product, each computing on the guest's memory, so its dirtying emerges from what it computes
instead of from a set rate (issue 23).

Why programs: a pattern answers "will this converge?" by assumption (its dirty rate is an
input); a program's dirty rate, writable working set and content (what zero pages, XBZRLE and
compression meet) come from its data structures, as the papers' SPECweb, Quake and memcached
did. They run on process vCPUs, where the kernel's dirty log sees every store numpy makes over
the guest's mapping (`nodes.host.guestmain.MappedGuest.frames`); a thread vCPU's guest has no
such mapping, so a guest spec refuses them there (`nodes.host.specs.GuestSpec`).

Everything a program is lives in the guest's memory, laid out per vCPU slice:
page 0 the journal (its phase, cursors and completed operations, `J_*` words), then its
application log (`workloads.applog`: ops in 10 ms bins, latencies in 100 ms windows), then its
data. Every operation is short (<= 1 ms: a request, a chunk of a triad, a run or a chunk of a
merge, a block of a product) and a batch runs operations for at most `BATCH_SECONDS`; the
journal is written as each batch ends, and a pause parks the vCPU only between batches, so the
memory a migration copies always names the last completed operation and the program resumes
there on the destination (its client's generator, the only state beside memory, crosses in the
vCPU context as every workload's does).

Latency is an operation's service time (its start to its completion on the vCPU): a post-copy
fault or a write-protect fault inside it lengthens it; a pause or a throttle sleep between
operations does not, and shows as fewer operations in a bin instead (brownout, blackout:
`workloads.brownout`).
"""

import time

import numpy as np

from nodes.errors import ConfigError, GuestPaused
from workloads.applog import AppLog, applog_pages, read_applog
from workloads.guest import Guest
from workloads.spec import WorkloadSpec
from workloads.workload import Workload

MAGIC = 0x6D6967626564_5047          # "migbed" "PG": the journal page is a program's
J_MAGIC, J_PROGRAM, J_LOADED, J_OPS, J_STORES = range(5)
J_CURSOR = 8                         # words 8.. are the program's own cursors
BATCH_SECONDS = 0.001                # a batch of operations: at most this long
MIN_DATA_PAGES = 4


class Program(Workload):
    """Base of the programs (module docstring): the layout, the batch loop, the journal, the
    application log. A subclass says how to `_load` (in steps), what one `_op` is and how
    to `check` its invariants."""

    code = 0                          # the program's id in its journal

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        self.ops_total = 0
        super().__init__(spec, data_pages, state, page_size)
        self.log_pages = applog_pages(page_size)
        self.data_at = 1 + self.log_pages
        if data_pages < self.data_at + MIN_DATA_PAGES:
            raise ConfigError(f"a {spec.pattern} guest needs at least "
                              f"{self.data_at + MIN_DATA_PAGES} data pages per vCPU "
                              f"({page_size} B each), it has {data_pages}")
        self._bound: tuple | None = None

    # -- the rate: operations, not pages ------------------------------------------------------
    @property
    def rate_pages_per_second(self) -> float:
        return self.spec.ops_per_second

    @property
    def progress_pages(self) -> int:
        """A program's progress is its completed client operations."""
        return self.ops_total

    # -- the memory ---------------------------------------------------------------------------
    def bind(self, frames: np.ndarray) -> None:
        """Views of this slice's pages (`frames`: data pages x page size, uint8): the
        journal, the log and the data; a subclass adds its structures (`_layout`)."""
        if frames.shape[0] < self.data_pages:
            raise ConfigError(f"{self.pattern}: a slice of {frames.shape[0]} pages, the "
                              f"program needs {self.data_pages}")
        frames = frames[:self.data_pages]
        self.frames = frames
        self.journal = frames[0].view(np.uint64)
        self.applog = AppLog(frames[1:self.data_at].reshape(-1).view(np.uint64))
        self.data = frames[self.data_at:].reshape(-1)
        self._layout(self.data)
        self._bound = _where(frames)

    def _layout(self, data: np.ndarray) -> None:
        raise NotImplementedError

    @property
    def cursor(self) -> np.ndarray:
        return self.journal[J_CURSOR:]

    # -- running ----------------------------------------------------------------------------
    def write(self, domain: Guest, now: float, max_batch: int = 4096) -> int:
        """Run the operations due at `now` (at most `BATCH_SECONDS` of them) on `domain`'s
        mapped pages; the number of operations (load steps count as one)."""
        frames = getattr(domain, "frames", None)
        if frames is None:
            raise ConfigError(f"{self.pattern} is a program: it runs on process vCPUs "
                              f"(--vcpu process), whose guest maps its memory")
        with domain.lock:
            if not domain.is_running:
                self._clock_seconds = None
                raise GuestPaused(f"{domain.name} is not running")
            if self._bound != _where(frames):
                self.bind(frames)
            if int(self.journal[J_MAGIC]) != MAGIC:
                self._start()
            if not int(self.journal[J_LOADED]):
                return self._load_batch(now)
            return self._op_batch(now, max_batch)

    def _start(self) -> None:
        self.journal[:] = 0
        self.journal[J_PROGRAM] = self.code
        self.journal[J_MAGIC] = MAGIC

    def _load_batch(self, now: float) -> int:
        self._due_pages(now, 0)              # the clock runs; a load earns no op budget
        end = time.perf_counter() + BATCH_SECONDS
        steps = 0
        while time.perf_counter() < end:
            steps += 1
            self.pages_written_total += self._load()
            if int(self.journal[J_LOADED]):
                break
        return steps

    def _op_batch(self, now: float, max_batch: int) -> int:
        due = self._due_pages(now, max(1, max_batch))
        if due == 0:
            return 0
        self._prepare(due)
        done = np.empty(due, np.int64)
        lat = np.empty(due, np.int64)
        stores, n = 0, 0
        end = time.perf_counter_ns() + int(BATCH_SECONDS * 1e9)
        while n < due:
            t0 = time.perf_counter_ns()
            stores += self._op()
            t1 = time.perf_counter_ns()
            done[n], lat[n] = time.time_ns(), t1 - t0
            n += 1
            if t1 >= end:
                break
        self.budget_pages += due - n          # what did not fit stays due
        self.applog.record(done[:n], lat[:n])
        self.ops_total += n
        self.pages_written_total += stores
        self.journal[J_OPS] = self.ops_total
        self.journal[J_STORES] = self.pages_written_total
        return n

    def _load(self) -> int:
        """One step of building the program's data (<= 1 ms); pages it stored to. Sets
        `journal[J_LOADED]` when the data is whole."""
        raise NotImplementedError

    def _prepare(self, n: int) -> None:
        """Before a batch of up to `n` operations (a client draws its requests here)."""

    def _op(self) -> int:
        """One client operation; the pages it stored to."""
        raise NotImplementedError

    # -- the state ----------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {**super().get_state(), "ops_total": int(self.ops_total)}

    def _load_state(self, state: dict) -> None:
        super()._load_state(state)
        self.ops_total = int(state.get("ops_total", 0))

    def describe(self) -> dict:
        return {**super().describe(), "ops_total": self.ops_total}

    # -- reading it from outside (a copy of its pages) -------------------------------------------
    def check(self) -> dict:
        """The program's own invariants over its bound memory: {"ok", "checked", "detail"}
        (subclasses; a copy of the pages, not the running guest's)."""
        raise NotImplementedError

    def read_log(self) -> dict:
        return read_applog(self.applog.w)

    @property
    def loaded(self) -> bool:
        return (self._bound is not None and int(self.journal[J_MAGIC]) == MAGIC
                and bool(int(self.journal[J_LOADED])))


def _where(frames: np.ndarray) -> tuple:
    """Which memory a frames array is (its address and shape): views are bound once."""
    return frames.__array_interface__["data"][0], frames.shape


_M64 = (1 << 64) - 1


def mix(x: int) -> int:
    """`splitmix` of one integer, in Python's own (a numpy scalar would warn as it wraps)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 of each uint64: the programs' content, a function of what it stands for
    (a key and its version, an index and its generation), so a check can recompute it."""
    z = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
