"""Draining and maintaining hosts: `migbed drain` (real, `--simulate`d or a `--sweep`) and
`migbed maintenance`; the options they share with `evacuate` live in `cluster.cli.fleet`."""

import argparse
import json

from cluster.cli.fleet import (
    DrainProgress,
    add_fleet_outputs,
    add_limit_options,
    add_rack_options,
    check_fleet_outputs,
    fleet_outputs,
    limits_from,
)
from cluster.cli.options import Commands, UsageError, arg
from cluster.scheduler import MAX_LIMIT, Limits
from nodes.units import parse_count

SIM_HOST_LINK = 1.25e9        # a simulated host's link unless --host-link: 10 Gbit/s


class SimReport:
    """A simulated drain's result, as `fleet_outputs` writes a report."""

    def __init__(self, result: dict):
        self.result, self.hosts, self.stats = result, result["hosts"], result["stats"]

    def to_dict(self) -> dict:
        return self.result


def _real_drain(path: str) -> dict:
    """A real drain's JSON (`drain --output`): its fleet statistics and its moves."""
    from cluster.inputfile import read_json
    from nodes.errors import ConfigError
    data = read_json(path, "a drain's JSON")
    if not isinstance(data, dict) or not isinstance(data.get("stats"), dict):
        raise ConfigError(f"{path} is not a drain's JSON (`migbed drain --output`): no stats")
    if not isinstance(data.get("moves", []), list):
        raise ConfigError(f"{path} is not a drain's JSON (`migbed drain --output`): its "
                          "moves are not a list")
    data["moves"] = [m for m in data.get("moves", []) if isinstance(m, dict)]
    return data


def cmd_drain_simulated(args: argparse.Namespace, limits: Limits, settings) -> int:
    """`drain --simulate`: the same scheduler on a virtual clock, the model's migrations."""
    import time
    from dataclasses import replace

    from cluster.cli.options import workload_from
    from cluster.fleetsim import SimFleet, simulate_drain, summary
    wl = workload_from(args)
    if wl.pattern == "idle":
        wl = replace(wl, rate_pages_per_second=0.0)
    guests: tuple = ()
    if args.from_file:
        from cluster.guestfile import read_guest_file
        guests = tuple(read_guest_file(args.from_file,
                                       [f"host-{i}" for i in range(args.hosts_count)]))
    fleet = SimFleet(hosts=args.hosts_count, racks=args.racks or 1, guests=guests,
                     guests_per_host=args.guests_per_host,
                     guest_memory_bytes=args.guest_memory, workload=wl,
                     host_link_bytes_per_second=args.host_link or SIM_HOST_LINK,
                     uplink_bytes_per_second=args.uplink, seed=args.seed)
    t0 = time.monotonic()
    cal = None
    if args.calibrate:
        from cluster.fleetsim import calibrate
        real = [_real_drain(path) for path in args.calibrate]
        cal = calibrate(fleet, args.hosts, limits, real[0]["stats"], settings, args.spread,
                        real_drains=[d["moves"] for d in real if d["moves"]])
    result = simulate_drain(fleet, args.hosts, limits, settings, args.spread, cal)
    result["planning_seconds"] = time.monotonic() - t0
    report = SimReport(result)
    fleet_outputs(args, report, result["moves"], "simulated drain")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(summary(result) + f"\n  (planned in {result['planning_seconds']:.2f} s)")
    return 0


