"""The density section: many small guests writing 1000 pages/s each, with thread vCPUs and
then with process vCPUs on the same cluster (issue 22's density target: 128 process guests on
32 hosts, `migbed list` <= 3 s, the guests' own CPU under 25 % of the machine, each process
guest's memory beyond its frames <= 8 MiB PSS).

What it measures, per kind, on the bench's hosts (every one, `density_guests_per_host` guests
each, then destroyed), one kind after the other:
- the listing's seconds (`Testbed.list`, what `migbed list` asks every host) while the
  guests run;
- the CPU every process of the cluster used over a window (from /proc: this driver's
  descendants, Ray's and the hosts' and the guests'), as a share of the machine's CPUs, and
  for process guests the guests' own share (their processes alone, from `schedstat`: a
  guest's ~1 ms of CPU a second is a tenth of a clock tick), and the page writes the guests
  achieved against the rate asked;
- for process guests, the memory each costs beyond its frames: its PSS less its shared
  memory (its frames and control page), plus its zygote's, shared among the guests forked
  from it (`nodes.host.guestprocess`).

A 2-core machine cannot hold 128 guests at 1000 writes/s beside 32 hosts' Ray workers, so
the section runs the bench's few hosts and also states the guests' CPU per guest times the
target's 128, as a share of this machine: a projection, named so.
"""

import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.figures import Results, unique_name
from cluster.bench.startup import descendants

if TYPE_CHECKING:
    from cluster.testbed import Testbed

KINDS = ("thread", "process")
RATE = 1000.0                  # page writes/s per guest (the density figure)
GUEST_BYTES = 4 * MiB
TARGET_GUESTS = 128
LISTINGS = 3
_TICK = os.sysconf("SC_CLK_TCK")


def bench_density(tb: "Testbed", opts: BenchOptions, res: Results,
                  say: Callable[[str], None]) -> None:
    rows: list = []
    for _ in range(1 if opts.quick else opts.density_repeats):
        for kind in KINDS:
            rows += _measure_kind(tb, opts, kind, say)
    for name, unit, value, note in rows:
        res.add(name, unit, value, note)
    res.ratio("density: cluster CPU, process / thread vCPUs", "density_process_cluster_cpu_share",
              "density_thread_cluster_cpu_share")
    res.ratio("density: listing, process / thread vCPUs", "density_process_list_seconds",
              "density_thread_list_seconds")
    n = len(tb.hosts) * opts.density_guests_per_host
    per_guest = res.median("density_process_guest_cpu_share_per_guest")
    pss = res.median("density_process_guest_pss_own_bytes")
    if per_guest is not None and pss is not None:
        res.conclusions.append(
            f"density: {n} process guests at {RATE:g} writes/s on {len(tb.hosts)} hosts: "
            f"listed in {res.median('density_process_list_seconds') * 1000:.0f} ms (thread "
            f"guests {res.median('density_thread_list_seconds') * 1000:.0f} ms), guests' own "
            f"CPU {per_guest * n:.1%} of this machine ({per_guest * TARGET_GUESTS:.1%} "
            f"projected for {TARGET_GUESTS}), {pss / MiB:.1f} MiB PSS each beyond frames; "
            f"{_paced_loop()}")


