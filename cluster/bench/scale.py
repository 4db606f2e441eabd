"""The startup and scale sections: how long N hosts take to come up and what they cost in
memory, and one host's guests evacuated concurrently against one at a time."""

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.bench.options import BenchOptions
from cluster.bench.results import Results, unique_name
from nodes.units import format_bytes

if TYPE_CHECKING:
    from cluster.testbed import Testbed


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
    root = Path(__file__).resolve().parents[2]      # the tree with cluster/ in it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"start-up of {hosts} hosts failed: {tail}")
    return json.loads(lines[-1])


def startup_child(hosts: int, host_memory_bytes: int) -> dict:
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


def bench_scale(tb: "Testbed", opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
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
            guests = [unique_name(f"s{j}") for j in range(k)]
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
