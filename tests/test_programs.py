"""The program workloads over plain memory (issue 23, unit tier): each runs, checks its own
invariants, resumes from a copy of its memory and its context where it stopped, and its check
catches a corrupted byte; the application log reads back what was recorded; brownout and
blackout by their one definition on synthetic series; bad input refused in one line."""

import threading

import numpy as np
import pytest

from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from workloads.applog import BIN_NS, AppLog, applog_pages, latency_bucket, read_applog
from workloads.brownout import BIN_SECONDS, blackout, brownout, percentile, phase_figures
from workloads.patterns import make_workload
from workloads.spec import PROGRAMS, WorkloadSpec

PAGES = 1536
PAGE = 4096


class Memory:
    """A guest's mapped pages as a program sees them (`MappedGuest`'s `frames`), in a plain
    array: the programs compute on it exactly as on a guest's mapping."""

    def __init__(self, pages: int = PAGES):
        self.frames = np.zeros((pages, PAGE), np.uint8)
        self.lock = threading.RLock()
        self.name, self.data_pages, self.pfn_base, self.is_running = "g", pages, 0, True


def spec(program: str, **kw) -> WorkloadSpec:
    return WorkloadSpec(program, seed=5, **kw)


def run(wl, mem: Memory, ops: int, batch: int = 64) -> None:
    """Batches of at most `batch` operations until `ops` are done (unlimited rate)."""
    t = 0.0
    while wl.ops_total < ops:
        t += 0.001
        wl.write(mem, t, min(batch, ops - wl.ops_total) if wl.loaded else batch)


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_program_resumes_from_its_memory_and_context_and_its_invariants_hold(program):
    pages = 200 if program == "matmul" else PAGES     # 128 x 128: 4 blocks a generation
    mem = Memory(pages)
    wl = make_workload(spec(program), pages)
    ops = 60 if program == "matmul" else 300
    run(wl, mem, ops)
    assert wl.loaded and wl.check()["ok"], wl.check()
    # A migration's copy: the memory and the vCPU context, to a workload made there.
    there = Memory(pages)
    there.frames[:] = mem.frames
    moved = make_workload(spec(program), pages, wl.get_state())
    assert moved.ops_total == wl.ops_total
    run(moved, there, wl.ops_total + ops)
    assert moved.check()["ok"], moved.check()
    assert not np.array_equal(there.frames, mem.frames), "it went on computing there"
    # ... exactly where the original would have: the same operations from the same point.
    run(wl, mem, moved.ops_total)
    data = 1 + applog_pages(PAGE)
    assert moved.ops_total == wl.ops_total
    assert np.array_equal(there.frames[data:], mem.frames[data:])
    assert np.array_equal(there.frames[0], mem.frames[0]), "the same journal"


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_programs_check_catches_a_corrupted_page(program):
    pages = 200 if program == "matmul" else PAGES
    mem = Memory(pages)
    wl = make_workload(spec(program), pages)
    run(wl, mem, 40 if program == "matmul" else 400)
    assert wl.check()["ok"]
    data = 1 + applog_pages(PAGE)
    written = np.flatnonzero(mem.frames[data:].any(axis=1)) + data
    mem.frames[written[len(written) // 2], 100] ^= 0x5A      # one byte of a data page
    assert not wl.check()["ok"]


def test_kvstore_values_are_real_data_and_gets_and_sets_follow_the_ratio():
    mem = Memory()
    wl = make_workload(spec("kvstore", get_ratio=0.75, value_size=100, keys=2000), PAGES)
    run(wl, mem, 4000)
    c = wl.c
    sets, gets = int(c[3]), int(c[4])
    assert sets + gets == wl.ops_total
    assert 0.65 < gets / wl.ops_total < 0.85
    values = wl.values.view(np.uint8)
    assert (values >= 0x40).all() and (values < 0x80).all(), "printable bytes, as text"
    assert wl.check()["checked"] == 2000


def test_zipf_skew_concentrates_the_keys():
    def hot_share(s: float) -> float:
        wl = make_workload(spec("kvstore", zipf=s, keys=5000), PAGES)
        keys, _ = wl.requests(20000)
        _, counts = np.unique(keys, return_counts=True)
        return float(np.sort(counts)[::-1][:50].sum() / 20000)
    assert hot_share(0.0) < hot_share(0.99) < hot_share(1.2)


def test_the_application_log_reads_back_what_was_recorded():
    words = np.zeros(applog_pages(PAGE) * PAGE // 8, np.uint64)
    log = AppLog(words)
    t0 = 1_000 * BIN_NS                                   # at a bin's start
    done = t0 + np.array([1, 2, 5, 12, 13, 40]) * 1_000_000      # ms into it
    lat = np.array([2_000, 4_000, 50_000, 2_000, 2_000, 1_000_000])
    log.record(done[:3], lat[:3])
    log.record(done[3:], lat[3:])
    out = read_applog(words)
    bins = out["bins"]
    assert bins[:, 0].tolist() == [1000, 1001, 1004]
    assert bins[:, 1].tolist() == [3, 2, 1]
    assert bins[0, 2:].tolist() == [1_000_000, 5_000_000, 3_000_000]   # first, last, gap
    assert out["windows"][:, 1].sum() == 6 and out["hist"].sum() == 6
    assert out["hist"][0, latency_bucket(np.array([1_000_000]))[0]] == 1


def bins_of(per_bin: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(first, first + len(per_bin)), per_bin


def test_brownout_by_its_definition_on_a_synthetic_series():
    """200 bins of 100 ops before; from the start 30 bins of 50, 5 of 0, then 100 again."""
    start_bin = 10_000
    series = np.concatenate([np.full(200, 100), np.full(30, 50), np.zeros(5, int),
                             np.full(1000, 100)])
    idx, ops = bins_of(series, start_bin - 200)
    start = start_bin * BIN_SECONDS
    out = brownout(idx, ops, start, start + 0.35, after_seconds=5.0)
    assert out["baseline_ops_per_bin"] == 100
    assert out["brownout_seconds"] == pytest.approx(35 * BIN_SECONDS)
    assert out["brownout_depth"] == pytest.approx(1 - (30 * 50) / 35 / 100)
    assert out["brownout_worst"] == 1.0
    # 89 ops is below 90 % of the baseline, 90 is not; bins past end + 5 s never count.
    series2 = np.concatenate([np.full(200, 100), [89, 90], np.full(600, 100), [0, 0]])
    idx2, ops2 = bins_of(series2, start_bin - 200)
    out2 = brownout(idx2, ops2, start, start + 0.01, after_seconds=5.0)
    assert out2["brownout_seconds"] == pytest.approx(BIN_SECONDS)
    # Nothing before the migration: no baseline, no brownout figure.
    assert brownout(idx[200:], ops[200:], start, start + 1)["brownout_seconds"] is None


def test_blackout_is_the_longest_gap_between_completed_operations():
    one = np.array([[10.000, 10.004, 0.001], [10.010, 10.019, 0.002],
                    [10.100, 10.105, 0.030]])
    assert blackout([one], 10.0, 10.105) == pytest.approx(0.081)     # 10.019 -> 10.100
    assert blackout([one[:1]], 10.0, 11.0) == pytest.approx(0.996)   # to the span's end
    assert blackout([], 10.0, 10.5) == 0.5
    # Two vCPUs: one's gap is covered by the other's operations.
    other = np.array([[10.015, 10.090, 0.0]])
    assert blackout([one, other], 10.0, 10.105) == pytest.approx(0.010)


def test_latency_percentiles_and_phase_figures():
    hist = np.zeros(40, np.int64)
    hist[latency_bucket(np.array([10_000]))[0]] = 98                 # 10 us
    hist[latency_bucket(np.array([5_000_000]))[0]] = 2               # 5 ms
    assert percentile(hist, 0.5) == pytest.approx(10e-6, rel=0.3)
    assert percentile(hist, 0.99) == pytest.approx(5e-3, rel=0.3)
    assert percentile(np.zeros(40), 0.5) is None
    windows = np.array([[100, 50, 0, 0], [101, 70, 0, 0], [105, 10, 0, 0]])
    figs = phase_figures(windows, np.tile(hist, (3, 1)), 10.0, 10.2)
    assert figs["ops"] == 120 and figs["ops_per_second"] == pytest.approx(600)


@pytest.mark.parametrize("knob", [{"rate_pages_per_second": 1000.0}, {"hot_fraction": 0.2},
                                  {"write_bytes": 64}, {"fill": "text"}])
def test_programs_refuse_the_pattern_knobs(knob):
    with pytest.raises(ConfigError, match="is a program"):
        WorkloadSpec("kvstore", **knob)


def test_programs_refuse_thread_vcpus_and_too_little_memory():
    with pytest.raises(ConfigError, match="process vCPUs only"):
        GuestSpec("g", 4 << 20, workload=WorkloadSpec("stream"), vcpu="thread")
    GuestSpec("g", 4 << 20, workload=WorkloadSpec("stream"), vcpu="process")
    with pytest.raises(ConfigError, match="at least"):
        make_workload(WorkloadSpec("sort"), 20)
    with pytest.raises(ConfigError, match="fewer --keys"):
        make_workload(WorkloadSpec("kvstore", keys=10**7), PAGES)
    with pytest.raises(ConfigError, match="process vCPUs"):
        make_workload(WorkloadSpec("matmul"), PAGES).write(object(), 0.0)