def cmd_drain_sweep(args: argparse.Namespace) -> int:
    """`drain --sweep FILE.toml`: the drain at each value of the scenario's axis, real and
    simulated (`cluster.fleetsweep`)."""
    import sys

    from cluster.cli.options import write_output
    from cluster.fleetsweep import draw_sweep, load_fleet_scenario, run_fleet_sweep, sweep_table
    if args.hosts:
        raise UsageError("--sweep takes the hosts to drain from its file: give no HOST")
    sc = load_fleet_scenario(args.sweep)
    result = run_fleet_sweep(sc, simulate_only=args.simulate, on_point=lambda p: print(
        f"  point {result_axis(sc)}={p[result_axis(sc)]}: "
        f"{'simulated' if 'simulated' in p else 'real drain'} done", file=sys.stderr,
        flush=True))
    if args.output:
        write_output(args.output, json.dumps(result, indent=2) + "\n")
    if args.plot:
        draw_sweep(result, args.plot)
        print(f"plot in {args.plot}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else sweep_table(result))
    return 0


def result_axis(sc: dict) -> str:
    return next(iter(sc["axes"]))


def cmd_drain(args: argparse.Namespace) -> int:
    from cluster.cli.options import EXIT_MIGRATION_FAILED, settings_from
    from cluster.drain import drain, move_dict, plan_drain
    limits = limits_from(args)
    settings = settings_from(args)
    check_fleet_outputs(args)
    if args.sweep:
        return cmd_drain_sweep(args)
    if args.simulate and not args.hosts:
        args.hosts = ["rack-0"]               # a simulated drain's default: the first rack
    if not args.hosts:
        raise UsageError("name the hosts to drain (HOST..., or rack-K with --simulate), or "
                         "give --sweep FILE.toml")
    if args.simulate:
        return cmd_drain_simulated(args, limits, settings)
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    moves, _ = plan_drain(tb, args.hosts, args.to, args.spread)
    report = drain(tb, args.hosts, args.to, args.spread, limits, settings,
                   on_event=DrainProgress(len(moves)))
    fleet_outputs(args, report, [move_dict(m, report.reports) for m in report.moves], "drain")
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else EXIT_MIGRATION_FAILED


def cmd_maintenance(args: argparse.Namespace) -> int:
    from cluster.cli.options import EXIT_MIGRATION_FAILED, settings_from
    from cluster.maintenance import maintenance
    limits = limits_from(args)
    settings = settings_from(args)
    check_fleet_outputs(args)
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    report = maintenance(tb, args.batch, limits, settings, args.rebalance, args.hosts or None,
                         on_event=DrainProgress(0))
    fleet_outputs(args, report, report.moves, "maintenance")
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else EXIT_MIGRATION_FAILED


def register(sub: Commands) -> None:
    from cluster.cli.options import add_migration_options
    s = sub.add_parser("drain", help="move every guest off hosts (by room and load) under "
                       "the migration limits; ends with the fleet's downtime statistics")
    s.add_argument("hosts", nargs="*", metavar="HOST")
    s.add_argument("--sweep", default=None, metavar="FILE.toml",
                   help="run the drain of a fleet scenario at each value of its axis, real "
                        "and simulated (e.g. scenarios/fleet/drain-parallelism.toml)")
    s.add_argument("--to", nargs="+", default=None, metavar="HOST",
                   help="only these hosts take the guests (default: every other host)")
    s.add_argument("--spread", action="store_true",
                   help="spread a rack's guests over the other racks, not into one")
    add_limit_options(s, parallel_default=None)
    add_fleet_outputs(s, with_json=False)
    add_migration_options(s)                    # --json among them
    add_simulate_options(s)
    s.set_defaults(func=cmd_drain)

    s = sub.add_parser("maintenance", help="a rolling maintenance: drain hosts a batch at a "
                       "time, restart each as a fresh host, return the guests (or rebalance)")
    s.add_argument("hosts", nargs="*", metavar="HOST",
                   help="the hosts to maintain, in this order (default: every host)")
    s.add_argument("--batch", type=arg(parse_count, "--batch", 1, MAX_LIMIT), default=1,
                   metavar="N", help="hosts drained and restarted at a time (default 1)")
    s.add_argument("--rebalance", action="store_true",
                   help="spread the guests evenly at the end instead of returning each to "
                        "its host")
    add_limit_options(s, parallel_default=None)
    add_fleet_outputs(s, with_json=False)
    add_migration_options(s)
    s.set_defaults(func=cmd_maintenance)


def add_simulate_options(s: argparse.ArgumentParser) -> None:
    """`--simulate` and the simulated fleet: its size, racks, links, guests (whose options
    default to a busy 1 GiB guest full of data, not a fresh one)."""
    from cluster.cli.options import add_field
    from cluster.fieldtable import WORKLOAD_FIELDS, field_named
    g = s.add_argument_group("--simulate: the fleet (HOST... may be rack-K; default rack-0)")
    g.add_argument("--simulate", action="store_true",
                   help="plan the drain with the analytic model on a virtual clock, the "
                        "same scheduler and limits, no cluster needed (host links 10Gbit "
                        "unless --host-link)")
    g.add_argument("--from", dest="from_file", default=None, metavar="FILE.toml",
                   help="the simulated guests from a `create --from` file (hosts host-0.."
                        "host-N-1) instead of --guests-per-host alike")
    g.add_argument("--calibrate", default=None, action="append", metavar="DRAIN.json",
                   help="calibrate the model from a real drain of the same fleet (its "
                        "`drain --output`): its fixed downtime and per-migration cost, "
                        "their spread and growth with migrations at once (again for more "
                        "drains, e.g. at --max-parallel 1 and 2)")
    g.add_argument("--hosts", dest="hosts_count", type=arg(parse_count, "--hosts", 2, 100_000),
                   default=32, metavar="N", help="hosts in the simulated fleet (default 32)")
    g.add_argument("--guests-per-host", type=arg(parse_count, "--guests-per-host", 0, 10_000),
                   default=4, metavar="N", help="guests on each host (default 4)")
    add_rack_options(g)
    add_field(g, field_named("guest_memory_bytes"), default=1 << 30,
              help="each guest's memory (default 1GiB)")
    sim_defaults = {"pattern": "uniform", "rate_pages_per_second": 5000.0, "fill": "random"}
    for row in WORKLOAD_FIELDS:
        if row.flag:
            add_field(g, row, **({"default": sim_defaults[row.name],
                                  "help": f"{row.help_text()} (simulated default "
                                          f"{sim_defaults[row.name]})"}
                                 if row.name in sim_defaults else {}))
