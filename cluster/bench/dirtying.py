"""The dirtying and stages sections: how fast one vCPU dirties pages in P2M and in VP with
log-dirty on, and each stage of the page pipeline alone, to show which is slowest."""

import io
import threading
import time
from collections.abc import Callable

import numpy as np

from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.figures import Results, mib_per_second
from nodes.migration.receive.landing import RECV_CHUNK_PAGES
from nodes.migration.receive.reader import RecordReader
from nodes.migration.wire import records

DIRTY_PATTERNS = ("uniform", "hotset", "sequential")
CLEAN_INTERVAL_SECONDS = 0.05   # VP dirtying: CLEAN as often as short pre-copy rounds do


def bench_dirtying(opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    """One vCPU at full speed per pattern: P2M (plain stores) vs VP with log-dirty on."""
    from nodes.xen.hypervisor import Hypervisor
    from nodes.xen.logdirty import ShadowOp
    from workloads.measure import measure_rate
    from workloads.spec import WorkloadSpec
    hv = Hypervisor("bench", opts.dirty_guest_memory_bytes + 16 * MiB)
    name = "dirty"
    dom = hv.create_domain(name, opts.dirty_guest_memory_bytes, "p2m")
    measure_rate(dom, WorkloadSpec("sequential"), max(0.02, opts.dirty_seconds / 4))  # warm-up
    for pattern in DIRTY_PATTERNS:
        spec = WorkloadSpec(pattern, 0.0, seed=3)
        for _ in range(opts.repeats):
            res.add(f"dirty_rate_p2m_{pattern}_pages_per_second", "pages_per_second",
                    measure_rate(dom, spec, opts.dirty_seconds), "one vCPU, P2M: plain stores")
            hv.set_mode(name, "vp")
            hv.shadow_op(name, ShadowOp.ENABLE_LOGDIRTY)
            stop = threading.Event()

            def clean(stop: threading.Event = stop) -> None:
                while not stop.wait(CLEAN_INTERVAL_SECONDS):
                    hv.shadow_op(name, ShadowOp.CLEAN)
            cleaner = threading.Thread(target=clean, daemon=True)
            cleaner.start()
            try:
                rate = measure_rate(dom, spec, opts.dirty_seconds)
            finally:
                stop.set()
                cleaner.join()
                hv.shadow_op(name, ShadowOp.OFF)
                hv.set_mode(name, "p2m")
            res.add(f"dirty_rate_vp_logdirty_{pattern}_pages_per_second", "pages_per_second",
                    rate, f"one vCPU, VP with log-dirty, CLEAN every "
                          f"{CLEAN_INTERVAL_SECONDS * 1000:g} ms")
        r = res.ratio(f"dirtying VP+log-dirty / P2M ({pattern})",
                      f"dirty_rate_vp_logdirty_{pattern}_pages_per_second",
                      f"dirty_rate_p2m_{pattern}_pages_per_second")
        say(f"  dirtying {pattern}: VP+log-dirty at {r:.2f}x P2M")


def bench_stages(opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    """Each stage of the page pipeline alone, on one 4 MiB record of a guest, to show which
    is slowest. The socket copies themselves are the throughput section's raw data path."""
    from nodes.xen.digest import page_hashes
    from nodes.xen.hypervisor import Hypervisor
    size = opts.downtime_guest_memory_bytes
    hv = Hypervisor("stages", 2 * size + 16 * MiB, superpages=opts.superpages)
    dom = hv.create_domain("g", size, "p2m")
    dom.memory.frames[dom.p2m] = 7                     # touched: warm frames
    batch = min(records.MAX_BATCH_PAGES, dom.data_pages)
    pfns = np.arange(batch, dtype=np.int64)
    types = np.zeros(batch, dtype=np.uint8)
    mfns = dom.p2m[pfns]
    pages = dom.foreign_read(pfns)
    record = b"".join(bytes(b) for b in records.encode_page_data(pfns, types, pages))
    target = hv.allocator.alloc_scattered(batch, 99)
    hv.memory.frames[target] = 1
    scattered = np.random.default_rng(0).permutation(target)   # frame by frame, any host

    def hash_in_place() -> None:
        for _, view, _ in hv.memory.pieces(mfns, RECV_CHUNK_PAGES):
            page_hashes(view)

    stages = {
        "send buffers from frames + encode": lambda: records.encode_page_data(
            pfns, types, hv.memory.buffers(mfns)),
        "decode PAGE_DATA": lambda: _decode(record),
        "hash as landed (extents)": hash_in_place,
        "hash gathered (scattered)": lambda: page_hashes(
            hv.memory.frames[scattered]),
        "read (gather from frames)": lambda: dom.foreign_read(pfns),
        "write (scatter to frames)": lambda: hv.memory.write(target, pages),
    }
    for label, fn in stages.items():
        fn()
        for _ in range(max(3, opts.repeats)):
            t0 = time.perf_counter()
            fn()
            res.add(f"stage {label}", "bytes_per_second", pages.nbytes / (time.perf_counter() - t0))
    fresh = Hypervisor("cold", batch * 4096 + 16 * MiB)   # never-written frames
    cold = fresh.allocator.alloc_scattered(batch, 99)
    t0 = time.perf_counter()
    fresh.memory.write(cold, pages)
    res.add("first_touch_write_bytes_per_second", "bytes_per_second",
            pages.nbytes / (time.perf_counter() - t0),
            "the write stage into frames never written before: page faults")
    slow = min((n for n in res.figures if n.startswith("stage ")), key=res.median)
    res.conclusions.append(
        f"slowest pipeline stage: {slow[6:]} at {mib_per_second(res.median(slow))}; writing into "
        f"never-touched frames runs at {mib_per_second(res.median('first_touch_write_bytes_per_second'))}"
        ", which is why a destination populates the frames it reserves before the stream; "
        "pages are sent from and received into the frames themselves (sendmsg, "
        "recvmsg_into), so gather and scatter run only for another record layout")
    say(f"  stages: slowest is {slow[6:]}")


def _decode(record: bytes) -> records.Record | None:
    """Read one framed record back, as a receiver does (from memory, not a socket)."""
    return RecordReader(io.BytesIO(record).readinto).read_record()
