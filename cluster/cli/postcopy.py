"""Post-copy on the command line: the options of `migbed migrate` (and `migbed model`), and
the operator's two commands on a persistent cluster, as virsh and QEMU have them:

- `migbed migrate-postcopy GUEST`: switch the running migration of GUEST to post-copy (QEMU's
  migrate-start-postcopy, virsh migrate-postcopy); it must allow it (`--postcopy-allowed`).
- `migbed migrate-recover GUEST`: the link of a paused post-copy is back: resume it (QEMU's
  migrate-recover and migrate resume=true) and print its report.
"""

import argparse

from cluster.cli.options import EXIT_MIGRATION_FAILED, Commands, UsageError, arg
from nodes.phase import Outcome
from nodes.units import parse_bandwidth, parse_rounds_or_duration


def add_postcopy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--postcopy", action="store_true",
                   help="pure post-copy: switch at once, only the vCPU state moves before the "
                        "guest runs on the destination (--postcopy-after 0)")
    p.add_argument("--postcopy-after", type=arg(parse_rounds_or_duration, "--postcopy-after"),
                   default=None, metavar="N|DURATION",
                   help="hybrid: switch to post-copy after N live rounds, or (with a unit, "
                        "e.g. 1.5s, 500ms) that long after the start")
    p.add_argument("--postcopy-allowed", action="store_true",
                   help="QEMU's postcopy-ram capability: `migbed migrate-postcopy GUEST` (or "
                        "a policy) may switch the running migration to post-copy")
    p.add_argument("--postcopy-bandwidth", type=arg(parse_bandwidth, "--postcopy-bandwidth"),
                   default=None, metavar="RATE",
                   help="limit of the background push after the switch, e.g. 64MiB (default "
                        "unlimited; requested pages always go at once)")


def postcopy_settings(args: argparse.Namespace) -> dict:
    """The MigrationSettings fields of the post-copy options."""
    if not hasattr(args, "postcopy"):
        return {}
    if args.postcopy and args.postcopy_after is not None:
        raise UsageError("give --postcopy (switch at once) or --postcopy-after N|DURATION, "
                         "not both")
    rounds, seconds = (0, None) if args.postcopy else (args.postcopy_after or (None, None))
    return {"postcopy_allowed": args.postcopy_allowed, "postcopy_after_rounds": rounds,
            "postcopy_after_seconds": seconds,
            "postcopy_bandwidth_bytes_per_second": args.postcopy_bandwidth}


def cmd_migrate_postcopy(args: argparse.Namespace) -> int:
    from cluster.testbed import Testbed
    print(f"{args.guest}: {Testbed.attach().start_postcopy(args.guest)}")
    return 0


def cmd_migrate_recover(args: argparse.Namespace) -> int:
    from cluster.console import RoundPrinter
    from cluster.testbed import Testbed
    tb = Testbed.attach()
    report = tb.recover(args.guest, RoundPrinter(header=f"recovering the post-copy of "
                                                         f"{args.guest}"))
    print(report.to_json() if args.json else report.table())
    ok = report.status == Outcome.COMPLETED and not report.guest_lost
    return 0 if ok else EXIT_MIGRATION_FAILED


def register(sub: Commands) -> None:
    s = sub.add_parser("migrate-postcopy", help="switch a running migration to post-copy "
                       "(QEMU's migrate-start-postcopy)")
    s.add_argument("guest")
    s.set_defaults(func=cmd_migrate_postcopy)
    s = sub.add_parser("migrate-recover", help="resume a post-copy migration paused on a "
                       "broken link, once the link is back")
    s.add_argument("guest")
    s.add_argument("--json", action="store_true", help="print the report alone, as JSON")
    s.set_defaults(func=cmd_migrate_recover)
