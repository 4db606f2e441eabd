"""The records of encoded pages, beside PAGE_DATA: their layout, and their decoding with every
length bounded and checked before a byte lands (framed and limited by `records`).

    PAGE_XBZRLE      msgpack [count, bin pfn words, bin u16 lengths, bin deltas]
                     each page's delta as QEMU's xbzrle.c makes it (`nodes.migration.wire.xbzrle`),
                     1..page_size bytes; QEMU sends per page a header, a flag byte, a be16
                     length and the delta, migbed the pfn word, a le16 length and the delta.
    PAGE_COMPRESSED  msgpack [count, bin pfn words, codec, bin payload]
                     a multifd packet: pfn words as PAGE_DATA's (zero pages typed ZERO carry
                     nothing), the pages that carry data compressed together (zlib 1, zstd 2).

Zero pages need no record of their own: in PAGE_DATA a pfn word typed ZERO carries no bytes,
so a zero page costs 8 bytes on the wire (QEMU spends 9).
"""

from dataclasses import dataclass

import msgpack
import numpy as np

from nodes.errors import StreamError
from nodes.migration.wire import compression
from nodes.migration.wire.records import (
    MAX_BATCH_PAGES,
    PFN_TYPE_SHIFT,
    RECORD_HEADER,
    PageData,
    RecordType,
    _pad,
    _unpack,
    check_page_words,
    data_mask,
)


@dataclass
class DeltaPages:
    """A decoded PAGE_XBZRLE record: pfns and each page's delta, checked for length only (the
    runs are checked as they are applied, `xbzrle.decode_runs`)."""

    pfns: np.ndarray          # int64
    lengths: np.ndarray       # int64, 1..page_size
    data: memoryview          # the deltas back to back

    def deltas(self):
        at = 0
        for pfn, n in zip(self.pfns.tolist(), self.lengths.tolist(), strict=True):
            yield pfn, self.data[at:at + n]
            at += n


def _words(pfns: np.ndarray, types: np.ndarray) -> bytes:
    w = pfns.astype("<u8") | (types.astype("<u8") << np.uint64(PFN_TYPE_SHIFT))
    return w.astype("<u8", copy=False).tobytes()


def _framed(rtype: RecordType, parts: list) -> list:
    length = sum(map(len, parts))
    return [RECORD_HEADER.pack(int(rtype), length), *parts, _pad(length)]


def encode_xbzrle(pfns: np.ndarray, lengths: np.ndarray, data: bytes) -> list:
    count = len(pfns)
    if not 0 < count <= MAX_BATCH_PAGES:
        raise ValueError(f"a PAGE_XBZRLE record carries 1..{MAX_BATCH_PAGES} pages, not {count}")
    body = msgpack.packb([count, _words(pfns, np.zeros(count, np.uint8)),
                          lengths.astype("<u2").tobytes(), data], use_bin_type=True)
    return _framed(RecordType.PAGE_XBZRLE, [body])


def decode_xbzrle(body: bytes | memoryview, page_size: int, guest_pages: int) -> DeltaPages:
    obj = _unpack(bytes(body))
    if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[0], int)
            and all(isinstance(x, bytes) for x in obj[1:])):
        raise StreamError("PAGE_XBZRLE body must be [count, pfn words, lengths, deltas]")
    count, words, lengths, data = obj
    pfns = _delta_words(count, words, guest_pages)
    if len(lengths) != 2 * count:
        raise StreamError(f"PAGE_XBZRLE has {len(lengths)} bytes of lengths for {count} pages")
    n = np.frombuffer(lengths, "<u2").astype(np.int64)
    if int(n.min()) < 1 or int(n.max()) > page_size:
        raise StreamError(f"PAGE_XBZRLE delta lengths must be 1..{page_size}")
    if int(n.sum()) != len(data):
        raise StreamError(f"PAGE_XBZRLE carries {len(data)} bytes of deltas for "
                          f"{int(n.sum())}")
    if len(np.unique(pfns)) != count:
        raise StreamError("PAGE_XBZRLE names a page twice")
    return DeltaPages(pfns, n, memoryview(data))


def _delta_words(count: int, words: bytes, guest_pages: int) -> np.ndarray:
    """pfns of a PAGE_XBZRLE record: plain data pages (never page tables, never typed)."""
    if not 0 < count <= MAX_BATCH_PAGES:
        raise StreamError(f"PAGE_XBZRLE count {count} outside 1..{MAX_BATCH_PAGES}")
    if len(words) != 8 * count:
        raise StreamError(f"PAGE_XBZRLE has {len(words)} bytes of pfns for {count} pages")
    w = np.frombuffer(words, "<u8")
    if (w >> np.uint64(PFN_TYPE_SHIFT)).any():
        raise StreamError("PAGE_XBZRLE pages must be plain data pages (type NOTAB)")
    pfns = w.astype(np.int64)
    if int(pfns.max()) >= guest_pages:
        raise StreamError(f"PAGE_XBZRLE pfn {int(pfns.max())} beyond the guest's "
                          f"{guest_pages} pages")
    return pfns


def encode_compressed(pfns: np.ndarray, types: np.ndarray, codec: int, payload: bytes) -> list:
    count = len(pfns)
    if not 0 < count <= MAX_BATCH_PAGES:
        raise ValueError(f"a PAGE_COMPRESSED record carries 1..{MAX_BATCH_PAGES} pages")
    head = msgpack.packb([count, _words(pfns, types), codec], use_bin_type=True)
    head = b"\x94" + head[1:]            # the same items, and the payload as a fourth
    return _framed(RecordType.PAGE_COMPRESSED,
                   [head, b"\xc6" + len(payload).to_bytes(4, "big"), payload])


def decode_compressed(body: bytes | memoryview, page_size: int, guest_pages: int) -> PageData:
    """PAGE_COMPRESSED checked (pfns, types, codec), then decompressed to exactly the pages
    its types say carry data, and no more."""
    obj = _unpack(bytes(body))
    if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[0], int)
            and isinstance(obj[1], bytes) and isinstance(obj[2], int)
            and isinstance(obj[3], bytes)):
        raise StreamError("PAGE_COMPRESSED body must be [count, pfn words, codec, payload]")
    count, words, codec, payload = obj
    if codec not in compression.CODEC_NAMES:
        raise StreamError(f"PAGE_COMPRESSED has an unknown codec {codec}")
    if not 0 < count <= MAX_BATCH_PAGES or len(words) != 8 * count:
        raise StreamError(f"PAGE_COMPRESSED has {len(words)} bytes of pfns for {count} pages")
    w = np.frombuffer(words, "<u8")
    types = (w >> np.uint64(PFN_TYPE_SHIFT)).astype(np.uint8)
    size = int(np.count_nonzero(data_mask(types))) * page_size
    pfns, types = check_page_words(count, words, size, page_size, guest_pages)
    raw = compression.decompress(codec, payload, size)
    pages = np.frombuffer(raw, np.uint8).reshape(size // page_size, page_size)
    return PageData(pfns, types, pages)


DECODERS = {RecordType.PAGE_XBZRLE: decode_xbzrle,
            RecordType.PAGE_COMPRESSED: decode_compressed}
