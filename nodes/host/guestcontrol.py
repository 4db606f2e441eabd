"""The control page shared by a host and one guest process: a few words both map.

Why a shared page and not messages: a pause must land at the guest's next operation boundary
within a millisecond, and the guest's counters must be readable at any time without asking
it. The host writes a command word and wakes the guest with a futex; the guest answers in a
state word and wakes the host the same way, so neither polls. Counters are written only by
the guest, the throttle only by the host.

Layout of the memfd (`ControlPage`):
  [0, 4096)      the words below: 32-bit ones first (futexes are 32-bit), then 64-bit ones
  [4096, +64K)   the vCPU context, msgpack (every vCPU's workload state), published by the
                 guest each time all its vCPUs have parked, before it says PAUSED
                 (`wait_context` says whether the one there is of the last park); or
                 given by the host to a parked guest (a migration's destination), which
                 its vCPUs take as they wake
  then           the guest's progress log (`nodes.host.sharedlog`): walls, pages, marks
  then, optionally, one byte per guest page: the pages the guest's workload wrote (for
                 tests that hold the kernel's dirty log against the truth)

  u32[0] command    RUN / PAUSE / EXIT, written by the host
  u32[1] state      STARTING / RUNNING / PAUSED / EXITED / FAILED, written by the guest
  u64 words: see the `W_*` indices (W_VCPU_WRITES + i: vCPU i's own page writes).
"""

import ctypes
import ctypes.util
import mmap
import os
import platform
import time
from enum import IntEnum

import msgpack
import numpy as np

from nodes.migration.guestinfo import MAX_VCPUS

CONTROL_BYTES = 4096
CONTEXT_BYTES = 64 * 1024
LOG_ENTRIES = 16384                  # the progress ring: a thread vCPU's time span at 0.5 ms
LOG_BYTES = LOG_ENTRIES * (8 + 8 + 1)
# u64 word indices. Written by the guest:
W_PAGES_WRITTEN, W_BATCHES, W_RESUMES, W_LAST_BATCH_NS, W_RUNNING_NS = 1, 2, 3, 4, 5
W_PROGRESS_PAGES = 6                 # pages gone through (a scan's reads too)
W_WORKLOAD_SECONDS = 7               # vCPU 0's workload phase clock, float64
W_THROTTLE_SLEEP_NS, W_LIMIT_SLEEP_NS, W_THROTTLED_RUN_NS = 8, 9, 10
W_CONTEXT_BYTES = 11                 # length of the published context
W_VCPUS = 12
W_PAUSES = 13                        # times every vCPU parked
W_CONTEXT_FOR = 14                   # the park the published context is of
# Written by the host: the throttle (auto-converge's percentage, dirty-limit's ring).
W_CPU_PERCENTAGE, W_RING_PAGES, W_RING_SLEEP_NS = 16, 17, 18
W_CONTEXT_GIVEN = 19                 # bumped when the host gives parked vCPUs a context
# The progress log's own words (`nodes.host.sharedlog`): seq, stored, latest wall/pages/flags.
W_LOG = 24
W_VCPU_WRITES = 64
assert W_VCPU_WRITES + MAX_VCPUS <= CONTROL_BYTES // 8, "every vCPU's counter in the page"
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}[platform.machine()]
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
# futex(uaddr, op, val, timeout) through a prototype: ctypes converts the Python ints itself,
# no c_long objects made per call (a paced vCPU waits on it once per batch: measured ~80 us
# of CPU per wait with the objects, ~60 us without, on this loaded machine).
_futex = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                          ctypes.c_long, ctypes.c_void_p)(("syscall", _libc))


class Command(IntEnum):
    RUN = 0
    PAUSE = 1
    EXIT = 2


class State(IntEnum):
    STARTING = 0
    RUNNING = 1
    PAUSED = 2
    EXITED = 3
    FAILED = 4


_COMMANDS, _STATES = tuple(Command), tuple(State)


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def control_size(npages: int, track_writes: bool) -> int:
    return CONTROL_BYTES + CONTEXT_BYTES + LOG_BYTES + (npages if track_writes else 0)


