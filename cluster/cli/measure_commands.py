"""Measuring a running guest without migrating it: `migbed wss` (its writable working set),
`migbed dirtyrate` (QEMU's calc-dirty-rate, three modes) and `migbed advise` (which way to
migrate it, by the analytic model fed what was measured)."""

import argparse
import json
import sys

from cluster.cli.options import Commands, add_migration_options, arg, settings_from
from nodes.units import parse_count, parse_duration


def _guest_host(guest: str):
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    return tb, tb.host(tb.where(guest))


def cmd_wss(args: argparse.Namespace) -> int:
    from cluster.measureview import draw_wss, wss_summary, wss_table
    from workloads.writableset import WssCurve
    if args.plot:
        from cluster.timeline import check_image_path
        check_image_path(args.plot, "--plot")
    _, host = _guest_host(args.guest)
    curve = WssCurve.from_dict(host.call("measure_wss", args.guest, args.duration, args.tick,
                                         timeout=args.duration + 60))
    if args.plot:
        draw_wss([curve], args.plot)
        print(f"plot in {args.plot}", file=sys.stderr)
    if args.json:
        print(curve.to_json())
        return 0
    from cluster.console import show
    show(wss_table(curve))
    print(wss_summary(curve))
    return 0


def cmd_dirtyrate(args: argparse.Namespace) -> int:
    from cluster.measureview import dirtyrate_table, series_stats
    _, host = _guest_host(args.guest)
    runs = [host.call("measure_dirty_rate", args.guest, args.mode, args.duration,
                      args.sample_pages_per_gib, timeout=args.duration + 60)
            for _ in range(args.repeat)]
    stats = series_stats(runs)
    if args.json:
        out = dict(runs[0]) if len(runs) == 1 else {"windows": runs, **stats}
        out["pages_per_second"] = stats["mean_pages_per_second"]
        out["bytes_per_second"] = stats["mean_bytes_per_second"]
        print(json.dumps(out, indent=2))
        return 0
    from cluster.console import show
    show(dirtyrate_table(runs))
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from cluster.advisor import advise, migrate_line, summary
    from workloads.spec import WorkloadSpec
    from workloads.writableset import WssCurve
    settings = settings_from(args)
    tb, host = _guest_host(args.guest)
    if args.destination not in tb.hosts:
        from nodes.errors import ConfigError
        raise ConfigError(f"no host {args.destination!r} (hosts: {', '.join(tb.hosts)})")
    status = host.call("guest_status", args.guest)
    curve = WssCurve.from_dict(host.call("measure_wss", args.guest, args.measure, 0.01,
                                         timeout=args.measure + 60))
    content = host.call("sample_content", args.guest)
    ranked = advise(curve, content, settings, status["memory_bytes"],
                    WorkloadSpec.from_dict(status.get("workload") or {}))
    best = ranked[0] if ranked[0].meets_limits else None
    line = migrate_line(args.guest, args.destination, _migrate_flags(args), best) if best else None
    if args.json:
        print(json.dumps({"guest": args.guest, "destination": args.destination,
                          "dirty_rate_pages_per_second": curve.distinct(1.0),
                          "wss": curve.to_dict(), "content": content,
                          "advice": [a.to_dict() for a in ranked], "migrate": line},
                         indent=2))
        return 0
    from cluster.console import show
    from cluster.measureview import advice_table
    print(summary(curve, content))
    show(advice_table(ranked))
    print(line if line else "no candidate meets the limits: raise the bandwidth or the "
          "downtime limit, or allow post-copy")
    return 0


def cmd_advise_check(args: argparse.Namespace) -> int:
    from cluster.advisecheck import run_check
    name, result = _run_scenario_check(args, run_check)
    if not args.json:
        print(f"{name}: predicted winner = measured winner at {result['winners_agree']}"
              f" of {result['point_count']} points; the winner's total time within 25 % at "
              f"{result['total_within_25_percent']}; among pre-copy alone the winners agree at "
              f"{result['precopy_winners_agree']}")
    return 0


def cmd_wss_check(args: argparse.Namespace) -> int:
    from cluster.wsscheck import run_check
    name, result = _run_scenario_check(args, run_check)
    if not args.json:
        print(f"{name}: the model on the measured WWS within 25 % of the measured "
              f"total time at {result['nominal_within_25_percent']} of "
              f"{result['point_count']} points at the link's speed, at "
              f"{result['measured_throughput_within_25_percent']} at the measured throughput")
    return 0


