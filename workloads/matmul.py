"""`matmul`: repeated matrix products C = A @ B landing in the guest's memory, a block of C
per operation (`workloads.program` says why programs, and how they journal).

A BLAS writing real memory: each generation writes a new B (row chunks, one per operation),
then computes C block by block (a 64 x 64 block is A's block row times B's block column:
~0.2 ms at n = 512). A and B hold small integers as doubles, so every product is exact and
`check` recomputes C on either side of the journal's cursor.
"""

import math

import numpy as np

from nodes.errors import ConfigError
from workloads.program import J_CURSOR, J_LOADED, Program, splitmix
from workloads.spec import WorkloadSpec

BLOCK = 64
MAX_N = 512                   # a 64-row block of C is 2 MFLOP: well under 1 ms
C_PHASE, C_AT, C_GEN, C_LOADED = range(4)      # phase 0: writing B, 1: multiplying


def matrix(gen: int, n: int, rows: slice) -> np.ndarray:
    """Generation `gen`'s matrix (0 is A), rows `rows`: integers -2..2 as doubles."""
    lo, hi, _ = rows.indices(n)
    r = np.arange(lo * n, hi * n, dtype=np.uint64).reshape(hi - lo, n)
    return (splitmix(r + np.uint64(gen) * np.uint64(n * n)) % np.uint64(5)).astype(
        np.float64) - 2.0


class MatMul(Program):
    pattern = "matmul"
    code = 4

    def __init__(self, spec: WorkloadSpec, data_pages: int, state: dict | None = None,
                 page_size: int = 4096):
        super().__init__(spec, data_pages, state, page_size)
        room = (data_pages - self.data_at) * page_size // 24
        self.n = min(MAX_N, int(math.isqrt(room)) // BLOCK * BLOCK)
        if self.n < BLOCK:
            raise ConfigError(f"matmul needs room for three {BLOCK} x {BLOCK} matrices; "
                              "give the guest more memory")
        self.nb = self.n // BLOCK
        self.rows = max(1, BLOCK * 4 * 512 // self.n)     # B's rows an operation writes

    def _layout(self, data: np.ndarray) -> None:
        nn = self.n * self.n * 8
        self.A, self.B, self.C = (data[k * nn:(k + 1) * nn].view(np.float64).reshape(
            self.n, self.n) for k in range(3))
        self.cur = self.journal[J_CURSOR:J_CURSOR + 4]

    def _load(self) -> int:
        r = int(self.cur[C_LOADED])
        hi = min(self.n, r + self.rows)
        self.A[r:hi] = matrix(0, self.n, slice(r, hi))
        self.cur[C_LOADED] = hi
        if hi == self.n:
            self.cur[C_GEN], self.cur[C_PHASE], self.cur[C_AT] = 1, 0, 0
            self.journal[J_LOADED] = 1
        return (hi - r) * self.n * 8 // self.page_size + 1

    def _op(self) -> int:
        at, gen = int(self.cur[C_AT]), int(self.cur[C_GEN])
        if int(self.cur[C_PHASE]) == 0:
            hi = min(self.n, at + self.rows)
            self.B[at:hi] = matrix(gen, self.n, slice(at, hi))
            if hi == self.n:
                self.cur[C_PHASE], self.cur[C_AT] = 1, 0
            else:
                self.cur[C_AT] = hi
            return (hi - at) * self.n * 8 // self.page_size + 1
        i, j = divmod(at, self.nb)
        rs, cs = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
        np.matmul(self.A[rs], self.B[:, cs], out=self.C[rs, cs])
        if at + 1 == self.nb * self.nb:
            self.cur[C_PHASE], self.cur[C_AT], self.cur[C_GEN] = 0, 0, gen + 1
        else:
            self.cur[C_AT] = at + 1
        return BLOCK

    def check(self) -> dict:
        if not self.loaded:
            return {"ok": True, "checked": 0, "detail": "still loading"}
        n, all_rows = self.n, slice(0, self.n)
        phase, at, gen = (int(self.cur[k]) for k in (C_PHASE, C_AT, C_GEN))
        bad = []
        A = matrix(0, n, all_rows)
        if (self.A != A).any():
            bad.append("A changed")
        b_now = matrix(gen, n, all_rows)
        b_old = matrix(gen - 1, n, all_rows) if gen > 1 else None
        written = at if phase == 0 else n
        if (self.B[:written] != b_now[:written]).any():
            bad.append(f"B's first {written} rows are not generation {gen}'s")
        b_rest = b_old[written:] if b_old is not None else 0.0
        if (self.B[written:] != b_rest).any():
            bad.append(f"B's rows from {written} are not generation {gen - 1}'s")
        c_old = A @ b_old if b_old is not None else np.zeros((n, n))
        want = c_old.copy()
        if phase == 1:
            c_new = A @ b_now
            for k in range(at):
                i, j = divmod(k, self.nb)
                rs, cs = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
                want[rs, cs] = c_new[rs, cs]
        wrong = int(np.count_nonzero(self.C != want))
        if wrong:
            bad.append(f"{wrong} elements of C are not A @ B's")
        return {"ok": not bad, "checked": 3 * n * n, "detail": "; ".join(bad) or
                f"C = A @ B ({n} x {n}), generation {gen}, phase {phase}, at {at}"}
