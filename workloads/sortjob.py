"""`sort`: sorts a large array of 64-bit records in the guest's memory in phases, as a batch
job does (`workloads.program` says why programs, and how they journal): it writes a new
generation of records, sorts runs of `RUN` records in place, then merges runs pairwise into
a second buffer and back, doubling their width each pass, until one run remains; then again.
Its dirty rate changes over time as the phases do (sequential writes, a run at a time, whole
passes over both buffers).

Every operation is one run, or the next `MERGE` records of a merge (the smallest of the two
runs' heads: found by sorting their next MERGE each), so a pause waits on no long call. The
journal keeps the phase, the run width, which buffer is the source, the pair and how far into
each of its runs the merge is, and the generation's sum and xor; `check` verifies what must
hold there: the sorted runs, the merged output so far, and the records' sum and xor.
"""

import numpy as np

from nodes.errors import ConfigError
from workloads.program import J_CURSOR, J_LOADED, Program, splitmix
from workloads.spec import WorkloadSpec

_MASK64 = (1 << 64) - 1
RUN = 4096
MERGE = 2048
GEN, RUNS, MERGING = 0, 1, 2
(C_PHASE, C_AT, C_WIDTH, C_SRC, C_I, C_J, C_GENERATION, C_SUM, C_XOR) = range(9)


def records(gen: int, lo: int, hi: int) -> np.ndarray:
    return splitmix(np.arange(lo, hi, dtype=np.uint64) + (np.uint64(gen) << np.uint64(40)))


