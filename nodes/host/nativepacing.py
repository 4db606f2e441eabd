"""A paced process vCPU's batches run natively between rare Python wake-ups.

Why: a paced vCPU at 1000 pages/s wakes ~16 times a second (a batch per 64 pages), and each
Python wake-up after its 64 ms sleep costs ~300 us of CPU, the interpreter's code and data cold
after 127 other guests ran (19 us warm): 128 such guests took 21-28 % of this machine. Here
Python wakes once per plan (about a second of batches) instead: it asks the workload itself
for each batch at its planned time (`Workload.take_batch`, the same pages and increments a
punctual vCPU would write), and `nodes/host/native/pacedloop.c` (built by `make setup` into
`libmigbedpaced.so` beside it, loaded by ctypes, called with the GIL released) waits for each
batch on the control page's command word, writes its page counters, keeps the control
page's counters and the shared progress log as `nodes.host.guestvcpu` does, and returns only
when Python work is due: the plan is done, the command is no longer RUN (a pause lands at a
batch boundary), a throttle is set, or it woke a whole tick late.

The workload's state after each planned batch is kept (its generator's state and the
budget's few numbers), so a plan cut short leaves the workload exactly at the batches
written: the vCPU context published at a pause is theirs.

Memory: the loop's struct and its plan live in the library's static memory (one vCPU a
process), viewed by arrays made once in the zygote; a guest sets the struct up in one call
from the control page's and the mapping's addresses, and each plan is two calls and a
read of one array: a guest allocates nearly nothing for it. Each allocation a
forked guest makes, and each first use of a numpy helper, writes to pages it shares with
the zygote, which then become its own (measured: ~120 KiB a guest when it made its own).

Where it runs: a guest of one vCPU (its thread alone writes the counters and the log), a
paced workload of the patterns whose batches are counter bumps (`idle`, `uniform`,
`hotset`, `sequential`, `phased`; content writes, `scan`, programs and traces stay Python).
Without the library, or with `MIGBED_PACED_NATIVE=0`, every vCPU runs the Python loop.
"""

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from nodes.host.guestcontrol import (
    CONTEXT_BYTES,
    CONTROL_BYTES,
    LOG_ENTRIES,
    W_BATCHES,
    W_CPU_PERCENTAGE,
    W_LAST_BATCH_NS,
    W_PAGES_WRITTEN,
    W_PROGRESS_PAGES,
    W_RING_PAGES,
    W_VCPU_WRITES,
    W_WORKLOAD_SECONDS,
    ControlPage,
)
from nodes.host.sharedlog import LOG_WORDS
from workloads.content import COUNTER_BYTES
from workloads.patterns import (
    HotsetWorkload,
    IdleWorkload,
    PhasedWorkload,
    SequentialWorkload,
    UniformWorkload,
)
from workloads.progresslog import IDLE, THINNED
from workloads.workload import Workload

LIBRARY = Path(__file__).resolve().parent / "native" / "libmigbedpaced.so"
SWITCH_ENV = "MIGBED_PACED_NATIVE"          # "0": the Python loop (paired measurements)
PLAN_SECONDS = 1.0                          # a plan's span: one Python wake-up per second
NATIVE_WORKLOADS = (IdleWorkload, UniformWorkload, HotsetWorkload, SequentialWorkload,
                    PhasedWorkload)
_P = ctypes.c_void_p


class _Log(ctypes.Structure):
    _fields_ = [("seq", _P), ("stored", _P), ("flags", _P), ("latest_wall", _P),
                ("latest_pages", _P), ("walls", _P), ("pages", _P), ("marks", _P),
                ("entries", ctypes.c_int64), ("interval", ctypes.c_double),
                ("thinned", ctypes.c_uint8)]


