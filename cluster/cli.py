"""The `migbed` command line, modelled on Xen's `xl`: parse, call the API, print.

Bad input of any kind is one line on stderr and exit code 2 (`--debug` shows the traceback);
a migration that ran but did not complete exits 1.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence

from nodes.errors import ConfigError, MigbedError
from nodes.units import format_bytes, parse_duration, parse_size
from nodes.xen.profiles import PROFILES

EXIT_BAD_INPUT = 2
EXIT_MIGRATION_FAILED = 1


class UsageError(MigbedError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# -- argument types: each rejects bad input with a one-line message ---------------------------
def _typed(fn):
    """Let argparse show our message (it hides a ValueError's text behind the type's name)."""
    def parse(text: str):
        try:
            return fn(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def _size(what: str):
    def parse(text: str) -> int:
        value = parse_size(text, what)
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {text!r}")
        return value
    return _typed(parse)


def _rate(what: str):
    def parse(text: str) -> float:
        value = parse_size(text, what)
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {text!r}; write e.g. 128MiB "
                              "(per second)")
        return float(value)
    return _typed(parse)


def _duration(what: str, allow_zero: bool = False):
    def parse(text: str) -> float:
        value = parse_duration(text, what)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{what} must be {'>= 0' if allow_zero else 'positive'}, got "
                              f"{text!r}")
        return value
    return _typed(parse)


def _count(what: str, minimum: int = 0):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{what} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise ConfigError(f"{what} must be >= {minimum}, got {value}")
        return value
    return _typed(parse)


def _fraction(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{what} must be a number, got {text!r}") from None
        if not 0 <= value <= 1:
            raise ConfigError(f"{what} must be between 0 and 1, got {text!r}")
        return value
    return _typed(parse)


@_typed
def _port(text: str) -> int:
    value = _count("port")(text)
    if value > 65535:
        raise ConfigError(f"port must be 0..65535, got {value}")
    return value


# -- option groups shared by several commands ----------------------------------------------
def add_cluster_options(p: argparse.ArgumentParser, hosts: int = 3,
                        memory: str = "512MiB") -> None:
    p.add_argument("--hosts", type=_count("--hosts", 1), default=hosts,
                   help=f"number of emulated hosts (default {hosts})")
    p.add_argument("--host-memory", type=_size("--host-memory"), default=parse_size(memory),
                   help=f"machine memory per host, e.g. 1GiB (default {memory})")
    p.add_argument("--profile", default=None,
                   help=f"architecture profile for all hosts ({', '.join(PROFILES)}) or per "
                        "host, e.g. host-0=ia64,host-1=ia64 (default x86)")
    p.add_argument("--page-size", type=_size("--page-size"), default=4096,
                   help="page size in bytes (default 4096)")
    p.add_argument("--hypervisor-reserve", type=_size("--hypervisor-reserve"),
                   default=4 * 1024 * 1024, help="frames the hypervisor keeps (default 4MiB)")
    p.add_argument("--dom0-memory", type=_size("--dom0-memory"), default=None,
                   help="dom0 memory per host (default 1/32 of the host, at least 1MiB)")
    add_superpages_option(p)


def add_superpages_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-superpages", action="store_true",
                   help="give guests frame by frame (a fragmented host) instead of in 2 MiB "
                        "superpage extents as Xen does; migrations then move scattered pages")


def add_prometheus_options(p: argparse.ArgumentParser, metrics_host: bool = True) -> None:
    p.add_argument("--prometheus", action="store_true",
                   help="also run a Prometheus server (Debian's `prometheus` binary) that "
                        "scrapes every host each second")
    p.add_argument("--prometheus-port", type=_port, default=9090,
                   help="port of that Prometheus on 127.0.0.1 (default 9090; 0: a free one)")
    if metrics_host:
        p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                       help="where each host's /metrics listens (default 127.0.0.1; "
                            "0.0.0.0 for a Prometheus on another machine)")


def add_workload_options(p: argparse.ArgumentParser) -> None:
    from workloads.spec import PATTERNS
    p.add_argument("--workload", default="idle", choices=PATTERNS, metavar="PATTERN",
                   help=f"memory workload: {', '.join(PATTERNS)} (default idle)")
    p.add_argument("--dirty-rate", default="0", metavar="PAGES_PER_S",
                   help="page writes per second, or max (default: max; idle writes nothing)")
    p.add_argument("--seed", type=_count("--seed"), default=0, help="workload seed")
    p.add_argument("--hot-fraction", type=_fraction("--hot-fraction"), default=0.1,
                   help="hotset: share of pages in the writable working set (default 0.1)")
    p.add_argument("--hot-share", type=_fraction("--hot-share"), default=0.9,
                   help="hotset: share of writes that hit it (default 0.9)")


def add_migration_options(p: argparse.ArgumentParser) -> None:
    from nodes.migration.policy import POLICIES
    p.add_argument("--policy", default="xen", choices=list(POLICIES), metavar="NAME",
                   help=f"pre-copy policy: {', '.join(POLICIES)} (default xen)")
    p.add_argument("--bandwidth", type=_rate("--bandwidth"), default=None,
                   help="the link's speed per second, e.g. 128MiB (default unlimited)")
    p.add_argument("--rate-limit", type=_rate("--rate-limit"), default=None,
                   help="the migration's own throttle per second, lifted for stop-and-copy "
                        "(default none)")
    p.add_argument("--latency", type=_duration("--latency", allow_zero=True), default=0.0,
                   help="one-way link latency, e.g. 5ms (default 0)")
    p.add_argument("--downtime-limit", type=_duration("--downtime-limit"), default=0.3,
                   help="qemu policy: downtime limit, e.g. 300ms (default 300ms)")
    p.add_argument("--max-iterations", type=_count("--max-iterations"), default=None,
                   help="override the policy's live round cap")
    p.add_argument("--cancel-after-round", type=_count("--cancel-after-round"), default=None,
                   help="cancel the migration after live round N (tests the abort path)")
    p.add_argument("--timeout", type=_duration("--timeout"), default=30.0,
                   help="timeout of every wait across hosts (default 30s)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the destination-equals-source memory check")
    p.add_argument("--json", action="store_true", help="print the report alone, as JSON")


def workload_from(args: argparse.Namespace):
    from workloads.spec import WorkloadSpec, parse_rate
    return WorkloadSpec(pattern=args.workload, rate_pages_per_second=parse_rate(args.dirty_rate),
                        seed=args.seed, hot_fraction=args.hot_fraction,
                        hot_share=args.hot_share)


def settings_from(args: argparse.Namespace):
    from nodes.migration.settings import MigrationSettings
    return MigrationSettings(
        policy=args.policy, link_bytes_per_second=args.bandwidth,
        latency_seconds=args.latency, rate_limit_bytes_per_second=args.rate_limit,
        downtime_limit_seconds=args.downtime_limit, max_iterations=args.max_iterations,
        verify=not args.no_verify, cancel_after_round=args.cancel_after_round,
        timeout_seconds=args.timeout)


def cluster_spec_from(args: argparse.Namespace, address: str | None = None):
    from cluster.launcher import ClusterSpec, host_names, parse_profiles
    default, per = parse_profiles(args.profile, host_names(args.hosts))
    return ClusterSpec(hosts=args.hosts, host_memory_bytes=args.host_memory,
                       page_size=args.page_size, reserved_bytes=args.hypervisor_reserve,
                       dom0_memory_bytes=args.dom0_memory, profiles=per,
                       default_profile=default, address=address,
                       bind_address="node" if address else "127.0.0.1",
                       metrics_address=getattr(args, "metrics_host", "127.0.0.1"),
                       superpages=not args.no_superpages)


def check_guests_fit(cluster, guest_bytes: int, count: int = 1) -> None:
    """Commands that build their own cluster check its guests before starting anything:
    whole pages, and `count` of them fitting one host beside the hypervisor and dom0."""
    from nodes.xen.hypervisor import default_dom0_bytes
    if guest_bytes % cluster.page_size:
        raise ConfigError(f"--guest-memory ({guest_bytes} B) is not a multiple of the "
                          f"page size ({cluster.page_size} B)")
    room = cluster.host_memory_bytes - cluster.reserved_bytes - (
        cluster.dom0_memory_bytes
        or default_dom0_bytes(cluster.host_memory_bytes, cluster.page_size))
    if count * guest_bytes > room:
        many = f"{count} guests of" if count > 1 else "a guest of"
        raise ConfigError(f"{many} {format_bytes(guest_bytes)} may not fit one host of "
                          f"{format_bytes(cluster.host_memory_bytes)}; raise --host-memory"
                          + (" or lower --guests" if count > 1 else ""))


# -- printing ------------------------------------------------------------------------------
def print_listing(listing: dict, out=sys.stdout) -> None:
    print("HOST       PROFILE    FRAMES:  TOTAL     FREE  RESERVED     USED   DOM0   HYPERVISOR AT",
          file=out)
    for h in listing["hosts"]:
        f = h["frames"]
        lo, hi = h["hypervisor_frames"]
        print(f"{h['name']:<10} {h['profile']:<8} {'':>8} {f['total']:>6} {f['free']:>8} "
              f"{f['reserved']:>9} {f['used']:>8} {f['dom0']:>6}   mfn {lo}..{hi}", file=out)
    print(file=out)
    print("GUEST            HOST       MODE   MEMORY      STATE     WORKLOAD     WRITES  "
          "MACHINE RANGE", file=out)
    for g in listing["guests"]:
        rng = g.get("machine_range")
        where = f"mfn {rng[0]}..{rng[1]}" if rng else "scattered"
        wl = g.get("workload", "-") if not g["dom0"] else "(toolstack)"
        print(f"{g['name']:<16} {g['host']:<10} {g['mode']:<6} "
              f"{format_bytes(g['memory_bytes']):>9}   {g['state']:<9} {wl:<10} "
              f"{g.get('pages_written_total', 0):>8}  {where}", file=out)


class ProgressPrinter:
    """One line per finished round on stderr, as `xl migrate` prints them."""

    def __init__(self, out=sys.stderr, header: str | None = None):
        self.out = out
        self.shown = 0
        self.header = header   # printed once the migration is under way, not before checks

    def __call__(self, p: dict) -> None:
        if self.header:
            print(self.header, file=self.out, flush=True)
            self.header = None
        for r in p["rounds"][self.shown:]:
            tag = "final" if r["final"] else f"round {r['index']}"
            print(f"  {tag:>8}: sent {r['pages_sent']:>7} pages, skipped "
                  f"{r['pages_skipped']:>6}, dirtied {r['pages_dirtied']:>7} in "
                  f"{r['duration_seconds'] * 1000:7.1f} ms "
                  f"({format_bytes(r['throughput_bytes_per_second'])}/s)", file=self.out,
                  flush=True)
        self.shown = len(p["rounds"])


# -- commands ------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from cluster import launcher
    spec = cluster_spec_from(args, args.address or os.environ.get("RAY_ADDRESS") or None)
    if args.prometheus:
        spec = dataclasses.replace(spec, prometheus_port=args.prometheus_port)
    t0 = time.monotonic()
    state = launcher.up(spec)
    print(f"migbed cluster up: {len(state['hosts'])} hosts ({', '.join(state['hosts'])}) on Ray "
          f"at {state['address']} in {time.monotonic() - t0:.1f} s")
    if state.get("prometheus"):
        print(f"Prometheus: {state['prometheus']['url']} (every host scraped each second; "
              f"targets in {state['sd_file']}); Grafana: import dashboards/migbed.json")
    elif state.get("sd_file"):
        print(f"metrics: every host serves /metrics; Prometheus targets in {state['sd_file']}")
    print("next: `migbed create host-0 vm1 --memory 64MiB --workload uniform --dirty-rate "
          "20000`, `migbed list`, `migbed migrate vm1 host-1`, `migbed down`")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cluster import launcher
    print("migbed cluster stopped" if launcher.down() else "no migbed cluster was running")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    listing = Testbed.attach().list()
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        print_listing(listing)
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    from nodes.host.specs import GuestSpec
    spec = GuestSpec(name=args.name, memory_bytes=args.memory, mode=args.mode, dma=args.dma,
                     workload=workload_from(args))
    d = Testbed.attach().create(args.host, spec)
    print(f"created {d['name']} on {args.host}: {format_bytes(d['memory_bytes'])}, mode "
          f"{d['mode']}, workload {spec.workload.pattern}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    Testbed.attach().destroy(args.name)
    print(f"destroyed {args.name}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    tb.host(tb.where(args.name)).call("pause_guest" if args.verb == "pause" else "unpause_guest",
                                      args.name)
    print(f"{args.verb}d {args.name}")
    return 0


def _report_out(report, args: argparse.Namespace) -> int:
    if args.json:
        print(report.to_json())
    else:
        print(report.table())
    ok = report.status == "completed" and not report.guest_lost
    return 0 if ok else EXIT_MIGRATION_FAILED


def cmd_migrate(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    settings = dataclasses.replace(settings_from(args), faults=tuple(args.fault or ()))
    if (args.guest is None) != (args.destination is None):
        raise UsageError("give both GUEST and DEST_HOST (against a running cluster), or "
                         "neither (a one-shot migration on an embedded cluster)")
    if args.guest is not None:
        tb = Testbed.attach()
        progress = ProgressPrinter(header=f"migrating {args.guest} to {args.destination} "
                                          f"(policy {settings.policy})")
        return _report_out(tb.migrate(args.guest, args.destination, settings, progress), args)
    from nodes.host.specs import GuestSpec
    spec = GuestSpec(name="vm1", memory_bytes=args.guest_memory, mode=args.mode,
                     workload=workload_from(args))
    cluster = cluster_spec_from(args)
    if cluster.hosts < 2:
        raise ConfigError("a migration needs at least 2 hosts (--hosts)")
    check_guests_fit(cluster, spec.memory_bytes)
    print(f"starting an embedded cluster of {cluster.hosts} hosts...", file=sys.stderr)
    with Testbed.local(cluster) as tb:
        tb.create("host-0", spec)
        time.sleep(args.warmup)
        progress = ProgressPrinter(header=f"migrating vm1 ({format_bytes(spec.memory_bytes)}, "
                                          f"{spec.workload.pattern}) host-0 -> host-1 (policy "
                                          f"{settings.policy})")
        report = tb.migrate("vm1", "host-1", settings, progress)
    return _report_out(report, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo
    if not args.prometheus:
        return run_demo(quick=args.quick)
    import tempfile

    from cluster.prometheus import LocalTargets, Prometheus
    from cluster.testbed import observing
    with tempfile.TemporaryDirectory(prefix="migbed-prometheus-") as workdir, \
            Prometheus(workdir, args.prometheus_port) as prom, \
            observing(LocalTargets(prom.sd_file)):
        print(f"Prometheus: {prom.url} scrapes the demo's hosts each second while it runs",
              flush=True)
        return run_demo(quick=args.quick)


def cmd_model(args: argparse.Namespace) -> int:
    from cluster.model import predict
    rate = None
    wl = workload_from(args)
    if wl.unlimited:
        raise ConfigError("the model needs a dirty rate in page writes per second "
                          "(--dirty-rate N), not max")
    if args.bandwidth is None and args.rate_limit is None:
        raise ConfigError("the model needs a bandwidth (--bandwidth, e.g. 128MiB): give the "
                          "link's speed or the throughput you measured")
    pred = predict(guest_memory_bytes=args.guest_memory, page_size=args.page_size,
                   workload=wl, link_bytes_per_second=args.bandwidth,
                   rate_limit_bytes_per_second=args.rate_limit, policy=args.policy,
                   downtime_limit_seconds=args.downtime_limit, latency_seconds=args.latency,
                   dirty_rate_pages_per_second=rate)
    d = pred.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"model: policy {args.policy}, guest {format_bytes(args.guest_memory)}, workload "
          f"{wl.pattern} at {wl.rate_pages_per_second:g} pages/s, lambda "
          f"{d.get('lambda_ratio', float('nan')):.3f}")
    print("  round      sent   skipped   dirtied      time")
    for r in d["rounds"]:
        tag = "final" if r.get("final") else str(r["index"])
        print(f"  {tag:>5} {r['pages_sent']:>9.0f} {r['pages_skipped']:>9.0f} "
              f"{r['pages_dirtied']:>9.0f} {r['duration_seconds'] * 1000:>8.1f} ms")
    print(f"  stop reason: {d['stop_reason']} (converged: {d['converged']})")
    print(f"  total time {d['total_time_seconds'] * 1000:.1f} ms, downtime "
          f"{d['downtime_seconds'] * 1000:.1f} ms, {d['pages_sent_total']:.0f} pages sent")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cluster.bench import SECTIONS, BenchOptions, run_bench
    sections = tuple(x.strip() for x in args.only.split(",")) if args.only else SECTIONS
    overrides: dict = {"sections": sections, "in_process": args.in_process,
                       "superpages": not args.no_superpages}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.guest_memory is not None:
        overrides["guest_memory_bytes"] = args.guest_memory
    opts = (BenchOptions.quick_options(**overrides) if args.quick
            else BenchOptions(**overrides))
    res = run_bench(opts)
    text = json.dumps(res.to_dict(), indent=2)
    if args.output:
        _write(args.output, text + "\n")
    print(text if args.json else res.table())
    return EXIT_MIGRATION_FAILED if res.errors else 0


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


# -- faults, evacuation, soak (issue 7) --------------------------------------------------------
MAX_SOAK_MIGRATIONS = 1_000_000
MAX_SOAK_GUESTS = 64


@_typed
def _fault(text: str):
    from nodes.faults.spec import parse_fault
    return parse_fault(text)


def add_fault_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fault", action="append", type=_fault, default=None,
                   metavar="KIND@STAGE[:ARG]",
                   help="inject a fault, e.g. stall-link@round1:2s, kill-destination@"
                        "stop-and-copy, slow-link@round0:1MiB (repeatable; `migbed fault "
                        "list` shows them all)")


def cmd_fault(args: argparse.Namespace) -> int:
    from nodes.faults.spec import fault_list_text
    if args.action == "list":
        print(fault_list_text())
        return 0
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    lost = [g["name"] for g in tb.host(args.host).call("list_guests") if not g["dom0"]]
    tb.kill(args.host)
    print(f"killed {args.host}" + (f"; its guests died with it: {', '.join(lost)}" if lost
                                   else "; it ran no guests"))
    return 0


def cmd_evacuate(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    if args.concurrency > 64:
        raise ConfigError(f"--concurrency must be 1..64, got {args.concurrency}")
    tb = Testbed.attach()
    report = tb.evacuate(args.host, args.concurrency, settings_from(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else EXIT_MIGRATION_FAILED


def _check_output(path: str | None) -> None:
    """Refuse an output file that cannot be written before a long run, not after it."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--output {path} is a directory; give a file name")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write --output {path}: {parent} is not a writable folder")


