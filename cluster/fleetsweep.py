"""A fleet sweep: the same drain at several limits (`migbed drain --sweep FILE.toml`), each
point a real drain on a fresh cluster and the same drain simulated (`cluster.fleetsim`)
beside it: the curve operators tune by (downtime p99 against `--max-parallel`), and how far
the simulation is from the real thing.

The simulation is calibrated from the first two real drains (`cluster.fleetsim.calibrate`,
`cluster.fleetcalibration`: the fixed downtime and per-migration cost the model leaves out, how
they grow with migrations at once, the downtime's spread), then held for the other points.

The scenario (`scenarios/fleet/drain-parallelism.toml`):

    name, description, seed
    [cluster]  hosts, racks, host_memory, host_link, uplink
    [guests]   per_host, and create's own keys (memory, workload, dirty_rate, fill, ...)
    [drain]    hosts (names or rack-K), limits (a preset), warmup, spread
    [axes]     max_parallel = [1, 2, 5, 10]   (or max_outbound_per_host, max_inbound_per_host)
"""

import time
from dataclasses import replace
from pathlib import Path

from cluster.drain import drain, move_dict
from cluster.fairshare import parse_link_rate
from cluster.fleetsim import SimFleet, calibrate, drained_hosts, simulate_drain
from cluster.guestfile import guest_spec
from cluster.inputfile import read_toml
from cluster.scheduler import Limits, preset
from nodes.errors import ConfigError
from nodes.units import parse_count, parse_duration, parse_size

AXES = ("max_parallel", "max_outbound_per_host", "max_inbound_per_host")
# The real drains the simulation is calibrated from: the first (its fixed costs alone, at the
# axis's first value, one at a time in the scenario) and the second (how they grow with more
# at once); the points after them are held out.
CALIBRATE_POINTS = 2


