"""`migbed bench`: how close migbed runs to this machine's limits, each figure against a
baseline measured in the same run on the same machine.

Sections (each figure is the median of repeats, with min and max):

- throughput: an idle guest migrated over an unlimited link, against the raw data path (the
  same bytes pushed between the same two host actors over migbed's own transport: a
  `nodes.migration.channel` TCP connection and a `LinkSender`, without encoding or page lookups), an
  in-process memory copy, and Ray's object store as the alternative data plane.
- downtime: the floor migbed adds to every downtime (idle guest) and with a ~50-page final
  round.
- dirtying: page writes per second one vCPU sustains per pattern in P2M mode and in VP mode
  with log-dirty on (CLEANed every round interval, as during a migration).
- stages: the pipeline's stages one at a time on one 4 MiB record, to show which is slowest.
- startup: seconds to bring up N hosts on a fresh local Ray cluster (in a child process, so
  it never touches the caller's Ray session) and the resident memory of its Ray processes.
- scale: one host's guests evacuated to the others concurrently (from threads; `migrate`
  blocks) against the same migrations one at a time.

`--quick` shrinks everything so the test suite can prove the code runs; its numbers mean
nothing. The functions run inside host actors (`_raw_sink`, `_raw_push`, `_ray_put`,
`_ray_get`) are module-level so Ray ships them by reference through `__ray_call__`.
"""

import concurrent.futures
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from nodes.errors import ConfigError
from nodes.migration import records
from nodes.migration.reader import RECV_CHUNK_PAGES, RecordReader
from nodes.units import format_bytes

