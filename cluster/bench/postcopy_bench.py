"""The post-copy section: the downtime of a post-copy switch beside pre-copy's floor, and the
fault latency (a page request to the page landed) beside the raw round trip of one page.

- downtime: an idle guest migrated by pure post-copy and by pre-copy, back to back, each
  repeat: pause to resume on the destination (libvirt's), and for post-copy QEMU's own
  (stop until the switch's state has been sent).
- fault latency: a guest writing uniformly at the bench's dirty rate migrated by pure
  post-copy with its push limited, so its vCPU faults; the report's mean request-to-landed
  time (QEMU 10.1's postcopy-latency) and its median bucket, beside a raw round trip over
  migbed's own channel between the same two hosts: a REQ_PAGES record one way, a one-page
  PAGE_DATA record back (`_echo_pages`, `_ask_pages`, run inside the host actors).
- post-copy preempt: the fault latency under a push that saturates the link, without and
  with `--postcopy-preempt`, paired (`cluster.bench.preempt_bench`).
"""

import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cluster.bench.baselines import on_host
from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.figures import Results, unique_name
from cluster.bench.preempt_bench import bench_preempt
from nodes.migration.wire.channel import Ticket
from nodes.phase import Outcome

if TYPE_CHECKING:
    from cluster.testbed import Testbed

PUSH_BYTES_PER_SECOND = 16 * MiB     # the fault-latency guest's push: slow, so it faults
ROUND_TRIPS = 200


def bench_postcopy(tb: "Testbed", opts: BenchOptions, res: Results,
                   say: Callable[[str], None]) -> None:
    a, b = list(tb.hosts)[:2]
    _downtimes(tb, a, b, opts, res, say)
    _fault_latency(tb, a, b, opts, res, say)
    bench_preempt(tb, a, b, opts, res, say)       # paired: without and with preempt
    for _ in range(opts.repeats):
        rtt = raw_round_trip_seconds(tb.host(a), tb.host(b), 20 if opts.quick else ROUND_TRIPS)
        res.add("page_round_trip_seconds", "seconds", rtt,
                "raw: a REQ_PAGES record one way, a one-page PAGE_DATA back, over "
                "nodes.migration.wire.channel between the same two hosts (median)")
    res.ratio("postcopy_downtime_over_precopy", "postcopy_downtime_idle_seconds",
              "precopy_downtime_idle_seconds")
    res.ratio("fault_latency_over_round_trip", "fault_latency_mean_seconds",
              "page_round_trip_seconds")
    pc, pre = res.median("postcopy_downtime_idle_seconds"), res.median(
        "precopy_downtime_idle_seconds")
    lat, rtt = res.median("fault_latency_mean_seconds"), res.median("page_round_trip_seconds")
    if pc is not None and pre is not None:
        res.conclusions.append(f"post-copy switch {pc * 1000:.2f} ms pause to resume (QEMU's "
                               f"{res.median('postcopy_switch_qemu_downtime_seconds') * 1000:.2f}"
                               f" ms), pre-copy's floor {pre * 1000:.2f} ms, idle guest")
    if lat is not None and rtt is not None:
        res.conclusions.append(f"fault latency {lat * 1000:.2f} ms mean against a raw page "
                               f"round trip of {rtt * 1000:.3f} ms")


def _downtimes(tb: "Testbed", a: str, b: str, opts: BenchOptions, res: Results,
               say: Callable[[str], None]) -> None:
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    name = unique_name("pc-idle")
    tb.create(a, GuestSpec(name, opts.downtime_guest_memory_bytes))
    where = a
    try:
        for i in range(opts.repeats):
            for label, settings in (("post-copy", MigrationSettings(postcopy_after_rounds=0)),
                                    ("pre-copy", MigrationSettings())):
                where = b if where == a else a
                r = tb.migrate(name, where, settings)
                if r.status != Outcome.COMPLETED:
                    raise RuntimeError(f"idle {label} migration {r.status}: {r.error}")
                key = "postcopy" if r.postcopy else "precopy"
                res.add(f"{key}_downtime_idle_seconds", "seconds", r.downtime_seconds,
                        "pause on the source to resume on the destination, idle guest")
                if r.postcopy:
                    res.add("postcopy_switch_qemu_downtime_seconds", "seconds",
                            r.postcopy.downtime_qemu_seconds,
                            "QEMU's downtime: the stop until the switch's state was sent")
                say(f"  idle {label} {i + 1}/{opts.repeats}: downtime "
                    f"{r.downtime_seconds * 1000:.2f} ms")
    finally:
        tb.destroy(name)


