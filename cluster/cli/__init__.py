"""The `migbed` command line, modelled on Xen's `xl`: parse, call the API, print.

Bad input of any kind is one line on stderr and exit code 2 (`--debug` shows the traceback);
a migration that ran but did not complete exits 1. Each command lives in the module of its
concern (`lifecycle`, `guests`, `top`, `migrate`, `reports`, `experiments`, `faults`) and
registers itself on the parser here; `options` holds what they share.
"""

import sys
from collections.abc import Sequence

from cluster.cli import experiments, faults, guests, lifecycle, measure_commands, migrate, reports
from cluster.cli import postcopy_commands as postcopy
from cluster.cli import top_command as top
from cluster.cli import trace_commands as trace
from cluster.cli.options import EXIT_BAD_INPUT, EXIT_MIGRATION_FAILED, Parser, UsageError
from nodes.errors import MigbedError

COMMAND_MODULES = (lifecycle, guests, top, migrate, postcopy, reports, experiments,
                   faults, measure_commands, trace)                     # in `--help`'s order


def build_parser() -> Parser:
    p = Parser(prog="migbed", description="A distributed live-migration testbed: emulated "
               "Xen-style hosts on Ray, pre-copy migration of real guest memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv                     # the words as typed (`advise` repeats them)
        return args.func(args)
    except MigbedError as exc:
        if debug:
            raise
        print(f"migbed: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("migbed: interrupted", file=sys.stderr)
        return 130


__all__ = ["EXIT_BAD_INPUT", "EXIT_MIGRATION_FAILED", "UsageError", "build_parser", "main"]
