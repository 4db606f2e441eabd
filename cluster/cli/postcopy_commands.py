"""Post-copy on the command line: the operator's two commands on a persistent cluster, as
virsh and QEMU have them (the options of `migbed migrate` that ask for post-copy are rows of
the field table, `nodes.migration.fields`):

- `migbed migrate-postcopy GUEST`: switch the running migration of GUEST to post-copy (QEMU's
  migrate-start-postcopy, virsh migrate-postcopy); it must allow it (`--postcopy-allowed`).
- `migbed migrate-recover GUEST`: the link of a paused post-copy is back: resume it (QEMU's
  migrate-recover and migrate resume=true) and print its report.
"""

import argparse

from cluster.cli.options import EXIT_MIGRATION_FAILED, Commands
from nodes.phase import Outcome


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