MiB = 1024 * 1024
SECTIONS = ("throughput", "downtime", "dirtying", "stages", "startup", "scale")
DIRTY_PATTERNS = ("uniform", "hotset", "sequential")
RECORD_BYTES = 4 * MiB          # one PAGE_DATA record: the unit both data planes move
RAY_WINDOW_BYTES = 64 * MiB     # objects in flight at once: half the default object store
CLEAN_INTERVAL_SECONDS = 0.05   # VP dirtying: CLEAN as often as short pre-copy rounds do
FINAL_ROUND_PAGES = 50          # Xen's stop threshold: the downtime section's final round


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how big. Sizes in bytes, times in seconds."""

    repeats: int = 5
    guest_memory_bytes: int = 256 * MiB
    downtime_guest_memory_bytes: int = 64 * MiB
    dirty_guest_memory_bytes: int = 64 * MiB
    dirty_seconds: float = 1.0
    startup_hosts: tuple[int, ...] = (2, 4, 8)
    startup_repeats: int = 3
    scale_guests: int = 8
    scale_guest_memory_bytes: int = 32 * MiB
    scale_dirty_rate_pages_per_second: float = 2000.0
    hosts: int = 3
    host_memory_bytes: int = 640 * MiB
    sections: tuple[str, ...] = SECTIONS
    in_process: bool = False
    quick: bool = False
    superpages: bool = True         # hosts give guests 2 MiB extents (False: frame by frame)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown bench section {unknown[0]!r}; use some of "
                              f"{', '.join(SECTIONS)}")
        if self.repeats < 1 or self.startup_repeats < 1:
            raise ConfigError("repeats must be >= 1")
        if self.hosts < 2:
            raise ConfigError("the bench needs at least 2 hosts")
        if any(n < 1 for n in self.startup_hosts):
            raise ConfigError("start-up host counts must be >= 1")

    @classmethod
    def quick_options(cls, **overrides) -> "BenchOptions":
        """Tiny sizes: proves every section runs, measures nothing worth reading."""
        tiny = dict(repeats=1, guest_memory_bytes=8 * MiB, downtime_guest_memory_bytes=4 * MiB,
                    dirty_guest_memory_bytes=4 * MiB, dirty_seconds=0.05, startup_hosts=(2,),
                    startup_repeats=1, scale_guests=2, scale_guest_memory_bytes=4 * MiB,
                    host_memory_bytes=128 * MiB, quick=True)
        return cls(**{**tiny, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# -- figures ------------------------------------------------------------------------------
@dataclass
class Figure:
    """One measured quantity: its samples, summarised as median, min and max."""

    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        s = self.samples
        return {"unit": self.unit, "median": statistics.median(s) if s else None,
                "min": min(s) if s else None, "max": max(s) if s else None,
                "samples": s, "note": self.note}


class Results:
    """The figures, ratios and conclusions of one bench run, and how to print them."""

    def __init__(self, options: BenchOptions):
        self.options = options
        self.figures: dict[str, Figure] = {}
        self.ratios: dict[str, float | None] = {}
        self.conclusions: list[str] = []
        self.errors: dict[str, str] = {}

    def add(self, name: str, unit: str, value: float, note: str = "") -> None:
        fig = self.figures.setdefault(name, Figure(unit))
        fig.samples.append(float(value))
        if note:
            fig.note = note

    def median(self, name: str) -> float | None:
        fig = self.figures.get(name)
        return statistics.median(fig.samples) if fig and fig.samples else None

    def ratio(self, name: str, num: str, den: str) -> float | None:
        a, b = self.median(num), self.median(den)
        self.ratios[name] = a / b if a is not None and b else None
        return self.ratios[name]

    def to_dict(self) -> dict:
        return {"bench": {"options": self.options.to_dict(), "machine": machine()},
                "figures": {k: f.to_dict() for k, f in self.figures.items()},
                "ratios": self.ratios, "conclusions": self.conclusions,
                "errors": self.errors}

    def table(self) -> str:
        lines = [f"migbed bench{' (quick: numbers mean nothing)' if self.options.quick else ''}"
                 f" on {machine()['cpus']} CPUs", "",
                 f"{'figure':<44} {'median':>12} {'min':>12} {'max':>12}  unit"]
        for name, fig in self.figures.items():
            d = fig.to_dict()
            lines.append(f"{name:<44} {_fmt(d['median'], fig.unit):>12} "
                         f"{_fmt(d['min'], fig.unit):>12} {_fmt(d['max'], fig.unit):>12}  "
                         f"{_unit(fig.unit)}")
        if self.ratios:
            lines += ["", "ratios (of medians)"]
            lines += [f"  {k:<42} {'-' if v is None else f'{v:.3f}'}"
                      for k, v in self.ratios.items()]
        if self.conclusions:
            lines += ["", *[f"* {c}" for c in self.conclusions]]
        if self.errors:
            lines += ["", *[f"! {k} failed: {v}" for k, v in self.errors.items()]]
        return "\n".join(lines)


def _unit(unit: str) -> str:
    return {"bytes_per_second": "MiB/s", "seconds": "ms", "bytes": "MiB"}.get(unit, unit)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes_per_second" or unit == "bytes":
        return f"{value / MiB:.1f}"
    if unit == "seconds":
        return f"{value * 1000:.2f}"
    return f"{value:.4g}"


def machine() -> dict:
    import ray
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "ray": ray.__version__, "numpy": np.__version__, "platform": platform.platform()}


# -- running code in a host's own process -------------------------------------------------
def on_host(handle, fn: Callable, *args):
    """Start fn(host_service, *args) in the host's own process (the Ray actor's, or this one
    for an in-process host); returns a zero-argument function that waits for the result."""
    actor = getattr(handle, "actor", None)
    if actor is None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        fut = pool.submit(fn, handle.service, *args)
        pool.shutdown(wait=False)
        return lambda timeout=120.0: fut.result(timeout)
    import ray
    ref = actor.__ray_call__.remote(fn, *args)
    return lambda timeout=120.0: ray.get(ref, timeout=timeout)


def _machine_bytes(nbytes: int) -> np.ndarray:
    """A buffer allocated as a host's machine memory is (`nodes.xen.memory`), as bytes."""
    from nodes.xen.memory import MachineMemory
    return MachineMemory(max(nbytes, RECORD_BYTES)).frames.reshape(-1)


