"""The fleet's commands: the cluster's migration queue and its limits (`migbed queue`,
`migbed limits`, `migbed cancel ID`), and the limit options `evacuate` and `drain` share."""

import argparse
import json

from cluster.cli.options import Commands, arg
from cluster.scheduler import MAX_LIMIT, PRESETS, Limits, preset
from nodes.units import format_bytes, parse_count


def add_limit_options(p: argparse.ArgumentParser, parallel_default: int | None = None,
                      concurrency_alias: bool = False) -> None:
    """--limits PRESET, --max-parallel (also --concurrency where that was the name),
    --max-outbound-per-host, --max-inbound-per-host. The per-migration cap is --rate-limit,
    a migration setting."""
    p.add_argument("--limits", choices=sorted(PRESETS), default=None,
                   help="a preset of limits: kubevirt (5 per cluster, 2 outbound per host, "
                        "KubeVirt's defaults) or none; the options below override it")
    flags = ["--max-parallel", "--concurrency"] if concurrency_alias else ["--max-parallel"]
    default = ("none" if parallel_default is None else str(parallel_default))
    p.add_argument(*flags, dest="max_parallel", metavar="N", default=None,
                   type=arg(parse_count, "--max-parallel", 1, MAX_LIMIT),
                   help=f"migrations at a time in all (default {default})"
                        + ("; --concurrency is its older name" if concurrency_alias else ""))
    p.add_argument("--max-outbound-per-host", metavar="N", default=None,
                   type=arg(parse_count, "--max-outbound-per-host", 1, MAX_LIMIT),
                   help="migrations leaving one host at a time (default none)")
    p.add_argument("--max-inbound-per-host", metavar="N", default=None,
                   type=arg(parse_count, "--max-inbound-per-host", 1, MAX_LIMIT),
                   help="migrations arriving at one host at a time (default none)")
    p.set_defaults(parallel_default=parallel_default)


def limits_from(args: argparse.Namespace) -> Limits:
    """The limits the options give: the preset, then each option given over it."""
    base = preset(args.limits) if getattr(args, "limits", None) else Limits()
    given = Limits(max_parallel=args.max_parallel,
                   max_outbound_per_host=args.max_outbound_per_host,
                   max_inbound_per_host=args.max_inbound_per_host)
    limits = base.merged(given)
    if limits.max_parallel is None and getattr(args, "parallel_default", None):
        limits = limits.merged(Limits(max_parallel=args.parallel_default))
    return limits


def add_rack_options(p: argparse.ArgumentParser) -> None:
    """--racks, --host-link, --uplink: the network the scheduler shares out
    (`cluster.fairshare`)."""
    from cluster.fairshare import parse_link_rate
    p.add_argument("--racks", type=arg(parse_count, "--racks", 1, MAX_LIMIT), default=None,
                   metavar="N", help="hosts in N racks, consecutive names together (default: "
                   "no racks)")
    p.add_argument("--host-link", type=arg(parse_link_rate, "--host-link"), default=None,
                   metavar="RATE", help="each host's own link, each way, e.g. 10Gbit "
                   "or 64MiB (default unlimited)")
    p.add_argument("--uplink", type=arg(parse_link_rate, "--uplink"), default=None,
                   metavar="RATE", help="each rack's uplink, each way, shared by every "
                   "migration between racks (default unlimited)")


def _entry_line(e: dict) -> str:
    rate = e["rates"][-1][1] if e["rates"] else None
    rate_text = "-" if rate is None else f"{format_bytes(rate)}/s"
    return (f"  {e['id']:<13} {e['guest']:<14} {e['source']:>8} -> {e['destination']:<8} "
            f"{e['state']:<9} waited {e['wait_seconds']:6.2f} s  rate {rate_text}  "
            f"via {', '.join(e['links'])}")


