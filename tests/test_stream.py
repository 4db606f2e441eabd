"""The migration stream: encoding, decoding, and a decoder that survives any bytes."""

import io

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.errors import StreamError
from nodes.migration.receive.reader import IncomingPages, RecordReader
from nodes.migration.wire import records
from nodes.migration.wire.records import RecordType as RT

PAGE = 4096


class Sink:
    """A page sink as a receiver's: pages land in rows of its own memory, chunk by chunk."""

    def __init__(self, guest_pages: int = 64):
        self.memory = np.zeros((guest_pages, PAGE), np.uint8)
        self.landed_chunks: list[int] = []
        self.done_records = 0

    def buffers(self, pfns, types):
        self.rows = pfns[records.data_mask(types)]
        rows = [self.memory[p] for p in self.rows.tolist()]
        return [rows[i:i + 2] for i in range(0, len(rows), 2)]   # chunks of two pages

    def landed(self, index):
        self.landed_chunks.append(index)

    def done(self):
        self.done_records += 1

    def land(self, pd: IncomingPages):
        """The record's pages received straight into its rows, chunk by chunk, as
        `RecordSink.land` does it: the sink drives the reader."""
        for index, chunk in enumerate(self.buffers(pd.pfns, pd.types)):
            pd.read_into(chunk)
            self.landed(index)
        pd.end()
        self.done()


class Receiving(RecordReader):
    """A receiver's loop over its reader (as `Receiver._receive`): it asks the reader for the
    next record and lands a PAGE_DATA's pages into its sink; the reader never calls it."""

    def __init__(self, read_into, sink: Sink):
        super().__init__(read_into, pages_in_place=True)
        self.page_sink = sink

    def read_record(self):
        rec = super().read_record()
        if rec is not None and isinstance(rec.fields.get("page_data"), IncomingPages):
            self.page_sink.land(rec.fields["page_data"])
        return rec


@pytest.fixture(params=["buffer", "sink"])
def via(request) -> str:
    """Every reader test twice: records read into a buffer, and pages received into a sink."""
    return request.param


def reader_of(data: bytes, guest_pages: int = 64, via: str = "buffer") -> RecordReader:
    f = io.BytesIO(data)
    r = Receiving(f.readinto, Sink(guest_pages)) if via == "sink" else RecordReader(f.readinto)
    r.guest_pages = guest_pages
    return r


def good_stream(npages: int = 4) -> bytes:
    pfns = np.arange(npages)
    types = np.zeros(npages, dtype=np.uint8)
    types[-1] = records.PageType.L1TAB
    pages = np.arange(npages * PAGE, dtype=np.uint32).astype(np.uint8).reshape(npages, PAGE)
    parts = [records.encode_image_header(), records.encode_domain_header("vp", 12),
             records.encode_record(RT.STATIC_DATA_END)]
    parts += [bytes(b) for b in records.encode_page_data(pfns, types, pages)]
    parts.append(records.encode_record(RT.END))
    return b"".join(parts)


def read_all(r: RecordReader) -> list:
    r.read_image_header()
    r.read_domain_header()
    out = []
    while True:
        rec = r.read_record()
        if rec is None:
            continue
        out.append(rec)
        if rec.type == RT.END:
            return out


def test_round_trip(via):
    r = reader_of(good_stream(5), via=via)
    recs = read_all(r)
    assert [r.type for r in recs] == [RT.STATIC_DATA_END, RT.PAGE_DATA, RT.END]
    pd = recs[1].fields["page_data"]
    assert list(pd.pfns) == [0, 1, 2, 3, 4] and pd.types[-1] == records.PageType.L1TAB
    pages = pd.pages if via == "buffer" else r.page_sink.memory[:5]
    assert pages.shape == (5, PAGE) and pages[1, 1] == (PAGE + 1) % 256
    expected = np.arange(5 * PAGE, dtype=np.uint32).astype(np.uint8).reshape(5, PAGE)
    assert (pages == expected).all()
    if via == "sink":
        assert pd.pages is None and r.page_sink.done_records == 1
        assert r.page_sink.landed_chunks == [0, 1, 2], "five pages land in chunks of two"