class Sort(Program):
    pattern = "sort"
    code = 3

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        super().__init__(spec, data_pages, state, page_size)
        self.n = (data_pages - self.data_at) * page_size // 16 // RUN * RUN
        if self.n < RUN:
            raise ConfigError(f"sort needs room for two buffers of {RUN} records; give the "
                              "guest more memory")

    def _layout(self, data: np.ndarray) -> None:
        nb = self.n * 8
        self.bufs = (data[:nb].view(np.uint64), data[nb:2 * nb].view(np.uint64))
        self.cur = self.journal[J_CURSOR:J_CURSOR + 12]

    def _load(self) -> int:
        self.cur[:] = 0
        self.journal[J_LOADED] = 1
        return 1

    def _op(self) -> int:
        phase = int(self.cur[C_PHASE])
        if phase == GEN:
            return self._generate()
        if phase == RUNS:
            k = int(self.cur[C_AT])
            run = self.bufs[0][k * RUN:(k + 1) * RUN]
            run.sort()
            if (k + 1) * RUN >= self.n:
                self.cur[C_PHASE], self.cur[C_WIDTH], self.cur[C_SRC] = MERGING, RUN, 0
                self.cur[C_AT] = self.cur[C_I] = self.cur[C_J] = 0
            else:
                self.cur[C_AT] = k + 1
            return RUN * 8 // self.page_size
        return self._merge()

    def _generate(self) -> int:
        k, gen = int(self.cur[C_AT]), int(self.cur[C_GENERATION])
        lo, hi = k * RUN, (k + 1) * RUN
        recs = records(gen, lo, hi)
        self.bufs[0][lo:hi] = recs
        self.cur[C_SUM] = (int(self.cur[C_SUM]) + int(recs.sum(dtype=np.uint64))) & _MASK64
        self.cur[C_XOR] = self.cur[C_XOR] ^ np.bitwise_xor.reduce(recs)
        if hi >= self.n:
            self.cur[C_PHASE], self.cur[C_AT] = RUNS, 0
        else:
            self.cur[C_AT] = k + 1
        return RUN * 8 // self.page_size

    def _pair(self) -> tuple[int, int, int]:
        """The current pair's bounds: left run's start, its end (= right's start), right's end."""
        w, p = int(self.cur[C_WIDTH]), int(self.cur[C_AT])
        lo = p * 2 * w
        return lo, min(lo + w, self.n), min(lo + 2 * w, self.n)

    def _merge(self) -> int:
        src = self.bufs[int(self.cur[C_SRC])]
        dst = self.bufs[1 - int(self.cur[C_SRC])]
        lo, mid, hi = self._pair()
        i, j = int(self.cur[C_I]), int(self.cur[C_J])
        ka, kb = src[lo + i:min(lo + i + MERGE, mid)], src[mid + j:min(mid + j + MERGE, hi)]
        m = min(MERGE, (mid - lo - i) + (hi - mid - j))
        merged = np.sort(np.concatenate((ka, kb)))[:m]
        if m:
            thr = merged[-1]
            a_lt, b_lt = int(np.searchsorted(ka, thr, "left")), int(np.searchsorted(kb, thr,
                                                                                    "left"))
            a_eq = int(np.searchsorted(ka, thr, "right")) - a_lt
            take_a = a_lt + min(m - a_lt - b_lt, a_eq)
            dst[lo + i + j:lo + i + j + m] = merged
            i, j = i + take_a, j + m - take_a
        if lo + i + j >= hi:
            self._next_pair(hi)
        else:
            self.cur[C_I], self.cur[C_J] = i, j
        return max(1, m * 8 // self.page_size)

    def _next_pair(self, hi: int) -> None:
        self.cur[C_I] = self.cur[C_J] = 0
        if hi < self.n:
            self.cur[C_AT] = int(self.cur[C_AT]) + 1
            return
        w = int(self.cur[C_WIDTH]) * 2
        self.cur[C_SRC] = 1 - int(self.cur[C_SRC])
        self.cur[C_AT] = 0
        if w >= self.n:          # one run, sorted (in either buffer): the next generation
            gen = int(self.cur[C_GENERATION]) + 1
            self.cur[:] = 0
            self.cur[C_GENERATION] = gen
            return
        self.cur[C_WIDTH] = w

    def check(self) -> dict:
        if not self.loaded:
            return {"ok": True, "checked": 0, "detail": "still loading"}
        phase, at = int(self.cur[C_PHASE]), int(self.cur[C_AT])
        bad = []
        if phase == RUNS:
            for k in range(at):
                if not _sorted(self.bufs[0][k * RUN:(k + 1) * RUN]):
                    bad.append(f"run {k} is not sorted")
                    break
        if phase in (RUNS, MERGING):
            src = self.bufs[int(self.cur[C_SRC])] if phase == MERGING else self.bufs[0]
            if src.sum(dtype=np.uint64) != self.cur[C_SUM] or \
                    np.bitwise_xor.reduce(src) != self.cur[C_XOR]:
                bad.append("the records' sum or xor changed")
        if phase == MERGING:
            bad += self._check_merge()
        return {"ok": not bad, "checked": self.n, "detail": "; ".join(bad) or
                f"phase {('generate', 'runs', 'merge')[phase]}, at {at}, width "
                f"{int(self.cur[C_WIDTH])}, generation {int(self.cur[C_GENERATION])}: "
                f"runs sorted, sum and xor hold"}

    def _check_merge(self) -> list[str]:
        w = int(self.cur[C_WIDTH])
        src = self.bufs[int(self.cur[C_SRC])]
        dst = self.bufs[1 - int(self.cur[C_SRC])]
        for lo in range(0, self.n, w):
            if not _sorted(src[lo:lo + w]):
                return [f"the run at {lo} (width {w}) is not sorted"]
        lo, _mid, _hi = self._pair()
        for start in range(0, lo, 2 * w):
            if not _sorted(dst[start:start + 2 * w]):
                return [f"the merged run at {start} (width {2 * w}) is not sorted"]
        out = dst[lo:lo + int(self.cur[C_I]) + int(self.cur[C_J])]
        if not _sorted(out):
            return ["the merge's output so far is not sorted"]
        return []


def _sorted(a: np.ndarray) -> bool:
    return bool((a[1:] >= a[:-1]).all())