def cmd_soak(args: argparse.Namespace) -> int:
    from cluster.soak import SoakOptions, run_soak
    from cluster.testbed import Testbed
    _check_output(args.output)
    if args.migrations > MAX_SOAK_MIGRATIONS:
        raise ConfigError(f"--migrations must be 1..{MAX_SOAK_MIGRATIONS}, got "
                          f"{args.migrations}")
    if args.guests > MAX_SOAK_GUESTS:
        raise ConfigError(f"--guests must be 1..{MAX_SOAK_GUESTS}, got {args.guests}")
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
    step = max(1, opts.migrations // 10)

    def on_step(k: int, r) -> None:
        if (k + 1) % step == 0:
            print(f"  {k + 1}/{opts.migrations}", file=sys.stderr, flush=True)
    with factory(cluster) as tb:
        result = run_soak(tb, opts, on_step)
    text = json.dumps(result.to_dict(), indent=2)
    if args.output:
        _write(args.output, text + "\n")
    print(text if args.json else result.table())
    return 0 if result.ok else EXIT_MIGRATION_FAILED


def add_fault_commands(sub) -> None:
    s = sub.add_parser("fault", help="faults: list the kinds, or kill a host of the running "
                       "cluster (inject faults into a migration with `migrate --fault`)")
    fs = s.add_subparsers(dest="action", required=True, parser_class=Parser)
    fs.add_parser("list", help="every fault kind, the stages it acts at, its argument")
    k = fs.add_parser("kill", help="kill a host now: its guests die with it")
    k.add_argument("host")
    s.set_defaults(func=cmd_fault)

    s = sub.add_parser("evacuate", help="move every guest off a host to the others, by free "
                       "memory, several at a time, each verified")
    s.add_argument("host")
    s.add_argument("--concurrency", type=_count("--concurrency", 1), default=2,
                   help="migrations at a time (default 2); they share the host's link")
    add_migration_options(s)
    s.set_defaults(func=cmd_evacuate)

    s = sub.add_parser("soak", help="many small migrations around a ring of hosts with busy "
                       "guests; checks every one, frame accounting and host memory growth")
    s.add_argument("--migrations", type=_count("--migrations", 1), default=1000,
                   help="migrations in all (default 1000)")
    s.add_argument("--guests", type=_count("--guests", 1), default=3,
                   help="guests going round the ring (default 3)")
    s.add_argument("--guest-memory", type=_size("--guest-memory"), default=4 * 1024 * 1024,
                   help="memory of each guest (default 4MiB)")
    s.add_argument("--warmup-migrations", type=_count("--warmup-migrations"), default=None,
                   help="migrations before the memory baseline is taken (default a quarter "
                        "of them: host processes' allocators settle in the first hundreds)")
    s.add_argument("--in-process", action="store_true",
                   help="hosts in this process instead of a local Ray cluster")
    s.add_argument("--output", default=None, metavar="FILE", help="also write the JSON here")
    add_migration_options(s)
    add_workload_options(s)
    s.set_defaults(workload="hotset", dirty_rate="5000")
    add_cluster_options(s, hosts=3, memory="256MiB")
    s.set_defaults(func=cmd_soak)


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


@_typed
def _mode(text: str) -> str:
    from nodes.errors import ModeError
    from nodes.xen.profiles import Mode
    try:
        return Mode.parse(text).value
    except ModeError as exc:
        raise ConfigError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="migbed", description="A distributed live-migration testbed: emulated "
               "Xen-style hosts on Ray, pre-copy migration of real guest memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("up", help="start a persistent local cluster (or hosts on a Ray cluster)")
    add_cluster_options(s, memory="1GiB")
    s.add_argument("--address", default=None,
                   help="an existing Ray cluster to place hosts on (default: $RAY_ADDRESS, "
                        "else a new local cluster)")
    add_prometheus_options(s)
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("down", help="stop the cluster; leaves no Ray process behind")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("list", help="hosts with their frames, and every guest")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("create", help="boot a guest on a host")
    s.add_argument("host")
    s.add_argument("name")
    s.add_argument("--memory", type=_size("--memory"), required=True, help="e.g. 64MiB")
    s.add_argument("--mode", default="p2m", type=_mode,
                   help="p2m, vp or p==m (default p2m)")
    s.add_argument("--dma", action="store_true", help="give the guest a DMA device")
    add_workload_options(s)
    s.set_defaults(func=cmd_create)

    s = sub.add_parser("destroy", help="destroy a guest; its frames go back to its host")
    s.add_argument("name")
    s.set_defaults(func=cmd_destroy)

    for verb in ("pause", "unpause"):
        s = sub.add_parser(verb, help=f"{verb} a guest")
        s.add_argument("name")
        s.set_defaults(func=cmd_pause, verb=verb)

    s = sub.add_parser("migrate", help="live-migrate a guest (one-shot on an embedded cluster "
                       "when GUEST and DEST_HOST are not given)")
    s.add_argument("guest", nargs="?")
    s.add_argument("destination", nargs="?", metavar="DEST_HOST")
    add_migration_options(s)
    add_workload_options(s)
    s.add_argument("--guest-memory", type=_size("--guest-memory"), default=64 * 1024 * 1024,
                   help="one-shot: guest memory (default 64MiB)")
    s.add_argument("--mode", default="p2m", type=_mode,
                   help="one-shot: guest mode (default p2m)")
    s.add_argument("--warmup", type=_duration("--warmup", allow_zero=True), default=0.5,
                   help="one-shot: run the workload this long before migrating (default 0.5s)")
    add_cluster_options(s, hosts=2, memory="512MiB")
    add_fault_option(s)
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("demo", help="the main job: a 3-host cluster, guests, migrations, "
                       "and the seed's three architectures side by side")
    s.add_argument("--quick", action="store_true", help="smaller guests, fewer migrations")
    add_prometheus_options(s, metrics_host=False)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("model", help="predict a migration with the analytic pre-copy model")
    add_migration_options(s)
    add_workload_options(s)
    s.add_argument("--guest-memory", type=_size("--guest-memory"), default=64 * 1024 * 1024)
    s.add_argument("--page-size", type=_size("--page-size"), default=4096)
    s.set_defaults(func=cmd_model)

    s = sub.add_parser("bench", help="how close migbed runs to this machine's limits: "
                       "throughput, downtime floor, dirtying, start-up, scale")
    s.add_argument("--quick", action="store_true",
                   help="tiny sizes, one repeat: proves it runs, measures nothing")
    s.add_argument("--only", default=None, metavar="SECTIONS",
                   help="comma-separated sections: throughput, downtime, dirtying, stages, "
                        "startup, scale (default all)")
    s.add_argument("--repeats", type=_count("--repeats", 1), default=None,
                   help="repeats of every figure (default 5)")
    s.add_argument("--guest-memory", type=_size("--guest-memory"), default=None,
                   help="idle guest of the throughput section (default 256MiB)")
    s.add_argument("--in-process", action="store_true",
                   help="hosts in this process instead of a local Ray cluster")
    add_superpages_option(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.add_argument("--output", default=None, metavar="FILE", help="also write the JSON here")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("sweep", help="run a scenario's grid of migrations beside the model: "
                       "one JSON per run, a CSV, PNG plots and an agreement table")
    s.add_argument("scenario", help="scenario TOML file (ready ones in scenarios/)")
    s.add_argument("--output", default=None, metavar="DIR",
                   help="results folder (default results/<scenario>-<time>)")
    s.add_argument("--repeats", type=_count("--repeats", 1), default=None,
                   help="override the scenario's repeats")
    s.add_argument("--in-process", action="store_true",
                   help="hosts in this process instead of a local Ray cluster (faster)")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.set_defaults(func=cmd_sweep)
    add_fault_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MigbedError as exc:
        if debug:
            raise
        print(f"migbed: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("migbed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
