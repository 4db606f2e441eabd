"""Reading the migration stream off a socket: framed records, every length bounded first.

`RecordReader` reads `{u32 type, u32 length}` headers and bodies and decodes them with
`nodes.migration.wire.records`. A reader made with `pages_in_place` stops a PAGE_DATA record
after its pfns and types, checked, and returns them as `IncomingPages`: its caller (the
destination's landing, `nodes.migration.receive.landing`) then has the pages received straight into
buffers of its own choosing (`IncomingPages.read_into`), so no page is copied from a record
buffer into guest memory. The reader knows nothing of where the pages go: it is asked for the
next record, and for the next bytes into given buffers, never calls out.
"""

from collections.abc import Callable

import numpy as np

from nodes.errors import ConnectionLost, PeerAborted, StreamError, StreamTruncated
from nodes.migration.wire import encoded
from nodes.migration.wire.records import (
    DOMAIN_HEADER,
    IMAGE_HEADER,
    MAX_GUEST_PAGES,
    OPTIONAL,
    RECORD_HEADER,
    DomainHeader,
    ImageHeader,
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


class IncomingPages:
    """A PAGE_DATA record read up to its pages: its pfns and types, checked against the guest
    and against the length of the page data that follows, which is still on the stream.

    Its reader's caller receives the pages into buffers of its own, chunk after chunk
    (`read_into`; never more than the record holds), then calls `end`. The reader reads no
    other record before that. `pages` is None: no buffer of the reader holds them."""

    pages = None

    def __init__(self, reader: "RecordReader", pfns: np.ndarray, types: np.ndarray,
                 data_bytes: int, pad_bytes: int, what: str):
        self.pfns = pfns
        self.types = types
        self._reader = reader
        self._left = data_bytes
        self._pad = pad_bytes
        self.what = what

    def read_into(self, chunk: list) -> None:
        """Fill the buffers of `chunk` (writable, of whole bytes), in order, from the stream:
        with a socket's recvmsg_into the kernel copies the pages straight into them."""
        want = sum(memoryview(b).nbytes for b in chunk)
        if want > self._left:
            raise StreamError(f"{self.what}: {want} bytes asked of the {self._left} bytes of "
                              "pages left in the record")
        self._reader.read_chunk(chunk, want, self.what)
        self._left -= want

    def end(self) -> None:
        """Every page was read: the record's padding is read and checked, and the reader
        may go on to the next record."""
        if self._left:
            raise StreamError(f"{self.what}: {self._left} bytes of pages were never read")
        pad = self._reader.read_exact(self._pad, self.what) if self._pad else b""
        if any(pad):
            raise StreamError("non-zero record padding")
        self._reader.incoming = None


class RecordReader:
    """Reads framed records from `read_into(memoryview) -> int` (a socket's recv_into).

    Returns 0 from read_into at end of stream; a stream that ends inside a header or record
    is reported as truncated. With `pages_in_place`, every PAGE_DATA record laid out as
    `encode_page_data` writes it is returned as `IncomingPages` once its pfns and types are
    checked, and its pages are received with `readv_into(buffers) -> int` (a socket's
    recvmsg_into) into the buffers its caller gives.
    """

    def __init__(self, read_into: Callable[[memoryview], int], reuse_page_buffer: bool = False,
                 pages_in_place: bool = False,
                 readv_into: Callable[[list], int] | None = None):
        self._read_into = read_into
        self._readv_into = readv_into or (lambda bufs: read_into(memoryview(bufs[0]).cast("B")))
        self.pages_in_place = pages_in_place
        self.incoming: IncomingPages | None = None    # a record whose pages are still unread
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

    def _read_body(self) -> tuple[int, memoryview | IncomingPages]:
        """The next record's type and body, as a view into a buffer of its own (or, for
        PAGE_DATA whose pages are to be received in place, its checked pfns and types)."""
        if self.incoming is not None:
            raise StreamError(f"{self.incoming.what}: its pages were never read")
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
            if self.pages_in_place and 4 <= offset <= length:
                return rtype, self._read_page_head(first, offset, length, padded, what)
            raw = self._read_view(padded, what, first, offset)
        else:
            raw = self._read_view(padded, what) if padded else memoryview(b"")
        if any(raw[length:]):
            raise StreamError("non-zero record padding")
        return rtype, raw[:length]

    def _read_page_head(self, first: bytes, offset: int, length: int, padded: int,
                        what: str) -> "IncomingPages | memoryview":
        """The head of a PAGE_DATA record whose body begins `first` and whose pages start at
        `offset` if laid out as `encode_page_data` writes it: pfns and types read and
        checked, the pages left on the stream for the caller. A body laid out otherwise
        (msgpack allows several) is read whole and returned for `decode_page_data`."""
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
        self.incoming = IncomingPages(self, pfns, types, data_len, padded - length, what)
        return self.incoming

    def read_chunk(self, chunk: list, want: int, what: str) -> None:
        """`want` bytes from the stream into the buffers of `chunk`, in order (for
        `IncomingPages.read_into`, which bounds `want` by what its record holds)."""
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

    def read_record(self) -> Record | None:
        """The next record, decoded and checked; None for an optional record we skip."""
        rtype, body = self._read_body()
        try:
            known = RecordType(rtype)
        except ValueError:
            if rtype & OPTIONAL:
                return None
            raise StreamError(f"unknown mandatory record type {rtype:#x}") from None
        if isinstance(body, IncomingPages):
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
