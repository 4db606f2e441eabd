"""Moving a guest, and predicting the move: `migbed migrate` (on a running cluster, or
one-shot on an embedded one) and `migbed model` (the analytic pre-copy model)."""

import argparse
import json
import sys
import time

from cluster.cli.options import (
    EXIT_MIGRATION_FAILED,
    Commands,
    UsageError,
    add_cluster_options,
    add_fault_option,
    add_field,
    add_migration_options,
    add_output_option,
    add_workload_options,
    arg,
    check_guests_fit,
    check_output,
    cluster_spec_from,
    settings_from,
    workload_from,
    write_output,
)
from cluster.fieldtable import field_named
from nodes.errors import ConfigError
from nodes.phase import Outcome
from nodes.units import format_bytes, parse_positive_size

ONE_SHOT_GUEST = "vm1"
ONE_SHOT_ROUTE = ("host-0", "host-1")


def _report_out(report, args: argparse.Namespace) -> int:
    if args.output:
        write_output(args.output, report.to_json() + "\n")
    if args.timeline:
        from cluster.timeline import draw_timeline, report_label
        draw_timeline([report], args.timeline, title=f"{report_label(report)}: "
                      f"{report.source} -> {report.destination}")
        print(f"timeline in {args.timeline}", file=sys.stderr)
    print(report.to_json() if args.json else report.table())
    ok = report.status == Outcome.COMPLETED and not report.guest_lost
    return 0 if ok else EXIT_MIGRATION_FAILED


def cmd_migrate(args: argparse.Namespace) -> int:
    if (args.guest is None) != (args.destination is None):
        raise UsageError("give both GUEST and DEST_HOST (against a running cluster), or "
                         "neither (a one-shot migration on an embedded cluster)")
    settings = settings_from(args)
    check_output(args.output)
    if args.timeline:
        from cluster.timeline import check_image_path
        check_image_path(args.timeline, "--timeline")
    if args.guest is None:
        return _migrate_one_shot(args, settings)
    from cluster.console import RoundPrinter
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    progress = RoundPrinter(header=f"migrating {args.guest} to {args.destination} "
                                   f"(policy {settings.policy})")
    return _report_out(tb.migrate(args.guest, args.destination, settings, progress,
                                  on_queued=_say_queued), args)


def _say_queued(mid: str) -> None:
    """The id `migbed cancel` takes, while the migration may still wait its turn."""
    print(f"migration {mid} queued (`migbed cancel {mid}` cancels it while it waits)",
          file=sys.stderr)


def _migrate_one_shot(args: argparse.Namespace, settings) -> int:
    """Start an embedded cluster, boot the guest, let its workload run, migrate it, stop."""
    from cluster.console import RoundPrinter
    from cluster.testbed import Testbed
    from nodes.host.specs import GuestSpec
    from nodes.host.vcpus import check_process_guest
    workload = workload_from(args)
    memory = args.guest_memory                      # not given: a trace's guest is its size
    if workload.pattern == "trace" and not getattr(args, "guest_memory_given", False):
        memory = 0
    spec = GuestSpec(name=ONE_SHOT_GUEST, memory_bytes=memory, mode=args.mode,
                     workload=workload, vcpu=args.vcpu, vcpus=args.vcpus)
    check_process_guest(spec.vcpu, settings)
    cluster = cluster_spec_from(args)
    if cluster.hosts < 2:
        raise ConfigError("a migration needs at least 2 hosts (--hosts)")
    check_guests_fit(cluster, spec.memory_bytes)
    src, dst = ONE_SHOT_ROUTE
    print(f"starting an embedded cluster of {cluster.hosts} hosts...", file=sys.stderr)
    with Testbed.local(cluster) as tb:
        created = tb.create(src, spec)
        time.sleep(args.warmup)
        progress = RoundPrinter(header=f"migrating {spec.name} "
                                       f"({format_bytes(spec.memory_bytes)}, "
                                       f"{spec.workload.pattern}, {created['vcpu']} vCPUs) "
                                       f"{src} -> {dst} "
                                       f"(policy {settings.policy})")
        report = tb.migrate(spec.name, dst, settings, progress)
    return _report_out(report, args)


def _measured_wss(args: argparse.Namespace):
    """The writable working set the model is to use: a `wss --json` file, or measured now
    on a running guest; None: the workload's set rate."""
    from workloads.writableset import WssCurve
    if args.wss and args.wss_guest:
        raise UsageError("give --wss FILE or --wss-guest GUEST, not both")
    if args.wss:
        try:
            with open(args.wss, encoding="utf-8") as f:
                return WssCurve.from_json(f.read(2 << 20))
        except OSError as exc:
            raise ConfigError(f"cannot read --wss {args.wss}: {exc.strerror}") from None
    if args.wss_guest:
        from cluster.testbed import Testbed
        tb = Testbed.attach()
        return WssCurve.from_dict(tb.host(tb.where(args.wss_guest)).call(
            "measure_wss", args.wss_guest, 2.0, 0.01, timeout=60))
    return None