def _fault_latency(tb: "Testbed", a: str, b: str, opts: BenchOptions, res: Results,
                   say: Callable[[str], None]) -> None:
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    name = unique_name("pc-busy")
    tb.create(a, GuestSpec(name, opts.dirty_guest_memory_bytes,
                           workload=WorkloadSpec("uniform", 20000.0, seed=3)))
    where = a
    try:
        time.sleep(0.2)
        for i in range(opts.repeats):
            where = b if where == a else a
            r = tb.migrate(name, where, MigrationSettings(
                postcopy_after_rounds=0, postcopy_bandwidth_bytes_per_second=PUSH_BYTES_PER_SECOND))
            if r.status != Outcome.COMPLETED or r.postcopy is None:
                raise RuntimeError(f"post-copy migration {r.status}: {r.error}")
            pc = r.postcopy
            if pc.fault_latency_mean_seconds is None:
                continue
            res.add("fault_latency_mean_seconds", "seconds", pc.fault_latency_mean_seconds,
                    "a page request to the page landed (QEMU 10.1's postcopy-latency), busy "
                    "guest, pure post-copy, push at 16 MiB/s")
            res.add("fault_latency_median_bucket_seconds", "seconds",
                    median_bucket(pc.fault_latency_seconds),
                    "upper bound of the log2 bucket holding the median fault")
            res.add("postcopy_blocktime_seconds", "seconds", pc.blocktime_seconds,
                    "time the vCPU waited on faults (QEMU's postcopy-blocktime)")
            say(f"  busy post-copy {i + 1}/{opts.repeats}: {r.postcopy_requests} requests, "
                f"mean latency {pc.fault_latency_mean_seconds * 1000:.2f} ms")
    finally:
        tb.destroy(name)


def median_bucket(histogram: dict[str, int]) -> float | None:
    """The upper bound of the bucket holding the median of a report's latency histogram."""
    total = sum(histogram.values())
    seen = 0
    for bound, n in histogram.items():
        seen += n
        if total and seen * 2 >= total:
            return float("inf") if bound == "+Inf" else float(bound)
    return None


# -- the raw round trip, run inside the host actors ----------------------------------------------
def _echo_pages(host, count: int, timeout: float) -> Ticket:
    """The page side: answer each REQ_PAGES with a one-page PAGE_DATA. Returns the ticket."""
    from nodes.migration.receive.reader import RecordReader
    from nodes.migration.wire import records
    from nodes.migration.wire.channel import Listener
    listener = Listener(host.config.address, "bench-rtt")
    page = np.ones((1, 4096), dtype=np.uint8)

    def serve() -> None:
        conn = None
        try:
            conn = listener.accept(timeout)
            reader = RecordReader(conn.recv_into)
            for _ in range(count):
                reader.read_record()
                parts = records.encode_page_data(np.zeros(1, np.int64), np.zeros(1, np.uint8),
                                                 page)
                conn.sendall(b"".join(bytes(p) for p in parts))
        finally:
            listener.close()
            if conn is not None:
                conn.close()
    threading.Thread(target=serve, name="bench-rtt", daemon=True).start()
    return listener.ticket


def _ask_pages(host, ticket: Ticket, count: int, timeout: float) -> float:
    """The faulting side: `count` requests, each waiting for its page; the median seconds."""
    from nodes.migration.receive.reader import RecordReader
    from nodes.migration.wire import pagesets, records
    from nodes.migration.wire.channel import connect
    from nodes.migration.wire.records import RecordType as RT
    sock = connect(ticket, timeout)
    try:
        reader = RecordReader(sock.recv_into)
        request = records.encode_record(RT.REQ_PAGES, {"pfns": pagesets.encode_pfns([0])})
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(request)
            reader.read_record()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        sock.close()


def raw_round_trip_seconds(source, destination, count: int, timeout: float = 30.0) -> float:
    """Median seconds of a one-page request and its page between two host handles."""
    ticket = on_host(source, _echo_pages, count, timeout)()
    return on_host(destination, _ask_pages, ticket, count, timeout)()
