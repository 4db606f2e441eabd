"""When hosts fail or must be emptied: `migbed fault` (list the kinds, kill a host) and
`migbed evacuate`. Faults inside a migration are `migrate --fault` (`options`)."""

import argparse
import json

from cluster.cli.fleet import add_limit_options, limits_from
from cluster.cli.options import (
    EXIT_MIGRATION_FAILED,
    Commands,
    Parser,
    add_migration_options,
    settings_from,
)


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
    tb = Testbed.attach()
    report = tb.evacuate(args.hosts, None, settings_from(args), limits=limits_from(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else EXIT_MIGRATION_FAILED


def register(sub: Commands) -> None:
    s = sub.add_parser("fault", help="faults: list the kinds, or kill a host of the running "
                       "cluster (inject faults into a migration with `migrate --fault`)")
    fs = s.add_subparsers(dest="action", required=True, parser_class=Parser)
    fs.add_parser("list", help="every fault kind, the stages it acts at, its argument")
    k = fs.add_parser("kill", help="kill a host now: its guests die with it")
    k.add_argument("host")
    s.set_defaults(func=cmd_fault)

    s = sub.add_parser("evacuate", help="move every guest off one host or several (a rack) to "
                       "the others, by free memory, several at a time, each verified")
    s.add_argument("hosts", nargs="+", metavar="HOST")
    add_limit_options(s, parallel_default=2, concurrency_alias=True)
    add_migration_options(s)
    s.set_defaults(func=cmd_evacuate)