class _VCPU(ctypes.Structure):
    """`struct paced_vcpu`'s head (the zygote reads its plan's buffers from it once)."""

    _fields_ = [(name, _P) for name in (
        "command", "cpu_percentage", "ring_pages", "pages_written", "progress_pages",
        "batches", "last_batch_ns", "vcpu_writes", "workload_seconds", "frames", "written")] + [
        ("page_size", ctypes.c_int64), ("tick", ctypes.c_double),
        ("idle_log_seconds", ctypes.c_double), ("idle_mark", ctypes.c_uint8), ("log", _Log)] + [
        (name, _P) for name in ("pages", "increments", "offsets", "deadlines", "running")] + [
        (name, ctypes.c_int64) for name in ("batches_planned", "owner_written",
                                            "owner_progress", "vcpu_written", "done",
                                            "reason")] + [
        ("last_batch", ctypes.c_double)]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The native loop, or None (not built, or switched off): the Python loop runs. Loaded
    once per process: the zygote loads it before it forks."""
    if os.environ.get(SWITCH_ENV, "1") == "0" or not LIBRARY.exists():
        return None
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        return None
    lib.migbed_paced_run.argtypes = [ctypes.c_int64] * 3
    lib.migbed_paced_run.restype = ctypes.c_int64
    lib.migbed_paced_setup.argtypes = [_P, ctypes.c_int64, ctypes.c_double, ctypes.c_uint8,
                                       ctypes.c_uint8, _P, _P, ctypes.c_int64, ctypes.c_double,
                                       ctypes.c_double, ctypes.c_int64]
    lib.migbed_paced_deadlines.argtypes = [ctypes.c_double, ctypes.c_double]
    lib.migbed_log_record.argtypes = [ctypes.POINTER(_Log), ctypes.c_double, ctypes.c_int64]
    lib.migbed_log_record_sleep.argtypes = [ctypes.POINTER(_Log), ctypes.c_double,
                                            ctypes.c_double, ctypes.c_int64, ctypes.c_uint8]
    lib.migbed_pcg64_save.argtypes = lib.migbed_pcg64_load.argtypes = [_P, _P]
    lib.migbed_paced_vcpu.restype = lib.migbed_paced_scratch.restype = _P
    lib.migbed_paced_out.restype = _P
    lib.migbed_paced_limits.restype = ctypes.c_int64
    lib.migbed_paced_limits.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    return lib


def native_log(log: _Log, ctl: ControlPage, record_interval_seconds: float) -> None:
    """Point `log` at the control page's progress log (its layout: `guestcontrol`)."""
    log.seq, log.stored, log.flags, log.latest_wall, log.latest_pages = (
        ctl.address + 8 * w for w in LOG_WORDS)
    at = ctl.address + CONTROL_BYTES + CONTEXT_BYTES
    log.walls, log.pages, log.marks = at, at + 8 * LOG_ENTRIES, at + 16 * LOG_ENTRIES
    log.entries, log.interval, log.thinned = LOG_ENTRIES, record_interval_seconds, THINNED


def runs_natively(lib: ctypes.CDLL, wl: Workload, vcpus: int, max_batch: int) -> bool:
    """Whether this vCPU's batches can be run by the native loop (see the module docstring)."""
    return (vcpus == 1 and type(wl) in NATIVE_WORKLOADS and not wl.unlimited
            and wl.spec.write_bytes <= COUNTER_BYTES and max_batch <= _memory(lib).max_batch
            and type(wl.rng.bit_generator) is np.random.PCG64 and _raw_state_works(lib))


class _Memory:
    """The library's static memory as arrays (see the module docstring), made once."""

    def __init__(self, lib: ctypes.CDLL):
        self.v = _VCPU.from_address(lib.migbed_paced_vcpu())
        limit = ctypes.c_int64()
        n = self.batches = lib.migbed_paced_limits(ctypes.byref(limit))
        self.max_batch = limit.value
        self.pages = _view(self.v.pages, np.int64, n * self.max_batch)
        self.increments = _view(self.v.increments, np.uint64, n * self.max_batch)
        self.offsets = _view(self.v.offsets, np.int64, n + 1)
        self.deadlines = _view(self.v.deadlines, np.float64, n)
        self.running = _view(self.v.running, np.float64, n)
        self.out = _view(lib.migbed_paced_out(), np.float64, 5)
        scratch = lib.migbed_paced_scratch()
        self.saved_f64 = _view(scratch, np.float64, 3 * (n + 1)).reshape(n + 1, 3)
        at = scratch + 8 * 3 * (n + 1)
        self.saved_i64 = _view(at, np.int64, 2 * (n + 1)).reshape(n + 1, 2)
        self.saved_rng = at + 8 * 2 * (n + 1)           # _STATE_BYTES a batch


def _view(address: int, dtype: type, count: int) -> np.ndarray:
    size = count * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * size).from_address(address), dtype)


@functools.cache
def _memory(lib: ctypes.CDLL) -> _Memory:
    return _Memory(lib)


_STATE_BYTES = 40                   # a PCG64 state as `migbed_pcg64_save` copies it
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def _address(a: np.ndarray) -> int:
    """An array's data address. Not `a.ctypes`: in a guest forked from the zygote, numpy's
    ctypes helper writes to ~30 KiB of the zygote's pages the first time (measured), which
    then become the guest's own."""
    return a.__array_interface__["data"][0]


def _bitgen(rng: np.random.Generator) -> int:
    """The generator's `bitgen_t` (its capsule's pointer; `bit_generator.ctypes` makes a
    dozen objects), whose first word points to its state."""
    return _capsule_pointer(rng.bit_generator.capsule, b"BitGenerator")


