"""A domain (guest) and its memory access path in each mode.

The access path is the seam later features plug into (post-copy faults, throttling): every
guest read and write goes through `Domain.write_words` / `read_words` / `write_pages` /
`read_pages`, which translate pfns the way the guest's current mode does:

- P==M: the guest's physical frame numbers *are* machine frames, inside one run; anything
  outside is refused (the hypervisor polices it).
- P2M: the guest translates through its own copy of the P2M table; the hypervisor sees
  nothing (no dirty logging possible).
- VP: the hypervisor translates through its P2M table and, with log-dirty on, marks pfns.

During a post-copy migration the destination runs the guest before all its pages have
arrived: `present` says which have, and an access (read or write) that touches any that have
not calls `on_missing` with all of them at once, which the migration layer installs
(`nodes.migration.postcopy.pagefault`): it asks the source for them and blocks this vCPU
until they land. The model itself waits on nothing and opens nothing.

All of it happens under `self.lock`, so a mode switch or pause never races a write: a batch
lands wholly before or wholly after it (a vCPU waiting on a missing page holds the lock: the
pages land without it).
"""

import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

import numpy as np

from nodes.errors import AccessViolation, GuestPaused
from nodes.xen import pagetable
from nodes.xen.logdirty import DirtyLog, LogDirty
from nodes.xen.memory import MachineMemory
from nodes.xen.profiles import Mode


class DomainState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"    # frames reserved on a migration's destination, not yet resumed

    def __str__(self) -> str:
        return self.value


class VCPUControl(Protocol):
    """How the hypervisor stops and starts a guest's vCPUs that do not wait on `running`
    (a process vCPU: `nodes.host.processvcpu`), installed by the host as
    `Domain.vcpu_control`. `pause` returns once they are parked."""

    def pause(self) -> None: ...

    def unpause(self) -> None: ...


