"""multifd's compression of a packet's pages: the real zlib and zstandard libraries, each packet
a stream of its own, and decompression bounded so no packet can make the destination
allocate more than the pages it says it carries.

QEMU's multifd-zlib keeps one deflate stream per channel across packets (each packet ends
with a sync flush), its multifd-zstd one zstd stream per channel; migbed compresses every
packet on its own, so a packet decodes without the packets before it (a little less ratio,
measured in `migbed bench`). Both libraries release the GIL while they work, so channels
compress in parallel for real.
"""

import zlib

import zstandard

from nodes.errors import StreamError

CODECS = {"zlib": 1, "zstd": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}


class Compressor:
    """Compresses whole packets at one level; one per channel (zstd contexts are not
    shared between threads)."""

    def __init__(self, name: str, level: int):
        self.name = name
        self.code = CODECS[name]
        self.level = level
        self._zstd = (zstandard.ZstdCompressor(level=level, write_content_size=True)
                      if name == "zstd" else None)

    def compress(self, buffers: list) -> bytes:
        if self._zstd is not None:
            return self._zstd.compress(b"".join(buffers))
        z = zlib.compressobj(self.level)
        return b"".join([*(z.compress(b) for b in buffers), z.flush()])


def decompress(code: int, data: bytes | memoryview, size: int) -> bytes:
    """Exactly `size` bytes from one packet compressed with codec `code`, or StreamError:
    never more than `size` bytes are made, whatever the input claims."""
    if code == CODECS["zlib"]:
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, size) if size else d.decompress(data, 1)
        except zlib.error as exc:
            raise StreamError(f"a zlib packet does not decompress: {exc}") from None
        if not d.eof or d.unconsumed_tail or d.unused_data or len(out) != size:
            raise StreamError(f"a zlib packet does not hold exactly {size} bytes")
        return out
    if code == CODECS["zstd"]:
        try:
            claimed = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise StreamError(f"a zstd packet has no valid frame header: {exc}") from None
        if claimed not in (-1, size):
            raise StreamError(f"a zstd packet claims {claimed} bytes for {size}")
        try:
            out = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise StreamError(f"a zstd packet does not decompress: {exc}") from None
        if len(out) != size:
            raise StreamError(f"a zstd packet does not hold exactly {size} bytes")
        return out
    raise StreamError(f"unknown compression code {code}")
