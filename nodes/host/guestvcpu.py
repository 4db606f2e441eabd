"""Inside a guest process: its vCPUs, one thread each, run, parked and throttled.

A guest of N vCPUs (`--vcpus N`) runs N threads in its one process: one address space, so one
userfaultfd and one PAGEMAP_SCAN cover all of them, as one VM's dirty log covers all its
vCPUs. Each vCPU runs its own workload, of the guest's pattern, at the guest's rate / N, on
its own slice of the data pages (vCPU i's seed is the guest's + i; one vCPU is the guest's
workload itself, so a guest of one vCPU writes what a thread vCPU would). Each publishes its
own page writes in the control page (`nodes.host.guestcontrol`), which dirty-limit reads per
vCPU, and the guest's progress goes to its shared log (`nodes.host.sharedlog`).

A pause parks every vCPU at a batch boundary (a sleep ends at once: it waits on the command
word); the last to park publishes every workload's state, the vCPU context, and only then
says PAUSED, so what the host reads after a pause is whole. Parking and un-parking are
logged as progress: the guest's last moment running and its first again.

The throttle is QEMU's, per vCPU (cpu_throttle_thread): after each 10 ms slice of running a
vCPU sleeps p/(1-p) x 10 ms; dirty-limit sleeps it a set time each ring's worth of page
writes. Both from words the host writes; the sleeps and the slices run before them are
counted, so the throttle obtained is measured against the one asked for.
"""

import ctypes
import os
import threading
import time
from dataclasses import replace

from nodes.host.guestcontrol import (
    W_BATCHES,
    W_CONTEXT_GIVEN,
    W_CPU_PERCENTAGE,
    W_LAST_BATCH_NS,
    W_LIMIT_SLEEP_NS,
    W_PAGES_WRITTEN,
    W_PAUSES,
    W_PROGRESS_PAGES,
    W_RESUMES,
    W_RING_PAGES,
    W_RING_SLEEP_NS,
    W_RUNNING_NS,
    W_THROTTLE_SLEEP_NS,
    W_THROTTLED_RUN_NS,
    W_VCPU_WRITES,
    W_VCPUS,
    W_WORKLOAD_SECONDS,
    Command,
    ControlPage,
    State,
)
from nodes.host.nativepacing import NativePacer, load_library, runs_natively
from nodes.host.sharedlog import RECORD_INTERVAL_SECONDS, SharedProgressLog
from workloads.guest import Guest
from workloads.patterns import make_workload
from workloads.progresslog import IDLE
from workloads.spec import WorkloadSpec
from workloads.vcpu import THROTTLE_SLICE_SECONDS, throttle_sleep_seconds
from workloads.workload import Workload

# Each vCPU thread asks EEVDF for a short slice (SCHED_OTHER's sched_runtime, Linux 6.12+), a
# latency hint, not more CPU: a vCPU woken by its resume is then run within ~0.1 ms where it
# waited behind the running tasks' 3 ms slices (measured on this loaded 2-core machine, a
# parked guest woken 30 times: median 0.43-0.90 ms from the resume to its first record
# without, 0.08-0.09 ms with; polling the command word instead was worse, 1.7 ms, since a
# polling task spends the lag that gets a sleeper scheduled). Where the kernel refuses it
# the vCPU runs without.
VCPU_SLICE_NS = 100_000
# A paced vCPU wakes once per BATCH_PAGES of its rate (1 ms at the fastest, the launch's
# tick; MAX_TICK_SECONDS at the slowest; after a resume from 1 ms, doubling): every wake-up
# is Python, and at 1 ms a guest writing 1000 pages/s cost ~9 % of a core (measured, 16
# guests on this machine: 73 % of its 2 CPUs; 0.66 % each at 64 pages a wake-up). Its waits are logged as idle (`IDLE_LOG_SECONDS` and longer), so its gaps are its
# overruns, not the waits it chose.
BATCH_PAGES = 64
MAX_TICK_SECONDS = 0.1
IDLE_LOG_SECONDS = 0.002
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(os.uname().machine)
_libc = ctypes.CDLL(None, use_errno=True)


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32),
                ("flags", ctypes.c_uint64), ("nice", ctypes.c_int32),
                ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64),
                ("util_min", ctypes.c_uint32), ("util_max", ctypes.c_uint32)]


