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
MAX_PLAN_BATCHES = 64
NATIVE_WORKLOADS = (IdleWorkload, UniformWorkload, HotsetWorkload, SequentialWorkload,
                    PhasedWorkload)
_P = ctypes.c_void_p


class _Log(ctypes.Structure):
    _fields_ = [("seq", _P), ("stored", _P), ("flags", _P), ("latest_wall", _P),
                ("latest_pages", _P), ("walls", _P), ("pages", _P), ("marks", _P),
                ("entries", ctypes.c_int64), ("interval", ctypes.c_double),
                ("thinned", ctypes.c_uint8)]


class _VCPU(ctypes.Structure):
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
    lib.migbed_paced_run.argtypes = [ctypes.POINTER(_VCPU)]
    lib.migbed_paced_run.restype = ctypes.c_int64
    lib.migbed_log_record.argtypes = [ctypes.POINTER(_Log), ctypes.c_double, ctypes.c_int64]
    lib.migbed_log_record_sleep.argtypes = [ctypes.POINTER(_Log), ctypes.c_double,
                                            ctypes.c_double, ctypes.c_int64, ctypes.c_uint8]
    return lib


def native_log(ctl: ControlPage, record_interval_seconds: float) -> _Log:
    """The control page's progress log as the native writer sees it."""
    words = np.frombuffer(ctl.u64, np.uint64).ctypes.data
    seq, stored, flags, wall, pages = (words + 8 * w for w in LOG_WORDS)
    return _Log(seq, stored, flags, wall, pages, ctl.log_walls.ctypes.data,
                ctl.log_pages.ctypes.data, ctl.log_slept.ctypes.data, len(ctl.log_walls),
                record_interval_seconds, THINNED)


def runs_natively(wl: Workload, vcpus: int) -> bool:
    """Whether this vCPU's batches can be run by the native loop (see the module docstring)."""
    return (vcpus == 1 and type(wl) in NATIVE_WORKLOADS and not wl.unlimited
            and wl.spec.write_bytes <= COUNTER_BYTES)


def _snapshot(wl: Workload) -> tuple:
    return (wl.rng.bit_generator.state, wl.pages_written_total, wl.budget_pages,
            wl.running_seconds, wl.position, wl._clock_seconds)


def _restore(wl: Workload, snap: tuple) -> None:
    (wl.rng.bit_generator.state, wl.pages_written_total, wl.budget_pages,
     wl.running_seconds, wl.position, wl._clock_seconds) = snap


class NativePacer:
    """One vCPU's native loop: `run` plans and runs its batches until Python work is due."""

    def __init__(self, lib: ctypes.CDLL, ctl: ControlPage, frames: np.ndarray,
                 written: np.ndarray | None, wl: Workload, tick: float, max_batch: int,
                 idle_log_seconds: float, record_interval_seconds: float):
        self.lib, self.wl, self.tick, self.max_batch = lib, wl, tick, max_batch
        self.batches = max(1, min(MAX_PLAN_BATCHES, round(PLAN_SECONDS / tick)))
        base = np.frombuffer(ctl.u64, np.uint64).ctypes.data
        v = self.v = _VCPU()
        v.command = base                            # u32[0] shares u64[0]'s first bytes
        for field, word in (("cpu_percentage", W_CPU_PERCENTAGE), ("ring_pages", W_RING_PAGES),
                            ("pages_written", W_PAGES_WRITTEN),
                            ("progress_pages", W_PROGRESS_PAGES), ("batches", W_BATCHES),
                            ("last_batch_ns", W_LAST_BATCH_NS), ("vcpu_writes", W_VCPU_WRITES),
                            ("workload_seconds", W_WORKLOAD_SECONDS)):
            setattr(v, field, base + 8 * word)
        v.frames = frames.ctypes.data
        v.written = None if written is None else written.ctypes.data
        v.page_size, v.tick, v.idle_log_seconds = frames.shape[1], tick, idle_log_seconds
        v.idle_mark = IDLE
        v.log = native_log(ctl, record_interval_seconds)
        self._plan: tuple = ()

    def _make_plan(self) -> list[tuple]:
        """The next batches, each asked of the workload at its deadline; the workload's
        state after each (the first: before any)."""
        wl, n, tick = self.wl, self.batches, self.tick
        start = wl._clock_seconds
        snaps, pages, increments, running = [_snapshot(wl)], [], [], []
        deadlines = start + tick * np.arange(1, n + 1)
        for t in deadlines.tolist():
            p, i = wl.take_batch(t, self.max_batch)
            pages.append(p)
            increments.append(i)
            running.append(wl.running_seconds)
            snaps.append(_snapshot(wl))
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(p) for p in pages], out=offsets[1:])
        self._plan = (np.concatenate(pages), np.concatenate(increments), offsets, deadlines,
                      np.array(running))
        v = self.v
        v.pages, v.increments, v.offsets, v.deadlines, v.running = (
            a.ctypes.data for a in self._plan)
        v.batches_planned = n
        return snaps

    def run(self, written: int, progress: int) -> tuple[int, int, float]:
        """Idle and write plan after plan until a pause, an exit, a throttle or a late
        wake-up; (the guest's page writes, its progress, when the last batch was written:
        monotonic seconds, or None if none was)."""
        v, wl, last = self.v, self.wl, None
        v.owner_written, v.owner_progress = written, progress
        while True:
            snaps = self._make_plan()
            v.vcpu_written = snaps[0][1]
            done = self.lib.migbed_paced_run(ctypes.byref(v))
            if done:
                last = v.last_batch
            if done < v.batches_planned:
                _restore(wl, snaps[done])
                return v.owner_written, v.owner_progress, last
