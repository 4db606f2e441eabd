"""Machine memory: a host's physical page frames, as real bytes in one numpy array.

The array is a view of one anonymous mapping (`mmap`): zeroed, page-aligned (a 4 KiB frame
is one page of the process), and backed by the kernel only on first touch. So an idle 4 GiB
host costs almost no resident memory, and a frame costs RAM once a guest (or the migration
receiver) writes it. Not `np.zeros`: numpy asks for transparent huge pages on big arrays,
and with this kernel's defrag=madvise every first touch of a 2 MiB page waited for
compaction: a destination reserving 256 MiB took 0.25-1.0 s to populate its frames, against
0.05-0.12 s in small pages, for the same migration throughput. Frames are addressed by
machine frame number (MFN); a frame is `page_size` bytes.
"""

import mmap
from collections.abc import Iterator

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
        self._map = mmap.mmap(-1, self.nframes * page_size,
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.frames = np.frombuffer(self._map, dtype=np.uint8).reshape(self.nframes, page_size)
        self.words = self.frames.view(np.uint64)
        self.flat = memoryview(self.frames).cast("B")    # all frames as one byte buffer

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

    def buffers(self, mfns: np.ndarray) -> list:
        """Frames `mfns`, in order, as buffers for scatter/gather socket I/O, without a copy:
        one buffer per run of adjacent frames (a superpage extent goes as one), or one per
        frame when the frames are scattered."""
        if not len(mfns):
            return []
        breaks = np.flatnonzero(np.diff(mfns) != 1) + 1
        if 2 * len(breaks) > len(mfns):
            return [self.frames[m] for m in mfns.tolist()]
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.append(starts, len(mfns)))
        ps = self.page_size
        return [self.flat[a * ps:(a + k) * ps]
                for a, k in zip(mfns[starts].tolist(), lengths.tolist(), strict=True)]

    def pieces(self, mfns: np.ndarray, max_pages: int = 1024
               ) -> Iterator[tuple[int, np.ndarray, bool]]:
        """Frames `mfns` as (index into mfns, pages, is_view) pieces of at most `max_pages`,
        covering each once (not necessarily in order): runs of adjacent frames as views of
        machine memory (no copy), the rest gathered into copies. Reading through views is what makes hashing and scrubbing a
        guest held in superpage extents cheap."""
        n = len(mfns)
        breaks = np.flatnonzero(np.diff(mfns) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = [*breaks.tolist(), n]
        loose: list[int] = []               # indices of frames in short runs: gathered
        for a, b in zip(starts, ends, strict=True):
            if b - a < 16:
                loose.extend(range(a, b))
                if len(loose) >= max_pages:
                    yield from self._gathered(mfns, loose, max_pages)
                    loose = []
                continue
            m = int(mfns[a])
            for i in range(a, b, max_pages):
                k = min(max_pages, b - i)
                yield i, self.frames[m + i - a:m + i - a + k], True
        if loose:
            yield from self._gathered(mfns, loose, max_pages)

    def _gathered(self, mfns: np.ndarray, loose: list[int], max_pages: int
                  ) -> Iterator[tuple[int, np.ndarray, bool]]:
        """Runs of consecutive indices in `loose` as gathered pieces of at most max_pages."""
        idx = np.asarray(loose)
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1
        for part in np.split(idx, cuts):
            for i in range(0, len(part), max_pages):
                piece = part[i:i + max_pages]
                yield int(piece[0]), self.frames[mfns[piece]], False

    def scrub(self, mfns: np.ndarray, batch_frames: int = 1024) -> None:
        """Zero frames before they go back to the free pool, as Xen scrubs freed pages.

        Only frames that are not zero already are written: reading a never-touched frame is
        cheap, writing it costs a page fault and makes it resident, so scrubbing an idle
        guest's untouched memory would take longer than migrating it (measured: 0.36 s for
        256 MiB) and leave its frames in RAM for nothing.
        """
        mfns = np.asarray(mfns, dtype=np.int64)
        for i, pages, is_view in self.pieces(mfns, batch_frames):
            dirty = pages.any(axis=1)
            if not dirty.any():
                continue
            if is_view:
                pages[dirty] = 0
            else:
                self.frames[mfns[i:i + len(pages)][dirty]] = 0