def cmd_queue(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    status = Testbed.attach().scheduler.call("status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    lim = {k: v for k, v in status["limits"].items() if v is not None}
    print(f"limits: {lim or 'none'}; running {status['running']}, queued {status['queued']}")
    for e in status["entries"]:
        print(_entry_line(e))
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    sched = Testbed.attach().scheduler
    given = any(getattr(args, k) is not None for k in (
        "limits", "max_parallel", "max_outbound_per_host", "max_inbound_per_host"))
    limits = sched.call("set_limits", limits_from(args)) if given else \
        sched.call("status")["limits"]
    if args.json:
        print(json.dumps(limits, indent=2))
        return 0
    text = ", ".join(f"{k}={v}" for k, v in limits.items() if v is not None)
    print(f"cluster limits: {text or 'none'}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    entry = tb.scheduler.call("cancel", args.id)
    if entry["state"] == "cancelled":
        print(f"cancelled {args.id}: {entry['guest']} stays on {entry['source']}")
        return 0
    if entry["state"] == "running":
        return _cancel_running(tb, entry)
    print(f"{args.id} has already {entry['state']}: nothing to cancel")
    return 0


def _cancel_running(tb, entry: dict) -> int:
    """A running entry: ask its source to cancel it; one its source does not run (its
    client died before it began, or after it ended) is finished in the queue, so it holds
    no slot."""
    from nodes.errors import MigbedError
    from nodes.phase import ENDED
    mid, src = entry["id"], entry["source"]
    try:
        if tb.host(src).call("cancel_migration", mid):
            print(f"{mid} was running: asked {src} to cancel it ({entry['guest']} stays "
                  "there unless it has already switched)")
            return 0
        progress = tb.host(src).call("migration_progress", mid)
    except MigbedError:
        progress = None                   # its source is gone
    if progress is None or progress.status in {str(o) for o in ENDED}:
        tb.scheduler.call("finish", mid, "abandoned")
        print(f"{mid} was no longer running on {src}: taken out of the queue")
    else:
        print(f"{mid} is past its point of no return (post-copy): it runs to its end")
    return 0


class DrainProgress:
    """One line on stderr as each migration of a drain starts and ends: how far it is."""

    def __init__(self, total: int):
        import threading
        self.total, self.started, self.ended = total, 0, 0
        self._lock = threading.Lock()

    def __call__(self, what: str, move) -> None:
        import sys
        with self._lock:
            if what == "batch":
                line = f"batch: draining {', '.join(move)}"
            elif what == "restarted":
                line = f"  {move} restarted as a fresh host"
            elif what == "started":
                self.started += 1
                line = f"  -> {move.guest} {move.source} -> {move.destination} started"
            elif what == "ended":
                self.ended += 1
                down = ("" if move.downtime_seconds is None
                        else f", downtime {move.downtime_seconds * 1000:.1f} ms")
                took = ("" if move.total_time_seconds is None
                        else f" in {move.total_time_seconds:.2f} s")
                of = f"/{self.total}" if self.total else ""
                line = f"  [{self.ended}{of}] {move.guest} {move.source} -> " \
                       f"{move.destination} {move.status}{took}{down}"
            else:
                return
            print(line, file=sys.stderr, flush=True)


def fleet_outputs(args: argparse.Namespace, report, moves: list[dict], run: str) -> None:
    """--output (the JSON), --plot (the fleet's figure), --metrics (Prometheus text)."""
    import sys

    from cluster.cli.options import write_output
    if args.output:
        write_output(args.output, json.dumps(report.to_dict(), indent=2) + "\n")
    if args.plot:
        from cluster.fleetstats import draw_fleet
        hosts = list(report.hosts)
        named = ", ".join(hosts[:4]) + (f" and {len(hosts) - 4} more" if len(hosts) > 4 else "")
        draw_fleet(moves, args.plot, title=f"{run} of {named}")
        print(f"plot in {args.plot}", file=sys.stderr)
    if args.metrics:
        from cluster.fleetstats import prometheus_text
        write_output(args.metrics, prometheus_text(report.stats, run))


def add_fleet_outputs(p: argparse.ArgumentParser, with_json: bool = True) -> None:
    if with_json:
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the downtime distribution and the migrations over time")
    p.add_argument("--metrics", default=None, metavar="FILE.prom",
                   help="write the fleet statistics as Prometheus text (textfile format)")


def check_fleet_outputs(args: argparse.Namespace) -> None:
    from cluster.cli.options import check_output
    check_output(args.output)
    check_output(args.metrics)
    if args.plot:
        from cluster.timeline import check_image_path
        check_image_path(args.plot, "--plot")


def register(sub: Commands) -> None:
    s = sub.add_parser("queue", help="the cluster's migration queue: limits, what runs, "
                       "what waits")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_queue)

    s = sub.add_parser("limits", help="show or set the cluster's migration limits (every "
                       "migration of the cluster obeys them)")
    add_limit_options(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_limits)

    s = sub.add_parser("cancel", help="cancel a queued migration by its id (its guest stays "
                       "where it is); a running one is asked to cancel")
    s.add_argument("id", metavar="ID", help="the migration's id (`migbed queue` lists them)")
    s.set_defaults(func=cmd_cancel)
