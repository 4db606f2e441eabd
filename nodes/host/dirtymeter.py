"""Measuring a running guest's dirtying without migrating it: its writable working set
(`workloads.writableset`), its dirty rate in QEMU's three `calc-dirty-rate` modes, and what
its pages hold (for XBZRLE and compression). Mixed into `nodes.host.service.HostService`,
which holds `hv`, `vcpus`, `workloads`, `lock`, `_measuring` and `metrics` (each dirty-rate
measurement is set on its gauges as it ends).

Why here: the dirty log is the host's. The window switches the guest to shadow (VP) mode with
log-dirty on, exactly as a migration's setup does (`Hypervisor.set_mode`, `shadow_op`), so a
thread guest is logged by the emulated log and a process guest by the kernel's
(`nodes.host.kerneldirty`, PAGEMAP_SCAN); afterwards log-dirty goes off and the guest returns
to its mode. A guest being migrated is refused (the migration owns its log), and a migration
is refused while a measurement holds it (`refuse_while_measured`).

The guest's true rate over the same window comes from its own write counters (word 0 of
every data page, bumped by each write): the distinct pages whose counter moved and the sum of
the moves, read at the window's two ends. A program guest (`kvstore`, `stream`, `sort`,
`matmul`) has no such counters: its word 0 is its own data, so its WSS carries its operations
per second (its journal's count) instead of writes, and its truth is None but in
page-sampling, which logs it beside the sample (the kernel's log is exact).
"""

import contextlib
import time
from collections.abc import Iterator

import numpy as np
import zstandard

from nodes.errors import ConfigError, MigrationError
from nodes.migration.wire import xbzrle
from nodes.xen.digest import page_hashes
from nodes.xen.domain import Domain
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode
from workloads.writableset import curve_from_ticks

DIRTY_RATE_MODES = ("page-sampling", "dirty-bitmap", "dirty-ring")
GIB = 1 << 30
MAX_MEASURE_SECONDS = 600.0
MAX_CONTENT_SAMPLE_PAGES = 4096


def _check_window(seconds: float, what: str = "duration") -> float:
    if not 0 < seconds <= MAX_MEASURE_SECONDS:
        raise ConfigError(f"{what} must be in (0, {MAX_MEASURE_SECONDS:g}] seconds, "
                          f"got {seconds!r}")
    return float(seconds)


