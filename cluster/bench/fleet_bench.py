"""The fleet section: `drain --simulate` held against real drains (issue 26's target: the
simulated span and downtime p50 / p99 within 25 % of the real drain's).

On a small in-process cluster of its own (`fleet_hosts` hosts in 2 racks, `fleet_guests_per_host`
busy guests each, 32 MiB/s uplinks, a rack drained under KubeVirt's 2 outbound per host), the
same drain at each `--max-parallel` of `fleet_max_parallel`, each a real drain on a fresh
cluster and the same drain simulated beside it (`cluster.fleetsweep`, as `migbed drain
--sweep`). The simulation is calibrated from the first two real drains (in sample: the fixed
costs alone and their growth with migrations at once) and held for the rest (out of sample);
the section reports, per point, the real and simulated span, downtime p50 and p99, and their
ratios simulated / real.
"""

from collections.abc import Callable

from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.figures import Results

UPLINK = "32MiB"
HOST_LINK = "64MiB"
DIRTY_RATE = 1500           # page writes/s per guest: converges alone, not at a 5th of the uplink


def fleet_scenario(opts: BenchOptions) -> dict:
    """The section's drain as a fleet scenario (`scenarios/fleet/`'s keys)."""
    return {"name": "bench fleet", "seed": 3,
            "cluster": {"hosts": opts.fleet_hosts, "racks": 2,
                        "host_memory": f"{opts.fleet_host_memory_bytes // MiB}MiB",
                        "host_link": HOST_LINK, "uplink": UPLINK},
            "guests": {"per_host": opts.fleet_guests_per_host,
                       "memory": f"{opts.fleet_guest_memory_bytes // MiB}MiB",
                       "workload": "uniform", "dirty_rate": DIRTY_RATE, "fill": "random"},
            "drain": {"hosts": ["rack-0"], "limits": "kubevirt", "warmup": "300ms"},
            "axes": {"max_parallel": list(opts.fleet_max_parallel)}}


def bench_fleet(opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    from cluster.fleetsweep import CALIBRATE_POINTS, run_fleet_sweep
    sc = fleet_scenario(opts)
    say(f"  {opts.fleet_hosts} in-process hosts, {opts.fleet_guests_per_host} guests each, "
        f"rack-0 drained at max-parallel {', '.join(map(str, opts.fleet_max_parallel))}")
    result = run_fleet_sweep(sc, on_point=lambda p: say(
        f"  max-parallel {p['max_parallel']}: "
        f"{'simulated' if 'simulated' in p else 'real drain'} done"))
    failed = 0
    held = []
    for i, p in enumerate(result["points"]):
        v, real, sim = p["max_parallel"], p["real"]["stats"], p["simulated"]
        failed += sum(n for s, n in real["by_status"].items() if s != "completed")
        failed += int(not p["real"]["ok"])
        inside = "calibrated from" if i < CALIBRATE_POINTS else "held out"
        ratios = []
        for what, key, q in (("span", "span_seconds", None),
                             ("downtime p50", "downtime_seconds", "p50"),
                             ("downtime p99", "downtime_seconds", "p99")):
            r_v, s_v = _value(real, key, q), _value(sim, key, q)
            if r_v is None or s_v is None:
                continue
            name = f"fleet_mp{v}_{what.replace(' ', '_')}_seconds"
            res.add(f"{name}_real", "seconds", r_v, f"real drain at max-parallel {v} ({inside})")
            res.add(f"{name}_simulated", "seconds", s_v, f"simulated, at max-parallel {v}")
            ratios.append(res.ratio(f"fleet: max-parallel {v} ({inside}): simulated / real, "
                                    f"{what}", f"{name}_simulated", f"{name}_real"))
        if i >= CALIBRATE_POINTS:
            held += [r for r in ratios if r is not None]
    c = result["points"][0]["calibration"]
    res.conclusions.append(
        f"fleet: the simulated drain, calibrated from real drains at max-parallel "
        f"{result['calibrated_from'].split('=', 1)[1]} (+{c['resume_seconds'] * 1000:.0f} ms "
        f"downtime and +{c['overhead_seconds']:.2f} s a migration alone, "
        f"+{c['contention'] * 100:.0f} % downtime per further one at once)"
        + (f", is {min(held):.2f}-{max(held):.2f}x the real span and downtime p50 / p99 "
           f"where held out" if held else ""))
    if failed:
        res.errors["fleet"] = f"{failed} real migrations did not complete or were not verified"


def _value(stats: dict, key: str, q: str | None) -> float | None:
    v = stats.get(key)
    if q is None:
        return float(v) if isinstance(v, (int, float)) else None
    return float(v[q]) if isinstance(v, dict) and v.get(q) is not None else None
