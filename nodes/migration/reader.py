"""Reading the migration stream off a socket: framed records, every length bounded first.

`RecordReader` reads `{u32 type, u32 length}` headers and bodies and decodes them with
`nodes.migration.records`. The pages of a PAGE_DATA record go straight into the buffers of a
`PageSink` (the destination's landing, `nodes.migration.landing`) once the record's pfns and
types are checked, so no page is copied from a record buffer into guest memory.
"""

from collections.abc import Callable
from typing import Protocol

import numpy as np

from nodes.errors import ConnectionLost, PeerAborted, StreamError, StreamTruncated
from nodes.migration import encoded
from nodes.migration.records import (
    DOMAIN_HEADER,
    IMAGE_HEADER,
    MAX_GUEST_PAGES,
    OPTIONAL,
    RECORD_HEADER,
    DomainHeader,
    ImageHeader,
    PageData,
    Record,
    RecordType,
    array_count,
    check_page_words,
    decode_domain_header,
    decode_fields,
    decode_image_header,
    decode_page_data,
    max_record_bytes,
    page_data_offset,
)

_ALIGN = 64                          # alignment of received page data, in bytes


class PageSink(Protocol):
    """Where a receiver wants the pages of each PAGE_DATA record to land: straight in the
    frames reserved for them, so no copy from a record buffer into guest memory is needed."""

    def buffers(self, pfns: np.ndarray, types: np.ndarray) -> list[list]:
        """Writable buffers for the record's pages that carry data, in record order, in
        chunks (lists of buffers) to be filled one after another (the pfns and types are
        checked already)."""
        ...

    def landed(self, index: int) -> None:
        """Chunk `index` is filled (hash it now, while it is in cache)."""
        ...

    def done(self) -> None:
        """The whole record has arrived."""
        ...


RECV_CHUNK_PAGES = 32   # pages a sink's chunk should hold: 128 KiB, still in cache when landed


