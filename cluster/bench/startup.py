"""The start-up section: how long N hosts take to come up on a fresh local Ray cluster, with
guests on them and listed, what every process the cluster started costs in memory per host
(guest frames excluded), whether Ray's memory monitor killed anything, and how long the
teardown takes; the default packing of hosts onto Ray nodes beside one node per host.

Each cluster starts in a child process (`python -m cluster.bench startup ...`): this process
may already drive the bench's own cluster, and a Ray driver drives one at a time."""

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.child import run_child
from cluster.bench.figures import Results
from nodes.host.process import vm_rss_bytes
from nodes.units import format_bytes

STARTUP_GUEST_BYTES = 4 * MiB
OOM_KILL_TEXT = "killed due to the node running low on memory"


def bench_startup(opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    layouts = [(n, opts.hosts_per_node, "default") for n in opts.startup_hosts]
    layouts += [(n, 1, "one_node_per_host") for n in opts.startup_one_node_per_host_hosts]
    for n, per, label in layouts:
        key = f"startup_{n}_hosts" + ("" if label == "default" else f"_{label}")
        for i in range(opts.startup_repeats):
            out = run_child(["startup", json.dumps({
                "hosts": n, "host_memory_bytes": opts.host_memory_bytes, "hosts_per_node": per,
                "guests_per_host": opts.startup_guests_per_host})], timeout=900.0)
            where = (f"{out['nodes']} Ray node{'s' if out['nodes'] > 1 else ''}, "
                     f"{opts.startup_guests_per_host} guests of "
                     f"{format_bytes(STARTUP_GUEST_BYTES)} per host")
            res.add(f"{key}_seconds", "seconds", out["startup_seconds"],
                    f"fresh local Ray cluster ({where}) until every host answers")
            res.add(f"{key}_listed_seconds", "seconds", out["listed_seconds"],
                    "then the guests booted and every host listed")
            res.add(f"{key}_shutdown_seconds", "seconds", out["shutdown_seconds"])
            res.add(f"{key}_rss_bytes_per_host", "bytes", out["rss_bytes_per_host"],
                    "RSS of every process the cluster started (Ray's and the hosts'), guest "
                    "frames excluded, over the hosts")
            res.add(f"{key}_host_actor_rss_bytes", "bytes", out["host_actor_rss_bytes"],
                    "one Host actor process, its frames excluded (median)")
            res.add(f"{key}_memory_monitor_kills", "count", out["memory_monitor_kills"],
                    "workers Ray's memory monitor killed")
            say(f"  start-up {n} hosts ({label}) {i + 1}/{opts.startup_repeats}: "
                f"{out['startup_seconds']:.1f} s, {format_bytes(out['rss_bytes_per_host'])} "
                f"per host, {out['memory_monitor_kills']} killed")
    for n in opts.startup_one_node_per_host_hosts:
        faster = res.ratio(f"start-up {n} hosts: one node per host / default",
                           f"startup_{n}_hosts_one_node_per_host_seconds",
                           f"startup_{n}_hosts_seconds")
        leaner = res.ratio(f"memory per host, {n} hosts: one node per host / default",
                           f"startup_{n}_hosts_one_node_per_host_rss_bytes_per_host",
                           f"startup_{n}_hosts_rss_bytes_per_host")
        if faster is not None and leaner is not None:
            res.conclusions.append(f"the default packing starts {n} hosts {faster:.1f}x "
                                   f"faster than one Ray node per host, in {1 / leaner:.2f}x "
                                   "the memory per host")


def startup_child(hosts: int, host_memory_bytes: int, hosts_per_node: int | None,
                  guests_per_host: int) -> dict:
    """Start, measure and stop one cluster (in the child process)."""
    from cluster.launch.launcher import ClusterSpec
    from cluster.testbed import Testbed
    from nodes.host.specs import GuestSpec
    t0 = time.perf_counter()
    tb = Testbed.local(ClusterSpec(hosts=hosts, host_memory_bytes=host_memory_bytes,
                                   hosts_per_node=hosts_per_node))
    try:
        up = time.perf_counter() - t0
        for name in tb.hosts:
            for j in range(guests_per_host):
                tb.create(name, GuestSpec(f"{name}-s{j}", STARTUP_GUEST_BYTES))
        listing = tb.list()
        listed = time.perf_counter() - t0
        assert len(listing["hosts"]) == hosts
        memory = cluster_memory(tb)
        kills = memory_monitor_kills(Path(tb._owner.cluster.head_node.get_session_dir_path()))
    finally:
        t1 = time.perf_counter()
        tb.close()
        down = time.perf_counter() - t1
    return {"hosts": hosts, "startup_seconds": up, "listed_seconds": listed,
            "shutdown_seconds": down, "memory_monitor_kills": kills,
            "nodes": len({h["ray_node"]["node_id"] for h in listing["hosts"]}), **memory}


def cluster_memory(tb) -> dict:
    """The issue's measure: the RSS of every process the cluster started (every descendant
    of this driver), less what of it is the hosts' guest frames (machine memory), over the
    hosts."""
    procs = descendants(os.getpid())
    rss = sum(vm_rss_bytes(p) for p in procs)
    stats = [h.call("process_stats") for h in tb.hosts.values()]
    frames = sum(s["arena_rss_bytes"] for s in stats)
    return {"rss_bytes_per_host": (rss - frames) / len(stats), "processes": len(procs),
            "host_actor_rss_bytes": statistics.median(
                s["rss_bytes"] - s["arena_rss_bytes"] for s in stats)}


def memory_monitor_kills(session_dir: Path) -> int:
    """Workers Ray's memory monitor killed, as the raylets logged it."""
    kills = 0
    for log in (session_dir / "logs").glob("raylet*.out"):
        try:
            kills += log.read_text(errors="replace").count(OOM_KILL_TEXT)
        except OSError:
            continue
    return kills


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    from cluster.launch.reaper import proc_stats
    children: dict[int, list[int]] = {}
    for child, f in proc_stats().items():
        children.setdefault(int(f[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out
