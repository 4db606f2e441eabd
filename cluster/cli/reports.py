"""Saved migration reports, looked at again: `migbed plot` draws their timelines on one
figure (`cluster.timeline`), `migbed compare` prints them side by side. A report is what
`migbed migrate --json` (or `--output`) wrote, or one run file of a sweep; reports of older
and newer migbed versions load too (`MigrationReport.from_dict`)."""

import argparse
from pathlib import Path

from cluster.cli.options import Commands


def _load(paths: list[str]) -> list:
    from cluster.report import MigrationReport
    return [MigrationReport.load(p) for p in paths]


def cmd_plot(args: argparse.Namespace) -> int:
    from cluster.timeline import check_image_path, draw_timeline
    out = check_image_path(args.output, "-o")
    reports = _load(args.reports)
    labels = None
    if args.label:
        if len(args.label) != len(reports):
            from nodes.errors import ConfigError
            raise ConfigError(f"{len(args.label)} --label given for {len(reports)} reports; "
                              "give one per report, in order")
        labels = args.label
    draw_timeline(reports, out, labels, args.title)
    print(f"timeline of {len(reports)} migration{'s' if len(reports) > 1 else ''} in {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cluster.console import reports_table, show
    reports = _load(args.reports)
    show(reports_table(reports, [Path(p).name for p in args.reports]))
    return 0


def register(sub: Commands) -> None:
    s = sub.add_parser("plot", help="draw saved migration reports over time on one figure: "
                       "the guest's write rate, throughput, bytes left, rounds, downtime")
    s.add_argument("reports", nargs="+", metavar="REPORT.json",
                   help="reports saved by `migbed migrate --json` or `--output`, or a "
                        "sweep's runs/*.json")
    s.add_argument("-o", "--output", required=True, metavar="FILE.png",
                   help="the image to write (.png, .svg or .pdf)")
    s.add_argument("--label", action="append", default=None,
                   help="legend label of each report, in order (default: guest, policy, "
                        "status)")
    s.add_argument("--title", default=None, help="the figure's title")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("compare", help="saved migration reports side by side")
    s.add_argument("reports", nargs="+", metavar="REPORT.json")
    s.set_defaults(func=cmd_compare)