def test_pages_in_place_are_read_only_as_far_as_the_record_goes():
    """A reader with pages in place returns PAGE_DATA with its pages still on the stream: its
    caller may read no more than the record holds, and must read them before the next."""
    r = RecordReader(io.BytesIO(good_stream(2)).readinto, pages_in_place=True)
    r.read_image_header()
    r.read_domain_header()
    assert r.read_record().type == RT.STATIC_DATA_END
    pd = r.read_record().fields["page_data"]
    assert isinstance(pd, IncomingPages) and list(pd.pfns) == [0, 1] and pd.pages is None
    with pytest.raises(StreamError, match="never read"):
        r.read_record()
    rows = np.zeros((3, PAGE), np.uint8)
    with pytest.raises(StreamError, match="bytes asked"):
        pd.read_into([rows.reshape(-1)])
    with pytest.raises(StreamError, match="never read"):
        pd.end()
    pd.read_into([rows[0]])
    pd.read_into([rows[1]])
    pd.end()
    assert rows[1, 1] == (PAGE + 1) % 256 and r.read_record().type == RT.END


def test_a_sink_takes_only_the_layout_it_knows(via):
    """PAGE_DATA as plain msgpack (bin 8/16 headers): read into a buffer and decoded, even
    by a reader with a sink."""
    pfns = np.array([3, 1])
    words = pfns.astype("<u8").tobytes()
    data = np.full((2, PAGE), 9, np.uint8).tobytes()
    r = reader_of(_body_stream(RT.PAGE_DATA, msgpack.packb([2, words, data])) +
                  records.encode_record(RT.END), via=via)
    pd = read_all(r)[0].fields["page_data"]
    assert list(pd.pfns) == [3, 1] and (pd.pages == 9).all()


def test_records_are_padded_to_eight_bytes():
    rec = records.encode_record(RT.ABORT, {"error": "abc"})
    assert len(rec) % 8 == 0
    assert sum(len(b) if isinstance(b, bytes) else b.nbytes
               for b in records.encode_page_data(np.arange(3), np.zeros(3, np.uint8),
                                           np.zeros((3, PAGE), np.uint8))) % 8 == 0


def test_bad_headers_and_versions():
    data = bytearray(good_stream())
    bad = bytes(data[:8]) + b"XENF" + bytes(data[12:])
    with pytest.raises(StreamError, match="not a migbed"):
        reader_of(bad).read_image_header()
    bad = bytes(data[:12]) + (99).to_bytes(4, "big") + bytes(data[16:])
    with pytest.raises(StreamError, match="version 99"):
        reader_of(bad).read_image_header()
    r = reader_of(bytes(data[:24]) + b"\x07" + bytes(data[25:]))
    r.read_image_header()
    with pytest.raises(StreamError, match="guest type"):
        r.read_domain_header()


def _body_stream(rtype: int, body: bytes) -> bytes:
    head = records.encode_image_header() + records.encode_domain_header("vp", 12)
    return head + records.RECORD_HEADER.pack(rtype, len(body)) + body + b"\0" * (-len(body) % 8)


def test_unknown_mandatory_record_fails_optional_is_skipped():
    with pytest.raises(StreamError, match="unknown mandatory record type 0x77"):
        read_all(reader_of(_body_stream(0x77, b"\x80")))
    skipped = _body_stream(records.OPTIONAL | 0x77, b"junk") + records.encode_record(RT.END)
    assert [r.type for r in read_all(reader_of(skipped))] == [RT.END]


@pytest.mark.parametrize("body,match", [
    (msgpack.packb([2, b"\0" * 8, b""]), "bytes of pfns"),
    (msgpack.packb([1, (5).to_bytes(8, "little"), b"\0" * 10]), "carries 10 bytes"),
    (msgpack.packb([1, (0x7 << 60).to_bytes(8, "little"), b""]), "unknown page type"),
    (msgpack.packb([1, (999).to_bytes(8, "little"), b"\0" * PAGE]), "beyond the guest"),
    (msgpack.packb([0, b"", b""]), "count 0"),
    (msgpack.packb([5000, b"", b""]), "count 5000"),
    (msgpack.packb({"a": 1}), "must be"),
    (b"\xc1", "not valid msgpack"),
])
def test_page_data_is_checked(body, match, via):
    with pytest.raises(StreamError, match=match):
        read_all(reader_of(_body_stream(RT.PAGE_DATA, body), via=via))