def _raw_sink(host, nbytes: int, timeout: float, memory_bytes: int) -> dict:
    """Destination side of the raw data path: listen like a migration does and receive
    `nbytes` into a `memory_bytes` buffer, resident before the first byte as a destination's
    reserved frames are (`populate_frames`), record-sized receives in order (wrapping round
    when the stream is longer); answer one byte. Returns the ticket at once."""
    from nodes.migration.channel import Listener
    listener = Listener(host.config.address, "bench-raw")
    memory = _machine_bytes(memory_bytes)
    memory[:] = 0                                     # resident, like populated frames

    def receive() -> None:
        conn = None
        try:
            conn = listener.accept(timeout)
            view = memoryview(memory)
            got = 0
            while got < nbytes:
                at = got % len(memory)
                n = min(RECORD_BYTES, nbytes - got, len(memory) - at)
                k = conn.recv_into(view[at:at + n])
                if not k:
                    return
                got += k
            conn.sendall(b"\x01")
        finally:
            listener.close()
            if conn is not None:
                conn.close()
    threading.Thread(target=receive, name="bench-raw-sink", daemon=True).start()
    return listener.ticket.to_dict()


def _raw_push(host, ticket: dict, nbytes: int, timeout: float, memory_bytes: int) -> float:
    """Source side: push `nbytes` from a resident `memory_bytes` buffer (as the guest's frames
    are once a migration has populated them) in record-sized sends through a LinkSender, as
    migrations do; seconds from the first byte until the destination confirmed the last."""
    from nodes.migration.channel import Ticket, connect
    from nodes.migration.link import LinkSender
    sock = connect(Ticket.from_dict(ticket), timeout)
    try:
        link = LinkSender(sock)
        memory = _machine_bytes(memory_bytes)
        memory[:] = 0                                 # resident
        view = memoryview(memory)
        start = time.perf_counter()
        sent = 0
        while sent < nbytes:
            at = sent % len(memory)
            n = min(RECORD_BYTES, nbytes - sent, len(memory) - at)
            link.send([view[at:at + n]])
            sent += n
        if sock.recv(1) != b"\x01":
            raise ConnectionError("raw data path: the sink did not confirm")
        return time.perf_counter() - start
    finally:
        sock.close()


def _ray_put(host, count: int, nbytes: int) -> list:
    """`count` objects of `nbytes` in this node's object store; refs inside a list so Ray
    hands them back as refs."""
    import ray
    data = np.ones(nbytes, dtype=np.uint8)
    return [[ray.put(data) for _ in range(count)]]


def _ray_get(host, refs: list) -> int:
    """Fetch the objects into this node's object store; returns the bytes fetched."""
    import ray
    return sum(ray.get(ref).nbytes for ref in refs)


# -- the sections ---------------------------------------------------------------------------
def _unique(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:6]}"


