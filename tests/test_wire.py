"""What crosses the wire: zero pages, XBZRLE, multifd channels and their compression, each
encoding round-tripped (hypothesis, XBZRLE against QEMU's own algorithm written out byte by
byte), its decoder refusing what QEMU refuses and surviving any bytes, and a migration with
each option, memory verified."""

import io
import zlib

import msgpack
import numpy as np
import pytest
import zstandard
from checks import frames_exact, wait_progress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.cli import main
from nodes.errors import ConfigError, StreamError
from nodes.host.specs import GuestSpec
from nodes.migration.receive.landing import Landing
from nodes.migration.receive.reader import RecordReader
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import compression, encoded, records, xbzrle
from nodes.migration.wire.records import RecordType as RT
from nodes.migration.wire.zeropage import zero_frames
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.memory import MachineMemory
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
PAGE = 4096


# -- XBZRLE: QEMU's xbzrle.c, written out byte by byte, is the reference ---------------------
def qemu_encode(old: bytes, new: bytes, dlen: int) -> tuple[int, bytes]:
    """xbzrle_encode_buffer: (length, delta); 0 unchanged, -1 overflow (its word-at-a-time
    loops find the same runs as this byte loop)."""
    slen, d, i, out = len(new), 0, 0, bytearray()

    def uleb(n: int) -> bytes:
        return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])
    while i < slen:
        if d + 2 > dlen:
            return -1, b""
        z = 0
        while i < slen and old[i] == new[i]:
            z, i = z + 1, i + 1
        if z == slen:
            return 0, b""
        if i == slen:
            return d, bytes(out)
        out += uleb(z)
        d += len(uleb(z))
        if d + 2 > dlen:
            return -1, b""
        start, n = i, 0
        while i < slen and old[i] != new[i]:
            n, i = n + 1, i + 1
        out += uleb(n)
        d += len(uleb(n))
        if d + n > dlen:
            return -1, b""
        out += new[start:start + n]
        d += n
    return d, bytes(out)


