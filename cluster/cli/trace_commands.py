"""`migbed trace record|info|list`: record how an unmodified program dirties its memory, look
at a trace, list the shipped ones (`cluster.tracerecord`, `workloads.tracefile`). Replaying a
trace is a workload: `--workload trace --trace FILE|NAME` of create, migrate and sweeps."""

import argparse
import sys
from pathlib import Path

from cluster.cli.options import Commands, arg
from cluster.fieldtable import read_speed
from nodes.errors import ConfigError
from nodes.units import parse_count, parse_duration, parse_positive_size


def _program(args: argparse.Namespace) -> list[str]:
    argv = list(args.program)
    return argv[1:] if argv and argv[0] == "--" else argv


def cmd_record(args: argparse.Namespace) -> int:
    from cluster.tracerecord import record
    argv = _program(args)
    result = record(argv, Path(args.output), args.interval, args.duration, args.region)
    print(f"migbed trace: {result.summary}", file=sys.stderr)
    return result.exit_code


def cmd_overhead(args: argparse.Namespace) -> int:
    """Paired runs, plain then recorded, alternating; the medians and their ratio."""
    import statistics
    import tempfile

    from cluster.tracerecord import record, run_plain
    from cluster.tracetarget import write_fault_seconds
    argv = _program(args)
    plain, traced, writes, own = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="migbed-trace-") as tmp:
        for i in range(args.runs):
            plain.append(run_plain(argv))
            r = record(argv, Path(tmp) / f"run{i}.mbtrace", args.interval, 0.0, args.region,
                       say=lambda _line: None, quiet=True)
            traced.append((r.program_seconds, r.program_cpu_seconds))
            writes.append(r.page_writes - r.pages_touched)
            own.append(r.recorder_cpu_seconds)
    med = [[statistics.median(x[k] for x in runs) for k in (0, 1)] for runs in (plain, traced)]
    (pw, pc), (tw, tc) = med
    cost = [[t[k] / max(p[k], 1e-9) - 1 for p, t in zip(plain, traced, strict=True)]
            for k in (0, 1)]
    span = [f"pairs {min(c):+.1%}..{max(c):+.1%}" for c in cost]
    print(f"{' '.join(argv)}: medians of {args.runs} pairs at {args.interval * 1e3:g} ms: "
          f"wall {pw:.3f} -> {tw:.3f} s ({tw / pw - 1:+.1%}; {span[0]}), CPU {pc:.3f} -> "
          f"{tc:.3f} s ({tc / max(pc, 1e-9) - 1:+.1%}; {span[1]})")
    # A page's first write faults with or without the recorder; each later interval's costs
    # one write-protect fault more.
    fault, n = write_fault_seconds(), statistics.median(writes)
    print(f"  its floor: {n:.0f} page rewrites (page writes after each page's first, median) "
          f"x {fault * 1e6:.2f} us, one write-protect fault each (measured here) = "
          f"{n * fault:.3f} s ({n * fault / max(pc, 1e-9):+.1%} of its plain CPU)")
    print(f"  the recorder's own CPU (scans, samples): {statistics.median(own):.3f} s (median), "
          "on the same cores as the program")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Replay a trace on a process guest and compare (`cluster.tracefidelity`)."""
    from cluster.tracefidelity import content_fidelity, replay_fidelity
    from nodes.host.userfault import kernel_support
    from workloads.tracefile import decode, read_trace_bytes
    kernel_support().require()
    data = read_trace_bytes(args.trace)
    recorded = decode(data, args.trace)
    f = replay_fidelity(data, recorded, args.speed, warmup_loops=args.warmup_loops,
                        vcpus=args.vcpus)
    a, b = f.pages_per_interval()
    wss = [(w, x, y, y / max(x, 1e-9) - 1) for w, x, y in f.wss()]
    w, x, y, worst = max(wss, key=lambda row: abs(row[3]))
    print(f"pages per {recorded.interval_seconds * 1e3:g} ms  {a:.0f} recorded -> {b:.0f} "
          f"replayed ({b / max(a, 1e-9) - 1:+.1%})")
    print(f"WSS curve       worst window {w * 1e3:g} ms: {x:.0f} -> {y:.0f} ({worst:+.1%}) of "
          f"{len(wss)} windows")
    if args.replay_only:
        return 0
    c = content_fidelity(data, recorded, args.speed, vcpus=args.vcpus)
    print(f"zero pages      {c.trace_zero:.2%} of the trace's sampled written pages; "
          f"{c.migration_zero:.2%} of the {c.migration_later_pages} pages the migration sent "
          f"after its first round ({c.migration_zero_pages} zero)")
    print(f"zstd ratio      {c.trace_ratio:.2f} trace, {_opt(c.migration_ratio)} migration "
          "(multifd zstd)")
    print(f"XBZRLE delta    {c.trace_delta:.0f} B trace, {_opt(c.migration_delta, '.0f')} B "
          "per cache hit in migration")
    return 0


def _opt(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from workloads.tracefile import load_trace
    from workloads.tracestats import summary
    trace = load_trace(args.trace)
    s = summary(trace)
    if args.plot:
        from cluster.traceplot import draw_trace
        draw_trace(trace, args.plot, s["program"])
    if args.wss:
        from workloads.tracestats import wss_of_trace
        try:
            Path(args.wss).write_text(wss_of_trace(trace).to_json() + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write --wss {args.wss}: {exc.strerror}") from None
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(_info_text(s))
    if args.plot:
        print(f"plot in {args.plot}")
    return 0


def _info_text(s: dict) -> str:
    c, r = s["content"], s["dirty_rate_pages_per_second"]
    lines = [
        f"program      {' '.join(s['argv'])}",
        f"recorded     {s['recorded_at']} on {s['machine'].get('system', '?')} "
        f"{s['machine'].get('release', '?')} {s['machine'].get('arch', '?')}, ended: "
        f"{s['ended']}, {s['children']} children",
        f"duration     {s['duration_seconds']:.3f} s, {s['intervals']} intervals of "
        f"{s['interval_seconds'] * 1e3:g} ms",
        f"pages        {s['pages_touched']} touched ({s['pages_touched'] * s['page_size'] / 2**20:.1f}"
        f" MiB), {s['page_writes']} page writes",
        f"dirty rate   mean {r['mean']:.0f} pages/s, peak {r['peak']:.0f} pages/s (one "
        "interval)",
        f"over time    pages/s per {s['dirty_rate_over_time']['bin_seconds']:.3g} s: "
        + " ".join(_short(v) for v in s["dirty_rate_over_time"]["pages_per_second"]),
        "WSS curve    " + ", ".join(f"{w['window_seconds'] * 1e3:g} ms: {w['pages']:.0f}"
                                    for w in s["wss_curve"]),
        f"content      {c['sampled_pages']} sampled pages: zero {c['zero_fraction']:.1%}, "
        f"zstd ratio {c['compression_ratio']:.2f}, XBZRLE delta {c['xbzrle_delta_bytes']:.0f} B "
        f"mean over {c['xbzrle_samples']} re-samples ({c['xbzrle_overflow_fraction']:.0%} "
        "overflow)"]
    return "\n".join(lines)


def _short(v: float) -> str:
    return f"{v / 1e3:.0f}k" if v >= 1e4 else f"{v:.0f}"


def cmd_list(args: argparse.Namespace) -> int:
    from workloads.tracefile import decode, shipped_traces
    from workloads.tracestats import distinct_pages
    for name, path in shipped_traces().items():
        t = decode(path.read_bytes(), name)
        print(f"{name:<16} {' '.join(t.header['argv'])[:50]:<50} {t.duration_seconds:6.2f} s "
              f"{distinct_pages(t):7d} pages {path.stat().st_size >> 10:5d} KiB")
    return 0


def _recorder_options(s: argparse.ArgumentParser, interval_help: str) -> None:
    """What `record` and `overhead` share: the recorder's interval and region, and the
    program after --."""
    s.add_argument("--interval", type=arg(parse_duration, "--interval"), default=0.01,
                   metavar="DURATION", help=interval_help)
    s.add_argument("--region", type=arg(parse_positive_size, "--region"), default=1 << 30,
                   metavar="SIZE", help="the traced heap region (default 1GiB)")
    s.add_argument("program", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                   help="the program and its arguments, after --")


def register(sub: Commands) -> None:
    t = sub.add_parser("trace", help="record how a real program dirties its memory, look at "
                       "a trace, list the shipped ones (replay: --workload trace)")
    tsub = t.add_subparsers(dest="trace_command", required=True, parser_class=type(t))
    s = tsub.add_parser("record", help="run a program and record the pages of its heap it "
                        "writes, every interval (needs the native allocator: make setup)")
    s.add_argument("--output", "-o", required=True, metavar="FILE",
                   help="the trace file to write")
    s.add_argument("--duration", type=arg(parse_duration, "--duration"), default=0.0,
                   metavar="DURATION", help="stop recording after this long; the program runs"
                   " on (default: until it ends)")
    _recorder_options(s, "how often to scan its written pages (default 10ms)")
    s.set_defaults(func=cmd_record)

    s = tsub.add_parser("overhead", help="what recording costs a program: paired runs "
                        "with and without the recorder (its output is discarded)")
    s.add_argument("--runs", type=arg(parse_count, "--runs", 1, 50), default=3,
                   help="pairs of runs (default 3)")
    _recorder_options(s, "the recorder's interval (default 10ms)")
    s.set_defaults(func=cmd_overhead)

    s = tsub.add_parser("info", help="a trace's duration, pages, dirty rate, WSS curve and "
                        "content figures")
    s.add_argument("trace", metavar="FILE|NAME", help="a trace file or a shipped trace's name")
    s.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw its dirty rate and WSS curve")
    s.add_argument("--wss", metavar="FILE.json", default=None,
                   help="also write its writable working set as the curve `migbed model "
                        "--wss` reads")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    s.set_defaults(func=cmd_info)

    s = tsub.add_parser("fidelity", help="replay a trace on a process guest: its pages per "
                        "interval and WSS curve against the recording's, and its content "
                        "figures against two migrations of a replaying guest")
    s.add_argument("trace", metavar="FILE|NAME", help="a trace file or a shipped trace's name")
    s.add_argument("--speed", type=arg(read_speed, "--speed"), default=1.0, metavar="X",
                   help="the replay's --trace-speed (default 1)")
    s.add_argument("--vcpus", type=arg(parse_count, "--vcpus", 1, 64), default=1,
                   metavar="N", help="the replaying guest's process vCPUs, each replaying "
                   "its share of the trace's pages (default 1)")
    s.add_argument("--warmup-loops", type=arg(parse_count, "--warmup-loops", 0, 100),
                   default=0, metavar="N", help="compare the replay's pass after N whole "
                   "passes of the trace (default 0: its first)")
    s.add_argument("--replay-only", action="store_true",
                   help="only the pages per interval and the WSS curve (no migrations)")
    s.set_defaults(func=cmd_fidelity)

    s = tsub.add_parser("list", help="the traces shipped with migbed (--trace NAME)")
    s.set_defaults(func=cmd_list)