class ControlPage:
    """One mapping of a control memfd: `create` on the host, the guest maps the same fd."""

    def __init__(self, fd: int, npages: int, track_writes: bool):
        self.fd = fd
        self._map = mmap.mmap(fd, control_size(npages, track_writes), flags=mmap.MAP_SHARED)
        # The words as memoryviews, not numpy arrays: a vCPU touches them every batch, and a
        # memoryview's item is a Python int at a tenth of a numpy scalar's cost.
        words = memoryview(self._map)[:CONTROL_BYTES]
        self.u32, self.u64, self.i64, self.f64 = (words.cast(c) for c in "IQqd")
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.address = self._addr            # the words' address, for native code
        self.context = np.frombuffer(self._map, np.uint8, CONTEXT_BYTES, CONTROL_BYTES)
        at = CONTROL_BYTES + CONTEXT_BYTES
        self.log_walls = np.frombuffer(self._map, np.float64, LOG_ENTRIES, at)
        self.log_pages = np.frombuffer(self._map, np.int64, LOG_ENTRIES, at + 8 * LOG_ENTRIES)
        self.log_slept = np.frombuffer(self._map, np.uint8, LOG_ENTRIES, at + 16 * LOG_ENTRIES)
        # The pages the workload wrote since the host last took them (1 a page), or None.
        self.written = (np.frombuffer(self._map, np.uint8, npages, at + LOG_BYTES)
                        if track_writes else None)

    @classmethod
    def create(cls, npages: int, track_writes: bool = False) -> "ControlPage":
        fd = os.memfd_create("migbed-guest-control", os.MFD_CLOEXEC)
        os.ftruncate(fd, control_size(npages, track_writes))
        return cls(fd, npages, track_writes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the two futex words --------------------------------------------------------------
    @property
    def command(self) -> Command:
        return _COMMANDS[self.u32[0]]

    @property
    def state(self) -> State:
        return _STATES[self.u32[1]]

    def set_command(self, command: Command) -> None:
        self.u32[0] = int(command)
        self._wake(0)

    def set_state(self, state: State) -> None:
        self.u32[1] = int(state)
        self._wake(1)

    def wait_command(self, current: Command, timeout_seconds: float) -> None:
        """Sleep while the command is `current`, at most `timeout_seconds`."""
        self._wait(0, int(current), timeout_seconds)

    def wait_state(self, want: set[State], timeout_seconds: float) -> State:
        """Wait until the guest's state is one of `want` (or the time is up): the state."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            state = self.state
            left = deadline - time.monotonic()
            if state in want or left <= 0:
                return state
            self._wait(1, int(state), min(left, 0.05))

    def _wake(self, index: int) -> None:
        _futex(_SYS_FUTEX, self._addr + 4 * index, _FUTEX_WAKE, 0x7FFFFFFF, None)

    def _wait(self, index: int, value: int, timeout_seconds: float) -> None:
        # A timespec per call: vCPU threads wait at once, and the kernel reads it after the
        # call has let go of the GIL.
        ts = _Timespec(int(timeout_seconds), int(timeout_seconds % 1 * 1e9))
        _futex(_SYS_FUTEX, self._addr + 4 * index, _FUTEX_WAIT, value, ctypes.addressof(ts))

    # -- counters, written by the guest ---------------------------------------------------
    @property
    def pages_written_total(self) -> int:
        return int(self.u64[W_PAGES_WRITTEN])

    @property
    def progress_pages(self) -> int:
        return int(self.u64[W_PROGRESS_PAGES])

    @property
    def batches_total(self) -> int:
        return int(self.u64[W_BATCHES])

    @property
    def resumes_total(self) -> int:
        return int(self.u64[W_RESUMES])

    @property
    def last_batch_ns(self) -> int:
        return int(self.u64[W_LAST_BATCH_NS])

    @property
    def workload_running_seconds(self) -> float:
        return float(self.f64[W_WORKLOAD_SECONDS])

    def vcpu_writes(self) -> list[int]:
        """Each vCPU's own page writes (dirty-limit's per-vCPU rates read these)."""
        n = self.u64[W_VCPUS]
        return list(self.u64[W_VCPU_WRITES:W_VCPU_WRITES + n])

    def seconds(self, word: int) -> float:
        return int(self.u64[word]) / 1e9

    # -- the throttle, written by the host ------------------------------------------------
    def set_throttle(self, cpu_percentage: int, ring_pages: int, ring_sleep_seconds: float
                     ) -> None:
        self.u64[W_RING_SLEEP_NS] = int(ring_sleep_seconds * 1e9)
        self.u64[W_RING_PAGES] = int(ring_pages)
        self.u64[W_CPU_PERCENTAGE] = int(cpu_percentage)

    # -- the vCPU context -----------------------------------------------------------------
    def _write_context(self, states: list[dict | None]) -> None:
        body = msgpack.packb(states)
        if len(body) > CONTEXT_BYTES:
            raise ValueError(f"a vCPU context of {len(body)} bytes exceeds {CONTEXT_BYTES}")
        self.context[:len(body)] = np.frombuffer(body, np.uint8)
        self.u64[W_CONTEXT_BYTES] = len(body)

    def publish_context(self, states: list[dict]) -> None:
        """The guest, every vCPU parked (before PAUSED): their workloads' states, for the
        host to read once `wait_context` says they are of this park."""
        self._write_context(states)
        self.u64[W_CONTEXT_FOR] = self.u64[W_PAUSES]

    def wait_context(self, timeout_seconds: float) -> bool:
        """Wait (bounded) until the context published is of the guest's last park."""
        deadline = time.monotonic() + timeout_seconds
        while int(self.u64[W_CONTEXT_FOR]) != int(self.u64[W_PAUSES]):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.00005)
        return True

    def give_context(self, states: list[dict | None]) -> None:
        """The host, every vCPU parked and their own context published: the states they
        resume from (a migration's vCPU context), taken by a parked vCPU woken for it (at
        the latest by the first to wake at the resume), before any runs."""
        self._write_context(states)
        self.u64[W_CONTEXT_GIVEN] += 1
        self._wake(0)                    # a parked vCPU takes it now, not at the resume

    def read_context(self) -> list[dict]:
        """The states the guest published when it last parked (read while it is paused)."""
        n = int(self.u64[W_CONTEXT_BYTES])
        return msgpack.unpackb(self.context[:n].tobytes()) if n else []

    def take_written(self) -> np.ndarray:
        """The pages written since the last call (indices), cleared; call it while the guest
        is paused, or writes may land between the read and the clear."""
        if self.written is None:
            raise ValueError("this guest was started without track_writes")
        pages = np.flatnonzero(self.written)
        self.written[pages] = 0
        return pages