class GuestMeasuring:
    """The host's measurements of a guest's memory: each a window the guest runs through."""

    # -- the window ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _logged(self, name: str) -> Iterator[Domain]:
        """The guest in VP mode with log-dirty on, as a migration's setup leaves it."""
        dom = self._measurable(name)
        before = dom.mode
        try:
            self.hv.set_mode(name, Mode.VP)
            self.hv.shadow_op(name, ShadowOp.ENABLE_LOGDIRTY)
            yield dom
        finally:
            try:
                self.hv.shadow_op(name, ShadowOp.OFF)
                self.hv.set_mode(name, before)
            finally:
                self._measuring.discard(name)

    def _measurable(self, name: str) -> Domain:
        """The guest, now held for a measurement; refused while it migrates or is measured."""
        with self.lock:
            dom = self.hv.guest(name)
            if dom.migrating:
                raise MigrationError(f"{name} is migrating: its dirty log is the "
                                     "migration's; measure it before or after")
            if name in self._measuring:
                raise MigrationError(f"{name} is being measured already; wait for it")
            if dom.mode is Mode.PEQM or dom.dma:
                raise ConfigError(f"{name} cannot enter VP (shadow) mode (P==M or a DMA "
                                  "device), so its writes cannot be logged")
            self._measuring.add(name)
            return dom

    def refuse_while_measured(self, name: str) -> None:
        """A migration of `name` may not start while a measurement holds its log."""
        if name in self._measuring:
            raise MigrationError(f"{name} is being measured (wss, dirtyrate); migrate it "
                                 "when the measurement ends")

    def _counters(self, dom: Domain) -> np.ndarray:
        """Word 0 of every data page: the workload's per-page write counters."""
        rel = np.arange(dom.data_pages, dtype=np.int64)
        with dom.lock:
            return dom.memory.words[dom.p2m[rel], 0].copy()

    def _is_program(self, name: str) -> bool:
        spec = self.workloads.get(name)
        return spec is not None and spec.is_program

    def _truth(self, dom: Domain, before: np.ndarray, seconds: float) -> dict:
        if self._is_program(dom.name):
            return {"true_pages_per_second": None, "true_writes_per_second": None}
        moved = self._counters(dom) - before
        return {"true_pages_per_second": float(np.count_nonzero(moved)) / seconds,
                "true_writes_per_second": float(moved.sum()) / seconds}

    def _ops(self, name: str) -> int | None:
        """A program guest's completed operations so far (None for a pattern)."""
        vcpu = self.vcpus.get(name)
        return vcpu.progress_pages if vcpu is not None and self._is_program(name) else None

    def _about(self, name: str, dom: Domain) -> dict:
        kind = "process" if getattr(self.vcpus.get(name), "pid", None) else "thread"
        return {"guest": name, "vcpu": kind, "dirty_log": dom.logdirty.kind}

    # -- the writable working set ----------------------------------------------------------
    def measure_wss(self, name: str, duration_seconds: float = 10.0,
                    tick_seconds: float = 0.01) -> dict:
        """The guest's WWS curve (`workloads.writableset.WssCurve.to_dict`): log-dirty
        CLEANed every `tick_seconds` for `duration_seconds`, windows of 10 ms .. 10 s."""
        duration = _check_window(duration_seconds)
        tick = _check_window(tick_seconds, "tick")
        if tick > min(duration / 2, 1.0):
            raise ConfigError(f"the tick ({tick:g} s) must be at most half the duration and "
                              "at most 1 s (it is the shortest window)")
        ticks: list[np.ndarray] = []
        with self._logged(name) as dom:
            about = self._about(name, dom)
            before, ops_before = self._counters(dom), self._ops(name)
            self.hv.shadow_op(name, ShadowOp.CLEAN)
            start = time.monotonic()
            deadline = start + duration
            next_at = start + tick
            while next_at <= deadline + 1e-9:
                time.sleep(max(0.0, next_at - time.monotonic()))
                bitmap, _ = self.hv.shadow_op(name, ShadowOp.CLEAN)
                ticks.append(np.flatnonzero(bitmap))
                # A late tick is not made up for: the window ends on time, ticks stay even.
                next_at = max(next_at + tick, time.monotonic() + tick / 2)
            elapsed = time.monotonic() - start
            writes = (None if self._is_program(name)
                      else float((self._counters(dom) - before).sum()) / elapsed)
            ops = self._ops(name)
            zero = self._zero_fraction(dom)
        curve = curve_from_ticks(ticks, elapsed / len(ticks), data_pages=dom.data_pages,
                                 guest_pages=dom.npages, page_size=self.hv.page_size,
                                 writes_per_second=writes, **about,
                                 ops_per_second=(None if ops is None or ops_before is None
                                                 else (ops - ops_before) / elapsed),
                                 zero_fraction=zero)
        return curve.to_dict()

    def _zero_fraction(self, dom: Domain, pages: int = 1024) -> float:
        """The share of a random sample of data pages that is zero: what the model's first
        pass sends as a pfn word (a program's loaded data is not in its steady writes)."""
        n = min(pages, dom.data_pages)
        pfns = np.sort(np.random.default_rng().choice(dom.data_pages, n, replace=False))
        return float((~dom.foreign_read(pfns).view(np.uint64).any(axis=1)).mean())

    # -- the dirty rate (QEMU's calc-dirty-rate) ------------------------------------------------
    def measure_dirty_rate(self, name: str, mode: str = "page-sampling",
                           duration_seconds: float = 1.0,
                           sample_pages_per_gib: int = 512) -> dict:
        """One window's dirty rate in `mode`, beside the guest's true rate over it."""
        if mode not in DIRTY_RATE_MODES:
            raise ConfigError(f"dirty-rate mode must be one of {', '.join(DIRTY_RATE_MODES)}, "
                              f"got {mode!r}")
        duration = _check_window(duration_seconds)
        if mode == "dirty-bitmap":
            out = self._by_bitmap(name, duration)
        elif mode == "page-sampling":
            if not 1 <= sample_pages_per_gib <= 1 << 18:
                raise ConfigError("sample pages per GiB must be in 1..262144, got "
                                  f"{sample_pages_per_gib!r}")
            out = self._by_sampling(name, duration, sample_pages_per_gib)
        else:
            out = self._by_ring(name, duration)
        out["mode"] = mode
        out["bytes_per_second"] = out["pages_per_second"] * self.hv.page_size
        out["page_size"] = self.hv.page_size
        self.metrics.dirty_rate_measured(name, out)
        return out

    def _by_bitmap(self, name: str, duration: float) -> dict:
        with self._logged(name) as dom:
            with dom.lock:        # a thread vCPU writes under it: both ends read at once
                before = self._counters(dom)
                self.hv.shadow_op(name, ShadowOp.CLEAN)
                start = time.monotonic()
            time.sleep(duration)
            with dom.lock:
                bitmap, _ = self.hv.shadow_op(name, ShadowOp.CLEAN)
                elapsed = time.monotonic() - start
                truth = self._truth(dom, before, elapsed)
            about = self._about(name, dom)
        return {"pages_per_second": float(np.count_nonzero(bitmap)) / elapsed,
                "window_seconds": elapsed, **truth, **about}

    @contextlib.contextmanager
    def _held(self, name: str) -> Iterator[Domain]:
        """The guest held for a measurement that only reads it (no log, no mode switch)."""
        dom = self._measurable(name)
        try:
            yield dom
        finally:
            self._measuring.discard(name)

    def _by_sampling(self, name: str, duration: float, per_gib: int) -> dict:
        """QEMU's page-sampling: hash a random sample of the guest's pages, hash them again
        after the window, scale the changed share to the guest's size. No log, no mode
        switch: the guest is only read. A program guest has no write counters: it is logged
        beside the sample (the kernel's log, exact), and the pages the log saw are its truth."""
        logged = self._is_program(name)
        with (self._logged(name) if logged else self._held(name)) as dom:
            n = max(1, min(dom.npages, round(per_gib * dom.npages * self.hv.page_size / GIB)))
            sample = np.sort(np.random.default_rng().choice(dom.npages, n, replace=False))
            with dom.lock:
                before = self._counters(dom)
                if logged:
                    self.hv.shadow_op(name, ShadowOp.CLEAN)
                first = page_hashes(dom.foreign_read(sample))
                start = time.monotonic()
            time.sleep(duration)
            with dom.lock:
                changed = int(np.count_nonzero(page_hashes(dom.foreign_read(sample)) != first))
                elapsed = time.monotonic() - start
                truth = self._truth(dom, before, elapsed)
                if logged:
                    bitmap, _ = self.hv.shadow_op(name, ShadowOp.CLEAN)
                    truth["true_pages_per_second"] = float(np.count_nonzero(bitmap)) / elapsed
        return {"pages_per_second": changed / n * dom.npages / elapsed,
                "window_seconds": elapsed, "sample_pages": n, "sample_changed": changed,
                **truth, **self._about(name, dom)}

    def _by_ring(self, name: str, duration: float) -> dict:
        """dirty-ring: each vCPU's own rate, from its own write count over the window."""
        dom = self._measurable(name)
        try:
            vcpu = self.vcpus.get(name)
            if vcpu is None:
                raise ConfigError(f"{name} has no running vCPU to count")
            counts = getattr(vcpu, "vcpu_writes", None)
            read = counts if counts is not None else lambda: [vcpu.pages_written_total]
            with dom.lock:
                before_counters, before = self._counters(dom), np.asarray(read(), dtype=float)
                start = time.monotonic()
            time.sleep(duration)
            with dom.lock:
                per_vcpu = (np.asarray(read(), dtype=float) - before)
                elapsed = time.monotonic() - start
                truth = self._truth(dom, before_counters, elapsed)
        finally:
            self._measuring.discard(name)
        rates = (per_vcpu / elapsed).tolist()
        return {"pages_per_second": float(sum(rates)), "vcpu_pages_per_second": rates,
                "window_seconds": elapsed, **truth, **self._about(name, dom)}

    # -- what the pages hold ------------------------------------------------------------
    def sample_content(self, name: str, pages: int = 1024, seconds: float = 0.2) -> dict:
        """A sample of the guest's data pages, read twice `seconds` apart: the share that
        is zero, what zstd (level 1) leaves of them, and what XBZRLE's delta leaves of the
        ones that changed, and how fast one zstd thread went: what the advisor prices those
        encodings by."""
        if not 1 <= pages <= MAX_CONTENT_SAMPLE_PAGES:
            raise ConfigError(f"content sample must be 1..{MAX_CONTENT_SAMPLE_PAGES} pages")
        _check_window(seconds, "content window")
        dom = self.hv.guest(name)
        n = min(pages, dom.data_pages)
        pfns = np.sort(np.random.default_rng().choice(dom.data_pages, n, replace=False))
        first = dom.foreign_read(pfns)
        time.sleep(seconds)
        second = dom.foreign_read(pfns)
        page = self.hv.page_size
        zero = ~second.view(np.uint64).any(axis=1)
        normal = second[~zero]
        started = time.perf_counter()
        compressed = (len(zstandard.ZstdCompressor(level=1).compress(normal.tobytes()))
                      / max(1, normal.size)) if len(normal) else 1.0
        speed = normal.size / max(time.perf_counter() - started, 1e-9) if len(normal) else None
        changed = np.flatnonzero((first != second).any(axis=1) & ~zero)
        lengths, _ = xbzrle.encode(first[changed], second[changed])
        delta = np.where(lengths == xbzrle.OVERFLOW, page, lengths + 2)
        return {"sample_pages": int(n), "zero_fraction": float(zero.mean()),
                "compression_ratio": float(compressed),
                "compression_bytes_per_second": speed,   # one zstd level-1 thread
                "xbzrle_changed_pages": int(len(changed)),
                "xbzrle_ratio": float(delta.mean() / page) if len(changed) else 0.0}
