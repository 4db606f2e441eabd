"""The migration stream's records: typed records encoded with msgpack, modelled on Xen's stream v2.

Layout on the wire (encoded and decoded here; `nodes.migration.receive.reader` frames them off a socket):

    image header   24 B  marker u64 all-ones, id "MIGB", version u32, options u16, 6 B zero
    domain header  16 B  guest mode u32, page_shift u16, reserved u16, migbed version 2 x u32
    records        {u32 type, u32 body_length} + msgpack body, zero-padded to 8 bytes
    ... END

Record types keep Xen's numbers where they exist (END 0, PAGE_DATA 1, STATIC_DATA_END
0x10). Bit 31 marks a record optional: a receiver that does not know it skips
it; an unknown mandatory record fails the restore. The same framing carries the hand-over
handshake back from the receiver (READY, PERMISSION_TO_GO, RESULT, ABORT), as libxl's
migration protocol does beside the stream, the SYNC the source sends before it pauses the
guest, which the destination acknowledges (SYNC_ACK) once it has landed every page before it,
and the NTP-style CLOCK_PROBE / CLOCK_REPLY exchange of setup that measures how far the two
hosts' clocks are apart.
A post-copy switch (`nodes.migration.postcopy`) sends the discard set (POSTCOPY_DISCARD, a
bitmap) and POSTCOPY_RUN; the destination answers POSTCOPY_RESUMED and asks for the pages its
guest touches (REQ_PAGES, QEMU's MIG_RP_MSG_REQ_PAGES); after a broken link the source opens a
new connection with POSTCOPY_RECOVER and the destination answers with the set of pages it
has (RECV_BITMAP, QEMU's MIG_RP_MSG_RECV_BITMAP). Their page sets are decoded, bounded, by
`nodes.migration.wire.pagesets`.

Decoding is defensive: every length is bounded before anything is allocated, msgpack is
unpacked with limits derived from the body length, ext types are refused, every field is
type-checked, and nothing is ever unpickled or evaluated.
"""

import struct
from dataclasses import dataclass
from enum import IntEnum

import msgpack
import numpy as np

from nodes.errors import StreamError

IMAGE_MARKER = 0xFFFF_FFFF_FFFF_FFFF
IMAGE_ID = b"MIGB"
STREAM_VERSION = 2
MIGBED_VERSION = (0, 1)
IMAGE_HEADER = struct.Struct(">Q4sIH6x")
DOMAIN_HEADER = struct.Struct("<IHHII")
RECORD_HEADER = struct.Struct("<II")
OPTION_LITTLE_ENDIAN = 0x0
OPTIONAL = 0x8000_0000
MAX_BATCH_PAGES = 1024               # Xen: at most 1024 pages (4 MiB) per PAGE_DATA record
MAX_CONTROL_RECORD_BYTES = 1 << 20   # every record but PAGE_DATA and P2M_FRAMES
MAX_GUEST_INFO_BYTES = 8 << 20       # a trace workload's bytes (at most 6 MiB) ride in it
MAX_PAGE_SHIFT = 16
PFN_TYPE_SHIFT = 60
PFN_MASK = (1 << PFN_TYPE_SHIFT) - 1
MAX_GUEST_PAGES = 1 << 28            # 1 TiB of 4 KiB pages: a bound, not a promise


