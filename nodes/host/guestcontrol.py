"""The control page shared by a host and one guest process: a few words both map.

Why a shared page and not messages: a pause must land at the guest's next operation boundary
within a millisecond, and the guest's counters must be readable at any time without asking
it. The host writes a command word and wakes the guest with a futex; the guest answers in a
state word and wakes the host the same way, so neither polls. Counters are written only by
the guest. After the page, optionally, one byte per guest page: the pages the guest's
workload wrote (for tests that hold the kernel's dirty log against the truth).

Layout, 32-bit words first (futexes are 32-bit), then 64-bit ones:
  u32[0] command    RUN / PAUSE / EXIT, written by the host
  u32[1] state      STARTING / RUNNING / PAUSED / EXITED / FAILED, written by the guest
  u64[1] pages_written_total, u64[2] batches_total, u64[3] resumes_total,
  u64[4] last batch end (CLOCK_MONOTONIC ns), u64[5] running ns (time not paused)
"""

import ctypes
import ctypes.util
import mmap
import os
import platform
import time
from enum import IntEnum

import numpy as np

CONTROL_BYTES = 4096
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}[platform.machine()]
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


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


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class ControlPage:
    """One mapping of a control memfd: `create` on the host, `attach` in the guest."""

    def __init__(self, fd: int, npages: int, track_writes: bool):
        self.fd = fd
        size = CONTROL_BYTES + (npages if track_writes else 0)
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        self.u32 = np.frombuffer(self._map, np.uint32, CONTROL_BYTES // 4)
        self.u64 = np.frombuffer(self._map, np.uint64, CONTROL_BYTES // 8)
        # The pages the workload wrote since the host last took them (1 a page), or None.
        self.written = (np.frombuffer(self._map, np.uint8, npages, CONTROL_BYTES)
                        if track_writes else None)

    @classmethod
    def create(cls, npages: int, track_writes: bool = False) -> "ControlPage":
        fd = os.memfd_create("migbed-guest-control", os.MFD_CLOEXEC)
        os.ftruncate(fd, CONTROL_BYTES + (npages if track_writes else 0))
        return cls(fd, npages, track_writes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the two futex words --------------------------------------------------------------
    @property
    def command(self) -> Command:
        return Command(int(self.u32[0]))

    @property
    def state(self) -> State:
        return State(int(self.u32[1]))

    def set_command(self, command: Command) -> None:
        self.u32[0] = command
        self._wake(0)

    def set_state(self, state: State) -> None:
        self.u32[1] = state
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
        addr = self.u32.ctypes.data + 4 * index
        _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAKE),
                      ctypes.c_long(0x7FFFFFFF), None, None, ctypes.c_long(0))

    def _wait(self, index: int, value: int, timeout_seconds: float) -> None:
        addr = self.u32.ctypes.data + 4 * index
        ts = _Timespec(int(timeout_seconds), int(timeout_seconds % 1 * 1e9))
        _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAIT),
                      ctypes.c_long(value), ctypes.byref(ts), None, ctypes.c_long(0))

    # -- counters, written by the guest ---------------------------------------------------
    @property
    def pages_written_total(self) -> int:
        return int(self.u64[1])

    @property
    def batches_total(self) -> int:
        return int(self.u64[2])

    @property
    def resumes_total(self) -> int:
        return int(self.u64[3])

    @property
    def last_batch_ns(self) -> int:
        return int(self.u64[4])

    def take_written(self) -> np.ndarray:
        """The pages written since the last call (indices), cleared; call it while the guest
        is paused, or writes may land between the read and the clear."""
        if self.written is None:
            raise ValueError("this guest was started without track_writes")
        pages = np.flatnonzero(self.written)
        self.written[pages] = 0
        return pages
