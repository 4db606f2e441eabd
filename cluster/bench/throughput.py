"""The throughput section: an idle guest migrated back and forth over an unlimited link,
each repeat beside the baselines (`baselines`) measured right after it."""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.bench import baselines
from cluster.bench.baselines import RECORD_BYTES
from cluster.bench.bench_options import BenchOptions
from cluster.bench.figures import Results, mib_per_second, unique_name
from nodes.phase import Outcome
from nodes.units import format_bytes

if TYPE_CHECKING:
    from cluster.report import MigrationReport
    from cluster.testbed import Testbed

_RAW_NOTE = "nodes.migration.wire.channel TCP + LinkSender between the same two hosts, 4 MiB sends, "


class _PingPong:
    """One idle guest migrated between two hosts, each time to the one it is not on."""

    def __init__(self, tb: "Testbed", name: str, a: str, b: str, say: Callable[[str], None]):
        self.tb, self.name, self.a, self.b, self.say = tb, name, a, b, say
        self.where = a

    def migrate(self, verify: bool, label: str) -> tuple["MigrationReport", float]:
        """Migrate to the other host; (the report, seconds of the whole call)."""
        from nodes.migration.settings import MigrationSettings
        dest = self.b if self.where == self.a else self.a
        t0 = time.perf_counter()
        r = self.tb.migrate(self.name, dest, MigrationSettings(verify=verify))
        wall = time.perf_counter() - t0
        self.where = dest
        if r.status != Outcome.COMPLETED:
            raise RuntimeError(f"idle migration {r.status}: {r.error}")
        cpu = r.cpu_seconds
        self.say(f"  {label}: {mib_per_second(r.throughput_bytes_per_second)} (round 0 "
                 f"{mib_per_second(r.rounds[0]['throughput_bytes_per_second'])}; CPU s source "
                 f"{cpu.get('source') or 0:.3f}, destination {cpu.get('destination') or 0:.3f} "
                 f"of {r.total_time_seconds:.3f} s)")
        return r, wall


def bench_throughput(tb: "Testbed", opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    from nodes.host.specs import GuestSpec
    from workloads.spec import WorkloadSpec
    a, b = list(tb.hosts)[:2]
    size = opts.guest_memory_bytes
    name = unique_name("idle")
    # Memory with content (random, as guestperf's guests have touched every page): every
    # page goes whole, as before zero-page detection, so the figures mean the same.
    tb.create(a, GuestSpec(name, size, workload=WorkloadSpec("idle", fill="random")))
    try:
        wire_bytes = _migrations_and_raw_path(_PingPong(tb, name, a, b, say), opts, res, say)
    finally:
        tb.destroy(name)
    baselines.memcpy(size, opts.repeats, res)
    if hasattr(tb.host(a), "actor"):      # Ray's object store exists only on a Ray cluster
        source, destination = baselines.cross_node_pair(tb)
        for i in range(opts.repeats):
            moved, seconds = baselines.ray_objects_seconds(source, destination, wire_bytes)
            res.add("ray_object_throughput_bytes_per_second", "bytes_per_second",
                    moved / seconds, f"4 MiB objects: ray.put on {source.name}'s node, "
                    f"ray.get on {destination.name}'s, another node")
            say(f"  ray objects {i + 1}/{opts.repeats}: {mib_per_second(moved / seconds)}")
    _ratios(res)
    _paired_ratios(res)


def _migrations_and_raw_path(guest: _PingPong, opts: BenchOptions, res: Results,
                             say: Callable[[str], None]) -> int:
    """Each repeat measures the migrations and their baselines back to back, so a slow patch
    of this (shared, noisy) machine weighs on both sides of a ratio alike. Returns the bytes
    one migration puts on the wire."""
    size = opts.guest_memory_bytes
    r, _ = guest.migrate(True, "idle migration into never-used frames")
    res.add("migration_cold_throughput_bytes_per_second", "bytes_per_second",
            r.throughput_bytes_per_second,
            "first migration of the run, into frames never written before")
    wire_bytes = r.bytes_sent_total
    for i in range(opts.repeats):
        r, wall = guest.migrate(True, f"idle migration {i + 1}/{opts.repeats}")
        res.add("migration_throughput_bytes_per_second", "bytes_per_second",
                r.throughput_bytes_per_second,
                "bytes on the wire / total time (setup to the destination's RESULT)")
        res.add("migration_round0_throughput_bytes_per_second", "bytes_per_second",
                r.rounds[0]["throughput_bytes_per_second"], "round 0 alone: the page pipeline")
        res.add("migrate_call_seconds", "seconds", wall,
                "the whole Testbed.migrate call: reservation, verify and cleanup included")
        res.add("downtime_idle_throughput_guest_seconds", "seconds", r.downtime_seconds,
                f"the idle {format_bytes(size)} guest of the throughput runs")
        r, _ = guest.migrate(False, f"unverified idle migration {i + 1}/{opts.repeats}")
        res.add("migration_round0_unverified_throughput_bytes_per_second",
                "bytes_per_second", r.rounds[0]["throughput_bytes_per_second"],
                "round 0 with --no-verify: the receiver hashes nothing")
        # Baselines: the raw data path between the same two hosts (the guest's bytes,
        # memory to memory), and the same with one cache-warm record buffer each side
        # (loopback TCP's ceiling here, not the guest's bytes).
        source, destination = guest.tb.host(guest.a), guest.tb.host(guest.b)
        for label, memory in (("raw_tcp", size), ("loopback_ceiling", RECORD_BYTES)):
            seconds = baselines.raw_path_seconds(source, destination, wire_bytes, memory)
            res.add(f"{label}_throughput_bytes_per_second", "bytes_per_second",
                    wire_bytes / seconds,
                    _RAW_NOTE + (f"from and into {format_bytes(memory)} buffers (the guest's "
                                 "bytes, memory to memory)" if memory == size else
                                 "one cache-warm 4 MiB buffer each side"))
            say(f"  {label.replace('_', ' ')} {i + 1}/{opts.repeats}: "
                f"{mib_per_second(wire_bytes / seconds)}")
    return wire_bytes


def _ratios(res: Results) -> None:
    mig, raw = "migration_throughput_bytes_per_second", "raw_tcp_throughput_bytes_per_second"
    round0 = "migration_round0_throughput_bytes_per_second"
    memcpy = "memcpy_throughput_bytes_per_second"
    res.ratio("migration / raw data path", mig, raw)
    res.ratio("migration round 0 / raw data path", round0, raw)
    res.ratio("migration / memcpy", mig, memcpy)
    res.ratio("raw data path / memcpy", raw, memcpy)
    res.ratio("migration round 0 unverified / raw data path",
              "migration_round0_unverified_throughput_bytes_per_second", raw)
    res.ratio("migration round 0 / loopback ceiling", round0,
              "loopback_ceiling_throughput_bytes_per_second")
    res.ratio("cold / warm migration", "migration_cold_throughput_bytes_per_second", mig)
    ray_vs_tcp = res.ratio("ray objects / raw TCP", "ray_object_throughput_bytes_per_second",
                           raw)
    if ray_vs_tcp is not None:
        faster = "TCP" if ray_vs_tcp < 1 else "Ray's object store"
        res.conclusions.append(
            f"data plane: {faster} is faster between two host actors (Ray objects at "
            f"{ray_vs_tcp:.2f}x the raw TCP path), which is why migrations stream over TCP")


def _paired_ratios(res: Results) -> None:
    """The same ratios repeat by repeat: each migration over the raw path measured right
    after it, so their spread shows what the machine's noise does to the ratio."""
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