def latency_hint(slice_ns: int) -> bool:
    """Ask EEVDF for a short slice for the calling thread (SCHED_OTHER's sched_runtime,
    Linux 6.12+): its wake-ups are scheduled sooner, its CPU share is unchanged."""
    if _SYS_SCHED_SETATTR is None:
        return False
    attr = _SchedAttr(ctypes.sizeof(_SchedAttr), 0, 0, 0, 0, slice_ns, 0, 0, 0, 0)
    return _libc.syscall(_SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0


def paced_tick(rate_pages_per_second: float, tick_seconds: float) -> float:
    """How long a paced vCPU waits between batches (see BATCH_PAGES)."""
    if rate_pages_per_second <= 0:
        return max(tick_seconds, MAX_TICK_SECONDS)
    return max(tick_seconds, min(MAX_TICK_SECONDS, BATCH_PAGES / rate_pages_per_second))


def split_pages(data_pages: int, n: int) -> list[tuple[int, int]]:
    """N even slices [lo, hi) of the data pages, one per vCPU."""
    bounds = [data_pages * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def vcpu_spec(spec: WorkloadSpec, n: int, i: int) -> WorkloadSpec:
    """vCPU i's share of the guest's workload (the guest's own for one vCPU)."""
    if n == 1:
        return spec
    return replace(spec, rate_pages_per_second=spec.rate_pages_per_second / n,
                   ops_per_second=spec.ops_per_second / n, keys=-(-spec.keys // n),
                   seed=spec.seed + i)


class VCPUSet:
    """The guest's vCPUs; `run` returns when the host says exit."""

    def __init__(self, ctl: ControlPage, parts: list[Guest], spec: WorkloadSpec,
                 states: list[dict | None], page_size: int, max_batch_pages: int,
                 tick_seconds: float):
        n = len(parts)
        self.ctl, self.n = ctl, n
        self.max_batch_pages, self.tick_seconds = max_batch_pages, tick_seconds
        self.log = SharedProgressLog(ctl)
        self.lock = threading.Lock()
        self.parked = 0
        self.context_given = 0
        self.run_started = time.monotonic_ns()
        self.vcpus = [GuestVCPU(self, i, part, make_workload(
            vcpu_spec(spec, n, i), part.data_pages, state, page_size,
            part.pfn_base - parts[0].pfn_base if n > 1 else None))
            for i, (part, state) in enumerate(zip(parts, states, strict=True))]
        ctl.u64[W_VCPUS] = n
        self._count()
        lib = load_library()
        for v in self.vcpus:
            if lib is not None and runs_natively(lib, v.wl, n, max_batch_pages):
                written = v.part.written
                v.pacer = NativePacer(
                    lib, ctl, v.part.address, v.part.frames.shape[1],
                    None if written is None else written.__array_interface__["data"][0],
                    v.wl, v.tick, max_batch_pages, IDLE_LOG_SECONDS, RECORD_INTERVAL_SECONDS)
        self.threads = [threading.Thread(target=v.run, name=f"vcpu{v.index}", daemon=True)
                        for v in self.vcpus]

    def _count(self) -> None:
        """The totals, from the workloads (made, or given their states)."""
        ctl = self.ctl
        self.progress = sum(v.wl.progress_pages for v in self.vcpus)
        self.written = sum(v.wl.pages_written_total for v in self.vcpus)
        ctl.u64[W_PAGES_WRITTEN], ctl.u64[W_PROGRESS_PAGES] = self.written, self.progress
        for v in self.vcpus:
            ctl.u64[W_VCPU_WRITES + v.index] = v.wl.pages_written_total
        ctl.f64[W_WORKLOAD_SECONDS] = self.vcpus[0].wl.running_seconds

    def start(self) -> None:
        """Every vCPU on a thread of its own (a guest launched parked parks at once)."""
        if self.ctl.command is Command.RUN:
            self.ctl.set_state(State.RUNNING)
        for t in self.threads:
            t.start()

    def _take_context(self) -> None:
        """Parked vCPUs given a context by the host (a migration's destination: made and
        parked at the stream's start, so the hand-over waits for no thread, no message):
        their workloads continue from it. Under the lock, every vCPU parked: by one woken
        for it, else by the first to wake at the resume."""
        given = int(self.ctl.u64[W_CONTEXT_GIVEN])
        if given == self.context_given:
            return
        self.context_given = given
        for v, state in zip(self.vcpus, self.ctl.read_context(), strict=True):
            if state is not None:
                v.wl.restore(state)
        self._count()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def batch_done(self, vcpu: "GuestVCPU", written: int, progressed: int,
                   record: bool = True) -> None:
        u64 = self.ctl.u64
        with self.lock:
            self.written += written
            self.progress += progressed
            u64[W_VCPU_WRITES + vcpu.index] = vcpu.wl.pages_written_total
            u64[W_PAGES_WRITTEN], u64[W_PROGRESS_PAGES] = self.written, self.progress
            u64[W_BATCHES] += 1
            u64[W_LAST_BATCH_NS] = time.monotonic_ns()
            if vcpu.index == 0:
                self.ctl.f64[W_WORKLOAD_SECONDS] = vcpu.wl.running_seconds
            if record:
                self.log.record(time.time(), self.progress)

    def add(self, word: int, seconds: float) -> None:
        with self.lock:
            self.ctl.u64[word] += int(seconds * 1e9)

    def park(self, vcpu: "GuestVCPU") -> bool:
        """Park `vcpu` until the host says run (True) or exit (False); see the module
        docstring for who says PAUSED and RUNNING."""
        ctl = self.ctl
        with self.lock:
            if vcpu.ran:
                self.log.record(time.time(), self.progress)     # its last moment running
            self.parked += 1
            if self.parked == self.n:           # the context (20 us), then PAUSED
                ctl.u64[W_RUNNING_NS] += time.monotonic_ns() - self.run_started
                ctl.u64[W_PAUSES] += 1
                ctl.publish_context([v.wl.get_state() for v in self.vcpus])
                ctl.set_state(State.PAUSED)
                # The host waits for that word, woken; on a busy machine it may wait for
                # this CPU (measured against three busy loops on 2 cores: pause median
                # 0.65 ms without the yield, 0.15 ms with it).
                os.sched_yield()
        while ctl.command is Command.PAUSE:
            if int(ctl.u64[W_CONTEXT_GIVEN]) != self.context_given:
                with self.lock:
                    if self.parked == self.n:
                        self._take_context()
            ctl.wait_command(Command.PAUSE, 1.0)
        with self.lock:
            if self.parked == self.n and ctl.command is Command.RUN:
                self._take_context()
                self.run_started = time.monotonic_ns()
                ctl.u64[W_RESUMES] += 1
                ctl.set_state(State.RUNNING)
            self.parked -= 1
            if ctl.command is Command.RUN:
                self.log.record(time.time(), self.progress)     # running again
        return ctl.command is not Command.EXIT


class GuestVCPU:
    """One vCPU thread: batches of its workload on its pages, parked and throttled."""

    def __init__(self, owner: VCPUSet, index: int, part: Guest, wl: Workload):
        self.owner, self.index, self.part, self.wl = owner, index, part, wl
        self.ran = False
        self.tick = paced_tick(0.0 if wl.unlimited else wl.rate_pages_per_second,
                               owner.tick_seconds)
        if wl.max_wait_seconds is not None:     # a trace: no recorded interval waited past
            self.tick = min(self.tick, max(wl.max_wait_seconds, owner.tick_seconds))
        self.wait = owner.tick_seconds     # the next wait: from the launch's tick, doubled
        # each batch up to `tick`, so a vCPU resumed for a few ms still writes at its rate
        self.slice_start = time.monotonic()
        self.ring_written = 0
        self.pacer: NativePacer | None = None     # its batches run natively, if set
        self.native_next = False

    def run(self) -> None:
        latency_hint(VCPU_SLICE_NS)
        try:
            self._loop()
        except BaseException:
            self.owner.ctl.set_state(State.FAILED)
            raise

    def _loop(self) -> None:
        ctl, wl, owner = self.owner.ctl, self.wl, self.owner
        paced = not wl.unlimited
        while True:
            command = ctl.command
            if command is Command.EXIT:
                return
            if command is Command.PAUSE:
                if not owner.park(self):
                    return
                self._resumed()
                continue
            if not self.ran:
                self._resumed()
            if self.native_next and not self._throttled():
                self._run_native()          # back at a pause, an exit, a throttle, lateness
                continue
            written, progress = wl.pages_written_total, wl.progress_pages
            n = wl.write(self.part, time.monotonic(), owner.max_batch_pages)
            written = wl.pages_written_total - written
            idles = paced or n == 0
            # A wait logged as idle stores the batch's end as its start: no record of its own.
            owner.batch_done(self, written, wl.progress_pages - progress,
                             not idles or self.wait < IDLE_LOG_SECONDS)
            self._throttle(written)
            if idles:
                if self.pacer is not None and not self._throttled():
                    self.native_next = True     # the native loop waits before its batch
                else:
                    self._idle(self.wait)
                    self.wait = min(self.tick, 2 * self.wait)

    def _throttled(self) -> bool:
        u64 = self.owner.ctl.u64
        return bool(u64[W_CPU_PERCENTAGE] or u64[W_RING_PAGES])

    def _run_native(self) -> None:
        """Idle waits and batches in native code (`nodes.host.nativepacing`), up to the next
        wake-up that needs Python: the loop then carries on (a pause parks, a throttle runs
        the Python path, a late wake-up writes its batch now)."""
        owner = self.owner
        owner.written, owner.progress, last, self.wait = self.pacer.run(
            owner.written, owner.progress, self.wait)
        self.native_next = False
        if last is not None:
            self.slice_start = last         # unthrottled, a slice starts at each batch

    def _idle(self, seconds: float) -> None:
        """Wait between batches (ended at once by a pause or an exit): the wait is logged as
        idle, up to its planned end or the pause; a late wake-up stays a gap."""
        ctl = self.owner.ctl
        start_wall = time.time()
        ctl.wait_command(Command.RUN, seconds)
        if seconds >= IDLE_LOG_SECONDS and ctl.command is not Command.EXIT:
            # Cut short by a pause, it was idle up to the pause, which the park then logs.
            end_wall = min(time.time(), start_wall + seconds)
            self.owner.log.record_sleep(start_wall, end_wall, self.owner.progress, IDLE)

    def _resumed(self) -> None:
        self.wait = self.owner.tick_seconds
        # The first batch after a resume is the Python loop's, at once: the native loop's
        # plan (~30 us a batch, a second of them) would stand between the resume and the
        # guest's first progress, which is where the guest sees its downtime end.
        self.native_next = False
        now = time.monotonic()
        self.wl.resume(now)
        self.slice_start = now
        self.ran = True

    def _throttle(self, written: int) -> None:
        """After a batch: the slice's sleep once 10 ms have run at a throttle; the dirty
        ring's sleep once a ring's worth of pages has been written."""
        owner = self.owner
        u64 = owner.ctl.u64
        pct = u64[W_CPU_PERCENTAGE]
        if not pct:
            self.slice_start = time.monotonic()
        elif (ran := time.monotonic() - self.slice_start) >= THROTTLE_SLICE_SECONDS:
            owner.add(W_THROTTLED_RUN_NS, ran)
            owner.add(W_THROTTLE_SLEEP_NS, self._sleep(throttle_sleep_seconds(pct)))
        ring = u64[W_RING_PAGES]
        if ring and written:
            self.ring_written += written
            if self.ring_written >= ring:
                self.ring_written %= ring
                sleep_ns = u64[W_RING_SLEEP_NS]
                if sleep_ns:
                    owner.add(W_LIMIT_SLEEP_NS, self._sleep(sleep_ns / 1e9))

    def _sleep(self, seconds: float) -> float:
        """Sleep throttled, ended at once by a pause or an exit; logged as a sleep, and the
        workload's clock restarted so the sleep earns it no budget."""
        ctl = self.owner.ctl
        start_wall, t0 = time.time(), time.monotonic()
        end = t0 + seconds
        while ctl.command is Command.RUN:
            left = end - time.monotonic()
            if left <= 0:
                break
            ctl.wait_command(Command.RUN, left)
        slept = time.monotonic() - t0
        self.owner.log.record_sleep(start_wall, start_wall + slept, self.owner.progress)
        self._resumed()
        return slept
