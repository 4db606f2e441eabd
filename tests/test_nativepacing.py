"""The native loop of a paced process vCPU (`nodes.host.nativepacing`): the pages, counters,
progress log and workload state it leaves are the ones the Python loop would."""

import ctypes
import mmap
import os
import threading
import time

import numpy as np
import pytest

from nodes.host.guestcontrol import (
    LOG_ENTRIES,
    W_CPU_PERCENTAGE,
    W_VCPU_WRITES,
    Command,
    ControlPage,
)
from nodes.host.nativepacing import NativePacer, _Log, load_library, native_log, runs_natively
from nodes.host.sharedlog import RECORD_INTERVAL_SECONDS, SharedProgressLog
from workloads.patterns import make_workload
from workloads.progresslog import IDLE, SLEPT, ProgressLog
from workloads.spec import WorkloadSpec

PAGES, PAGE = 256, 4096


@pytest.fixture
def lib():
    """The native loop (`make setup` builds it); under CI its absence fails."""
    found = load_library()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nodes/host/native/libmigbedpaced.so is not built: run `make setup`")
        pytest.skip("the native paced loop is not built (make setup)")
    return found


def test_the_native_log_stores_what_a_progress_log_stores(lib):
    rng = np.random.default_rng(7)
    ctl = ControlPage.create(16)
    try:
        log = _Log()
        native_log(log, ctl, RECORD_INTERVAL_SECONDS)
        plain = ProgressLog(LOG_ENTRIES, RECORD_INTERVAL_SECONDS)
        reader = SharedProgressLog(ControlPage(ctl.fd, 16, False))
        wall, pages = 50.0, 0
        for _ in range(LOG_ENTRIES + 2000):              # it wraps
            wall += float(rng.choice([0.0001, 0.0003, 0.0006, 0.002, 0.05]))
            pages += int(rng.integers(0, 70))
            if rng.random() < 0.3:
                end, mark = wall + float(rng.choice([0.0005, 0.064])), int(rng.choice([SLEPT, IDLE]))
                lib.migbed_log_record_sleep(ctypes.byref(log), wall, end, pages, mark)
                plain.record_sleep(wall, end, pages, mark)
                wall = end
            else:
                lib.migbed_log_record(ctypes.byref(log), wall, pages)
                plain.record(wall, pages)
        for got, want in zip(reader.mark_arrays(), plain.mark_arrays(), strict=True):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        assert reader.latest == plain.latest
    finally:
        ctl.close()


def _pacer(lib, spec: WorkloadSpec, tick: float, plan_batches: int | None = None):
    ctl = ControlPage.create(PAGES, track_writes=True)
    buf = mmap.mmap(-1, PAGES * PAGE)
    frames = np.frombuffer(buf, np.uint8).reshape(PAGES, PAGE)
    wl = make_workload(spec, PAGES, None, PAGE)
    start = time.monotonic()
    wl.resume(start)
    address = frames.__array_interface__["data"][0]
    pacer = NativePacer(lib, ctl, address, PAGE, ctl.written.__array_interface__["data"][0],
                        wl, tick, 256, 0.002, RECORD_INTERVAL_SECONDS, plan_batches)
    return ctl, frames, wl, pacer, start


def _after_batches(ctl: ControlPage, batches: int, then) -> threading.Thread:
    """A thread that does `then()` once the guest has written `batches` batches."""
    def watch():
        deadline = time.monotonic() + 10
        while ctl.batches_total < batches and time.monotonic() < deadline:
            time.sleep(0.001)
        then()
    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def _run(pacer: NativePacer, ctl: ControlPage, until) -> tuple[int, int, float | None]:
    """Run as the vCPU does until `until()` (a late wake-up returns early too)."""
    written = progress = 0
    wait, last = pacer.tick, None
    while True:
        written, progress, ran, wait = pacer.run(written, progress, wait)
        last = ran if ran is not None else last
        if until():
            return written, progress, last


