"""The scale section: evacuating one host and then a rack of hosts at once (each host's
guests busy), every migration at a time against one at a time: total time and
per-migration downtime. It runs on a cluster of its own (`scale_hosts` hosts, in a child
process, see `cluster.bench.child`; in this process for `--in-process`)."""

import json
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from cluster.bench.bench_options import BenchOptions
from cluster.bench.child import run_child
from cluster.bench.figures import Results, unique_name
from nodes.phase import Outcome
from nodes.units import format_bytes

if TYPE_CHECKING:
    from cluster.testbed import Testbed


def bench_scale(opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    if opts.in_process:
        samples = scale_child(opts, say)
    else:
        say(f"  starting a local Ray cluster of {opts.scale_hosts} hosts in a child process")
        samples = run_child(["scale", json.dumps(opts.to_dict())], timeout=1800.0)["samples"]
    for name, unit, value, note in samples:
        res.add(name, unit, value, note)
    failed = 0
    for rack in opts.scale_racks:
        key = f"scale_evacuate_{rack}_hosts"
        failed += int(res.median(f"{key}_failed_migrations") or 0)
        speedup = res.ratio(f"scale: evacuate {rack}: one at a time / all at once, total time",
                            f"{key}_sequential_total_seconds",
                            f"{key}_concurrent_total_seconds")
        down = res.ratio(f"scale: evacuate {rack}: all at once / one at a time, downtime",
                         f"{key}_concurrent_downtime_seconds",
                         f"{key}_sequential_downtime_seconds")
        if speedup is not None and down is not None:
            n = rack * opts.scale_guests_per_host
            res.conclusions.append(
                f"evacuating {rack} host{'s' if rack > 1 else ''} ({n} guests) with all {n} "
                f"migrations at once takes {1 / speedup:.2f}x the time of one at a time, at "
                f"{down:.2f}x the downtime ({os.cpu_count()} CPUs for all hosts)")
    if failed:
        res.errors["scale"] = f"{failed} migrations did not complete or were not verified"


def scale_child(opts: BenchOptions, say: Callable[[str], None] = lambda _: None) -> list:
    """Build the section's cluster, evacuate each rack both ways, return the samples as
    (name, unit, value, note) rows."""
    from cluster.launch.launcher import ClusterSpec
    from cluster.testbed import Testbed
    spec = ClusterSpec(hosts=opts.scale_hosts, host_memory_bytes=opts.scale_host_memory_bytes,
                       hosts_per_node=opts.hosts_per_node, superpages=opts.superpages)
    rows: list = []
    with (Testbed.in_process(spec) if opts.in_process else Testbed.local(spec)) as tb:
        for _ in range(opts.repeats):
            for rack in opts.scale_racks:
                for mode in ("sequential", "concurrent"):
                    rows += _evacuate_rack(tb, opts, rack, mode, say)
    return rows


def _evacuate_rack(tb: "Testbed", opts: BenchOptions, rack: int, mode: str,
                   say: Callable[[str], None]) -> list:
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    hosts = list(tb.hosts)[:rack]
    wl = WorkloadSpec("uniform", opts.scale_dirty_rate_pages_per_second, seed=11)
    guests = []
    for h in hosts:
        for _ in range(opts.scale_guests_per_host):
            guests.append(unique_name(f"e{len(guests)}"))
            tb.create(h, GuestSpec(guests[-1], opts.scale_guest_memory_bytes,
                                   workload=replace(wl, seed=wl.seed + len(guests))))
    concurrency = 1 if mode == "sequential" else len(guests)
    try:
        rep = tb.evacuate(hosts, concurrency, MigrationSettings(timeout_seconds=120.0))
    finally:
        for g in guests:
            try:
                tb.destroy(g)
            except Exception:  # noqa: BLE001 - a failed migration may have left it
                pass
    key = f"scale_evacuate_{rack}_hosts"
    what = (f"{len(guests)} guests of {format_bytes(opts.scale_guest_memory_bytes)} off "
            f"{rack} of {len(tb.hosts)} hosts, uniform "
            f"{opts.scale_dirty_rate_pages_per_second:g} pages/s, {concurrency} at a time")
    rows = [(f"{key}_{mode}_total_seconds", "seconds", rep.total_time_seconds, what)]
    bad = [m for m in rep.moves if m.status != Outcome.COMPLETED or m.verified is not True]
    rows.append((f"{key}_failed_migrations", "count", len(bad) + len(rep.stayed), ""))
    for m in rep.moves:
        if m.downtime_seconds is not None and m.status == Outcome.COMPLETED:
            rows.append((f"{key}_{mode}_downtime_seconds", "seconds", m.downtime_seconds,
                         "every migration of every repeat"))
    say(f"  evacuate {rack} host(s), {len(guests)} guests, {mode}: "
        f"{rep.total_time_seconds:.2f} s, {len(bad)} failed")
    return rows
