"""Traces: the file format and its bounded decoder, the figures, the replay workload (exact
pages, its position as state), the shipped traces, and `migbed trace info|list`."""

import numpy as np
import pytest

from cluster.cli import main
from nodes.errors import ConfigError
from nodes.host.guestvcpu import split_pages, vcpu_spec
from nodes.host.specs import GuestSpec
from nodes.xen.hypervisor import Hypervisor
from workloads.patterns import make_workload
from workloads.spec import WorkloadSpec
from workloads.tracefile import (
    TraceFormatError,
    decode,
    encode,
    make_trace,
    read_trace_bytes,
    shipped_traces,
)
from workloads.tracereplay import trace_data_pages, trace_memory_bytes
from workloads.tracestats import content_figures, summary, wss_curve

MiB = 1 << 20


def header(**kw) -> dict:
    return {"program": "t", "argv": ["t", "-x"], "machine": {"arch": "x86_64"},
            "interval_seconds": 0.01, "children": 0, "page_size": 4096,
            "region_pages": 10_000, "duration_seconds": 0.05, "ended": "exited",
            "recorded_at": "2026-01-01T00:00:00+00:00", **kw}


def small_trace(n: int = 5, seed: int = 1):
    rng = np.random.default_rng(seed)
    per = [rng.choice(10_000, int(rng.integers(0, 40)), replace=False) for _ in range(n)]
    samples = np.zeros(3, dtype=[("interval", "<u4"), ("page", "<u4"), ("zero", "u1"),
                                 ("compressed_bytes", "<u4"), ("delta_bytes", "<i4")])
    samples["interval"] = [0, 1, 2]
    samples["page"] = [1, 2, 1]
    samples["zero"] = [1, 0, 0]
    samples["compressed_bytes"] = [0, 1024, 2048]
    samples["delta_bytes"] = [-1, -1, 100]
    times = [0.01 * (i + 1) for i in range(n)]
    return make_trace(header(duration_seconds=times[-1]), times, per, samples), per


def test_a_trace_round_trips_exactly():
    trace, per = small_trace(40)
    back = decode(encode(trace))
    assert back.header == trace.header
    np.testing.assert_array_equal(back.counts, [len(p) for p in per])
    for i, p in enumerate(per):
        assert back.interval_pages(i).tolist() == sorted(p.tolist())
    np.testing.assert_allclose(back.times_seconds, trace.times_seconds)
    assert back.samples.tolist() == trace.samples.tolist()


def test_every_truncation_and_a_forged_byte_are_refused_in_one_line():
    data = encode(small_trace(8)[0])
    for cut in range(0, len(data)):
        with pytest.raises(TraceFormatError) as exc:
            decode(data[:cut], "t.mbtrace")
        assert "\n" not in str(exc.value) and "t.mbtrace" in str(exc.value)
    for at in (0, 9, 12, 20, 30, len(data) - 1):
        forged = bytearray(data)
        forged[at] ^= 0x41
        with pytest.raises(TraceFormatError):
            decode(bytes(forged))


def test_a_forged_header_cannot_make_the_decoder_allocate():
    """A header that claims a billion page writes is refused before anything is read."""
    import json
    import struct
    import zlib

    head = json.dumps(header(intervals=1, page_writes=10**9, samples=0)).encode()
    fixed = struct.pack("<8sHHIQI", b"MIGBTRC\0", 1, 0, len(head), 12 + 4 * 10**9, 0)
    with pytest.raises(TraceFormatError, match="forged"):
        decode(fixed + head + zlib.compress(b"x"))


def test_pages_outside_the_region_or_unsorted_are_refused():
    with pytest.raises(TraceFormatError, match="outside"):
        make_trace(header(region_pages=10), [0.01], [[3, 10]])
    trace = make_trace(header(), [0.01, 0.02], [[1, 2], [0]])
    assert decode(encode(trace)).pages.tolist() == [1, 2, 0]


def test_the_figures_say_what_was_recorded():
    trace, _ = small_trace(5)
    c = content_figures(trace)
    assert c.sampled_pages == 3 and c.zero_fraction == pytest.approx(1 / 3)
    assert c.compression_ratio == pytest.approx(2 * 4096 / 3072)
    assert (c.xbzrle_samples, c.xbzrle_delta_bytes) == (1, 100.0)
    two = make_trace(header(duration_seconds=0.04), [0.01, 0.02, 0.03, 0.04],
                     [[1, 2], [2, 3], [1], [9]])
    curve = dict(wss_curve(two))
    # sliding windows (writableset's): {1,2,3} {1,2,3} {1,9} for two intervals
    assert curve[0.01] == pytest.approx(1.5) and curve[0.02] == pytest.approx(8 / 3)
    assert curve[0.04] == 4
    s = summary(two)
    assert (s["pages_touched"], s["page_writes"]) == (4, 6)


def _replay_all(trace_bytes: bytes, pages: int, steps: int, state: dict | None = None):
    spec = WorkloadSpec("trace", trace_bytes=trace_bytes)
    wl = make_workload(spec, pages, state)
    out = []
    for i in range(steps):
        p, inc = wl.take_batch(i * 0.005, max_batch=7)
        out.append(np.repeat(p, inc.astype(np.int64)))
    return wl, np.concatenate(out)