def bench_throughput(tb, opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    a, b = list(tb.hosts)[:2]
    size = opts.guest_memory_bytes
    name = _unique("idle")
    tb.create(a, GuestSpec(name, size))
    ha, hb = tb.host(a), tb.host(b)
    where = [a]

    def migrate(verify: bool, label: str):
        dest = b if where[0] == a else a
        t0 = time.perf_counter()
        r = tb.migrate(name, dest, MigrationSettings(verify=verify))
        wall = time.perf_counter() - t0
        where[0] = dest
        if r.status != "completed":
            raise RuntimeError(f"idle migration {r.status}: {r.error}")
        cpu = r.cpu_seconds
        say(f"  {label}: {_mib(r.throughput_bytes_per_second)} (round 0 "
            f"{_mib(r.rounds[0]['throughput_bytes_per_second'])}; CPU s source "
            f"{cpu.get('source') or 0:.3f}, destination {cpu.get('destination') or 0:.3f} "
            f"of {r.total_time_seconds:.3f} s)")
        return r, wall

    # Each repeat measures the migrations and their baselines back to back, so a slow patch
    # of this (shared, noisy) machine weighs on both sides of a ratio alike.
    try:
        r, _ = migrate(True, "idle migration into never-used frames")
        res.add("migration_cold_throughput_bytes_per_second", "bytes_per_second",
                r.throughput_bytes_per_second,
                "first migration of the run, into frames never written before")
        wire_bytes = r.bytes_sent_total
        for i in range(opts.repeats):
            r, wall = migrate(True, f"idle migration {i + 1}/{opts.repeats}")
            res.add("migration_throughput_bytes_per_second", "bytes_per_second",
                    r.throughput_bytes_per_second,
                    "bytes on the wire / total time (setup to the destination's RESULT)")
            res.add("migration_round0_throughput_bytes_per_second", "bytes_per_second",
                    r.rounds[0]["throughput_bytes_per_second"],
                    "round 0 alone: the page pipeline")
            res.add("migrate_call_seconds", "seconds", wall,
                    "the whole Testbed.migrate call: reservation, verify and cleanup included")
            res.add("downtime_idle_throughput_guest_seconds", "seconds", r.downtime_seconds,
                    f"the idle {format_bytes(size)} guest of the throughput runs")
            r, _ = migrate(False, f"unverified idle migration {i + 1}/{opts.repeats}")
            res.add("migration_round0_unverified_throughput_bytes_per_second",
                    "bytes_per_second", r.rounds[0]["throughput_bytes_per_second"],
                    "round 0 with --no-verify: the receiver hashes nothing")
            # Baselines: the raw data path between the same two hosts (the guest's bytes,
            # memory to memory), and the same with one cache-warm record buffer each side
            # (loopback TCP's ceiling here, not the guest's bytes).
            for label, memory in (("raw_tcp", size), ("loopback_ceiling", RECORD_BYTES)):
                ticket = on_host(hb, _raw_sink, wire_bytes, 30.0, memory)()
                seconds = on_host(ha, _raw_push, ticket, wire_bytes, 30.0, memory)()
                res.add(f"{label}_throughput_bytes_per_second", "bytes_per_second",
                        wire_bytes / seconds,
                        "nodes.migration.channel TCP + LinkSender between the same two hosts, 4 MiB "
                        "sends, " + (f"from and into {format_bytes(memory)} buffers (the "
                                     "guest's bytes, memory to memory)" if memory == size else
                                     "one cache-warm 4 MiB buffer each side"))
                say(f"  {label.replace('_', ' ')} {i + 1}/{opts.repeats}: "
                    f"{_mib(wire_bytes / seconds)}")
    finally:
        tb.destroy(name)

    # A memcpy and Ray's object store, the other data plane.
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    dst[:] = 1                                      # touched: a copy, not first-touch faults
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        res.add("memcpy_throughput_bytes_per_second", "bytes_per_second",
                size / (time.perf_counter() - t0), "np.copyto between two warm buffers")
    del src, dst
    if hasattr(ha, "actor"):
        count = max(1, min(RAY_WINDOW_BYTES, wire_bytes) // RECORD_BYTES)
        for i in range(opts.repeats):
            moved = 0
            t0 = time.perf_counter()
            while moved < wire_bytes:
                refs = on_host(ha, _ray_put, count, RECORD_BYTES)()[0]
                moved += on_host(hb, _ray_get, refs)()
                del refs
            seconds = time.perf_counter() - t0
            res.add("ray_object_throughput_bytes_per_second", "bytes_per_second",
                    moved / seconds, "4 MiB objects: ray.put on one node, ray.get on the other")
            say(f"  ray objects {i + 1}/{opts.repeats}: {_mib(moved / seconds)}")
    mig = "migration_throughput_bytes_per_second"
    res.ratio("migration / raw data path", mig, "raw_tcp_throughput_bytes_per_second")
    res.ratio("migration round 0 / raw data path", "migration_round0_throughput_bytes_per_second",
              "raw_tcp_throughput_bytes_per_second")
    res.ratio("migration / memcpy", mig, "memcpy_throughput_bytes_per_second")
    res.ratio("raw data path / memcpy", "raw_tcp_throughput_bytes_per_second",
              "memcpy_throughput_bytes_per_second")
    res.ratio("migration round 0 unverified / raw data path",
              "migration_round0_unverified_throughput_bytes_per_second",
              "raw_tcp_throughput_bytes_per_second")
    res.ratio("migration round 0 / loopback ceiling",
              "migration_round0_throughput_bytes_per_second",
              "loopback_ceiling_throughput_bytes_per_second")
    res.ratio("cold / warm migration", "migration_cold_throughput_bytes_per_second", mig)
    ray_vs_tcp = res.ratio("ray objects / raw TCP", "ray_object_throughput_bytes_per_second",
                           "raw_tcp_throughput_bytes_per_second")
    if ray_vs_tcp is not None:
        faster = "TCP" if ray_vs_tcp < 1 else "Ray's object store"
        res.conclusions.append(
            f"data plane: {faster} is faster between two host actors (Ray objects at "
            f"{ray_vs_tcp:.2f}x the raw TCP path), which is why migrations stream over TCP")
    # The same ratios repeat by repeat: each migration over the raw path measured right
    # after it, so their spread shows what the machine's noise does to the ratio.
    raw = res.figures.get("raw_tcp_throughput_bytes_per_second")
    for name, num in (("paired_round0_to_raw_ratio",
                       "migration_round0_throughput_bytes_per_second"),
                      ("paired_migration_to_raw_ratio", "migration_throughput_bytes_per_second")):
        if raw is not None and num in res.figures:
            for a, b in zip(res.figures[num].samples, raw.samples, strict=True):
                res.add(name, "ratio", a / b, "one repeat's migration over the raw path "
                        "measured right after it")
    target = res.median("paired_round0_to_raw_ratio")
    if target is not None:
        whole = res.figures["paired_migration_to_raw_ratio"].to_dict()
        res.conclusions.append(
            f"page pipeline (round 0) at {target:.0%} of the raw data path, median of paired "
            f"repeats ({'meets' if target >= 0.8 else 'misses'} the 80 % target); the whole "
            f"migration at {whole['median']:.0%} ({whole['min']:.0%}-{whole['max']:.0%}; "
            "setup to the destination's RESULT, the source's verify and cleanup come after, "
            "see phase_seconds)")


def bench_downtime(tb, opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    """Downtime with a final round of ~50 pages: a hot set of exactly 50 pages written all
    the time, one live round (max_iterations=1), so the final round is the hot set."""
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    a, b = list(tb.hosts)[:2]
    size = opts.downtime_guest_memory_bytes
    _idle_downtimes(tb, a, b, size, opts.repeats, res)
    page = 4096
    pages = size // page
    data_pages = pages - -(-pages // (page // 8))
    spec = WorkloadSpec("hotset", 20000.0, seed=7, hot_fraction=FINAL_ROUND_PAGES / data_pages,
                        hot_share=1.0)
    name = _unique("hot50")
    tb.create(a, GuestSpec(name, size, workload=spec))
    try:
        time.sleep(0.2)
        where = a
        for i in range(opts.repeats):
            dest = b if where == a else a
            r = tb.migrate(name, dest, MigrationSettings(max_iterations=1))
            where = dest
            if r.status != "completed":
                raise RuntimeError(f"migration {r.status}: {r.error}")
            final = r.rounds[-1]["pages_sent"]
            res.add("downtime_50_page_final_round_seconds", "seconds", r.downtime_seconds,
                    "hot set of 50 pages, one live round, then stop-and-copy")
            res.add("final_round_pages", "pages", final)
            if r.guest_observed_downtime_seconds is not None:
                res.add("downtime_50_page_guest_observed_seconds", "seconds",
                        r.guest_observed_downtime_seconds)
            say(f"  50-page final round {i + 1}/{opts.repeats}: {final} pages, "
                f"{r.downtime_seconds * 1000:.1f} ms")
    finally:
        tb.destroy(name)
    floor = res.median("downtime_idle_seconds")
    fifty = res.median("downtime_50_page_final_round_seconds")
    if floor is not None and fifty is not None:
        res.conclusions.append(
            f"downtime floor {floor * 1000:.1f} ms for an idle {format_bytes(size)} guest; "
            f"with a ~50-page final round {fifty * 1000:.1f} ms")


def _idle_downtimes(tb, a: str, b: str, size: int, repeats: int, res: Results) -> None:
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    name = _unique("idle")
    tb.create(a, GuestSpec(name, size))
    try:
        where = a
        for _ in range(repeats):
            where = b if where == a else a
            r = tb.migrate(name, where, MigrationSettings())
            if r.status != "completed":
                raise RuntimeError(f"idle migration {r.status}: {r.error}")
            res.add("downtime_idle_seconds", "seconds", r.downtime_seconds,
                    f"pause on the source to resume on the destination, idle "
                    f"{format_bytes(size)} guest")
            if r.guest_observed_downtime_seconds is not None:
                res.add("downtime_idle_guest_observed_seconds", "seconds",
                        r.guest_observed_downtime_seconds)
    finally:
        tb.destroy(name)


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
        f"slowest pipeline stage: {slow[6:]} at {_mib(res.median(slow))}; writing into "
        f"never-touched frames runs at {_mib(res.median('first_touch_write_bytes_per_second'))}"
        ", which is why a destination populates the frames it reserves before the stream; "
        "pages are sent from and received into the frames themselves (sendmsg, "
        "recvmsg_into), so gather and scatter run only for another record layout")
    say(f"  stages: slowest is {slow[6:]}")


def _decode(record: bytes) -> records.Record | None:
    """Read one framed record back, as a receiver does (from memory, not a socket)."""
    return RecordReader(io.BytesIO(record).readinto).read_record()


def bench_startup(opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    for n in opts.startup_hosts:
        for i in range(opts.startup_repeats):
            out = measure_startup(n, opts.host_memory_bytes)
            res.add(f"startup_{n}_hosts_seconds", "seconds", out["startup_seconds"],
                    "fresh local Ray cluster, one node per host, until every host answers")
            res.add(f"startup_{n}_hosts_rss_bytes_per_host", "bytes",
                    out["rss_bytes_total"] / n,
                    "resident memory of every Ray process of the cluster, over N")
            res.add(f"startup_{n}_hosts_host_actor_rss_bytes", "bytes",
                    out["host_actor_rss_bytes"], "one idle Host actor process")
            say(f"  start-up {n} hosts {i + 1}/{opts.startup_repeats}: "
                f"{out['startup_seconds']:.1f} s, {format_bytes(out['rss_bytes_total'] / n)} "
                "per host")


def measure_startup(hosts: int, host_memory_bytes: int, timeout: float = 300.0) -> dict:
    """Start a fresh cluster in a child process (this process may already be a Ray driver),
    measure it, stop it. Returns the child's JSON."""
    cmd = [sys.executable, "-m", "cluster.bench", "startup", str(hosts), str(host_memory_bytes)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"start-up of {hosts} hosts failed: {tail}")
    return json.loads(lines[-1])


def _startup_child(hosts: int, host_memory_bytes: int) -> dict:
    from cluster.launcher import ClusterSpec
    from cluster.testbed import Testbed
    t0 = time.perf_counter()
    tb = Testbed.local(ClusterSpec(hosts=hosts, host_memory_bytes=host_memory_bytes))
    try:
        up = time.perf_counter() - t0
        procs = descendants(os.getpid())
        rss = {pid: rss_bytes(pid) for pid in procs}
        actors = [rss[p] for p in procs if process_name(p).startswith("ray::Host")]
    finally:
        t1 = time.perf_counter()
        tb.close()
        down = time.perf_counter() - t1
    return {"hosts": hosts, "startup_seconds": up, "shutdown_seconds": down,
            "rss_bytes_total": sum(rss.values()), "processes": len(procs),
            "host_actor_rss_bytes": statistics.median(actors) if actors else 0}


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def bench_scale(tb, opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    """Evacuate one host's guests to the others: one at a time, then all at once."""
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    names = list(tb.hosts)
    src, others = names[0], names[1:]
    k = opts.scale_guests
    spec = WorkloadSpec("uniform", opts.scale_dirty_rate_pages_per_second, seed=11)
    settings = MigrationSettings(timeout_seconds=120.0)
    failed = 0
    for i in range(opts.repeats):
        for mode in ("sequential", "concurrent"):
            guests = [_unique(f"s{j}") for j in range(k)]
            for j, g in enumerate(guests):
                tb.create(src, GuestSpec(g, opts.scale_guest_memory_bytes,
                                         workload=replace(spec, seed=spec.seed + j)))
            try:
                time.sleep(0.2)
                plan = [(g, others[j % len(others)]) for j, g in enumerate(guests)]
                t0 = time.perf_counter()
                if mode == "sequential":
                    reports = [tb.migrate(g, d, settings) for g, d in plan]
                else:
                    with concurrent.futures.ThreadPoolExecutor(max_workers=k) as pool:
                        reports = list(pool.map(lambda p: tb.migrate(p[0], p[1], settings),
                                                plan))
                total = time.perf_counter() - t0
            finally:
                for g in guests:
                    try:
                        tb.destroy(g)
                    except Exception:  # noqa: BLE001 - a failed migration may have left it
                        pass
            ok = [r for r in reports if r.status == "completed"]
            failed += len(reports) - len(ok)
            res.add(f"scale_{mode}_total_seconds", "seconds", total,
                    f"{k} guests of {format_bytes(opts.scale_guest_memory_bytes)}, "
                    f"uniform {opts.scale_dirty_rate_pages_per_second:g} pages/s")
            for r in ok:
                res.add(f"scale_{mode}_downtime_seconds", "seconds", r.downtime_seconds,
                        "every migration of every repeat")
                res.add(f"scale_{mode}_migration_seconds", "seconds", r.total_time_seconds)
            say(f"  evacuate {k} guests {mode} {i + 1}/{opts.repeats}: {total:.2f} s")
    speedup = res.ratio("scale: sequential / concurrent total time",
                        "scale_sequential_total_seconds", "scale_concurrent_total_seconds")
    res.ratio("scale: concurrent / sequential downtime", "scale_concurrent_downtime_seconds",
              "scale_sequential_downtime_seconds")
    if failed:
        res.errors["scale"] = f"{failed} migrations did not complete"
    if speedup is not None:
        res.conclusions.append(
            f"evacuating {k} guests concurrently is {speedup:.2f}x faster than one at a time, "
            f"at {res.ratios['scale: concurrent / sequential downtime']:.2f}x the downtime "
            f"({os.cpu_count()} CPUs for all hosts)")


def _mib(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / MiB:.0f} MiB/s"


# -- the whole run ------------------------------------------------------------------------
def run_bench(opts: BenchOptions, testbed=None,
              say: Callable[[str], None] | None = None) -> Results:
    """Measure the sections of `opts`. `testbed`: an existing testbed to use (it needs room
    for the guests); None starts one (`opts.hosts` hosts, local Ray unless in_process) and
    closes it afterwards. A section that fails is recorded in `errors`, the others run."""
    from cluster.launcher import ClusterSpec
    from cluster.testbed import Testbed
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    res = Results(opts)
    needs_cluster = any(s in opts.sections for s in ("throughput", "downtime", "scale"))
    own = None
    if testbed is None and needs_cluster:
        spec = ClusterSpec(hosts=opts.hosts, host_memory_bytes=opts.host_memory_bytes,
                           superpages=opts.superpages)
        say(f"bench: starting {'an in-process' if opts.in_process else 'a local Ray'} "
            f"cluster of {opts.hosts} hosts")
        own = testbed = Testbed.in_process(spec) if opts.in_process else Testbed.local(spec)
    try:
        for section in opts.sections:
            say(f"bench: {section}")
            try:
                if section == "throughput":
                    bench_throughput(testbed, opts, res, say)
                elif section == "downtime":
                    bench_downtime(testbed, opts, res, say)
                elif section == "dirtying":
                    bench_dirtying(opts, res, say)
                elif section == "stages":
                    bench_stages(opts, res, say)
                elif section == "startup":
                    bench_startup(opts, res, say)
                elif section == "scale":
                    bench_scale(testbed, opts, res, say)
            except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
                res.errors[section] = f"{type(exc).__name__}: {exc}"
                say(f"bench: {section} failed: {exc}")
    finally:
        if own is not None:
            own.close()
    return res


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "startup":
        print(json.dumps(_startup_child(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        sys.exit("usage: python -m cluster.bench startup HOSTS HOST_MEMORY_BYTES "
                 "(internal; use `migbed bench`)")