class RecordType(IntEnum):
    END = 0x00
    PAGE_DATA = 0x01
    GUEST_INFO = 0x02
    P2M_FRAMES = 0x03
    VCPU_CONTEXT = 0x04
    STATIC_DATA_END = 0x10
    RECEIVER_READY = 0x20
    PERMISSION_TO_GO = 0x21
    RECEIVER_RESULT = 0x22
    ABORT = 0x23
    SYNC = 0x24                # the source asks: have you landed everything before this?
    SYNC_ACK = 0x25            # the destination answers once it has
    CLOCK_PROBE = 0x26         # the source's wall clock, t1 (`nodes.migration.clock`)
    CLOCK_REPLY = 0x27         # t1 echoed, the destination's t2 (received) and t3 (sent)
    # What crosses the wire beside PAGE_DATA (`nodes.migration.wire.encoded`, `.multifd`)
    PAGE_XBZRLE = 0x30         # pages as XBZRLE deltas against what the destination holds
    PAGE_COMPRESSED = 0x31     # a multifd packet's pages, zlib- or zstd-compressed
    MULTIFD_HELLO = 0x32       # the first record on a multifd channel: which one it is
    MULTIFD_SYNC = 0x33        # on every channel once per pass: all before it has gone
    MULTIFD_FLUSH = 0x34       # on the main channel after the channels' sync of that number
    # Post-copy (`nodes.migration.postcopy`)
    POSTCOPY_DISCARD = 0x40    # the pages the destination must not take as present
    POSTCOPY_RUN = 0x41        # the destination may run the guest, pages still missing
    POSTCOPY_RESUMED = 0x42    # back: the guest runs on the destination
    REQ_PAGES = 0x43           # back: the guest touched these missing pages
    POSTCOPY_RECOVER = 0x44    # a new connection that resumes a paused post-copy
    RECV_BITMAP = 0x45         # back: the pages the destination has
    POSTCOPY_PREEMPT = 0x46    # the first record on the preempt channel (requested pages)
    ROUND_STATS = OPTIONAL | 0x01
    SOURCE_TIMING = OPTIONAL | 0x02


class PageType(IntEnum):
    """Top four bits of a PAGE_DATA pfn word, as Xen's."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    ZERO = 0x5        # migbed's own (Xen leaves 5..8 unused): a page of zeros, no data
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF

    @property
    def has_data(self) -> bool:
        return self not in (PageType.ZERO, PageType.BROKEN, PageType.XALLOC, PageType.XTAB)


GUEST_MODE_CODES = {"p==m": 0, "p2m": 1, "vp": 2}
_KNOWN_PAGE_TYPES = np.zeros(16, dtype=bool)
_KNOWN_PAGE_TYPES[[int(t) for t in PageType]] = True
_HAS_DATA = np.zeros(16, dtype=bool)
_HAS_DATA[[int(t) for t in PageType if t.has_data]] = True

# Field schemas of the map records: name -> allowed Python types after msgpack decoding.
_NUM = (int, float)
_OPT_STR = (str, type(None))
SCHEMAS: dict[RecordType, dict[str, tuple[type, ...]]] = {
    RecordType.END: {},
    RecordType.STATIC_DATA_END: {},
    RecordType.PERMISSION_TO_GO: {},
    RecordType.GUEST_INFO: {
        "migration_id": (str,), "name": (str,), "pages": (int,), "data_pages": (int,),
        "page_table_pages": (int,), "mode_before": (str,), "mode_during": (str,),
        "arch": (str,), "profile": (str,), "workload": (dict, type(None))},
    RecordType.P2M_FRAMES: {"mfns": (bytes,)},
    RecordType.VCPU_CONTEXT: {
        "vcpu_id": (int,), "workload_state": (dict, type(None)),
        "last_progress_wall": (float, type(None)), "pages_written_total": (int,)},
    RecordType.RECEIVER_READY: {"pages_received": (int,)},
    RecordType.SYNC: {},
    RecordType.SYNC_ACK: {"pages_received": (int,)},
    RecordType.RECEIVER_RESULT: {"ok": (bool,), "error": _OPT_STR, "digest": _OPT_STR,
                                 "resume_wall": (float, type(None))},
    RecordType.ABORT: {"error": (str,)},
    RecordType.POSTCOPY_DISCARD: {"bitmap": (bytes,)},
    RecordType.POSTCOPY_RUN: {},
    RecordType.POSTCOPY_RESUMED: {"resume_wall": _NUM},
    RecordType.REQ_PAGES: {"pfns": (bytes,)},
    RecordType.POSTCOPY_RECOVER: {"migration_id": (str,)},
    RecordType.RECV_BITMAP: {"bitmap": (bytes,)},
    RecordType.POSTCOPY_PREEMPT: {"migration_id": (str,)},
    RecordType.ROUND_STATS: {"rounds": (list,)},
    RecordType.SOURCE_TIMING: {"pause_wall": _NUM, "final_round_pages": (int,),
                               "clock_offset_seconds": (float, type(None)),
                               "clock_rtt_seconds": (float, type(None))},
    RecordType.CLOCK_PROBE: {"t1": (float,)},
    RecordType.CLOCK_REPLY: {"t1": (float,), "t2": (float,), "t3": (float,)},
    RecordType.MULTIFD_HELLO: {"migration_id": (str,), "channel": (int,), "channels": (int,)},
    RecordType.MULTIFD_SYNC: {"sync": (int,)},
    RecordType.MULTIFD_FLUSH: {"sync": (int,)},
}


@dataclass(frozen=True)
class ImageHeader:
    version: int
    options: int


@dataclass(frozen=True)
class DomainHeader:
    guest_mode: str
    page_shift: int


def data_mask(types: np.ndarray) -> np.ndarray:
    """Which pages of a record carry data (Xen's BROKEN, XALLOC and XTAB do not)."""
    return _HAS_DATA[types]


@dataclass
class PageData:
    """One decoded PAGE_DATA record: pfns, their types, and the pages that carry data."""

    pfns: np.ndarray        # int64
    types: np.ndarray       # uint8, PageType values
    # (n_with_data, page_size) uint8, in the order of pfns with data; None when the reader
    # delivered them to its page sink instead
    pages: np.ndarray | None

    @property
    def data_mask(self) -> np.ndarray:
        return data_mask(self.types)


@dataclass
class Record:
    type: int
    fields: dict


# -- encoding ---------------------------------------------------------------------------------
def encode_image_header() -> bytes:
    return IMAGE_HEADER.pack(IMAGE_MARKER, IMAGE_ID, STREAM_VERSION, OPTION_LITTLE_ENDIAN)


def encode_domain_header(guest_mode: str, page_shift: int) -> bytes:
    return DOMAIN_HEADER.pack(GUEST_MODE_CODES[guest_mode], page_shift, 0, *MIGBED_VERSION)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 8)