def load_fleet_scenario(path: str | Path) -> dict:
    """The scenario, checked (one-line ConfigError otherwise)."""
    path = Path(path)
    sc = read_toml(path, "a fleet scenario")
    for table in ("cluster", "guests", "drain", "axes"):
        if not isinstance(sc.get(table), dict):
            raise ConfigError(f"{path}: a fleet scenario needs a [{table}] table")
    axes = sc["axes"]
    if len(axes) != 1 or next(iter(axes)) not in AXES:
        raise ConfigError(f"{path}: [axes] sweeps one of {', '.join(AXES)}")
    name, values = next(iter(axes.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: [axes] {name} must be a list of values")
    for v in values:
        Limits(**{name: v})                 # a bad limit is refused here, in one line
    return sc


def _fleet(sc: dict) -> tuple[SimFleet, dict]:
    c, g = sc["cluster"], dict(sc["guests"])
    per_host = parse_count(g.pop("per_host", 1), "[guests] per_host", 1, 64)
    spec = guest_spec({"name": "template", **g}, "[guests]")
    fleet = SimFleet(
        hosts=parse_count(c.get("hosts", 4), "[cluster] hosts", 2, 64),
        racks=parse_count(c.get("racks", 1), "[cluster] racks", 1, 64),
        guests_per_host=per_host, guest_memory_bytes=spec.memory_bytes,
        workload=spec.workload,
        host_link_bytes_per_second=parse_link_rate(c["host_link"], "[cluster] host_link")
        if "host_link" in c else None,
        uplink_bytes_per_second=parse_link_rate(c["uplink"], "[cluster] uplink")
        if "uplink" in c else None, seed=int(sc.get("seed", 0)),
        rate_spread=0.0)               # as the real drain's guests: all at the one rate
    return fleet, {"spec": spec, "host_memory": parse_size(c.get("host_memory", "256MiB"),
                                                           "[cluster] host_memory")}


def _real_point(fleet: SimFleet, extra: dict, sc: dict, limits: Limits) -> dict:
    """One real drain on a fresh in-process cluster (real hosts, real TCP streams)."""
    from cluster.launch.launcher import ClusterSpec
    from cluster.testbed import Testbed
    spec = ClusterSpec(hosts=fleet.hosts, host_memory_bytes=extra["host_memory"],
                       racks=fleet.racks, metrics_port=None,
                       host_link_bytes_per_second=fleet.host_link_bytes_per_second,
                       uplink_bytes_per_second=fleet.uplink_bytes_per_second)
    with Testbed.in_process(spec) as tb:
        for h in tb.hosts:
            for i in range(fleet.guests_per_host):
                tb.create(h, replace(extra["spec"], name=f"{h}-g{i}", workload=replace(
                    extra["spec"].workload, seed=fleet.seed + i)))
        time.sleep(parse_duration(sc["drain"].get("warmup", "300ms"), "[drain] warmup"))
        hosts = drained_hosts(fleet, tb.topology, list(sc["drain"]["hosts"]))
        rep = drain(tb, hosts, spread=bool(sc["drain"].get("spread", False)), limits=limits)
        return {"ok": rep.ok, "stats": rep.stats,
                "moves": [move_dict(m, rep.reports) for m in rep.moves]}


def run_fleet_sweep(sc: dict, simulate_only: bool = False, on_point=None) -> dict:
    """Every value of the axis: the real drain (unless `simulate_only`) and the simulated,
    calibrated from the first `CALIBRATE_POINTS` real drains (`calibrated_from`)."""
    fleet, extra = _fleet(sc)
    axis, values = next(iter(sc["axes"].items()))
    base = preset(sc["drain"]["limits"]) if sc["drain"].get("limits") else Limits()
    which, spread = list(sc["drain"]["hosts"]), bool(sc["drain"].get("spread", False))
    points = [{axis: v, "limits": base.merged(Limits(**{axis: v})).to_dict()} for v in values]
    cal, used = None, values[:CALIBRATE_POINTS]
    if not simulate_only:
        for point in points:
            point["real"] = _real_point(fleet, extra, sc, Limits(**point["limits"]))
            if on_point is not None:
                on_point(point)
        cal = calibrate(fleet, which, Limits(**points[0]["limits"]),
                        points[0]["real"]["stats"], spread=spread,
                        real_drains=[p["real"]["moves"] for p in points[:len(used)]])
    for point in points:
        sim = simulate_drain(fleet, which, Limits(**point["limits"]), spread=spread,
                             calibration=cal)
        point["simulated"] = sim["stats"]
        point["calibration"] = sim["calibration"]
        if on_point is not None:
            on_point(point)
    return {"name": sc.get("name", "fleet sweep"), "axis": axis, "points": points,
            "calibrated_from": None if simulate_only else
            f"{axis}={', '.join(str(v) for v in used)}"}


def _q(stats: dict | None, key: str, q: str, scale: float = 1.0) -> str:
    d = (stats or {}).get(key)
    return "-" if not d else f"{d[q] * scale:.1f}"


def sweep_table(result: dict) -> str:
    axis = result["axis"]
    lines = [f"{result['name']}: drain against {axis}",
             f"  {axis:>22}  {'span s':>13}  {'downtime p50 ms':>17}  {'downtime p99 ms':>17}",
             f"  {'':>22}  {'real / sim':>13}  {'real / sim':>17}  {'real / sim':>17}"]
    if result.get("calibrated_from"):
        c = result["points"][0]["calibration"]
        lines.append(f"  (simulation calibrated from the real drains at "
                     f"{result['calibrated_from']}: +{c['resume_seconds'] * 1000:.1f} ms "
                     f"downtime, +{c['overhead_seconds']:.2f} s a migration, each alone; "
                     f"+{c.get('contention', 0) * 100:.0f} % / "
                     f"+{c.get('overhead_contention', 0) * 100:.0f} % per further one "
                     f"at once)")
    for p in result["points"]:
        real = (p.get("real") or {}).get("stats")
        sim = p["simulated"]
        span = "-" if not real else f"{real['span_seconds']:.1f}"
        lines.append(
            f"  {p[axis]:>22}  {span:>6} / {sim['span_seconds']:<5.1f}"
            f"  {_q(real, 'downtime_seconds', 'p50', 1000):>8} / "
            f"{_q(sim, 'downtime_seconds', 'p50', 1000):<6}"
            f"  {_q(real, 'downtime_seconds', 'p99', 1000):>8} / "
            f"{_q(sim, 'downtime_seconds', 'p99', 1000):<6}")
    return "\n".join(lines)


def draw_sweep(result: dict, path: str | Path) -> Path:
    """Downtime p99 (and p50) against the axis, real and simulated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    axis = result["axis"]
    xs = [p[axis] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for source, style in (("real", "o-"), ("simulated", "s--")):
        for q in ("p50", "p99"):
            ys = []
            for p in result["points"]:
                st = p.get(source, {})
                st = st.get("stats", st) if source == "real" else st
                d = (st or {}).get("downtime_seconds")
                ys.append(d[q] * 1000 if d else float("nan"))
            ax.plot(xs, ys, style, label=f"{source} {q}")
    ax.set_xlabel(axis.replace("_", " "))
    ax.set_ylabel("downtime (ms)")
    ax.set_title(result["name"])
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