def test_the_replay_writes_the_trace_pages_compacted_and_its_position_travels():
    trace, per = small_trace(30, seed=4)
    data = encode(trace)
    pages = trace_data_pages(data)
    assert pages == len(np.unique(np.concatenate(per)))
    compacted = np.searchsorted(np.unique(trace.pages), trace.pages)
    _, whole = _replay_all(data, pages, 400)
    assert sorted(whole.tolist()) == sorted(compacted.tolist())
    # stopped half way, its state continues elsewhere: together exactly the trace again
    first, a = _replay_all(data, pages, 30)
    state = first.get_state()
    _, b = _replay_all(data, pages, 400, state)
    assert sorted(np.concatenate((a, b)).tolist()) == sorted(compacted.tolist())
    assert 0 < len(a) < len(compacted)


def test_a_replay_guest_is_sized_from_its_trace_and_needs_its_pages():
    data = encode(small_trace(30, seed=4)[0])
    spec = GuestSpec("g", 0, workload=WorkloadSpec("trace", trace_bytes=data))
    assert spec.memory_bytes == trace_memory_bytes(data)
    assert spec.memory_bytes % (2 * MiB) == 0
    assert trace_data_pages(data) * 4096 < spec.memory_bytes <= trace_data_pages(data) * 4096 \
        + 2 * MiB + 64 * 1024
    hv = Hypervisor("h", 16 * MiB)
    dom = hv.create_domain("g", spec.memory_bytes, "p2m")
    wl = make_workload(spec.workload, dom.data_pages)
    wl.fill(dom)
    with dom.lock:
        for i in range(100):
            wl.write(dom, i * 0.005)
    assert wl.pages_written_total == int(decode(data).counts.sum())
    with pytest.raises(ConfigError, match="touches"):
        make_workload(spec.workload, trace_data_pages(data) - 1)
    assert GuestSpec("g", 0, workload=spec.workload, vcpu="process", vcpus=2).vcpus == 2
    with pytest.raises(ConfigError, match="needs --vcpu process"):
        GuestSpec("g", 0, workload=spec.workload, vcpu="thread", vcpus=2)
    with pytest.raises(ConfigError, match="needs --trace"):
        WorkloadSpec("trace")
    assert WorkloadSpec.from_json(spec.workload.to_json()).trace_bytes == data


def test_two_vcpus_replay_between_them_what_one_replays_interval_by_interval():
    """Each vCPU of a guest of two replays its own share of the trace's pages (its slice of
    the guest's data pages); driven by one clock they write, interval by interval, the pages
    one vCPU writes, and each one's position is its own state."""
    data = encode(small_trace(30, seed=4)[0])
    spec = WorkloadSpec("trace", trace_bytes=data)
    data_pages = trace_data_pages(data) + 5       # a guest's pages are rounded up: split those
    slices = split_pages(data_pages, 2)

    def vcpus(states=(None, None)):
        return [make_workload(vcpu_spec(spec, 2, i), hi - lo, state, 4096, lo)
                for i, ((lo, hi), state) in enumerate(zip(slices, states, strict=True))]

    one, two = make_workload(spec, data_pages), vcpus()
    per_interval = []
    for step in range(100):
        now = 0.004 * step
        if step == 40:                            # migrated: each continues from its state
            two = vcpus([wl.get_state() for wl in two])
            for wl in two:
                wl.resume(now)
            one.resume(now)
        pages = one.take_batch(now, 10_000)[0]
        shares = [wl.take_batch(now, 10_000)[0] for wl in two]
        assert all(((0 <= p) & (p < hi - lo)).all() for p, (lo, hi) in zip(shares, slices,
                                                                             strict=True))
        both = np.concatenate([p + lo for p, (lo, _) in zip(shares, slices, strict=True)])
        assert sorted(both.tolist()) == sorted(pages.tolist())
        per_interval.append(len(pages))
    assert sum(per_interval) == int(decode(data).counts.sum())
    assert all(len(wl.compacted) for wl in two), "both vCPUs had pages to write"


@pytest.mark.parametrize("name", ["sqlite-updates", "sort", "python-dict"])
def test_the_shipped_traces_decode_and_are_small(name):
    assert name in shipped_traces()
    data = read_trace_bytes(name)
    assert len(data) < 4 * MiB
    s = summary(decode(data))
    assert s["pages_touched"] > 1000 and s["content"]["sampled_pages"] > 100


def test_trace_info_and_list_and_a_forged_file(tmp_path, capsys):
    assert main(["trace", "list"]) == 0
    assert "sqlite-updates" in capsys.readouterr().out
    assert main(["trace", "info", "sort", "--plot", str(tmp_path / "sort.png")]) == 0
    out = capsys.readouterr().out
    assert "WSS curve" in out and (tmp_path / "sort.png").stat().st_size > 1000
    bad = tmp_path / "bad.mbtrace"
    bad.write_bytes(read_trace_bytes("sort")[:500])
    assert main(["trace", "info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "truncated" in err
    assert main(["trace", "info", "no-such-trace"]) == 2


def test_a_trace_gives_the_wss_curve_the_model_reads(tmp_path):
    """`trace info --wss` writes the curve `migbed model --wss` reads: per tick, the mean
    distinct pages of an interval; the whole trace at its longest window."""
    from workloads.writableset import WssCurve
    per = [[1, 2, 3], [3, 4], [1, 2, 3], [5]] * 5
    trace = make_trace(header(duration_seconds=0.2), [0.01 * (i + 1) for i in range(20)], per)
    path = tmp_path / "t.mbtrace"
    path.write_bytes(encode(trace))
    assert main(["trace", "info", str(path), "--wss", str(tmp_path / "w.json")]) == 0
    curve = WssCurve.from_json((tmp_path / "w.json").read_text())
    assert curve.windows_seconds[0] == pytest.approx(0.01)
    assert curve.pages[0] == pytest.approx(np.mean([len(p) for p in per]))
    assert curve.data_pages == 5 and max(curve.pages_max) == 5
