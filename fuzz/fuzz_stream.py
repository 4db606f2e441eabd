"""A long fuzz run of the migration stream decoder, started by hand.

The test suite fuzzes the decoder briefly with hypothesis (tests/test_stream.py); this runs
it for millions of inputs with atheris (libFuzzer, coverage-guided):

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_stream.py -runs=2000000 -rss_limit_mb=2048 -max_len=70000

libFuzzer's last line says how many inputs it ran ("Done N runs in S second(s)"); a crash
leaves the input in crash-<sha1>. Without atheris, a hypothesis profile does the same job,
slower and without coverage guidance:

    .venv/bin/python fuzz/fuzz_stream.py --hypothesis 200000

The promise checked: any bytes give records or a StreamError, never another exception, a
hang or an unbounded allocation (libFuzzer's -rss_limit_mb and -timeout catch those; the
hypothesis profile caps the address space at 2 GiB). The first byte of an input picks the
target: a whole stream after valid headers, raw headers, one record body of each schema, one
PAGE_DATA body, one PAGE_XBZRLE body, one PAGE_COMPRESSED body (its decompression bounded),
one XBZRLE delta applied to a page, or the post-copy payloads: a page bitmap
(POSTCOPY_DISCARD, RECV_BITMAP) or the pfns of a page request (REQ_PAGES).
"""

import io
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

from nodes.errors import StreamError  # noqa: E402
from nodes.migration.receive.reader import RecordReader  # noqa: E402
from nodes.migration.wire import compression, encoded, pagesets, records, xbzrle  # noqa: E402
from nodes.migration.wire.records import RecordType as RT  # noqa: E402

GUEST_PAGES = 64
HEAD = records.encode_image_header() + records.encode_domain_header("vp", 12)
SCHEMAS = list(records.SCHEMAS)
ADDRESS_SPACE_BYTES = 2 << 30
CORPUS = Path(tempfile.gettempdir()) / "migbed-fuzz-corpus"   # libFuzzer adds to it
count = 0


def _read_all(data: bytes, with_head: bool) -> None:
    r = RecordReader(io.BytesIO((HEAD if with_head else b"") + data).readinto)
    r.guest_pages = GUEST_PAGES
    r.read_image_header()
    r.read_domain_header()
    for _ in range(10_000):          # every record consumes >= 8 bytes: a bound, not a limit
        rec = r.read_record()
        if rec is not None and rec.type == RT.END:
            return


def one_input(data: bytes) -> None:
    """The fuzz target: StreamError is the only exception allowed out."""
    global count
    count += 1
    if not data:
        return
    mode, body = data[0] % 9, data[1:]
    try:
        if mode == 0:
            _read_all(body, with_head=True)
        elif mode == 1:
            _read_all(body, with_head=False)
        elif mode == 2 and body:
            fields = records.decode_fields(SCHEMAS[body[0] % len(SCHEMAS)], body[1:])
            assert isinstance(fields, dict)
        elif mode == 3:
            pd = records.decode_page_data(body, 4096, GUEST_PAGES)
            assert len(pd.pfns) == len(pd.types) and pd.pages.shape[1] == 4096
        elif mode == 4:
            dp = encoded.decode_xbzrle(body, 4096, GUEST_PAGES)
            assert sum(len(d) for _, d in dp.deltas()) == len(dp.data)
        elif mode == 5:
            pd = encoded.decode_compressed(body, 4096, GUEST_PAGES)
            assert pd.pages.shape[1] == 4096
        elif mode == 6:
            xbzrle.apply(np.zeros(4096, np.uint8), body)
        elif mode == 7:
            mask = pagesets.decode_bitmap(body, GUEST_PAGES)
            assert len(mask) == GUEST_PAGES
        else:
            pfns = pagesets.decode_pfns(body, GUEST_PAGES)
            assert 0 < len(pfns) <= pagesets.MAX_REQUEST_PAGES and int(pfns.max()) < GUEST_PAGES
    except StreamError:
        pass