def _run_scenario_check(args: argparse.Namespace, run_check) -> tuple[str, dict]:
    """A check over a scenario's points on a fresh cluster of its size (in this process with
    `--in-process`): its name and result, the result printed as JSON with `--json` (progress
    then goes to stderr)."""
    from cluster.launch.launcher import ClusterSpec
    from cluster.sweep.scenario import load_scenario
    from cluster.testbed import Testbed
    scenario = load_scenario(args.scenario)
    spec = ClusterSpec(hosts=scenario.hosts, host_memory_bytes=scenario.host_memory_bytes)
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    with (Testbed.in_process(spec) if args.in_process else Testbed.local(spec)) as tb:
        result = run_check(scenario, tb, say)
    if args.json:
        print(json.dumps(result, indent=2))
    return scenario.name, result


def _migrate_flags(args: argparse.Namespace) -> list[str]:
    """The migrate flags the operator typed after GUEST DEST_HOST (advise's own left out)."""
    words = list(getattr(args, "argv", None) or [])
    own = {"--json": 0, "--debug": 0, "--measure": 1}
    out, i = [], words.index(args.destination) + 1 if args.destination in words else len(words)
    while i < len(words):
        word = words[i]
        name = word.split("=", 1)[0]
        if name in own:
            i += 1 + (own[name] if "=" not in word else 0)
            continue
        out.append(word)
        i += 1
    return out


def register(sub: Commands) -> None:
    s = sub.add_parser("wss", help="measure a running guest's writable working set (pages "
                       "dirtied over windows of 10 ms .. 10 s) without migrating it")
    s.add_argument("guest")
    s.add_argument("--duration", type=arg(parse_duration, "--duration"), default=10.0,
                   help="how long to watch the guest (default 10s; the longest window is "
                        "at most this)")
    s.add_argument("--tick", type=arg(parse_duration, "--tick"), default=0.01,
                   help="how often the dirty log is read (default 10ms, the shortest window)")
    s.add_argument("--json", action="store_true",
                   help="print the curve as JSON (the file `migbed model --wss` reads)")
    s.add_argument("--plot", metavar="FILE.png", help="draw the curve into FILE")
    s.set_defaults(func=cmd_wss)

    s = sub.add_parser("dirtyrate", help="measure a running guest's dirty rate as QEMU's "
                       "calc-dirty-rate does, beside its true rate")
    s.add_argument("guest")
    s.add_argument("--mode", choices=("page-sampling", "dirty-bitmap", "dirty-ring"),
                   default="page-sampling", help="how (default page-sampling, QEMU's)")
    s.add_argument("--duration", type=arg(parse_duration, "--duration"), default=1.0,
                   help="the window (default 1s)")
    s.add_argument("--sample-pages-per-gib", type=arg(parse_count, "--sample-pages-per-gib",
                                                      1, 1 << 18),
                   default=512, help="page-sampling: pages hashed per GiB (default 512)")
    s.add_argument("--repeat", type=arg(parse_count, "--repeat", 1, 1000), default=1,
                   help="windows one after another: mean, spread and each one's true rate")
    s.add_argument("--json", action="store_true",
                   help="print pages_per_second, bytes_per_second (and the windows) as JSON")
    s.set_defaults(func=cmd_dirtyrate)

    s = sub.add_parser("advise", help="which algorithm and aid to migrate a running guest "
                       "with: measured, then predicted by the model, ranked")
    s.add_argument("guest")
    s.add_argument("destination", metavar="DEST_HOST")
    add_migration_options(s)
    s.add_argument("--measure", type=arg(parse_duration, "--measure"), default=2.0,
                   help="how long to measure the guest's working set (default 2s)")
    s.set_defaults(func=cmd_advise)

    s = sub.add_parser("advise-check", help="run a scenario's points (dirty rates x links): "
                       "the advisor's winner against every candidate migrated for real")
    s.add_argument("scenario", metavar="SCENARIO.toml")
    s.add_argument("--in-process", action="store_true",
                   help="hosts as objects in this process instead of a local Ray cluster")
    s.add_argument("--json", action="store_true", help="print every point as JSON")
    s.set_defaults(func=cmd_advise_check)

    s = sub.add_parser("wss-check", help="run a scenario's program guests: each measured "
                       "(wss), predicted by the model on its curve, then migrated for real")
    s.add_argument("scenario", metavar="SCENARIO.toml")
    s.add_argument("--in-process", action="store_true",
                   help="hosts as objects in this process instead of a local Ray cluster")
    s.add_argument("--json", action="store_true", help="print every point as JSON")
    s.set_defaults(func=cmd_wss_check)