def cmd_model(args: argparse.Namespace) -> int:
    from cluster.model import predict
    wl = workload_from(args)
    wss = _measured_wss(args)
    typed = getattr(args, "argv", None) or []
    if wss is not None and not any(w.startswith("--guest-memory") for w in typed):
        args.guest_memory, args.page_size = wss.guest_pages * wss.page_size, wss.page_size
    if wl.unlimited and wss is None:
        raise ConfigError("the model needs a dirty rate in page writes per second "
                          "(--dirty-rate N), not max")
    if args.bandwidth is None and args.rate_limit is None:
        raise ConfigError("the model needs a bandwidth (--bandwidth, e.g. 128MiB): give the "
                          "link's speed or the throughput you measured")
    from cluster.model.block import settings_inputs
    settings = settings_from(args)
    # No host pair measured here: the fixed downtime is the three one-way crossings.
    fixed = {"seconds": 3 * args.latency} if settings.subtract_fixed_downtime else None
    pred = predict(guest_memory_bytes=args.guest_memory, page_size=args.page_size,
                   workload=wl, link_bytes_per_second=args.bandwidth,
                   rate_limit_bytes_per_second=args.rate_limit, warmup_seconds=args.warmup,
                   wss=wss, **settings_inputs(settings, args.guest_memory, fixed))
    d = pred.to_dict()
    d["dirtying"] = ({"source": "workload", "pattern": wl.pattern,
                      "rate_pages_per_second": wl.rate_pages_per_second} if wss is None else
                     {"source": "measured-wss", "guest": wss.guest, "wws_pages": wss.wws_pages,
                      "rate_pages_per_second": wss.rate_pages_per_second})
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    from cluster.console import prediction_renderables, show
    show(*prediction_renderables(
        d, f"model: policy {args.policy}, guest {format_bytes(args.guest_memory)}, "
           + (f"workload {wl.pattern} at {wl.rate_pages_per_second:g} pages/s" if wss is None
              else f"measured WWS of {wss.guest} ({wss.wws_pages:.0f} pages, "
                   f"{wss.rate_pages_per_second:.0f} writes/s)") + ", lambda "
           f"{d.get('lambda_ratio', float('nan')):.3f}"))
    return 0


class _GivenMemory(argparse.Action):
    """--guest-memory, noting that it was given (a trace's guest is sized from its trace
    otherwise)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.guest_memory_given = True


def register(sub: Commands) -> None:
    s = sub.add_parser("migrate", help="live-migrate a guest (one-shot on an embedded cluster "
                       "when GUEST and DEST_HOST are not given)")
    s.add_argument("guest", nargs="?")
    s.add_argument("destination", nargs="?", metavar="DEST_HOST")
    add_migration_options(s)
    add_workload_options(s)
    memory, mode, warmup, vcpu, vcpus = (field_named(n) for n in (
        "guest_memory_bytes", "mode", "warmup_seconds", "vcpu", "vcpus"))
    add_field(s, memory, action=_GivenMemory,
              help=f"one-shot: {memory.help_text()} (--workload trace: sized from the trace "
                   "unless given)")
    add_field(s, mode, help=f"one-shot: {mode.help_text()}")
    add_field(s, vcpu, help=f"one-shot: {vcpu.help_text()}")
    add_field(s, vcpus, help=f"one-shot: {vcpus.help_text()}")
    add_field(s, warmup, default=0.5,
              help=f"one-shot: {warmup.help} (default 500ms)")
    add_cluster_options(s, hosts=2, memory="512MiB")
    add_fault_option(s)
    add_output_option(s)
    add_field(s, field_named("timeline"))
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("model", help="predict a migration with the analytic pre-copy model")
    add_migration_options(s)
    add_workload_options(s)
    add_field(s, field_named("guest_memory_bytes"))
    s.add_argument("--page-size", type=arg(parse_positive_size, "--page-size"), default=4096,
                   help="page size in bytes (default 4096)")
    add_field(s, field_named("warmup_seconds"), default=0.5,
              help="how long the workload ran before the migration: with --fill zero, what "
                   "it has written (default 500ms, as migrate's)")
    s.add_argument("--wss", metavar="FILE", help="dirty as this measured writable working set "
                   "(the JSON `migbed wss --json` prints) instead of the workload's set rate; "
                   "the guest's memory is the measured guest's unless --guest-memory is given")
    s.add_argument("--wss-guest", metavar="GUEST", help="measure this running guest's "
                   "writable working set (2 s) and dirty as it does")
    s.set_defaults(func=cmd_model)