@st.composite
def page_pairs(draw, rows: int = 4, size: int = 512):
    """(old, new) pages: random old ones, new ones changed by runs, bytes, words or wholly."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old = rng.integers(0, 256, (rows, size), dtype=np.uint8)
    new = old.copy()
    for r in range(rows):
        how = draw(st.sampled_from(["same", "run", "bytes", "whole", "ends", "sparse"]))
        if how == "run":
            a = draw(st.integers(0, size - 1))
            b = draw(st.integers(a + 1, size))
            new[r, a:b] = rng.integers(0, 256, b - a)
        elif how == "bytes":
            for at in draw(st.lists(st.integers(0, size - 1), max_size=40)):
                new[r, at] ^= draw(st.integers(1, 255))
        elif how == "whole":
            new[r] = rng.integers(0, 256, size)
        elif how == "ends":
            new[r, 0] ^= 1
            new[r, -1] ^= 1
        elif how == "sparse":
            new[r, ::draw(st.integers(2, 9))] ^= 0x5A
    return old, new


@settings(max_examples=150, deadline=None)
@given(page_pairs())
def test_xbzrle_encodes_as_qemu_and_decodes_back(pair):
    old, new = pair
    lengths, data = xbzrle.encode(old, new)
    at = 0
    for r in range(len(old)):
        want, delta = qemu_encode(old[r].tobytes(), new[r].tobytes(), old.shape[1])
        assert lengths[r] == want
        if want > 0:
            assert data[at:at + want] == delta
            page = old[r].copy()
            xbzrle.apply(page, data[at:at + want])
            assert np.array_equal(page, new[r])
            at += want
    assert at == len(data)


def test_xbzrle_identical_sends_nothing_and_overflow_is_refused_whole():
    old = np.zeros((3, PAGE), np.uint8)
    new = old.copy()
    new[1, 100:110] = 7                       # 100 unchanged, 10 changed and their bytes
    new[2, ::2] = 1                           # every other byte: longer than a page
    lengths, data = xbzrle.encode(old, new)
    assert lengths.tolist() == [xbzrle.IDENTICAL, 1 + 1 + 10, xbzrle.OVERFLOW]
    assert data == bytes([100, 10]) + b"\x07" * 10


@pytest.mark.parametrize("delta,why", [
    (b"\x05", "ends inside"),                 # fewer than two bytes left
    (b"\x00\x00\x01", "empty changed"),       # a changed run of 0
    (b"\x01\x01\x01\x00\x01\x01", "empty unchanged"),   # a later unchanged run of 0
    (b"\x81\x80\x01", "14 bits"),             # a third ULEB128 byte
    (b"\xff\x7f\x01\x01", "past its page"),   # beyond the page
    (b"\x00\x05\x01\x02", "past its page"),   # a run longer than the delta
])
def test_xbzrle_decoder_refuses_what_qemu_refuses(delta, why):
    with pytest.raises(StreamError, match=why):
        xbzrle.decode_runs(delta, PAGE)


def test_xbzrle_cache_lifetime_and_stale_entries():
    """Direct-mapped: an entry younger than two syncs is not evicted by another page; an old
    one is. A hit against a stale copy still decodes, because the copy is what was sent."""
    cache = xbzrle.PageCache(2 * PAGE, PAGE, guest_pages=16)        # two slots
    pages = np.arange(3 * PAGE, dtype=np.uint32).astype(np.uint8).reshape(3, PAGE)
    pfns = np.array([0, 1])
    assert cache.insert(pfns, cache.slots(pfns), pages[:2], generation=1).all()
    two = np.array([2])                                               # slot 0, like pfn 0
    assert not cache.insert(two, cache.slots(two), pages[2:], generation=2).any()
    assert cache.lookup(np.array([0]), cache.slots(np.array([0])), generation=2).all()
    assert not cache.insert(two, cache.slots(two), pages[2:], generation=3).any(), \
        "the hit made it young again"
    assert cache.insert(two, cache.slots(two), pages[2:], generation=4).all()
    assert not cache.lookup(np.array([0]), cache.slots(np.array([0])), 4).any()


def _encoder(slots: int, guest_pages: int = 8):
    mem = MachineMemory(guest_pages * PAGE)
    gen = [1]
    enc = xbzrle.XbzrleEncoder(slots * PAGE, mem.frames, guest_pages, lambda: gen[0])
    enc.started = True
    return mem, enc, gen


def test_xbzrle_split_miss_hit_identical_overflow_and_last_stage():
    mem, enc, gen = _encoder(slots=8)
    pfns = mfns = np.arange(4)
    mem.frames[:4] = 3
    first = enc.split(pfns, mfns, last_stage=False)
    assert first.whole.all() and set(first.copies) == {0, 1, 2, 3}, "misses: whole, cached"
    assert enc.stats.cache_miss == 4 and enc.stats.pages == 0
    mem.frames[0, :8] = 9                         # a delta
    mem.frames[1, ::2] = 0                        # an overflow
    gen[0] = 2                                    # (page 2 unchanged; page 3 too)
    second = enc.split(pfns, mfns, last_stage=False)
    assert second.delta_index.tolist() == [0] and second.identical == 2
    assert second.whole.tolist() == [False, True, False, False]
    assert enc.stats.pages == 4 and enc.stats.overflow == 1
    assert enc.stats.bytes == PAGE + second.delta_lengths.sum() + 2
    mem.frames[0, :8] = 1
    before = enc.cache.data.copy()
    enc.split(pfns, mfns, last_stage=True)
    assert np.array_equal(enc.cache.data, before), "the stop-and-copy updates nothing"
    d = enc.stats.to_dict()
    assert set(d) == {"cache_size", "bytes", "pages", "cache_miss", "cache_miss_rate",
                      "encoding_rate", "overflow"}
    assert d["encoding_rate"] == pytest.approx(enc.stats.pages * PAGE / enc.stats.bytes)


def test_xbzrle_slot_mates_in_one_batch_go_in_turn():
    """Two pages of one batch in one slot: the first is inserted, the second finds it young
    and goes whole from its frame (not from a cache copy)."""
    mem, enc, _ = _encoder(slots=1)
    split = enc.split(np.array([0, 1]), np.array([0, 1]), last_stage=False)
    assert split.whole.all() and list(split.copies) == [0]
    assert enc.stats.cache_miss == 2


# -- zero pages ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(0, PAGE - 1), st.integers(1, 255)),
                max_size=30), st.booleans())
def test_zero_detection_is_exactly_all_zero(writes, scattered):
    mem = MachineMemory(64 * PAGE)
    for frame, at, value in writes:
        mem.frames[frame, at] = value
    mfns = np.random.default_rng(1).permutation(64) if scattered else np.arange(64)
    assert np.array_equal(zero_frames(mem, mfns), ~mem.frames[mfns].any(axis=1))
    for m in mfns[:8]:               # a frame alone (a post-copy request's page): its own path
        assert zero_frames(mem, np.array([m])).tolist() == [not mem.frames[m].any()]


def test_a_zero_page_writes_nothing_into_a_frame_that_never_received_a_page():
    hv = Hypervisor("d", 16 * MiB)
    dom = hv.create_incoming("g", 64, "vp")
    landing = Landing(hv.memory, dom, verify=True)
    hv.memory.frames[dom.p2m[5]] = 0
    writes = []
    real = hv.memory.write
    hv.memory.write = lambda mfns, pages: (writes.append(len(mfns)), real(mfns, pages))
    landing.land_zero(np.array([3, 4]))
    assert writes == [] and landing.received[[3, 4]].all()
    pages = np.full((1, PAGE), 7, np.uint8)
    landing.land(records.PageData(np.array([5]), np.zeros(1, np.uint8), pages))
    landing.land_zero(np.array([5]))                       # received before: zeroed now
    assert not hv.memory.frames[dom.p2m[5]].any()
    assert landing.hashes[5] == landing.hashes[3] == landing.zero_hash


# -- compression and the new records ----------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["zlib", "zstd"]), st.integers(0, 9),
       st.lists(st.binary(min_size=0, max_size=600), max_size=6))
def test_compression_round_trips(codec, level, parts):
    c = compression.Compressor(codec, level)
    raw = b"".join(parts)
    assert compression.decompress(c.code, c.compress(parts), len(raw)) == raw


def test_decompression_is_bounded_by_the_pages_a_packet_claims():
    bomb = zlib.compress(b"\0" * (64 * MiB), 9)
    with pytest.raises(StreamError, match="exactly"):
        compression.decompress(compression.CODECS["zlib"], bomb, 128 * PAGE)
    liar = zstandard.ZstdCompressor().compress(b"\0" * (64 * MiB))
    with pytest.raises(StreamError, match="claims"):
        compression.decompress(compression.CODECS["zstd"], liar, 128 * PAGE)


def _read(body_buffers: list, guest_pages: int = 64):
    data = b"".join(bytes(b) for b in body_buffers) + records.encode_record(RT.END)
    r = RecordReader(io.BytesIO(data).readinto)
    r.guest_pages = guest_pages
    return r.read_record()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["zlib", "zstd"]), st.lists(st.sampled_from(
    [records.PageType.NOTAB, records.PageType.ZERO, records.PageType.L1TAB]),
    min_size=1, max_size=12))
def test_compressed_packets_round_trip(codec, kinds):
    types = np.array(kinds, np.uint8)
    pfns = np.arange(len(types), dtype=np.int64) * 3
    n = int(records.data_mask(types).sum())
    pages = np.random.default_rng(n).integers(0, 4, (n, PAGE), dtype=np.uint8)
    c = compression.Compressor(codec, 1)
    pd = _read(encoded.encode_compressed(pfns, types, c.code, c.compress([pages.tobytes()])))
    pd = pd.fields["page_data"]
    assert pd.pfns.tolist() == pfns.tolist() and pd.types.tolist() == types.tolist()
    assert np.array_equal(pd.pages, pages)


@settings(max_examples=40, deadline=None)
@given(page_pairs(rows=3, size=PAGE))
def test_xbzrle_records_round_trip(pair):
    old, new = pair
    lengths, data = xbzrle.encode(old, new)
    sent = np.flatnonzero(lengths > 0)
    if not len(sent):
        return
    dp = _read(encoded.encode_xbzrle(sent * 5, lengths[sent], data)).fields["page_data"]
    assert dp.pfns.tolist() == (sent * 5).tolist()
    for (pfn, delta), row in zip(dp.deltas(), sent, strict=True):
        assert pfn == row * 5
        page = old[row].copy()
        xbzrle.apply(page, delta)
        assert np.array_equal(page, new[row])


@pytest.mark.parametrize("body,match", [
    (msgpack.packb([1, (1 << 60).to_bytes(8, "little"), b"\1\0", b"\0"]), "NOTAB"),
    (msgpack.packb([1, (99).to_bytes(8, "little"), b"\1\0", b"\0"]), "beyond the guest"),
    (msgpack.packb([1, b"\0" * 8, b"\0\0", b""]), "lengths must be"),
    (msgpack.packb([1, b"\0" * 8, b"\2\0", b"\0"]), "carries 1 bytes"),
    (msgpack.packb([2, b"\0" * 16, b"\1\0\1\0", b"\0\0"]), "twice"),
    (msgpack.packb([1, b"\0" * 8, b"\1\0"]), "must be"),
])
def test_xbzrle_records_are_checked(body, match):
    with pytest.raises(StreamError, match=match):
        encoded.decode_xbzrle(body, PAGE, 64)


@pytest.mark.parametrize("body,match", [
    (msgpack.packb([1, b"\0" * 8, 9, b""]), "unknown codec"),
    (msgpack.packb([1, b"\0" * 8, 1, zlib.compress(b"\0" * 100)]), "exactly"),
    (msgpack.packb([2, b"\0" * 8, 1, b""]), "bytes of pfns"),
    (msgpack.packb([1, (7 << 60).to_bytes(8, "little"), 1, b""]), "unknown page type"),
])
def test_compressed_records_are_checked(body, match):
    with pytest.raises(StreamError, match=match):
        encoded.decode_compressed(body, PAGE, 64)


@pytest.mark.parametrize("decode", [encoded.decode_xbzrle, encoded.decode_compressed])
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_fuzz_encoded_page_decoders(decode, data):
    try:
        decode(data, PAGE, 64)
    except StreamError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_xbzrle_deltas_apply_or_refuse(delta):
    page = np.zeros(PAGE, np.uint8)
    try:
        xbzrle.apply(page, delta)
    except StreamError:
        assert not page.any(), "a refused delta writes nothing"


# -- settings as QEMU checks them -----------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"xbzrle_cache_bytes": 3 * MiB}, "power of two"),
    ({"xbzrle_cache_bytes": 256}, "power of two"),
    ({"xbzrle_cache_bytes": 4 * MiB, "multifd_channels": 2}, "cannot be used together"),
    ({"multifd_channels": 0}, "multifd channels"),
    ({"multifd_compression": "zstd"}, "--multifd-channels"),
    ({"multifd_channels": 2, "multifd_compression": "lz4"}, "unknown multifd compression"),
    ({"multifd_channels": 2, "multifd_zstd_level": 21}, "zstd level"),
    ({"multifd_channels": 2, "multifd_zlib_level": -1}, "zlib level"),
    ({"zero_page_detection": "always"}, "zero-page detection"),
    ({"multifd_channels": 1, "faults": ("cut-channel@round0:1",)}, "channel 1"),
])
def test_settings_refuse_what_qemu_refuses(kw, match):
    with pytest.raises(ConfigError, match=match):
        MigrationSettings(**kw)


@pytest.mark.parametrize("argv", [
    ["--xbzrle-cache", "3MiB"], ["--xbzrle-cache", "64MiB", "--multifd-channels", "2"],
    ["--multifd-channels", "0"], ["--multifd-compression", "zstd"],
    ["--multifd-channels", "2", "--multifd-zlib-level", "10"], ["--write-bytes", "4"],
    ["--fill", "lorem"], ["--zero-page-detection", "sometimes"],
])
def test_cli_refuses_bad_wire_options_in_one_line(argv, capsys):
    assert main(["migrate", "--guest-memory", "4MiB", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("migbed: error:")


# -- migrations with each option, memory verified -----------------------------------------------
@pytest.fixture
def pair(in_process):
    return in_process(hosts=2, host_memory_bytes=96 * MiB)


def migrate(tb, settings: MigrationSettings, workload: WorkloadSpec, memory: int = 8 * MiB):
    tb.create("host-0", GuestSpec("w", memory, workload=workload))
    if workload.pattern != "idle":
        wait_progress(tb.host("host-0"), "w")
    r = tb.migrate("w", "host-1", settings)
    assert r.status == "completed", r.error
    assert r.integrity.verified is True
    assert r.pages_sent_total == (r.normal_pages + r.zero_pages
                                  + (r.xbzrle["pages"] - r.xbzrle["overflow"]
                                     if r.xbzrle else 0))
    dst = tb.host("host-1")
    assert dst.call("page_table_problem", "w") is None
    if workload.pattern != "idle":
        wait_progress(dst, "w")
        dst.call("pause_guest", "w")
        counters = dst.call("guest_counters", "w")
        written = dst.call("guest_status", "w")["pages_written_total"]
        dst.call("unpause_guest", "w")
        assert int(counters.sum()) == written, "no write lost or repeated"
    frames_exact(tb)
    tb.destroy("w")
    return r


def test_an_idle_fresh_guest_migrates_in_a_tiny_fraction_of_its_size(pair):
    r = migrate(pair, MigrationSettings(), WorkloadSpec("idle"), memory=16 * MiB)
    pages = 16 * MiB // PAGE
    assert r.zero_pages == pages - 8, "all but its 8 page tables are zero"
    assert r.bytes_sent_total < 16 * MiB / 50
    full = migrate(pair, MigrationSettings(zero_page_detection="none"), WorkloadSpec("idle"),
                   memory=16 * MiB)
    assert full.zero_pages == 0 and full.bytes_sent_total > 16 * MiB


@pytest.mark.parametrize("detection", ["legacy", "multifd"])
@pytest.mark.parametrize("channels", [None, 2])
def test_zero_pages_found_by_the_sender_or_the_channels(pair, detection, channels):
    r = migrate(pair, MigrationSettings(zero_page_detection=detection,
                                        multifd_channels=channels),
                WorkloadSpec("uniform", 3000, seed=2, write_bytes=256))
    assert r.zero_pages > 0 and r.normal_pages > 0
    assert r.rounds[0]["zero_pages"] + r.rounds[0]["normal_pages"] == r.rounds[0]["pages_sent"]


@pytest.mark.parametrize("policy", ["xen", "qemu"])
def test_xbzrle_migration_sends_deltas_after_the_first_pass(pair, policy):
    s = MigrationSettings(policy=policy, xbzrle_cache_bytes=8 * MiB, max_iterations=6,
                          link_bytes_per_second=64 * MiB, downtime_limit_seconds=0.02)
    r = migrate(pair, s, WorkloadSpec("hotset", 20000, seed=5, write_bytes=64,
                                      fill="random", hot_fraction=0.05))
    x = r.xbzrle
    assert x["cache_size"] == 8 * MiB and x["cache_miss"] > 0
    assert x["pages"] > 0 and x["bytes"] > 0, "the hot pages went as deltas"
    assert x["encoding_rate"] > 4, "64 changed bytes of a 4 KiB page"
    assert r.rounds[0]["normal_pages"] == r.rounds[0]["pages_sent"], "nothing before a pass"


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 2])
def test_multifd_migration_with_each_compression(pair, codec, channels):
    s = MigrationSettings(multifd_channels=channels, multifd_compression=codec,
                          link_bytes_per_second=128 * MiB)
    r = migrate(pair, s, WorkloadSpec("uniform", 5000, seed=3, write_bytes=512, fill="text"))
    m = r.multifd
    assert m["channels"] == channels and len(m["bytes_per_channel"]) == channels
    assert all(b > 0 for b in m["bytes_per_channel"])
    assert sum(m["bytes_per_channel"]) < r.bytes_sent_total
    assert m["compression"] == codec
    if codec == "none":
        assert m["compression_ratio"] is None
    else:
        assert m["compression_ratio"] > 1.5, "text compresses"
        assert r.bytes_sent_total < r.normal_pages * PAGE
    assert m["cpu_seconds"]["source"] > 0 and m["cpu_seconds"]["destination"] > 0
    assert m["syncs"] >= r.live_rounds, "a sync on every channel per pass"
    big = [x for x in r.rounds if x["bytes_sent"] > 4 * MiB]
    assert all(x["throughput_bytes_per_second"] < 128 * MiB * 1.25 for x in big), \
        "the channels share the one link"


def test_multifd_with_the_qemu_policy_and_a_rate_limit(pair):
    s = MigrationSettings(policy="qemu", multifd_channels=2,
                          rate_limit_bytes_per_second=64 * MiB)
    r = migrate(pair, s, WorkloadSpec("uniform", 2000, seed=4, fill="random"))
    live = [x for x in r.rounds if not x["final"]]
    assert live and all(x["throughput_bytes_per_second"] < 64 * MiB * 1.3 for x in live), \
        "the channels share the rate limit"


def test_xbzrle_overflows_as_qemu_when_two_bytes_short_before_a_trailing_unchanged_run():
    """QEMU looks for room for two more bytes before it scans each unchanged run, the trailing
    one too: a 511-byte delta of a 512-byte page followed by unchanged bytes overflows (hypothesis
    found the encoder saying 511)."""
    old = np.zeros((1, 512), np.uint8)
    new = old.copy()
    new[0, 0:338:2] = 1                      # 169 one-byte runs, one byte apart: 3 bytes each
    new[0, 338:340] = 1                      # a two-byte run: 4 bytes; 511 in all
    assert qemu_encode(old[0].tobytes(), new[0].tobytes(), 512)[0] == xbzrle.OVERFLOW
    assert xbzrle.encode(old, new)[0].tolist() == [xbzrle.OVERFLOW]
    new[0, 340:] = 1                         # no unchanged byte after it: then it fits
    want, delta = qemu_encode(old[0].tobytes(), new[0].tobytes(), 512)
    lengths, data = xbzrle.encode(old, new)
    assert lengths.tolist() == [want] and (want == xbzrle.OVERFLOW or data == delta)
