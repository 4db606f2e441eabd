"""Guests on a running cluster: `migbed create`, `destroy`, `pause` and `unpause`."""

import argparse

from cluster.cli.options import (
    Commands,
    UsageError,
    add_field,
    add_workload_options,
    arg,
    workload_from,
)
from cluster.fieldtable import field_named
from nodes.units import format_bytes


def cmd_create(args: argparse.Namespace) -> int:
    if args.from_file is not None:
        return _create_from(args)
    if args.host is None or args.name is None or args.memory is None:
        raise UsageError("give HOST NAME --memory SIZE, or --from FILE.toml (see "
                         "`migbed create --help`)")
    from cluster.testbed import Testbed
    from nodes.host.specs import GuestSpec
    from nodes.host.vcpus import check_process_guest
    workload = workload_from(args)
    if args.memory is None and workload.pattern != "trace":
        raise UsageError("the following arguments are required: --memory (see `migbed create "
                         "--help`)")
    spec = GuestSpec(name=args.name, memory_bytes=args.memory or 0, mode=args.mode,
                     dma=args.dma, workload=workload, vcpu=args.vcpu, vcpus=args.vcpus)
    check_process_guest(spec.vcpu)
    d = Testbed.attach().create(args.host, spec)
    print(f"created {d['name']} on {args.host}: {format_bytes(d['memory_bytes'])}, mode "
          f"{d['mode']}, workload {spec.workload.pattern}, {spec.vcpus} {d['vcpu']} vCPU"
          + ("s" if spec.vcpus > 1 else "")
          + (f" (process {d['pid']})" if d.get("pid") else ""))
    return 0


def _create_from(args: argparse.Namespace) -> int:
    """`--from FILE.toml`: every guest of the file (`cluster.guestfile`), in one command."""
    import sys
    import time
    if args.host is not None or args.name is not None or args.memory is not None:
        raise UsageError("--from FILE.toml gives every guest's host, name and memory: "
                         "give no HOST NAME --memory with it")
    from pathlib import Path

    from cluster.guestfile import create_many, read_guest_file
    from cluster.testbed import Testbed
    from nodes.errors import ConfigError
    if not Path(args.from_file).is_file():
        raise ConfigError(f"--from {args.from_file}: no such file")
    t0 = time.monotonic()
    tb = Testbed.attach()
    guests = read_guest_file(args.from_file, tb.hosts)
    print(f"booting {len(guests)} guests...", file=sys.stderr, flush=True)
    done = create_many(tb, guests)
    total = sum(d["memory_bytes"] for d in done)
    print(f"created {len(done)} guests ({format_bytes(total)}) on "
          f"{len({h for h, _ in guests})} hosts in {time.monotonic() - t0:.1f} s")
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
    s.add_argument("host", nargs="?")
    s.add_argument("name", nargs="?")
    add_field(s, field_named("from_file"), dest="from_file")
    memory = field_named("guest_memory_bytes")
    s.add_argument("--memory", memory.flag, dest="memory", default=None,
                   type=arg(memory.read, "--memory"), metavar=memory.metavar,
                   help=f"{memory.help}, e.g. 64MiB (required without --from; with "
                        "--workload trace: sized from the trace)")
    add_field(s, field_named("mode"))
    add_field(s, field_named("dma"))
    add_field(s, field_named("vcpu"))
    add_field(s, field_named("vcpus"))
    add_workload_options(s)
    s.set_defaults(func=cmd_create)

    s = sub.add_parser("destroy", help="destroy a guest; its frames go back to its host")
    s.add_argument("name")
    s.set_defaults(func=cmd_destroy)

    for verb in ("pause", "unpause"):
        s = sub.add_parser(verb, help=f"{verb} a guest")
        s.add_argument("name")
        s.set_defaults(func=cmd_pause, verb=verb)
