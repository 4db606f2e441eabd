"""`stream`: the STREAM triad a = b + s * c over three arrays in the guest's memory, a chunk
per operation (`workloads.program` says why programs, and how they journal).

The workload auto-converge exists for: it rewrites every page of `a` once a sweep, as fast as
its vCPU runs (`--ops-per-second max`) or at a set rate, so its dirty rate is the vCPU's
speed, and a throttle that slows the vCPU slows the dirtying (nothing else sets it).

The arrays hold small integers as doubles, and the scalar of sweep k is 1 + k mod 5, so every
value is exact: `check` recomputes what `a` must hold, chunk by chunk, on either side of the
journal's cursor (b and c never change after the load).
"""

import numpy as np

from nodes.errors import ConfigError
from workloads.program import J_CURSOR, J_LOADED, Program
from workloads.spec import WorkloadSpec

CHUNK = 32768                 # doubles an operation covers (256 KiB of a; ~0.1 ms)
C_CHUNK, C_SWEEP, C_LOADED = range(3)


def scalar(sweep: int) -> float:
    return float(1 + sweep % 5)


def b_values(i: np.ndarray) -> np.ndarray:
    return (i % 97).astype(np.float64)


def c_values(i: np.ndarray) -> np.ndarray:
    return (i % 89 + 1).astype(np.float64)


class Stream(Program):
    pattern = "stream"
    code = 2

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        super().__init__(spec, data_pages, state, page_size)
        elems = (data_pages - self.data_at) * page_size // 24
        self.chunk = min(CHUNK, elems)
        self.chunks = elems // max(self.chunk, 1)
        self.n = self.chunks * self.chunk
        if self.n < 1:
            raise ConfigError("stream needs room for three arrays of doubles; give the guest "
                              "more memory")

    def _layout(self, data: np.ndarray) -> None:
        nb = self.n * 8
        self.a, self.b, self.c_ = (data[k * nb:(k + 1) * nb].view(np.float64)
                                   for k in range(3))
        self.cur = self.journal[J_CURSOR:J_CURSOR + 4]

    def _load(self) -> int:
        k = int(self.cur[C_LOADED])
        lo, hi = k * self.chunk, (k + 1) * self.chunk
        i = np.arange(lo, hi)
        self.a[lo:hi] = 0.0
        self.b[lo:hi] = b_values(i)
        self.c_[lo:hi] = c_values(i)
        self.cur[C_LOADED] = k + 1
        if k + 1 == self.chunks:
            self.journal[J_LOADED] = 1
        return 3 * self.chunk * 8 // self.page_size

    def _op(self) -> int:
        k, sweep = int(self.cur[C_CHUNK]), int(self.cur[C_SWEEP])
        lo, hi = k * self.chunk, (k + 1) * self.chunk
        a = self.a[lo:hi]
        np.multiply(self.c_[lo:hi], scalar(sweep), out=a)
        np.add(a, self.b[lo:hi], out=a)
        if k + 1 == self.chunks:
            self.cur[C_CHUNK], self.cur[C_SWEEP] = 0, sweep + 1
        else:
            self.cur[C_CHUNK] = k + 1
        return max(1, self.chunk * 8 // self.page_size)

    def check(self) -> dict:
        if not self.loaded:
            return {"ok": True, "checked": 0, "detail": "still loading"}
        i = np.arange(self.n)
        b, c = b_values(i), c_values(i)
        bad = []
        if (self.b != b).any() or (self.c_ != c).any():
            bad.append("b or c changed")
        k, sweep = int(self.cur[C_CHUNK]), int(self.cur[C_SWEEP])
        cut = k * self.chunk
        want = np.empty(self.n)
        want[:cut] = b[:cut] + scalar(sweep) * c[:cut]
        want[cut:] = (b[cut:] + scalar(sweep - 1) * c[cut:]) if sweep else 0.0
        wrong = np.flatnonzero(self.a != want)
        if len(wrong):
            bad.append(f"{len(wrong)} elements of a are not the triad's (first {int(wrong[0])})")
        return {"ok": not bad, "checked": 3 * self.n, "detail": "; ".join(bad) or
                f"a = b + s*c over {self.n} elements, sweep {sweep}, chunk {k}"}