class RecordReader:
    """Reads framed records from `read_into(memoryview) -> int` (a socket's recv_into).

    Returns 0 from read_into at end of stream; a stream that ends inside a header or record
    is reported as truncated. With a `page_sink`, the pages of every PAGE_DATA record laid
    out as `encode_page_data` writes it are received straight into the sink's buffers with
    `readv_into(buffers) -> int` (a socket's recvmsg_into), after the record's pfns and types
    have been checked; such a record is returned with `pages` None.
    """

    def __init__(self, read_into: Callable[[memoryview], int], reuse_page_buffer: bool = False,
                 page_sink: PageSink | None = None,
                 readv_into: Callable[[list], int] | None = None):
        self._read_into = read_into
        self._readv_into = readv_into or (lambda bufs: read_into(memoryview(bufs[0]).cast("B")))
        self.page_sink = page_sink
        self.bytes_read = 0
        self.page_size = 4096
        self.guest_pages = MAX_GUEST_PAGES
        # A migration receiver applies each PAGE_DATA record before it reads the next: it
        # may have every record read into one buffer, kept warm in cache, instead of a fresh
        # 4 MiB each time. The record's pages are then valid only until the next read.
        self._page_buffer: np.ndarray | None = np.empty(0, np.uint8) if reuse_page_buffer \
            else None

    def _read_view(self, n: int, what: str, prefix: bytes = b"",
                   align_offset: int | None = None) -> memoryview:
        """`n` bytes (the first of them `prefix`, already read) in a fresh buffer of their own,
        not zeroed first since every byte is overwritten, returned without a copy. With
        `align_offset`, byte `align_offset` of the result sits on a 64-byte boundary."""
        if align_offset is None:
            view = memoryview(np.empty(n, dtype=np.uint8))
        else:
            buf = self._page_buffer
            if buf is None or len(buf) < n + _ALIGN:
                buf = np.empty(n + _ALIGN, dtype=np.uint8)
                if self._page_buffer is not None:
                    self._page_buffer = buf
            shift = -(buf.ctypes.data + align_offset) % _ALIGN
            view = memoryview(buf)[shift:shift + n]
        view[:len(prefix)] = prefix
        got = len(prefix)
        while got < n:
            k = _io(self._read_into, view[got:], what)
            if not k:
                raise StreamTruncated(f"stream truncated in {what} ({got} of {n} bytes)")
            got += k
        self.bytes_read += n - len(prefix)
        return view

    def read_exact(self, n: int, what: str) -> bytes:
        return self._read_view(n, what).tobytes()

    def read_image_header(self) -> ImageHeader:
        return decode_image_header(self.read_exact(IMAGE_HEADER.size, "image header"))

    def read_domain_header(self) -> DomainHeader:
        hdr = decode_domain_header(self.read_exact(DOMAIN_HEADER.size, "domain header"))
        self.page_size = 1 << hdr.page_shift
        return hdr

    def _read_body(self) -> tuple[int, memoryview | PageData]:
        """The next record's type and body, as a view into a buffer of its own (or, for
        PAGE_DATA received into the page sink, the record decoded)."""
        rtype, length = RECORD_HEADER.unpack(self.read_exact(RECORD_HEADER.size,
                                                             "record header"))
        limit = max_record_bytes(rtype, self.page_size, self.guest_pages)
        if length > limit:
            raise StreamError(f"record type {rtype:#x} of {length} bytes exceeds its limit "
                              f"of {limit} bytes")
        padded = length + (-length % 8)
        what = f"record {rtype:#x}"
        if rtype == RecordType.PAGE_DATA and padded:
            # Read the pages into an aligned buffer: hashing them as 64-bit words is twice
            # as fast aligned. Where they start follows from the body's first four bytes.
            first = self.read_exact(min(4, padded), what)
            offset = page_data_offset(first)
            if self.page_sink is not None and 4 <= offset <= length:
                return rtype, self._read_pages_to_sink(first, offset, length, padded, what)
            raw = self._read_view(padded, what, first, offset)
        else:
            raw = self._read_view(padded, what) if padded else memoryview(b"")
        if any(raw[length:]):
            raise StreamError("non-zero record padding")
        return rtype, raw[:length]

    def _read_pages_to_sink(self, first: bytes, offset: int, length: int, padded: int,
                            what: str) -> "PageData | memoryview":
        """The rest of a PAGE_DATA record whose body begins `first` and whose pages start at
        `offset` if laid out as `encode_page_data` writes it: pfns and types read and
        checked, then the pages received into the sink. A body laid out otherwise (msgpack
        allows several) is read whole and returned for `decode_page_data`."""
        prefix = first + self.read_exact(offset - len(first), what)
        head = array_count(prefix)
        assert head is not None                    # `first` parsed, or offset would be 0
        count, pos = head
        words_len = int.from_bytes(prefix[pos + 1:pos + 5], "big")
        data_len = int.from_bytes(prefix[offset - 4:offset], "big")
        if (prefix[pos] != 0xC6 or prefix[offset - 5] != 0xC6 or words_len != 8 * count
                or data_len != length - offset):
            raw = self._read_view(padded, what, prefix)
            if any(raw[length:]):
                raise StreamError("non-zero record padding")
            return raw[:length]
        words = memoryview(prefix)[pos + 5:pos + 5 + words_len]
        pfns, types = check_page_words(count, words, data_len, self.page_size,
                                        self.guest_pages)
        buffers = self.page_sink.buffers(pfns, types)
        self._read_into_buffers(buffers, what)
        pad = self.read_exact(padded - length, what) if padded > length else b""
        if any(pad):
            raise StreamError("non-zero record padding")
        self.page_sink.done()
        return PageData(pfns, types, None)

    def _read_into_buffers(self, chunks: list[list], what: str) -> None:
        """Fill the sink's chunks in order, telling it as each is filled."""
        for index, chunk in enumerate(chunks):
            want = sum(map(len, chunk))
            got = 0
            while got < want:
                k = _io(self._readv_into, chunk, what)
                if not k:
                    raise StreamTruncated(f"stream truncated in {what} (pages)")
                got += k
                if got < want:     # resume where the kernel stopped, mid-buffer perhaps
                    while k >= len(chunk[0]):
                        k -= len(chunk[0])
                        chunk = chunk[1:]
                    if k:
                        chunk = [memoryview(chunk[0]).cast("B")[k:], *chunk[1:]]
            self.bytes_read += want
            self.page_sink.landed(index)

    def read_record(self) -> Record | None:
        """The next record, decoded and checked; None for an optional record we skip."""
        rtype, body = self._read_body()
        try:
            known = RecordType(rtype)
        except ValueError:
            if rtype & OPTIONAL:
                return None
            raise StreamError(f"unknown mandatory record type {rtype:#x}") from None
        if isinstance(body, PageData):
            return Record(known, {"page_data": body})
        if known is RecordType.PAGE_DATA:
            return Record(known, {"page_data": decode_page_data(body, self.page_size,
                                                                self.guest_pages)})
        decode = encoded.DECODERS.get(known)
        if decode is not None:          # encoded pages: XBZRLE deltas, compressed packets
            return Record(known, {"page_data": decode(body, self.page_size, self.guest_pages)})
        return Record(known, decode_fields(known, body))

    def expect(self, *types: RecordType) -> Record:
        """The next non-skipped record, which must be one of `types` (or ABORT -> error)."""
        while True:
            rec = self.read_record()
            if rec is None:
                continue
            if rec.type == RecordType.ABORT and RecordType.ABORT not in types:
                raise PeerAborted(rec.fields["error"])
            if rec.type not in types:
                names = "/".join(t.name for t in types)
                raise StreamError(f"expected {names}, got {RecordType(rec.type).name}")
            return rec


def _io(read: Callable, into, what: str) -> int:
    """One read from the socket; a socket error (reset, timeout) is the connection lost."""
    try:
        return read(into)
    except OSError as exc:
        raise ConnectionLost(f"connection lost while reading {what}: "
                             f"{exc.strerror or exc}") from None
