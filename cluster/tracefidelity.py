"""How faithfully a trace replays: a process guest replays it while the kernel's dirty log
(`nodes.host.kerneldirty`, the same PAGEMAP_SCAN a migration's CLEAN uses) is read every
interval, and the log is made a trace of its own, so the recording and the replay are
compared by one definition (`workloads.tracestats`): pages written per interval, the writable
working set curve. And its content (`content_fidelity`): the trace's content figures against
what migrating a replaying guest measures, like with like (see `ContentComparison`).

Why a process guest: its writes are real stores the kernel logs, as the recorded program's
were; a thread vCPU replays through Python and cannot keep a real program's pace.
"""

import time
from dataclasses import dataclass

import numpy as np

from cluster.launch.launcher import ClusterSpec
from cluster.testbed import Testbed
from nodes.host.guestprocess import GuestProcess
from nodes.host.kerneldirty import KernelDirtyLog
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.xen.hypervisor import Hypervisor
from workloads.spec import WorkloadSpec
from workloads.tracefile import Trace, make_trace
from workloads.tracereplay import trace_memory_bytes
from workloads.tracestats import (
    content_figures,
    distinct_per_window,
    window_seconds,
    wss_curve,
)

MiB = 1 << 20


@dataclass(frozen=True)
class Fidelity:
    recorded: Trace
    replayed: Trace             # the kernel's log of the replay, one interval per scan

    def pages_per_interval(self) -> tuple[float, float]:
        """Mean distinct pages written per recording interval, by the clock (recording,
        replay): the WSS curve's first point."""
        w = self.recorded.interval_seconds
        return (float(distinct_per_window(self.recorded, w).mean()),
                float(distinct_per_window(self.replayed, w).mean()))

    def wss(self) -> list[tuple[float, float, float]]:
        """[(window seconds, recorded WSS, replayed WSS)] on the recording's windows."""
        windows = window_seconds(self.recorded)
        return [(w, a, b) for (w, a), (_, b) in zip(wss_curve(self.recorded, windows),
                                                    wss_curve(self.replayed, windows),
                                                    strict=True)]


def replay_fidelity(trace_bytes: bytes, recorded: Trace, speed: float = 1.0,
                    host_bytes: int | None = None, warmup_loops: int = 0,
                    vcpus: int = 1) -> Fidelity:
    """Replay `trace_bytes` (decoded: `recorded`) on a process guest of `vcpus`, looping,
    scanning the
    kernel's log at the recording's interval (scaled by `speed`); the replay is the pass
    after `warmup_loops` whole passes of the trace, shifted to start at 0. (A new guest
    process's first batches pay one-time costs, the copy-on-write of the heap it shares with
    its zygote: tens of ms here, which a short trace feels; a later pass does not pay them,
    but may begin with the previous pass's late tail.)"""
    spec = WorkloadSpec("trace", trace_bytes=trace_bytes, trace_speed=speed, trace_loop=True)
    memory = trace_memory_bytes(trace_bytes)
    hv = Hypervisor("fidelity", host_bytes or memory + (32 << 20))
    dom = hv.create_domain("replay", memory, "vp")
    interval = recorded.interval_seconds / speed
    period = max(recorded.duration_seconds, recorded.interval_seconds) / speed
    first, end = warmup_loops * period, (warmup_loops + 1) * period + interval
    times, pages = [], []
    with GuestProcess.launch(hv.memory, dom, spec, vcpus=vcpus, parked=True) as gp:
        log = KernelDirtyLog(gp.pid, gp.uffd, gp.base, dom.npages, hv.page_size)
        log.enable()
        gp.resume()
        start = time.monotonic()
        tick = 1
        while (now := time.monotonic() - start) < end:
            time.sleep(max(0.0, tick * interval - now))
            tick += 1
            pfns = log.clean_pfns()
            at = time.monotonic() - start
            if at > first:
                times.append((at - first) * speed)
                pages.append(pfns[pfns >= dom.pfn_base] - dom.pfn_base)
        log.disable()
        log.close()
    header = {**recorded.header, "program": f"replay of {recorded.header['program']}",
              "region_pages": max(dom.data_pages, 1), "duration_seconds": times[-1],
              "interval_seconds": recorded.interval_seconds}
    return Fidelity(recorded, make_trace(header, np.array(times), pages))


@dataclass(frozen=True)
class ContentComparison:
    """A trace's content figures (over its samples of written pages) against a migration of
    a guest replaying it, like with like. Zero pages: the migration's share of the pages it
    sent after its first round, which are pages the replay wrote (a first round also sends
    every page never written: the guest's 2 MiB rounding and its page tables, all zero, which
    the trace knows nothing of). Compression: the multifd channels' zstd ratio. XBZRLE: the
    migration's delta bytes per cache hit (its run lengths counted) against the trace's mean
    delta per re-sampled page (an overflow counted as a page)."""
    trace_zero: float
    migration_zero: float
    migration_zero_pages: int       # the zero pages the migration's share rests on
    migration_later_pages: int      # ... of this many pages sent after the first round
    trace_ratio: float
    migration_ratio: float | None
    trace_delta: float
    migration_delta: float | None   # None: no page was re-sent from the cache


def content_fidelity(trace_bytes: bytes, recorded: Trace, speed: float = 1.0,
                     bandwidth: int = 128 * MiB, warmup_seconds: float = 0.5,
                     rounds: int = 5, vcpus: int = 1) -> ContentComparison:
    """Migrate a process guest replaying `trace_bytes` (looping) twice between in-process
    hosts, at most `rounds` live rounds each: with multifd zstd (2 channels; zero pages and
    the compression ratio) and with XBZRLE (a 64 MiB cache; its deltas)."""
    c = content_figures(recorded)
    spec = WorkloadSpec("trace", trace_bytes=trace_bytes, trace_speed=speed, trace_loop=True)
    memory = trace_memory_bytes(trace_bytes)
    base = {"link_bytes_per_second": bandwidth, "max_iterations": rounds}
    with Testbed.in_process(ClusterSpec(hosts=2, host_memory_bytes=2 * memory + 64 * MiB)) as tb:
        z = _migrate(tb, spec, vcpus, warmup_seconds, MigrationSettings(
            **base, multifd_channels=2, multifd_compression="zstd"))
        x = _migrate(tb, spec, vcpus, warmup_seconds, MigrationSettings(
            **base, xbzrle_cache_bytes=64 * MiB))
    later = z.rounds[1:]
    zeros = sum(r["zero_pages"] for r in later)
    sent = sum(r["pages_sent"] for r in later)
    xb = x.xbzrle
    return ContentComparison(
        c.zero_fraction, zeros / sent if sent else 0.0, zeros, sent, c.compression_ratio,
        z.multifd.compression_ratio if z.multifd else None, c.xbzrle_delta_bytes,
        xb.bytes / xb.pages if xb and xb.pages else None)


def _migrate(tb: Testbed, spec: WorkloadSpec, vcpus: int, warmup_seconds: float,
             settings: MigrationSettings):
    """One migration of a fresh replaying guest from host-0 to host-1: its report."""
    tb.create("host-0", GuestSpec("replay", 0, workload=spec, vcpu="process", vcpus=vcpus))
    try:
        time.sleep(warmup_seconds)
        return tb.migrate("replay", "host-1", settings)
    finally:
        tb.destroy("replay")