def encode_record(rtype: RecordType, fields: dict | None = None) -> bytes:
    """A map record: header, msgpack body, padding."""
    body = msgpack.packb(fields or {}, use_bin_type=True)
    return RECORD_HEADER.pack(int(rtype), len(body)) + body + _pad(len(body))


def _bin_header(n: int) -> bytes:
    return b"\xc6" + struct.pack(">I", n)   # msgpack bin 32


def encode_page_data(pfns: np.ndarray, types: np.ndarray, pages) -> list:
    """PAGE_DATA as buffers to send without joining: msgpack [count, bin pfn words, bin pages].

    `pages` holds only the pages whose type carries data, in pfn order: one (k, page_size)
    array, or a list of k one-dimensional page buffers (rows of machine memory, sent from
    where they sit: the socket gathers them, nothing copies them into a record first).
    """
    count = len(pfns)
    if not 0 < count <= MAX_BATCH_PAGES:
        raise ValueError(f"a PAGE_DATA record carries 1..{MAX_BATCH_PAGES} pages, not {count}")
    words = (pfns.astype("<u8") | (types.astype("<u8") << np.uint64(PFN_TYPE_SHIFT)))
    words = words.astype("<u8", copy=False)
    if isinstance(pages, list):
        parts = pages
        nbytes = sum(map(len, pages))
    else:
        data = np.ascontiguousarray(pages)
        parts = [memoryview(data).cast("B")]
        nbytes = data.nbytes
    head = b"\x93" + msgpack.packb(count) + _bin_header(words.nbytes)
    mid = _bin_header(nbytes)
    length = len(head) + words.nbytes + len(mid) + nbytes
    return [RECORD_HEADER.pack(RecordType.PAGE_DATA, length), head, words.tobytes(), mid,
            *parts, _pad(length)]