@functools.cache
def _raw_state_works(lib: ctypes.CDLL) -> bool:
    """Whether the library's copy of a PCG64 state round-trips (it reads numpy's struct)."""
    rng = np.random.Generator(np.random.PCG64(11))
    rng.integers(0, 7, 3)
    want, saved = rng.bit_generator.state, np.zeros(_STATE_BYTES, np.uint8)
    address = _bitgen(rng)
    lib.migbed_pcg64_save(address, _address(saved))
    rng.integers(0, 1000, 5)
    lib.migbed_pcg64_load(address, _address(saved))
    return rng.bit_generator.state == want


class NativePacer:
    """One vCPU's native loop: `run` plans and runs its batches until Python work is due."""

    def __init__(self, lib: ctypes.CDLL, ctl: ControlPage, frames: int, page_size: int,
                 written: int | None, wl: Workload, tick: float, max_batch: int,
                 idle_log_seconds: float, record_interval_seconds: float,
                 plan_batches: int | None = None):
        """`frames`: the address of the vCPU's first data page; `written`: of its byte per
        page, or None. The library's memory is this pacer's until another is made."""
        self.lib, self.wl, self.tick, self.max_batch = lib, wl, tick, max_batch
        mem = self.mem = _memory(lib)
        n = self.batches = plan_batches or max(1, min(mem.batches, round(PLAN_SECONDS / tick)))
        base, log = ctl.address, ctl.address + CONTROL_BYTES + CONTEXT_BYTES
        words = (0, W_CPU_PERCENTAGE, W_RING_PAGES, W_PAGES_WRITTEN, W_PROGRESS_PAGES,
                 W_BATCHES, W_LAST_BATCH_NS, W_VCPU_WRITES, W_WORKLOAD_SECONDS, *LOG_WORDS)
        at = (ctypes.c_int64 * 17)(*(base + 8 * w for w in words), log,
                                   log + 8 * LOG_ENTRIES, log + 16 * LOG_ENTRIES)
        lib.migbed_paced_setup(at, LOG_ENTRIES, record_interval_seconds, THINNED, IDLE, frames,
                               written, page_size, tick, idle_log_seconds, n)
        self.deadlines = mem.deadlines[:n]
        self._rng: np.random.Generator | None = None
        self._rng_address = 0

    def _save(self, k: int, state_address: int) -> None:
        wl = self.wl
        mem = self.mem
        self.lib.migbed_pcg64_save(state_address, mem.saved_rng + _STATE_BYTES * k)
        mem.saved_f64[k] = wl.budget_pages, wl.running_seconds, wl._clock_seconds
        mem.saved_i64[k] = wl.pages_written_total, wl.position

    def _state_address(self) -> int:
        """The workload's generator's `bitgen_t` (the generator is replaced when the vCPU is
        given a context: asked once per generator)."""
        rng = self.wl.rng
        if rng is not self._rng:
            self._rng, self._rng_address = rng, _bitgen(rng)
        return self._rng_address

    def restore(self, k: int) -> None:
        """The workload as it was after planned batch k (0: before the plan)."""
        wl, mem = self.wl, self.mem
        self.lib.migbed_pcg64_load(self._state_address(), mem.saved_rng + _STATE_BYTES * k)
        wl.budget_pages, wl.running_seconds, wl._clock_seconds = mem.saved_f64[k].tolist()
        wl.pages_written_total, wl.position = mem.saved_i64[k].tolist()

    def plan(self, wait: float) -> None:
        """The next batches, each asked of the workload at its deadline (the first `wait`
        after the workload's clock), into the library's plan; the workload's state after
        each is saved."""
        wl = self.wl
        address = self._state_address()
        self.lib.migbed_paced_deadlines(wl._clock_seconds, wait)
        self._save(0, address)
        mem = self.mem
        at, offsets, running, all_pages, all_increments = (
            0, mem.offsets, mem.running, mem.pages, mem.increments)
        offsets[0] = 0
        for k, t in enumerate(self.deadlines.tolist()):
            pages, increments = wl.take_batch(t, self.max_batch)    # <= max_batch pages
            end = at + len(pages)
            all_pages[at:end] = pages
            all_increments[at:end] = increments
            at = offsets[k + 1] = end
            running[k] = wl.running_seconds
            self._save(k + 1, address)

    def run(self, written: int, progress: int, wait: float
            ) -> tuple[int, int, float | None, float]:
        """Idle and write plan after plan, the first wait `wait`, until a pause, an exit, a
        throttle or a late wake-up: (the guest's page writes, its progress, when the last
        batch was written (monotonic seconds, None if none was), the next wait)."""
        last, run, out = None, self.lib.migbed_paced_run, self.mem.out
        while True:
            before = self.wl.pages_written_total            # the plan advances it
            self.plan(wait)
            run(written, progress, before)
            done, written, progress, ran, wait = out.tolist()
            done, written, progress = int(done), int(written), int(progress)
            if done:
                last = ran
            if done < self.batches:
                self.restore(done)
                return written, progress, last, wait