@pytest.mark.inprocess
@pytest.mark.parametrize("spec", [WorkloadSpec("uniform", 5_000, seed=3),
                                  WorkloadSpec("hotset", 5_000, seed=4),
                                  WorkloadSpec("sequential", 5_000, seed=5),
                                  WorkloadSpec("phased", 5_000, seed=6, busy_seconds=0.05,
                                               quiet_seconds=0.05)])
def test_the_native_loop_writes_the_workloads_own_batches(lib, spec):
    """Plans run whole write the pages and increments the workload chooses at each batch's
    time; a pause mid-plan leaves the workload at the batches written, none more."""
    assert runs_natively(lib, make_workload(spec, PAGES), 1, 256)
    # Plans of 4 batches 20 ms apart (a wake-up 20 ms late hands back to Python, which the
    # vCPU would write a batch of: here the next plan waits, so the batches stay planned).
    ctl, frames, wl, pacer, start = _pacer(lib, spec, 0.02, 4)
    ref = make_workload(spec, PAGES, None, PAGE)
    ref.resume(start)
    want = np.zeros(PAGES, np.uint64)
    pauser = _after_batches(ctl, 3 * pacer.batches + 2, lambda: ctl.set_command(Command.PAUSE))
    written, progress, last = _run(pacer, ctl, lambda: ctl.command is not Command.RUN)
    pauser.join()
    assert last is not None and 0 < written == wl.pages_written_total == progress
    # the reference asked for the same batches at the same times (a late wake-up re-plans
    # from the last batch written, as the reference goes on from it), up to those written
    t, batches = start, ctl.batches_total
    assert batches > 3 * pacer.batches, "several plans ran"
    while batches > 0:
        for deadline in (t + pacer.tick * np.arange(1, 5)).tolist()[:batches]:
            pages, inc = ref.take_batch(deadline, 256)
            want[pages] += inc
            t, batches = deadline, batches - 1
    assert ref.pages_written_total == written, "whole batches only"
    assert ref.get_state() == wl.get_state(), "the workload is where its batches left it"
    assert np.array_equal(frames.view(np.uint64)[:, 0], want)
    assert np.array_equal(np.flatnonzero(ctl.written), np.flatnonzero(want))
    assert ctl.pages_written_total == written == int(ctl.u64[W_VCPU_WRITES])
    _, _, marks = SharedProgressLog(ctl).mark_arrays()
    assert (marks & IDLE).sum() >= ctl.batches_total - 1, "every wait logged as idle"
    ctl.close()


@pytest.mark.inprocess
def test_a_throttle_hands_the_loop_back_to_python(lib):
    ctl, frames, wl, pacer, _ = _pacer(lib, WorkloadSpec("uniform", 5_000, seed=1), 0.02)
    setter = _after_batches(ctl, 3, lambda: ctl.set_throttle(30, 0, 0.0))
    written, _, _ = _run(pacer, ctl, lambda: ctl.u64[W_CPU_PERCENTAGE] != 0)
    setter.join()
    assert ctl.command is Command.RUN and written == wl.pages_written_total
    assert int(frames.view(np.uint64)[:, 0].sum()) == written
    ctl.close()


def test_a_plan_after_a_resume_waits_as_the_python_loop_does(lib):
    """From a resume the waits double from the launch's tick up to the vCPU's tick (the
    Python loop's `wait = min(tick, 2 * wait)`); then a batch every tick."""
    ctl, _, wl, pacer, start = _pacer(lib, WorkloadSpec("uniform", 1000, seed=2), 0.064, 10)
    pacer.plan(0.001)
    gaps = np.diff(np.concatenate(([start], pacer.deadlines)))
    assert np.allclose(gaps, [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.064, 0.064,
                              0.064])
    pacer.restore(0)
    assert wl.pages_written_total == 0 and wl._clock_seconds == start, "restored as before"
    pacer.plan(pacer.tick)
    assert np.allclose(pacer.deadlines, start + 0.064 * np.arange(1, 11))
    ctl.close()
