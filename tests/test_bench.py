"""migbed bench in its quick mode (proves it runs; no timing is asserted), and the data-path
changes its profiling led to: the zero-copy PAGE_DATA decoder, aligned receive buffers, and
a scrub that skips frames already zero."""

import io
import json

import msgpack
import numpy as np
import pytest

from cluster.bench import SECTIONS, BenchOptions, run_bench
from cluster.cli import main
from nodes.errors import ConfigError, StreamError
from nodes.migration.receive.reader import RecordReader
from nodes.migration.wire import records
from nodes.migration.wire.records import RecordType as RT
from nodes.xen.memory import MachineMemory

PAGE = 4096


def test_bench_quick_runs_every_section_on_ray(ray_testbed):
    res = run_bench(BenchOptions.quick_options(), testbed=ray_testbed, say=lambda _: None)
    assert res.errors == {}
    data = json.loads(json.dumps(res.to_dict()))
    figures = data["figures"]
    for name in ("migration_throughput_bytes_per_second", "raw_tcp_throughput_bytes_per_second",
                 "memcpy_throughput_bytes_per_second", "ray_object_throughput_bytes_per_second",
                 "downtime_idle_seconds", "downtime_50_page_final_round_seconds",
                 "dirty_rate_vp_logdirty_uniform_pages_per_second", "startup_2_hosts_seconds",
                 "startup_2_hosts_rss_bytes_per_host", "scale_evacuate_2_hosts_concurrent_total_seconds",
                 "scale_evacuate_1_hosts_sequential_downtime_seconds",
                 "encoder xbzrle encode, counter + 64 bytes changed",
                 "encoder zero-page detection, random frames",
                 "wire plain on random throughput_bytes_per_second",
                 "wire multifd 4 channels on random throughput_bytes_per_second",
                 "wire multifd 2 channels zstd on text compression_ratio"):
        fig = figures[name]
        assert fig["min"] <= fig["median"] <= fig["max"], name
    assert data["ratios"]["migration / raw data path"] is not None
    assert data["ratios"]["multifd 2 channels zlib on text / plain"] is not None
    assert any(c.startswith("data plane:") for c in data["conclusions"])
    assert "ratios (of medians)" in res.table()
    assert not [g for g in ray_testbed.guests() if g["name"].startswith("bench-")]


@pytest.mark.inprocess
def test_bench_cli_in_process_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    only = ",".join(s for s in SECTIONS if s != "startup")
    assert main(["bench", "--quick", "--in-process", "--only", only, "--json",
                 "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["errors"] == {} and printed["bench"]["options"]["quick"] is True
    assert "ray_object_throughput_bytes_per_second" not in printed["figures"]  # no Ray here
    from nodes.host.userfault import kernel_support
    if kernel_support().dirty_log:          # process against thread vCPUs, paired
        for kind in ("thread", "process"):
            for name in (f"process_bench_{kind}_throughput_bytes_per_second",
                         f"process_bench_{kind}_downtime_idle_seconds",
                         f"density_{kind}_list_seconds", f"density_{kind}_cluster_cpu_share"):
                fig = printed["figures"][name]
                assert fig["min"] <= fig["median"] <= fig["max"], name
        assert printed["ratios"]["process / thread vCPU: throughput"] is not None
        assert printed["figures"]["density_process_guest_pss_own_bytes"]["median"] > 0


@pytest.mark.parametrize("argv", [["bench", "--only", "nope"], ["bench", "--repeats", "0"]])
def test_bench_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("migbed: error:")


def test_bench_options_refuse_nonsense():
    with pytest.raises(ConfigError, match="unknown bench section"):
        BenchOptions(sections=("warp",))
    with pytest.raises(ConfigError, match="2 hosts"):
        BenchOptions(hosts=1)


# -- the data path ---------------------------------------------------------------------------
def _page_data(n: int = 3):
    pfns = np.arange(n, dtype=np.int64) * 7
    types = np.zeros(n, dtype=np.uint8)
    types[-1] = records.PageType.L1TAB
    pages = np.random.default_rng(n).integers(0, 256, (n, PAGE), dtype=np.uint8)
    words = (pfns.astype("<u8") | (types.astype("<u8") << np.uint64(records.PFN_TYPE_SHIFT)))
    return pfns, types, pages, words.astype("<u8").tobytes()


def test_page_data_fast_path_and_msgpack_path_decode_alike():
    pfns, types, pages, words = _page_data()
    fast = b"".join(bytes(b) for b in records.encode_page_data(pfns, types, pages))[8:]
    # The same list in msgpack's own compact encoding (bin 8 / bin 16): the fallback path.
    slow = msgpack.packb([len(pfns), words, pages.tobytes()], use_bin_type=True)
    fast = fast[:_body_len(fast)]
    assert records._page_data_parts(fast) is not None and records._page_data_parts(slow) is None
    for body in (fast, slow):
        pd = records.decode_page_data(memoryview(body), PAGE, 100)
        assert list(pd.pfns) == list(pfns) and list(pd.types) == list(types)
        assert np.array_equal(pd.pages, pages)


def _body_len(body: bytes) -> int:
    """Length of the msgpack object at the start of `body` (drops record padding)."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(body)
    unpacker.skip()
    return unpacker.tell()


def test_page_data_fast_path_refuses_what_msgpack_refuses():
    pfns, types, pages, words = _page_data()
    body = b"".join(bytes(b) for b in records.encode_page_data(pfns, types, pages))[8:]
    body = body[:_body_len(body)]
    with pytest.raises(StreamError):            # trailing byte: not one msgpack object
        records.decode_page_data(body + b"\0", PAGE, 100)
    with pytest.raises(StreamError):            # truncated page data
        records.decode_page_data(body[:-1], PAGE, 100)
    with pytest.raises(StreamError, match="beyond the guest"):
        records.decode_page_data(body, PAGE, 10)
    bad_count = body[:1] + bytes([4]) + body[2:]          # count 4 for 3 pfn words
    with pytest.raises(StreamError, match="bytes of pfns"):
        records.decode_page_data(bad_count, PAGE, 100)


@pytest.mark.parametrize("n", [1, 127, 128, 300, 1024])
def test_received_pages_are_aligned_and_counted(n):
    pfns, types, pages, _ = _page_data(n)
    data = (b"".join(bytes(b) for b in records.encode_page_data(pfns, types, pages))
            + records.encode_record(RT.END))
    reader = RecordReader(io.BytesIO(data).readinto)
    reader.guest_pages = 8 * n
    pd = reader.read_record().fields["page_data"]
    assert pd.pages.ctypes.data % 64 == 0
    assert np.array_equal(pd.pages, pages)
    assert reader.read_record().type == RT.END
    assert reader.bytes_read == len(data)


def test_scrub_zeroes_written_frames_and_leaves_zero_ones():
    mem = MachineMemory(64 * PAGE)
    mem.frames[[3, 7, 40]] = 9
    mem.frames[50] = 1
    mem.scrub(np.arange(60), batch_frames=16)
    assert not mem.frames[:60].any() and mem.frames[60:].sum() == 0
    mem.frames[[5, 6]] = 3
    mem.scrub(np.array([6]))
    assert mem.frames[5].all() and not mem.frames[6].any()