def _measure_kind(tb: "Testbed", opts: BenchOptions, kind: str,
                  say: Callable[[str], None]) -> list:
    from nodes.host.specs import GuestSpec
    from workloads.spec import WorkloadSpec
    names = []
    for h in tb.hosts:
        for j in range(opts.density_guests_per_host):
            names.append(unique_name(f"d{kind[0]}{j}"))
            tb.create(h, GuestSpec(names[-1], GUEST_BYTES, vcpu=kind,
                                   workload=WorkloadSpec("uniform", RATE, seed=len(names),
                                                         fill="random")))
    try:
        time.sleep(opts.density_settle_seconds)
        pids = [g["pid"] for g in tb.guests() if g["name"] in names and g.get("pid")]
        cluster0, guests0 = _cpu_seconds(_cluster_pids()), _run_seconds(pids)
        written0, t0 = _written(tb, names), time.monotonic()
        listings = []
        for _ in range(LISTINGS):
            t = time.perf_counter()
            tb.list()
            listings.append(time.perf_counter() - t)
        time.sleep(max(0.0, opts.density_seconds - (time.monotonic() - t0)))
        span = time.monotonic() - t0
        cluster1, guests1 = _cpu_seconds(_cluster_pids()), _run_seconds(pids)
        written = _written(tb, names) - written0
        memory = _guest_memory(pids) if kind == "process" else None
    finally:
        for name in names:
            tb.destroy(name)
    cpus = os.cpu_count() or 1
    what = (f"{len(names)} {kind} guests of {GUEST_BYTES // MiB} MiB writing {RATE:g} pages/s "
            f"on {len(tb.hosts)} hosts")
    rows = [(f"density_{kind}_list_seconds", "seconds", statistics.median(listings),
             f"Testbed.list (every host's describe and guests), {what}"),
            (f"density_{kind}_cluster_cpu_share", "ratio", (cluster1 - cluster0) / span / cpus,
             f"CPU of every process of the cluster over {span:.1f} s, share of {cpus} CPUs, "
             f"{what}"),
            (f"density_{kind}_write_rate_share", "ratio", written / span / (RATE * len(names)),
             "page writes achieved over those asked")]
    if kind == "process" and pids:
        share = (guests1 - guests0) / span / cpus
        rows.append(("density_process_guest_cpu_share", "ratio", share,
                     f"the guest processes' own CPU, share of {cpus} CPUs, {what}"))
        rows.append(("density_process_guest_cpu_share_per_guest", "ratio", share / len(pids),
                     "the same per guest"))
    if memory is not None:
        rows.append(("density_process_guest_pss_own_bytes", "bytes", memory,
                     "PSS beyond frames and control page per guest process, its zygote's "
                     "share included"))
    say(f"  density {kind}: listed in {statistics.median(listings) * 1000:.0f} ms, cluster CPU "
        f"{rows[1][2]:.1%} of the machine")
    return rows


def _paced_loop() -> str:
    """Which loop ran the process guests' paced vCPUs (the hosts share this machine's build
    and environment): the native one, or the Python one and why."""
    from nodes.host.nativepacing import SWITCH_ENV, load_library
    if load_library() is not None:
        return "paced vCPUs by the native loop"
    return (f"paced vCPUs by the Python loop (libmigbedpaced.so not built: `make setup`; or "
            f"{SWITCH_ENV}=0)")


def _cluster_pids() -> list[int]:
    return [os.getpid(), *descendants(os.getpid())]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (those gone count nothing)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])     # utime, stime
    return total / _TICK


def _run_seconds(pids: list[int]) -> float:
    """CPU seconds the processes' threads ran, to the nanosecond (`schedstat`): a guest's
    few ms a second are a fraction of a clock tick, which `_cpu_seconds` counts in."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def _written(tb: "Testbed", names: list[str]) -> int:
    return sum(g.get("pages_written_total", 0) for g in tb.guests() if g["name"] in names)


def _pss_own(pid: int) -> int | None:
    """PSS less shared memory (the guest's frames, its control page), bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Pss_Shmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        return None
    return out.get("Pss", 0) - out.get("Pss_Shmem", 0)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except OSError:
        return None


def _guest_memory(pids: list[int]) -> float | None:
    """Bytes per guest beyond its frames: the guests' own PSS and their zygotes', over the
    guests."""
    own = [_pss_own(p) for p in pids]
    zygotes = {_parent(p) for p in pids} - {None}
    shared = [_pss_own(z) for z in zygotes if z is not None]
    if not own or None in own:
        return None
    return (sum(own) + sum(s for s in shared if s is not None)) / len(own)
