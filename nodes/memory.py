"""Machine memory: a host's physical page frames, as real bytes in one numpy array.

The array comes from `np.zeros`, which asks the C library for zeroed memory; for anything
larger than a few pages glibc maps fresh anonymous pages that the kernel only backs on first
touch. So an idle 4 GiB host costs almost no resident memory, and a frame costs RAM once a
guest (or the migration receiver) writes it. Frames are addressed by machine frame number
(MFN); a frame is `page_size` bytes.
"""

import numpy as np

from nodes.errors import ConfigError

WORD_BYTES = 8


class MachineMemory:
    """`nframes` frames of `page_size` bytes, viewed as bytes and as 64-bit words."""

    def __init__(self, total_bytes: int, page_size: int = 4096):
        if page_size < 512 or page_size & (page_size - 1):
            raise ConfigError(f"page size must be a power of two >= 512 bytes, got {page_size}")
        if total_bytes <= 0 or total_bytes % page_size:
            raise ConfigError(
                f"host memory must be a positive multiple of the page size ({page_size} B), "
                f"got {total_bytes} B")
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.nframes = total_bytes // page_size
        self.frames = np.zeros((self.nframes, page_size), dtype=np.uint8)
        self.words = self.frames.view(np.uint64)

    @property
    def total_bytes(self) -> int:
        return self.nframes * self.page_size

    @property
    def words_per_page(self) -> int:
        return self.page_size // WORD_BYTES

    def read(self, mfns: np.ndarray) -> np.ndarray:
        """A copy of the frames `mfns`, shape (len(mfns), page_size)."""
        return self.frames[mfns]

    def write(self, mfns: np.ndarray, pages: np.ndarray) -> None:
        """Overwrite frames `mfns` with `pages` (shape (len(mfns), page_size), uint8)."""
        self.frames[mfns] = pages

    def scrub(self, mfns: np.ndarray, batch_frames: int = 1024) -> None:
        """Zero frames before they go back to the free pool, as Xen scrubs freed pages.

        Only frames that are not zero already are written: reading a never-touched frame is
        cheap, writing it costs a page fault and makes it resident, so scrubbing an idle
        guest's untouched memory would take longer than migrating it (measured: 0.36 s for
        256 MiB) and leave its frames in RAM for nothing.
        """
        mfns = np.asarray(mfns)
        for i in range(0, len(mfns), batch_frames):
            chunk = mfns[i:i + batch_frames]
            dirty = chunk[self.frames[chunk].any(axis=1)]
            if len(dirty):
                self.frames[dirty] = 0