# -- decoding ---------------------------------------------------------------------------------
def decode_image_header(buf: bytes) -> ImageHeader:
    if len(buf) != IMAGE_HEADER.size:
        raise StreamError("truncated image header")
    marker, ident, version, options = IMAGE_HEADER.unpack(buf)
    if marker != IMAGE_MARKER or ident != IMAGE_ID:
        raise StreamError("not a migbed migration stream (bad image marker or id)")
    if version != STREAM_VERSION:
        raise StreamError(f"unsupported stream version {version} (this host speaks "
                          f"{STREAM_VERSION})")
    if options != OPTION_LITTLE_ENDIAN:
        raise StreamError(f"unsupported stream options {options:#x}")
    return ImageHeader(version, options)


def decode_domain_header(buf: bytes) -> DomainHeader:
    if len(buf) != DOMAIN_HEADER.size:
        raise StreamError("truncated domain header")
    code, page_shift, _res, _major, _minor = DOMAIN_HEADER.unpack(buf)
    modes = {v: k for k, v in GUEST_MODE_CODES.items()}
    if code not in modes:
        raise StreamError(f"unknown guest type {code} in domain header")
    if not 9 <= page_shift <= MAX_PAGE_SHIFT:
        raise StreamError(f"page shift {page_shift} out of range")
    return DomainHeader(modes[code], page_shift)


def _unpack(body: bytes) -> object:
    def no_ext(code: int, data: bytes) -> object:
        raise StreamError(f"msgpack ext type {code} is not allowed in a migration stream")

    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               ext_hook=no_ext, timestamp=0, max_bin_len=len(body),
                               max_str_len=len(body), max_array_len=len(body),
                               max_map_len=len(body) // 2, max_ext_len=0)
    except StreamError:
        raise
    except Exception as exc:  # msgpack raises several unrelated classes on bad input
        raise StreamError(f"record body is not valid msgpack: {type(exc).__name__}") from None