def seed_corpus(folder: Path) -> None:
    """Valid inputs to start from, one per target."""
    folder.mkdir(parents=True, exist_ok=True)
    pfns = np.arange(3)
    types = np.array([0, 0, 1], np.uint8)
    pages = np.arange(3 * 4096, dtype=np.uint32).astype(np.uint8).reshape(3, 4096)
    page_data = b"".join(bytes(b) for b in records.encode_page_data(pfns, types, pages))
    stream = (records.encode_record(RT.STATIC_DATA_END) + page_data
              + records.encode_record(RT.END))
    (folder / "stream").write_bytes(b"\0" + stream)
    (folder / "headers").write_bytes(b"\1" + HEAD + stream)
    (folder / "ready").write_bytes(b"\2" + bytes([SCHEMAS.index(RT.RECEIVER_READY)])
                                   + msgpack.packb({"pages_received": 3, "digest": None}))
    (folder / "page_data").write_bytes(b"\3" + page_data[8:])
    old = np.zeros((2, 4096), np.uint8)
    new = old.copy()
    new[0, 10:20] = 1
    new[1, ::64] = 2
    lengths, deltas = xbzrle.encode(old, new)
    delta = b"".join(bytes(b) for b in encoded.encode_xbzrle(np.arange(2), lengths, deltas))
    (folder / "xbzrle").write_bytes(b"\4" + delta[8:])
    zstd = compression.Compressor("zstd", 1)
    packet = b"".join(bytes(b) for b in encoded.encode_compressed(
        pfns, types, zstd.code, zstd.compress([pages.tobytes()])))
    (folder / "compressed").write_bytes(b"\5" + packet[8:])
    (folder / "delta").write_bytes(b"\6" + deltas[:int(lengths[0])])
    mask = np.zeros(GUEST_PAGES, dtype=bool)
    mask[::3] = True
    (folder / "bitmap").write_bytes(b"\7" + pagesets.encode_bitmap(mask))
    (folder / "pfns").write_bytes(b"\x08" + pagesets.encode_pfns(np.array([3, 1, 4])))


def run_hypothesis(examples: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hst
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))
    corpus = CORPUS
    seed_corpus(corpus)
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir())]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hst.one_of(hst.binary(max_size=8192),
                      hst.tuples(hst.sampled_from(seeds), hst.data()).map(_mutate)))
    def fuzz(data: bytes) -> None:
        one_input(data)

    fuzz()
    return count


def _mutate(args) -> bytes:
    from hypothesis import strategies as hst
    seed, data = args
    raw = bytearray(seed)
    for _ in range(data.draw(hst.integers(1, 8))):
        if not raw:
            break
        i = data.draw(hst.integers(0, len(raw) - 1))
        op = data.draw(hst.sampled_from(["flip", "cut", "insert", "word"]))
        if op == "flip":
            raw[i] ^= data.draw(hst.integers(1, 255))
        elif op == "cut":
            del raw[i:i + data.draw(hst.integers(1, 64))]
        elif op == "insert":
            raw[i:i] = data.draw(hst.binary(min_size=1, max_size=16))
        else:
            raw[i:i + 4] = data.draw(hst.sampled_from(
                [b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x00\x00\x00\x80", b"\xc6\xff\xff\xff"]))
    return bytes(raw)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--hypothesis"]:
        n = int(argv[1]) if len(argv) > 1 else 100_000
        tried = run_hypothesis(n)
        print(f"hypothesis: {tried} inputs tried, no exception but StreamError")
        return 0
    import atheris
    corpus = CORPUS
    seed_corpus(corpus)
    args = [sys.argv[0], *argv]
    if not any(not a.startswith("-") for a in argv):
        args.append(str(corpus))
    atheris.instrument_all()
    atheris.Setup(args, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
