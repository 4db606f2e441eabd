"""How faithfully a trace replays: a process guest replays it while the kernel's dirty log
(`nodes.host.kerneldirty`, the same PAGEMAP_SCAN a migration's CLEAN uses) is read every
interval, and the log is made a trace of its own, so the recording and the replay are
compared by one definition (`workloads.tracestats`): pages written per interval, the writable
working set curve.

Why a process guest: its writes are real stores the kernel logs, as the recorded program's
were; a thread vCPU replays through Python and cannot keep a real program's pace.
"""

import time
from dataclasses import dataclass

import numpy as np

from nodes.host.guestprocess import GuestProcess
from nodes.host.kerneldirty import KernelDirtyLog
from nodes.xen.hypervisor import Hypervisor
from workloads.spec import WorkloadSpec
from workloads.tracefile import Trace, make_trace
from workloads.tracereplay import trace_memory_bytes
from workloads.tracestats import distinct_per_window, window_seconds, wss_curve


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
                    host_bytes: int | None = None) -> Fidelity:
    """Replay `trace_bytes` (decoded: `recorded`) on a process guest, scanning the kernel's
    log at the recording's interval (scaled by `speed`) until the trace is over."""
    spec = WorkloadSpec("trace", trace_bytes=trace_bytes, trace_speed=speed)
    memory = trace_memory_bytes(trace_bytes)
    hv = Hypervisor("fidelity", host_bytes or memory + (32 << 20))
    dom = hv.create_domain("replay", memory, "vp")
    interval = recorded.interval_seconds / speed
    span = recorded.duration_seconds / speed
    times, pages = [], []
    with GuestProcess.launch(hv.memory, dom, spec, parked=True) as gp:
        log = KernelDirtyLog(gp.pid, gp.uffd, gp.base, dom.npages, hv.page_size)
        log.enable()
        gp.resume()
        start = time.monotonic()
        tick = 1
        while (now := time.monotonic() - start) < span + interval:
            time.sleep(max(0.0, tick * interval - now))
            tick += 1
            pfns = log.clean_pfns()
            times.append((time.monotonic() - start) * speed)
            pages.append(pfns[pfns >= dom.pfn_base] - dom.pfn_base)
        log.disable()
        log.close()
    header = {**recorded.header, "program": f"replay of {recorded.header['program']}",
              "region_pages": max(dom.data_pages, 1), "duration_seconds": times[-1],
              "interval_seconds": recorded.interval_seconds}
    return Fidelity(recorded, make_trace(header, np.array(times), pages))
