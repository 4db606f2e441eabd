"""Machine memory: a host's physical page frames, as real bytes in one numpy array.

The array is a view of one shared mapping of a memfd (one per host): zeroed, page-aligned (a
4 KiB frame is one page of the process), and backed by the kernel only on first touch. So an
idle 4 GiB host costs almost no resident memory, and a frame costs RAM once a guest (or the
migration receiver) writes it. A memfd rather than anonymous memory so that another process
(a guest's process vCPU, `nodes.host`) can map a guest's frames (`fd`) and write them as the
host sees them. Not `np.zeros`: numpy asks for transparent huge pages on big arrays, and with
this kernel's defrag=madvise every first touch of a 2 MiB page waited for compaction: a
destination reserving 256 MiB took 0.25-1.0 s to populate its frames, against 0.05-0.12 s in
small pages, for the same migration throughput (so the mapping is madvised NOHUGEPAGE too,
should shmem huge pages be on). Frames are addressed by machine frame number (MFN); a frame
is `page_size` bytes.

Two costs of shared memory the model works around. Freed frames are punched out of the memfd
(`discard`): that zeroes them, as Xen scrubs freed pages, and gives their RAM back, so a later
guest mapping them sees zeros. And a read through the mapping of a frame never written
allocates it (shmem has no shared zero page, as anonymous memory has): readers of whole
guests (zero-page detection, digests) ask `holes` first and skip frames known to be zero.
Where memfds do not exist the memory is anonymous, as before, and `fd` is None.
"""

import ctypes
import ctypes.util
import mmap
import os
import weakref
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
        self.fd = _memfd(total_bytes)
        if self.fd is None:
            self._map = mmap.mmap(-1, total_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            weakref.finalize(self, os.close, self.fd)
            self._map = mmap.mmap(self.fd, total_bytes, flags=mmap.MAP_SHARED)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.frames = np.frombuffer(self._map, dtype=np.uint8).reshape(self.nframes, page_size)
        self.words = self.frames.view(np.uint64)
        self.flat = memoryview(self.frames).cast("B")    # all frames as one byte buffer
        self._trust_holes = self.fd is not None and not _swap_on()

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
        """Zero frames in place (a freed guest's frames are `discard`ed instead).

        Only frames that are not zero already are written: reading a never-touched frame is
        cheap, writing it costs a page fault and makes it resident, so scrubbing an idle
        guest's untouched memory would take longer than migrating it (measured: 0.36 s for
        256 MiB) and leave its frames in RAM for nothing. Holes are not even read.
        """
        mfns = np.asarray(mfns, dtype=np.int64)
        mfns = mfns[~self.holes(mfns)]
        for i, pages, is_view in self.pieces(mfns, batch_frames):
            dirty = pages.any(axis=1)
            if not dirty.any():
                continue
            if is_view:
                pages[dirty] = 0
            else:
                self.frames[mfns[i:i + len(pages)][dirty]] = 0

    def discard(self, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Give back runs of frames (`lengths[i]` frames from `starts[i]`): they read as
        zeros from now on, in every process that maps them, and hold no RAM. One
        `fallocate(PUNCH_HOLE)` per run, so callers pass runs as long as they can (the
        hypervisor bridges the free frames between a freed guest's frames). Anonymous
        memory (no memfd) is zeroed instead."""
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.fd is None:
            for a, k in zip(starts.tolist(), lengths.tolist(), strict=True):
                self.scrub(np.arange(a, a + k))
            return
        ps = self.page_size
        for a, k in zip(starts.tolist(), lengths.tolist(), strict=True):
            if _libc.fallocate(self.fd, _PUNCH, ctypes.c_long(a * ps), ctypes.c_long(k * ps)):
                err = ctypes.get_errno()
                raise OSError(err, f"punching frames {a}..{a + k - 1}: {os.strerror(err)}")

    def holes(self, mfns: np.ndarray) -> np.ndarray:
        """One bool per frame of `mfns`: True where the frame holds no page at all (never
        written since the host started or since it was discarded), so it is zero and
        reading it would only allocate it. False where unsure: anonymous memory, swap on
        (a swapped-out page would look like a hole to `mincore`), or frames so scattered
        that asking would cost more than reading them (`mincore` costs ~40 ns per page of
        the span asked, a call ~5 us: frames are asked a span at a time, or a run of
        neighbours at a time when there are few such runs)."""
        mfns = np.asarray(mfns, dtype=np.int64)
        out = np.zeros(len(mfns), bool)
        if not self._trust_holes or not len(mfns):
            return out
        lo, hi = int(mfns.min()), int(mfns.max()) + 1
        if hi - lo <= 8 * len(mfns):
            return self._incore(lo, hi)[mfns - lo] == 0
        order = np.argsort(mfns, kind="stable")
        ordered = mfns[order]
        cuts = np.flatnonzero(np.diff(ordered) > 128) + 1
        if 16 * len(cuts) > len(mfns):
            return out
        bounds = [0, *cuts.tolist(), len(mfns)]
        for i, j in zip(bounds[:-1], bounds[1:], strict=True):
            a = int(ordered[i])
            vec = self._incore(a, int(ordered[j - 1]) + 1)
            out[order[i:j]] = vec[ordered[i:j] - a] == 0
        return out

    def _incore(self, lo: int, hi: int) -> np.ndarray:
        """mincore(2) of frames lo..hi-1: bit 0 of each byte is set where a page is held."""
        vec = np.zeros(hi - lo, np.uint8)
        addr = self.frames.ctypes.data + lo * self.page_size
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t((hi - lo) * self.page_size),
                         vec.ctypes.data_as(ctypes.c_void_p)):
            vec[:] = 1                           # unsure: read them
        return vec & 1


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_PUNCH = 0x02 | 0x01                            # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _memfd(total_bytes: int) -> int | None:
    """A memfd of `total_bytes` (close-on-exec), or None where the system has none."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("migbed-machine-memory", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        os.ftruncate(fd, total_bytes)
    except OSError:
        os.close(fd)
        raise
    return fd


def _swap_on() -> bool:
    """Whether any swap is configured (then `mincore` cannot tell a hole from a page out)."""
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return True
