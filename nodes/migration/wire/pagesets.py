"""Sets of pages on the wire, for post-copy: a bitmap (the discard set of POSTCOPY_DISCARD,
the received set of RECV_BITMAP; bit i of byte i // 8 for pfn i) and a list of pfns (the pages
a REQ_PAGES asks for). Decoding is bounded by the guest's pages and refuses anything a
well-formed sender never writes (a wrong length, bits past the guest, a pfn beyond it or twice,
more than MAX_REQUEST_PAGES)."""

import numpy as np

from nodes.errors import StreamError

MAX_REQUEST_PAGES = 1 << 13          # pages one REQ_PAGES asks for (a vCPU batch is 4096)


def encode_bitmap(mask: np.ndarray) -> bytes:
    """A set of pages (a bool per pfn) as a bitmap."""
    return np.packbits(np.asarray(mask, bool), bitorder="little").tobytes()


def decode_bitmap(data: bytes, guest_pages: int) -> np.ndarray:
    """The bool per pfn of a bitmap from the wire: exactly ceil(pages / 8) bytes, the bits
    past the last page zero."""
    if len(data) != (guest_pages + 7) // 8:
        raise StreamError(f"a bitmap of {len(data)} bytes for {guest_pages} pages (expected "
                          f"{(guest_pages + 7) // 8})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[guest_pages:].any():
        raise StreamError("a bitmap marks pages beyond the guest's memory")
    return bits[:guest_pages].astype(bool)


def encode_pfns(pfns: np.ndarray) -> bytes:
    return np.asarray(pfns, dtype="<u8").tobytes()


def decode_pfns(data: bytes, guest_pages: int) -> np.ndarray:
    """The pfns of a REQ_PAGES record: 1..MAX_REQUEST_PAGES u64 words, each a page of the
    guest, none twice."""
    if not data or len(data) % 8 or len(data) // 8 > MAX_REQUEST_PAGES:
        raise StreamError(f"REQ_PAGES carries {len(data)} bytes: 1 to {MAX_REQUEST_PAGES} "
                          "pfns of 8 bytes each")
    words = np.frombuffer(data, dtype="<u8")
    if int(words.max()) >= guest_pages:
        raise StreamError(f"REQ_PAGES asks for pfn {int(words.max())} beyond the guest's "
                          f"{guest_pages} pages")
    pfns = words.astype(np.int64)
    ordered = np.sort(pfns)                      # not np.unique: it imports numpy.ma
    if (ordered[1:] == ordered[:-1]).any():
        raise StreamError("REQ_PAGES asks for a page twice")
    return pfns
