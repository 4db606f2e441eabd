"""Guests on a running cluster: `migbed create`, `destroy`, `pause` and `unpause`."""

import argparse

from cluster.cli.options import Commands, add_workload_options, arg, mode_arg, workload_from
from nodes.units import format_bytes, parse_positive_size


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


def register(sub: Commands) -> None:
    s = sub.add_parser("create", help="boot a guest on a host")
    s.add_argument("host")
    s.add_argument("name")
    s.add_argument("--memory", type=arg(parse_positive_size, "--memory"), required=True,
                   help="e.g. 64MiB")
    s.add_argument("--mode", default="p2m", type=mode_arg, help="p2m, vp or p==m (default p2m)")
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