class Domain:
    def __init__(self, domid: int, name: str, mode: Mode, p2m: np.ndarray,
                 memory: MachineMemory, *, dma: bool = False, is_dom0: bool = False,
                 pfn_base: int = 0, state: DomainState = DomainState.RUNNING,
                 has_page_tables: bool = True):
        self.domid = domid
        self.name = name
        self.mode = mode
        self.dma = dma
        self.is_dom0 = is_dom0
        self.memory = memory
        self.state = state
        self.lock = threading.RLock()
        self.running = threading.Event()
        if state is DomainState.RUNNING:
            self.running.set()
        # The hypervisor's table: pfn (relative to pfn_base) -> mfn.
        self.p2m = p2m
        # The guest's own copy (P2M mode only); a VP guest knows no machine frames.
        self.guest_p2m: np.ndarray | None = p2m.copy() if mode is Mode.P2M else None
        self.pfn_base = pfn_base
        self.npages = len(p2m)
        epp = memory.words_per_page
        self.pt_pfns = (pagetable.table_pfns(self.npages, epp) if has_page_tables
                        else np.zeros(0, dtype=np.int64))
        self.data_pages = self.npages - len(self.pt_pfns)
        # The emulated log, marked by the access path below; a process vCPU's host puts
        # the kernel's in its place (`nodes.xen.logdirty.DirtyLog`).
        self.logdirty: DirtyLog = LogDirty(self.npages)
        self.vcpu_control: VCPUControl | None = None
        self.pages_written_total = 0
        self.migrating = False
        # Post-copy: which pages have arrived (None: all), and the handler of an access to
        # pages that have not (it returns once they have; see the module docstring).
        self.present: np.ndarray | None = None
        self.on_missing: Callable[[np.ndarray], None] | None = None

    # -- description -------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.state is DomainState.RUNNING

    @property
    def memory_bytes(self) -> int:
        return self.npages * self.memory.page_size

    def describe(self) -> dict:
        d = {"domid": self.domid, "name": self.name, "mode": self.mode.value,
             "memory_bytes": self.memory_bytes, "pages": self.npages,
             "state": self.state.value, "dma": self.dma, "dom0": self.is_dom0,
             "page_table_pages": len(self.pt_pfns)}
        if self.npages and int(self.p2m[-1]) - int(self.p2m[0]) == self.npages - 1 and (
                self.mode is Mode.PEQM or self.is_dom0):
            # One machine run: P==M (physical == machine) or ppc dom0 (physical 0 = its start).
            d["machine_range"] = [int(self.p2m[0]), int(self.p2m[-1])]
        return d

    # -- the access path ----------------------------------------------------------------
    def _translate(self, pfns: np.ndarray, write: bool) -> np.ndarray:
        """Machine frames for guest pfns `pfns` in the current mode, or AccessViolation."""
        if len(pfns) == 0:
            return pfns
        rel = pfns - self.pfn_base if self.pfn_base else pfns
        lo, hi = int(rel.min()), int(rel.max())
        if lo < 0 or hi >= self.npages:
            bad = int(pfns[(rel < 0) | (rel >= self.npages)][0])
            if self.mode is Mode.PEQM:
                raise AccessViolation(
                    f"{self.name}: machine frame {bad} is outside the guest's run "
                    f"{self.pfn_base}..{self.pfn_base + self.npages - 1}; access refused")
            raise AccessViolation(
                f"{self.name}: pfn {bad} is outside the guest's memory (0..{self.npages - 1})")
        if write and hi >= self.data_pages:
            raise AccessViolation(
                f"{self.name}: pfn {hi} is a page-table page, mapped read-only; page-table "
                "updates go through the hypervisor")
        present = self.present
        if present is not None:
            absent = rel[~present[rel]]
            if len(absent):
                self.on_missing(absent)
        if self.mode is Mode.P2M:
            return self.guest_p2m[rel]
        if self.mode is Mode.VP:
            if write and self.logdirty.enabled:
                self.logdirty.mark(rel)
            return self.p2m[rel]
        return rel + self.p2m[0]  # P==M: physical == machine

    def _check_running(self) -> None:
        if self.state is not DomainState.RUNNING:
            raise GuestPaused(f"{self.name} is {self.state.value}")

    def write_words(self, pfns: np.ndarray, word: int | np.ndarray, values: np.ndarray) -> None:
        """Store 64-bit `values` at word index `word` of each page `pfns` (vectorised)."""
        with self.lock:
            self._check_running()
            mfns = self._translate(pfns, write=True)
            self.memory.words[mfns, word] = values
            self.pages_written_total += len(pfns)

    def write_bytes(self, pfns: np.ndarray, offset: int, data: np.ndarray) -> None:
        """Store the rows of `data` (uint8, one per pfn) at byte `offset` of each page."""
        with self.lock:
            self._check_running()
            mfns = self._translate(pfns, write=True)
            self.memory.frames[mfns, offset:offset + data.shape[1]] = data
            self.pages_written_total += len(pfns)

    def read_words(self, pfns: np.ndarray, word: int | np.ndarray) -> np.ndarray:
        with self.lock:
            return self.memory.words[self._translate(pfns, write=False), word]

    def write_pages(self, pfns: np.ndarray, pages: np.ndarray) -> None:
        with self.lock:
            self._check_running()
            self.memory.write(self._translate(pfns, write=True), pages)
            self.pages_written_total += len(pfns)

    def read_pages(self, pfns: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.memory.read(self._translate(pfns, write=False))

    # -- the hypervisor's side ------------------------------------------------------------
    def foreign_read(self, rel_pfns: np.ndarray) -> np.ndarray:
        """Pages read by dom0's toolstack through the hypervisor's P2M (no dirty logging)."""
        return self.memory.read(self.p2m[rel_pfns])

    def page_tables(self) -> np.ndarray:
        """The guest's L1 tables as (k, words_per_page) uint64, as they sit in memory."""
        return self.memory.words[self.p2m[self.pt_pfns]]
