"""Runs that measure: `migbed bench`, `migbed sweep`, `migbed soak` and the `migbed demo`."""

import argparse
import json
import sys

from cluster.cli.options import (
    EXIT_MIGRATION_FAILED,
    Commands,
    add_cluster_options,
    add_hosts_per_node_option,
    add_migration_options,
    add_output_option,
    add_prometheus_options,
    add_superpages_option,
    add_workload_options,
    arg,
    check_guests_fit,
    check_output,
    cluster_spec_from,
    settings_from,
    workload_from,
    write_output,
)
from nodes.errors import ConfigError
from nodes.phase import Outcome
from nodes.units import parse_count, parse_positive_size

MAX_SOAK_MIGRATIONS = 1_000_000
MAX_SOAK_GUESTS = 64


def cmd_bench(args: argparse.Namespace) -> int:
    from cluster.bench import SECTIONS, BenchOptions, run_bench
    from cluster.bench.compare import load_saved
    check_output(args.output)                 # refused now, not after a long run
    old = load_saved(args.compare) if args.compare else None
    if args.fail_on_change and old is None:
        raise ConfigError("--fail-on-change needs a saved run to compare with "
                          "(--compare OLD.json)")
    sections = tuple(x.strip() for x in args.only.split(",")) if args.only else SECTIONS
    overrides: dict = {"sections": sections, "in_process": args.in_process,
                       "superpages": not args.no_superpages}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.guest_memory is not None:
        overrides["guest_memory_bytes"] = args.guest_memory
    if args.hosts_per_node is not None:
        overrides["hosts_per_node"] = args.hosts_per_node
    opts = (BenchOptions.quick_options(**overrides) if args.quick
            else BenchOptions(**overrides))
    res = run_bench(opts)
    data = res.to_dict()
    comparison = None
    if old is not None:
        from cluster.bench.compare import compare
        comparison = compare(old, data, args.compare)
        data["comparison"] = comparison.to_dict()
    text = json.dumps(data, indent=2)
    if args.output:
        write_output(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        res.show()
        if comparison is not None:
            _show_comparison(comparison)
    if res.errors or (args.fail_on_change and comparison is not None and comparison.changed):
        return EXIT_MIGRATION_FAILED
    return 0


def _show_comparison(comparison) -> None:
    from cluster.console import bench_comparison_renderables, show
    show(*bench_comparison_renderables(
        f"against {comparison.old_path}", comparison.rows(), comparison.differences,
        len(comparison.changed)))


def cmd_sweep(args: argparse.Namespace) -> int:
    from cluster.sweep import load_scenario, run_sweep
    scenario = load_scenario(args.scenario)
    if args.repeats is not None:
        scenario = scenario.with_repeats(args.repeats)
    result = run_sweep(scenario, args.output, in_process=args.in_process,
                       plots=not args.no_plots)
    print(result.summary_text())
    print(f"\nresults in {result.folder}", file=sys.stderr)
    return EXIT_MIGRATION_FAILED if result.failed_runs else 0


def cmd_soak(args: argparse.Namespace) -> int:
    from cluster.console import Steps
    from cluster.soak import SoakOptions, run_soak
    from cluster.testbed import Testbed
    check_output(args.output)
    cluster = cluster_spec_from(args)
    if cluster.hosts < 2:
        raise ConfigError("a soak needs at least 2 hosts around its ring (--hosts)")
    check_guests_fit(cluster, args.guest_memory, args.guests)
    opts = SoakOptions(migrations=args.migrations, guests=args.guests,
                       guest_memory_bytes=args.guest_memory, workload=workload_from(args),
                       settings=settings_from(args),
                       warmup_migrations=args.warmup_migrations)
    factory = Testbed.in_process if args.in_process else Testbed.local
    print(f"soak: {opts.migrations} migrations of {opts.guests} guests around "
          f"{cluster.hosts} {'in-process ' if args.in_process else ''}hosts...",
          file=sys.stderr)
    with factory(cluster) as tb, Steps(opts.migrations,
                                      log_every=max(1, opts.migrations // 10)) as steps:
        result = run_soak(tb, opts, lambda k, r: steps.step(
            f"{r.guest} {r.source} -> {r.destination}: {r.status}",
            failed=r.status != Outcome.COMPLETED, at=k + 1))
    text = json.dumps(result.to_dict(), indent=2)
    if args.output:
        write_output(args.output, text + "\n")
    print(text if args.json else result.table())
    return 0 if result.ok else EXIT_MIGRATION_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo
    if not args.prometheus:
        return run_demo(quick=args.quick, hosts_per_node=args.hosts_per_node)
    import tempfile

    from cluster.prometheus import LocalTargets, Prometheus
    from cluster.testbed import observing
    with tempfile.TemporaryDirectory(prefix="migbed-prometheus-") as workdir, \
            Prometheus(workdir, args.prometheus_port) as prom, \
            observing(LocalTargets(prom.sd_file)):
        print(f"Prometheus: {prom.url} scrapes the demo's hosts each second while it runs",
              flush=True)
        return run_demo(quick=args.quick, hosts_per_node=args.hosts_per_node)


def register(sub: Commands) -> None:
    s = sub.add_parser("demo", help="the main job: a 3-host cluster, guests, migrations, "
                       "and the seed's three architectures side by side")
    s.add_argument("--quick", action="store_true", help="smaller guests, fewer migrations")
    add_hosts_per_node_option(s)
    add_prometheus_options(s, metrics_host=False)
    s.set_defaults(func=cmd_demo)
    _register_bench(sub)
    _register_sweep(sub)
    _register_soak(sub)


def _register_bench(sub: Commands) -> None:
    from cluster.bench.bench_options import SECTIONS
    s = sub.add_parser("bench", help="how close migbed runs to this machine's limits: "
                       "throughput, downtime floor, dirtying, wire, start-up, scale, post-copy")
    s.add_argument("--quick", action="store_true",
                   help="tiny sizes, one repeat: proves it runs, measures nothing")
    s.add_argument("--only", default=None, metavar="SECTIONS",
                   help=f"comma-separated sections: {', '.join(SECTIONS)} (default all)")
    s.add_argument("--repeats", type=arg(parse_count, "--repeats", 1), default=None,
                   help="repeats of every figure (default 5)")
    s.add_argument("--guest-memory", type=arg(parse_positive_size, "--guest-memory"),
                   default=None, help="idle guest of the throughput section (default 256MiB)")
    s.add_argument("--in-process", action="store_true",
                   help="hosts in this process instead of a local Ray cluster")
    add_superpages_option(s)
    add_hosts_per_node_option(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.add_argument("--output", "--save", dest="output", default=None, metavar="FILE",
                   help="also write the figures as JSON, with the machine's description and "
                        "the commit (what --compare reads)")
    s.add_argument("--compare", default=None, metavar="OLD.json",
                   help="print each figure beside the one of a run saved with --save, their "
                        "ratio, and which changed")
    s.add_argument("--fail-on-change", action="store_true",
                   help="with --compare: exit 1 when a figure changed")
    s.set_defaults(func=cmd_bench)


def _register_sweep(sub: Commands) -> None:
    s = sub.add_parser("sweep", help="run a scenario's grid of migrations beside the model: "
                       "one JSON per run, a CSV, PNG plots and an agreement table")
    s.add_argument("scenario", help="scenario TOML file (ready ones in scenarios/)")
    s.add_argument("--output", default=None, metavar="DIR",
                   help="results folder (default results/<scenario>-<time>)")
    s.add_argument("--repeats", type=arg(parse_count, "--repeats", 1), default=None,
                   help="override the scenario's repeats")
    s.add_argument("--in-process", action="store_true",
                   help="hosts in this process instead of a local Ray cluster (faster)")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.set_defaults(func=cmd_sweep)


def _register_soak(sub: Commands) -> None:
    s = sub.add_parser("soak", help="many small migrations around a ring of hosts with busy "
                       "guests; checks every one, frame accounting and host memory growth")
    s.add_argument("--migrations", default=1000,
                   type=arg(parse_count, "--migrations", 1, MAX_SOAK_MIGRATIONS),
                   help="migrations in all (default 1000)")
    s.add_argument("--guests", type=arg(parse_count, "--guests", 1, MAX_SOAK_GUESTS), default=3,
                   help="guests going round the ring (default 3)")
    s.add_argument("--guest-memory", type=arg(parse_positive_size, "--guest-memory"),
                   default=4 * 1024 * 1024, help="memory of each guest (default 4MiB)")
    s.add_argument("--warmup-migrations", type=arg(parse_count, "--warmup-migrations"),
                   default=None,
                   help="migrations before the memory baseline is taken (default a quarter "
                        "of them: host processes' allocators settle in the first hundreds)")
    s.add_argument("--in-process", action="store_true",
                   help="hosts in this process instead of a local Ray cluster")
    add_output_option(s)
    add_migration_options(s)
    add_workload_options(s)
    s.set_defaults(workload="hotset", dirty_rate=5000.0)
    add_cluster_options(s, hosts=3, memory="256MiB")
    s.set_defaults(func=cmd_soak)
