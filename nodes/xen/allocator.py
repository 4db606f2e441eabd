"""The frame allocator and the global M2P table (machine frame -> owner domain, pfn).

Every machine frame is in exactly one state: reserved for the hypervisor, free, or owned by a
domain at one pseudo-physical frame number. The allocator keeps that in two arrays, which
are also Xen's M2P table, so frame accounting is exact by construction: `counts()` adds up to
`nframes` always, and a property test checks no frame is ever owned twice.

Scattered allocations are deliberately shuffled, so physical != machine is visible in every
P2M and VP guest. By default they come in superpage extents, as Xen populates a guest's memory
(populate_physmap in 2 MiB extents where it can): aligned runs of SUPERPAGE_FRAMES frames,
the runs in random machine order, the frames in order within a run; what does not fill an
extent, or finds no free one, comes as single frames. With `superpages=False` every frame is
drawn on its own: a host so fragmented that no two neighbouring pfns share a run.
"""

import numpy as np

from nodes.errors import ConfigError, OutOfFramesError

OWNER_FREE = -1
OWNER_HYPERVISOR = -2
PFN_NONE = -1
SUPERPAGE_FRAMES = 512   # a 2 MiB superpage of 4 KiB frames


class FrameAllocator:
    def __init__(self, nframes: int, reserved_frames: int, hypervisor_at: str = "bottom",
                 seed: int = 0, superpages: bool = True):
        if reserved_frames < 1:
            raise ConfigError("the hypervisor needs at least one reserved frame")
        if reserved_frames >= nframes:
            raise ConfigError(
                f"host memory ({nframes} frames) must be larger than the hypervisor's reserve "
                f"({reserved_frames} frames); give the host more memory or reserve less")
        self.nframes = nframes
        self.owner = np.full(nframes, OWNER_FREE, dtype=np.int32)
        self.pfn = np.full(nframes, PFN_NONE, dtype=np.int64)
        if hypervisor_at == "bottom":
            self.reserved = range(0, reserved_frames)
        elif hypervisor_at == "top":
            self.reserved = range(nframes - reserved_frames, nframes)
        else:
            raise ConfigError(f"hypervisor_at must be 'bottom' or 'top', not {hypervisor_at!r}")
        self.owner[self.reserved.start:self.reserved.stop] = OWNER_HYPERVISOR
        self._rng = np.random.default_rng(seed)
        self.extent = SUPERPAGE_FRAMES if superpages else 1

    # -- accounting -------------------------------------------------------------------
    @property
    def free_frames(self) -> int:
        return int(np.count_nonzero(self.owner == OWNER_FREE))

    def counts(self) -> dict[str, int]:
        free = self.free_frames
        reserved = len(self.reserved)
        return {"total": self.nframes, "free": free, "reserved": reserved,
                "used": self.nframes - free - reserved}

    def frames_of(self, domid: int) -> np.ndarray:
        return np.flatnonzero(self.owner == domid)

    # -- allocation -------------------------------------------------------------------
    def _need(self, n: int) -> None:
        if n <= 0:
            raise ConfigError(f"cannot allocate {n} frames")
        free = self.free_frames
        if n > free:
            raise OutOfFramesError(
                f"needs {n} frames but only {free} are free", needed_frames=n, free_frames=free)

    def alloc_scattered(self, n: int, domid: int) -> np.ndarray:
        """`n` free frames in random order, claimed for `domid` (pfns not yet assigned).

        Frames are drawn at random from the 2n highest free frames: out of order and with
        holes, like a fragmented host, while long runs stay free low in memory for P==M
        guests (which need one contiguous run). Whole free superpages among them are taken
        as extents first (see the module docstring), the rest frame by frame.
        """
        self._need(n)
        free = np.flatnonzero(self.owner == OWNER_FREE)[::-1][:2 * n]
        extents = np.empty(0, dtype=np.int64)
        e = self.extent
        if e > 1 and n >= e:
            isfree = np.zeros(self.nframes // e * e, dtype=bool)
            isfree[free[free < len(isfree)]] = True
            whole = np.flatnonzero(isfree.reshape(-1, e).all(axis=1))
            take = self._rng.choice(whole, size=min(n // e, len(whole)), replace=False)
            extents = (take[:, None] * e + np.arange(e)).ravel()
            if len(extents):
                free = free[~np.isin(free, extents)]
        singles = self._rng.choice(free, size=n - len(extents), replace=False)
        mfns = np.concatenate([extents, singles]).astype(np.int64)
        self.owner[mfns] = domid
        return mfns

    def alloc_contiguous(self, n: int, domid: int, start: int | None = None) -> int:
        """One run of `n` free frames for `domid`, at `start` or the lowest run that fits."""
        self._need(n)
        isfree = self.owner == OWNER_FREE
        if start is None:
            # Lowest start s with n free frames in [s, s+n): sliding window over a prefix sum.
            csum = np.concatenate(([0], np.cumsum(isfree, dtype=np.int64)))
            fits = np.flatnonzero(csum[n:] - csum[:-n] == n)
            if len(fits) == 0:
                raise OutOfFramesError(
                    f"needs a contiguous run of {n} frames; memory is too fragmented "
                    f"({self.free_frames} frames free)", needed_frames=n,
                    free_frames=self.free_frames)
            start = int(fits[0])
        elif start < 0 or start + n > self.nframes or not isfree[start:start + n].all():
            raise OutOfFramesError(
                f"frames {start}..{start + n - 1} are not all free", needed_frames=n,
                free_frames=self.free_frames)
        self.owner[start:start + n] = domid
        return start

    def set_m2p(self, mfns: np.ndarray, domid: int, pfns: np.ndarray) -> None:
        """Record that machine frames `mfns` hold `domid`'s pseudo-physical frames `pfns`."""
        if np.any(self.owner[mfns] != domid):
            raise AssertionError("set_m2p on frames the domain does not own")
        self.pfn[mfns] = pfns

    def free(self, mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return frames `mfns` to the free pool. Returns the runs of free frames that now
        hold them, as (starts, lengths): the freed frames with the free ones around them,
        so machine memory can give them back in a few long runs (`MachineMemory.discard`)
        instead of one call per scattered frame."""
        mfns = np.asarray(mfns, dtype=np.int64)
        if np.any(self.owner[mfns] < 0):
            raise AssertionError("freeing frames that are free or reserved")
        self.owner[mfns] = OWNER_FREE
        self.pfn[mfns] = PFN_NONE
        if not len(mfns):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        isfree = np.concatenate(([False], self.owner == OWNER_FREE, [False]))
        edges = np.flatnonzero(isfree[1:] != isfree[:-1])
        starts, ends = edges[0::2], edges[1::2]              # free runs [start, end)
        held = np.sort(np.searchsorted(starts, mfns, side="right") - 1)
        held = held[np.concatenate(([True], held[1:] != held[:-1]))]   # not np.unique:
        # its first call imports numpy.ma (12-17 ms), here at a migration's end
        return starts[held], ends[held] - starts[held]