@pytest.mark.parametrize("change,match", [
    (lambda w, d: (w[:-8], d), "8 bytes of pfns for 2"),         # pfn words short of count
    (lambda w, d: (w, d[:-PAGE]), "carries 4096 bytes for 2"),   # page data short of count
    (lambda w, d: ((999).to_bytes(8, "little") + w[8:], d), "beyond the guest"),
    (lambda w, d: (((0x7 << 60) | 1).to_bytes(8, "little") + w[8:], d), "unknown page type"),
])
def test_page_data_in_encoder_layout_is_checked_before_a_page_lands(change, match, via):
    """The layout the sink takes: its pfns and types are checked before any page is
    received, so a bad record writes nothing to the sink's memory."""
    words = np.arange(2, dtype="<u8").tobytes()
    data = np.full((2, PAGE), 5, np.uint8).tobytes()
    words, data = change(words, data)
    head = b"\x93\x02" + b"\xc6" + len(words).to_bytes(4, "big") + words
    body = head + b"\xc6" + len(data).to_bytes(4, "big") + data
    r = reader_of(_body_stream(RT.PAGE_DATA, body), via=via)
    with pytest.raises(StreamError, match=match):
        read_all(r)
    if via == "sink":
        assert not r.page_sink.memory.any()


def test_lengths_are_bounded_before_allocation():
    head = records.encode_image_header() + records.encode_domain_header("vp", 12)
    huge = head + records.RECORD_HEADER.pack(RT.ABORT, 0xFFFF_FFF0)
    with pytest.raises(StreamError, match="exceeds its limit"):
        read_all(reader_of(huge))


def test_truncation_and_padding(via):
    data = good_stream()
    for cut in (3, 30, 60, 200, 5000, len(data) - 1):
        with pytest.raises(StreamError, match="truncated"):
            read_all(reader_of(data[:cut], via=via))
    body = msgpack.packb({"error": "x"})
    bad_pad = (records.encode_image_header() + records.encode_domain_header("vp", 12)
               + records.RECORD_HEADER.pack(RT.ABORT, len(body)) + body + b"\1" * (-len(body) % 8))
    with pytest.raises(StreamError, match="padding"):
        read_all(reader_of(bad_pad, via=via))


@pytest.mark.parametrize("fields,match", [
    ({}, "lacks error"), ({"error": 5}, "wrong type"),
])
def test_field_schemas(fields, match):
    with pytest.raises(StreamError, match=match):
        records.decode_fields(RT.ABORT, msgpack.packb(fields))


def test_ext_types_and_negative_numbers_are_refused():
    with pytest.raises(StreamError):  # ext types are refused by length or by hook
        records.decode_fields(RT.ABORT, msgpack.packb({"error": msgpack.ExtType(3, b"x")}))
    body = msgpack.packb({"pages_received": -1, "digest": None})
    with pytest.raises(StreamError, match="negative"):
        records.decode_fields(RT.RECEIVER_READY, body)


@pytest.mark.parametrize("way", ["buffer", "sink"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_fuzz_any_bytes_give_a_clean_error(data, way):
    """Random bytes after a valid header: a StreamError or a valid record, nothing else."""
    head = records.encode_image_header() + records.encode_domain_header("vp", 12)
    try:
        read_all(reader_of(head + data, via=way))
    except StreamError:
        pass


@pytest.mark.parametrize("way", ["buffer", "sink"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_valid_stream(data, way):
    """Flip, cut and insert bytes in a valid stream: never a crash, never a hang."""
    raw = bytearray(good_stream(3))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i:i + data.draw(st.integers(1, 64))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        if not raw:
            break
    try:
        read_all(reader_of(bytes(raw), via=way))
    except StreamError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
                    | st.text(max_size=20) | st.binary(max_size=20),
                    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c,
                                                                        max_size=5),
                    max_leaves=20),
       st.sampled_from(list(records.SCHEMAS)))
def test_fuzz_schema_decoding(obj, rtype):
    """Any msgpack value as any record body: checked against the schema or refused."""
    try:
        fields = records.decode_fields(rtype, msgpack.packb(obj))
    except StreamError:
        return
    for key, allowed in records.SCHEMAS[rtype].items():
        assert isinstance(fields[key], allowed)