def decode_fields(rtype: RecordType, body: bytes) -> dict:
    obj = _unpack(body)
    if not isinstance(obj, dict):
        raise StreamError(f"{rtype.name} body must be a map")
    schema = SCHEMAS[rtype]
    missing = [k for k in schema if k not in obj]
    if missing:
        raise StreamError(f"{rtype.name} record lacks {', '.join(missing)}")
    for key, allowed in schema.items():
        value = obj[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise StreamError(f"{rtype.name}.{key} has the wrong type")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise StreamError(f"{rtype.name}.{key} is negative")
    return obj


def _page_data_parts(body: bytes | memoryview) -> tuple[int, memoryview, memoryview] | None:
    """[count, pfn words, page data] of a body laid out as `encode_page_data` writes it
    (fixarray 3, uint count, two bin 32), as views into `body`: no copy of the 4 MiB of
    pages. None for any other layout, which msgpack then decodes (and checks) the slow way.
    """
    view = memoryview(body).cast("B")
    n = len(view)
    head = array_count(view)
    if head is None:
        return None
    count, pos = head
    parts = []
    for _ in range(2):
        if n - pos < 5 or view[pos] != 0xC6:
            return None
        size = int.from_bytes(view[pos + 1:pos + 5], "big")
        pos += 5
        if size > n - pos:
            return None
        parts.append(view[pos:pos + size])
        pos += size
    if pos != n:
        return None
    return count, parts[0], parts[1]


def array_count(view: bytes | memoryview) -> tuple[int, int] | None:
    """(count, where the next item starts) of a body that opens as `encode_page_data`
    writes it: a fixarray of 3, then the count as a positive fixint, uint 8 or uint 16."""
    n = len(view)
    if n < 2 or view[0] != 0x93:
        return None
    tag = view[1]
    if tag <= 0x7F:
        return tag, 2
    if tag == 0xCC and n >= 3:
        return view[2], 3
    if tag == 0xCD and n >= 4:
        return int.from_bytes(view[2:4], "big"), 4
    return None


def page_data_offset(first: bytes) -> int:
    """Where the page bytes start in a PAGE_DATA body that begins with `first` (its first
    four bytes) and is laid out as `encode_page_data` writes it: fixarray, count, bin 32
    header, 8 x count bytes of pfn words, bin 32 header. Used to align a buffer and to
    find the pages a sink takes, each checked again after; 0 for another layout."""
    head = array_count(first) if len(first) >= 4 else None
    if head is None:
        return 0
    count, pos = head
    return pos + 5 + 8 * count + 5


def check_page_words(count: int, words: bytes | memoryview, data_bytes: int, page_size: int,
                      guest_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """pfns and types of a PAGE_DATA record, checked against its count and its data."""
    if not 0 < count <= MAX_BATCH_PAGES:
        raise StreamError(f"PAGE_DATA count {count} outside 1..{MAX_BATCH_PAGES}")
    if len(words) != 8 * count:
        raise StreamError(f"PAGE_DATA has {len(words)} bytes of pfns for {count} pages")
    w = np.frombuffer(words, dtype="<u8")
    types = (w >> np.uint64(PFN_TYPE_SHIFT)).astype(np.uint8)
    pfns = (w & np.uint64(PFN_MASK)).astype(np.int64)
    if not _KNOWN_PAGE_TYPES[types].all():
        raise StreamError(f"PAGE_DATA has an unknown page type {int(types[~_KNOWN_PAGE_TYPES[types]][0]):#x}")
    if int(pfns.max()) >= guest_pages:
        raise StreamError(f"PAGE_DATA pfn {int(pfns.max())} beyond the guest's {guest_pages} pages")
    with_data = int(np.count_nonzero(_HAS_DATA[types]))
    if data_bytes != with_data * page_size:
        raise StreamError(f"PAGE_DATA carries {data_bytes} bytes for {with_data} pages of "
                          f"{page_size} bytes")
    return pfns, types


def decode_page_data(body: bytes | memoryview, page_size: int, guest_pages: int) -> PageData:
    """PAGE_DATA checked and decoded; `pages` is a view into `body` when its layout allows."""
    parts = _page_data_parts(body)
    if parts is not None:
        count, words, data = parts
    else:
        obj = _unpack(body)
        if not (isinstance(obj, list) and len(obj) == 3 and isinstance(obj[0], int)
                and isinstance(obj[1], bytes) and isinstance(obj[2], bytes)):
            raise StreamError("PAGE_DATA body must be [count, pfn words, page data]")
        count, words, data = obj
    pfns, types = check_page_words(count, words, len(data), page_size, guest_pages)
    pages = np.frombuffer(data, dtype=np.uint8).reshape(len(data) // page_size, page_size)
    return PageData(pfns, types, pages)


def max_record_bytes(rtype: int, page_size: int, guest_pages: int) -> int:
    """The largest body a record of this type may have in this stream."""
    if rtype == RecordType.PAGE_DATA:
        return MAX_BATCH_PAGES * (page_size + 8) + 64
    if rtype == RecordType.P2M_FRAMES:
        return 8 * guest_pages + 64
    if rtype == RecordType.PAGE_XBZRLE:     # a delta never exceeds its page
        return MAX_BATCH_PAGES * (page_size + 10) + 64
    if rtype == RecordType.PAGE_COMPRESSED:  # at most one packet, and compression's worst case
        return MAX_BATCH_PAGES * (page_size + 8) + (MAX_BATCH_PAGES * page_size >> 6) + 1024
    if rtype in (RecordType.POSTCOPY_DISCARD, RecordType.RECV_BITMAP):
        return guest_pages // 8 + 64
    if rtype == RecordType.GUEST_INFO:      # a trace workload's trace travels in it
        return MAX_GUEST_INFO_BYTES
    return MAX_CONTROL_RECORD_BYTES
