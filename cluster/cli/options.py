"""How a `migbed` command line is read: the parser and its one-line error, the exit codes,
the argument types (the value parsers of `nodes.units` wrapped for argparse) and the option
groups several commands share, with what each group builds (a workload, migration settings,
a cluster spec).
"""

import argparse
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nodes.errors import ConfigError, MigbedError
from nodes.phase import Phase
from nodes.units import (
    format_bytes,
    parse_bandwidth,
    parse_completion_timeout,
    parse_count,
    parse_fraction,
    parse_positive_size,
    parse_seconds,
    parse_size,
)
from nodes.xen.profiles import PROFILES

if TYPE_CHECKING:
    from cluster.launcher import ClusterSpec
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec

Commands = argparse._SubParsersAction   # what `add_subparsers` returns: each module adds its own

EXIT_BAD_INPUT = 2          # any bad input: one line on stderr
EXIT_MIGRATION_FAILED = 1   # a migration (or bench section, soak) ran but did not complete


class UsageError(MigbedError):
    """A command line argparse or a command refused as written."""


# A `%(name)s` argparse fills in, a `%%` already escaped, or a bare `%` (to escape).
_HELP_PERCENT = re.compile(r"%\(\w+\)[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]|%%|%")


def escape_help(text: str | None) -> str | None:
    """Help text with every bare `%` doubled, so argparse's `%`-formatting of it cannot fail
    ("first throttle, %"); `%(default)s` and `%%` are left as argparse reads them."""
    if text is None:
        return None
    return _HELP_PERCENT.sub(lambda m: "%%" if m.group(0) == "%" else m.group(0), text)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, reading every help string through `escape_help`: a help string
    written by hand, generated from the field table or given to `add_parser` is safe."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return escape_help(super()._get_help_string(action)) or ""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other bad input, and
    formats help through `HelpFormatter`, so no `--help` can crash."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# -- argument types: each rejects bad input with a one-line message ---------------------------
def arg(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[str], Any]:
    """An argparse type from a value parser: `arg(parse_count, "--hosts", 1)`. argparse would
    hide a ValueError's text behind the type's name; this shows our message."""
    def convert(text: str) -> Any:
        try:
            return parse(text, *args, **kwargs)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _mode(text: str) -> str:
    from nodes.errors import ModeError
    from nodes.xen.profiles import Mode
    try:
        return Mode.parse(text).value
    except ModeError as exc:
        raise ConfigError(str(exc)) from None


def _fault(text: str):
    from nodes.faults.spec import parse_fault
    return parse_fault(text)


def _dirty_rate(text: str) -> float:
    from workloads.spec import parse_rate
    return parse_rate(text)


mode_arg = arg(_mode)
port_arg = arg(parse_count, "port", 0, 65535)


# -- option groups shared by several commands ----------------------------------------------
def add_cluster_options(p: argparse.ArgumentParser, hosts: int = 3,
                        memory: str = "512MiB") -> None:
    p.add_argument("--hosts", type=arg(parse_count, "--hosts", 1), default=hosts,
                   help=f"number of emulated hosts (default {hosts})")
    p.add_argument("--host-memory", type=arg(parse_positive_size, "--host-memory"),
                   default=parse_size(memory),
                   help=f"machine memory per host, e.g. 1GiB (default {memory})")
    p.add_argument("--profile", default=None,
                   help=f"architecture profile for all hosts ({', '.join(PROFILES)}) or per "
                        "host, e.g. host-0=ia64,host-1=ia64 (default x86)")
    p.add_argument("--page-size", type=arg(parse_positive_size, "--page-size"), default=4096,
                   help="page size in bytes (default 4096)")
    p.add_argument("--hypervisor-reserve", type=arg(parse_positive_size, "--hypervisor-reserve"),
                   default=4 * 1024 * 1024, help="frames the hypervisor keeps (default 4MiB)")
    p.add_argument("--dom0-memory", type=arg(parse_positive_size, "--dom0-memory"), default=None,
                   help="dom0 memory per host (default 1/32 of the host, at least 1MiB)")
    add_superpages_option(p)
    add_hosts_per_node_option(p)


def add_hosts_per_node_option(p: argparse.ArgumentParser) -> None:
    from cluster.launcher import MAX_HOSTS
    p.add_argument("--hosts-per-node", type=arg(parse_count, "--hosts-per-node", 1, MAX_HOSTS),
                   default=None, metavar="N",
                   help="emulated hosts per Ray node, each still a process of its own "
                        "(default: a local cluster puts all on one node, the least memory "
                        "and start-up; an existing cluster spreads them round robin)")


def add_superpages_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-superpages", action="store_true",
                   help="give guests frame by frame (a fragmented host) instead of in 2 MiB "
                        "superpage extents as Xen does; migrations then move scattered pages")


def add_prometheus_options(p: argparse.ArgumentParser, metrics_host: bool = True) -> None:
    p.add_argument("--prometheus", action="store_true",
                   help="also run a Prometheus server (Debian's `prometheus` binary) that "
                        "scrapes every host each second")
    p.add_argument("--prometheus-port", type=port_arg, default=9090,
                   help="port of that Prometheus on 127.0.0.1 (default 9090; 0: a free one)")
    if metrics_host:
        p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                       help="where each host's /metrics listens (default 127.0.0.1; "
                            "0.0.0.0 for a Prometheus on another machine)")


def add_workload_options(p: argparse.ArgumentParser) -> None:
    from workloads.spec import PATTERNS
    p.add_argument("--workload", default="idle", choices=PATTERNS, metavar="PATTERN",
                   help=f"memory workload: {', '.join(PATTERNS)} (default idle)")
    p.add_argument("--dirty-rate", type=arg(_dirty_rate), default=0.0, metavar="PAGES_PER_S",
                   help="page writes per second, or max (default: max; idle writes nothing)")
    p.add_argument("--seed", type=arg(parse_count, "--seed"), default=0, help="workload seed")
    p.add_argument("--hot-fraction", type=arg(parse_fraction, "--hot-fraction"), default=0.1,
                   help="hotset: share of pages in the writable working set (default 0.1)")
    p.add_argument("--hot-share", type=arg(parse_fraction, "--hot-share"), default=0.9,
                   help="hotset: share of writes that hit it (default 0.9)")
    from workloads.content import FILLS
    p.add_argument("--write-bytes", type=arg(parse_size, "--write-bytes"), default=8,
                   metavar="N", help="bytes of its page each write rewrites, 8 (the counter "
                   "alone) to the page size (default 8)")
    p.add_argument("--fill", default="zero", choices=FILLS, metavar="CONTENT",
                   help=f"what the guest's memory holds before the workload starts: "
                        f"{', '.join(FILLS)} (default zero, as a fresh guest)")


def add_migration_options(p: argparse.ArgumentParser) -> None:
    from nodes.migration.policy import POLICIES
    p.add_argument("--policy", default="xen", choices=list(POLICIES), metavar="NAME",
                   help=f"pre-copy policy: {', '.join(POLICIES)} (default xen)")
    p.add_argument("--bandwidth", type=arg(parse_bandwidth, "--bandwidth"), default=None,
                   help="the link's speed per second, e.g. 128MiB (default unlimited)")
    p.add_argument("--rate-limit", type=arg(parse_bandwidth, "--rate-limit"), default=None,
                   help=f"the migration's own throttle per second, lifted for "
                        f"{Phase.STOP_AND_COPY} (default none)")
    p.add_argument("--latency", type=arg(parse_seconds, "--latency", allow_zero=True),
                   default=0.0, help="one-way link latency, e.g. 5ms (default 0)")
    p.add_argument("--downtime-limit", type=arg(parse_seconds, "--downtime-limit"), default=0.3,
                   help="qemu policy: downtime limit, e.g. 300ms (default 300ms)")
    p.add_argument("--max-iterations", type=arg(parse_count, "--max-iterations"), default=None,
                   help="override the policy's live round cap")
    p.add_argument("--cancel-after-round", type=arg(parse_count, "--cancel-after-round"),
                   default=None,
                   help="cancel the migration after live round N (tests the abort path)")
    p.add_argument("--timeout", type=arg(parse_seconds, "--timeout"), default=30.0,
                   help="timeout of every wait across hosts (default 30s)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the destination-equals-source memory check")
    add_wire_options(p)
    p.add_argument("--json", action="store_true", help="print the report alone, as JSON")
    add_convergence_options(p)
    from cluster.cli.postcopy import add_postcopy_options
    add_postcopy_options(p)


def add_convergence_options(p: argparse.ArgumentParser) -> None:
    """QEMU's auto-converge and dirty-limit, the operators' timeouts, Xen's adaptive rate
    (`nodes.migration.convergence`); defaults and ranges are QEMU's."""
    g = p.add_argument_group("convergence aids")
    g.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest's vCPU when it dirties faster than pages go")
    for flag, default, hi, what in (
            ("--throttle-initial", 20, 99, "first throttle, %"),
            ("--throttle-increment", 10, 99, "throttle step, %"),
            ("--max-throttle", 99, 99, "highest throttle, %"),
            ("--throttle-trigger-threshold", 50, 100,
             "a period is hot when it dirtied more than this % of what it sent")):
        g.add_argument(flag, type=arg(parse_count, flag, 1, hi), default=default,
                       metavar="PCT", help=f"auto-converge: {what} (1-{hi}, default {default})")
    g.add_argument("--throttle-tailslow", action="store_true",
                   help="auto-converge: smaller last steps (QEMU's cpu-throttle-tailslow)")
    g.add_argument("--dirty-limit", type=arg(parse_bandwidth, "--dirty-limit"), default=None,
                   metavar="RATE", help="slow a writing vCPU towards RATE of dirtied memory "
                                        "per second, e.g. 10MB (1MB = 10^6 bytes)")
    g.add_argument("--dirty-limit-period", type=arg(parse_seconds, "--dirty-limit-period"),
                   default=1.0, help="dirty-limit: how often the rate is measured (1ms-1s, "
                                     "default 1s)")
    g.add_argument("--completion-timeout",
                   type=arg(parse_completion_timeout, "--completion-timeout"), default=None,
                   metavar="DURATION", help="give up after DURATION, e.g. 30s, or per GiB of "
                                            "guest memory, e.g. 10s/GiB (see --on-timeout)")
    g.add_argument("--on-timeout", choices=("abort", "postcopy", "pause"), default="abort",
                   help="after --completion-timeout: abort (the guest stays), postcopy, or "
                        "pause the guest and finish (default abort)")
    g.add_argument("--progress-timeout", type=arg(parse_seconds, "--progress-timeout"),
                   default=None, metavar="DURATION",
                   help="abort when the remaining bytes have not dropped for DURATION")
    g.add_argument("--subtract-fixed-downtime", action="store_true",
                   help="qemu policy: budget = downtime limit - the hand-over measured for "
                        "this host pair (QEMU subtracts nothing)")
    g.add_argument("--adaptive-rate", action="store_true",
                   help="xen-legacy: Xen's ADAPTIVE_SAVE rate (100 Mbit/s, raised to the "
                        "dirty rate + 50, at most 500)")


def convergence_from(args: argparse.Namespace) -> dict:
    """The MigrationSettings fields of the convergence options."""
    absolute, per_gib = args.completion_timeout or (None, None)
    return dict(auto_converge=args.auto_converge, throttle_initial=args.throttle_initial,
                throttle_increment=args.throttle_increment, max_throttle=args.max_throttle,
                throttle_trigger_threshold=args.throttle_trigger_threshold,
                throttle_tailslow=args.throttle_tailslow,
                dirty_limit_bytes_per_second=args.dirty_limit,
                dirty_limit_period_seconds=args.dirty_limit_period,
                completion_timeout_seconds=absolute,
                completion_timeout_per_gib_seconds=per_gib, on_timeout=args.on_timeout,
                progress_timeout_seconds=args.progress_timeout,
                subtract_fixed_downtime=args.subtract_fixed_downtime,
                adaptive_rate=args.adaptive_rate)


def add_wire_options(p: argparse.ArgumentParser) -> None:
    """What crosses the wire (`nodes.migration.wire`): QEMU's names and defaults."""
    from nodes.migration.wire import COMPRESSIONS, LEVELS, ZERO_PAGE_DETECTIONS
    p.add_argument("--zero-page-detection", default="multifd", choices=ZERO_PAGE_DETECTIONS,
                   metavar="WHERE", help="none, legacy (the sender looks) or multifd (the "
                   "channels look, else as legacy; QEMU's default)")
    p.add_argument("--xbzrle-cache", type=arg(parse_positive_size, "--xbzrle-cache"),
                   default=None, metavar="SIZE",
                   help="XBZRLE delta pages with a cache of SIZE, a power of two (e.g. "
                        "64MiB, QEMU's default size)")
    p.add_argument("--multifd-channels", type=arg(parse_count, "--multifd-channels", 1, 255),
                   default=None, metavar="N",
                   help="send pages over N more connections (QEMU's default is 2)")
    p.add_argument("--multifd-compression", default="none", choices=COMPRESSIONS,
                   metavar="CODEC", help="compress the channels' packets: none, zlib or zstd")
    for codec, (lo, hi) in LEVELS.items():
        p.add_argument(f"--multifd-{codec}-level",
                       type=arg(parse_count, f"--multifd-{codec}-level", lo, hi), default=1,
                       metavar="L", help=f"{codec} level {lo}..{hi} (default 1, as QEMU's)")


def add_fault_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fault", action="append", type=arg(_fault), default=None,
                   metavar="KIND@STAGE[:ARG]",
                   help=f"inject a fault, e.g. stall-link@round1:2s, kill-destination@"
                        f"{Phase.STOP_AND_COPY}, slow-link@round0:1MiB (repeatable; `migbed "
                        "fault list` shows them all)")


def add_output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON here")


# -- what the option groups build ---------------------------------------------------------------
def workload_from(args: argparse.Namespace) -> "WorkloadSpec":
    from workloads.spec import WorkloadSpec
    return WorkloadSpec(pattern=args.workload, rate_pages_per_second=args.dirty_rate,
                        seed=args.seed, hot_fraction=args.hot_fraction,
                        hot_share=args.hot_share, write_bytes=args.write_bytes,
                        fill=args.fill)


def settings_from(args: argparse.Namespace) -> "MigrationSettings":
    from cluster.cli.postcopy import postcopy_settings
    from nodes.migration.settings import MigrationSettings
    return MigrationSettings(**postcopy_settings(args),
        policy=args.policy, link_bytes_per_second=args.bandwidth,
        latency_seconds=args.latency, rate_limit_bytes_per_second=args.rate_limit,
        downtime_limit_seconds=args.downtime_limit, max_iterations=args.max_iterations,
        verify=not args.no_verify, cancel_after_round=args.cancel_after_round,
        timeout_seconds=args.timeout, faults=tuple(getattr(args, "fault", None) or ()),
        zero_page_detection=args.zero_page_detection, xbzrle_cache_bytes=args.xbzrle_cache,
        multifd_channels=args.multifd_channels, multifd_compression=args.multifd_compression,
        multifd_zlib_level=args.multifd_zlib_level, multifd_zstd_level=args.multifd_zstd_level,
        **convergence_from(args))


def cluster_spec_from(args: argparse.Namespace,
                      address: str | None = None) -> "ClusterSpec":
    from cluster.launcher import ClusterSpec, host_names, parse_profiles
    from cluster.placement import parse_placement
    default, per = parse_profiles(args.profile, host_names(args.hosts))
    return ClusterSpec(hosts=args.hosts, host_memory_bytes=args.host_memory,
                       page_size=args.page_size, reserved_bytes=args.hypervisor_reserve,
                       dom0_memory_bytes=args.dom0_memory, profiles=per,
                       default_profile=default, address=address,
                       bind_address="node" if address else "127.0.0.1",
                       metrics_address=getattr(args, "metrics_host", "127.0.0.1"),
                       superpages=not args.no_superpages,
                       hosts_per_node=getattr(args, "hosts_per_node", None),
                       placement=parse_placement(getattr(args, "placement", None),
                                                 host_names(args.hosts)),
                       data_ports=getattr(args, "data_ports", None))


def check_guests_fit(cluster: "ClusterSpec", guest_bytes: int, count: int = 1) -> None:
    """Commands that build their own cluster check its guests before starting anything:
    whole pages, and `count` of them fitting one host beside the hypervisor and dom0."""
    from nodes.xen.hypervisor import default_dom0_bytes
    if guest_bytes % cluster.page_size:
        raise ConfigError(f"--guest-memory ({guest_bytes} B) is not a multiple of the "
                          f"page size ({cluster.page_size} B)")
    room = cluster.host_memory_bytes - cluster.reserved_bytes - (
        cluster.dom0_memory_bytes
        or default_dom0_bytes(cluster.host_memory_bytes, cluster.page_size))
    if count * guest_bytes > room:
        many = f"{count} guests of" if count > 1 else "a guest of"
        raise ConfigError(f"{many} {format_bytes(guest_bytes)} may not fit one host of "
                          f"{format_bytes(cluster.host_memory_bytes)}; raise --host-memory"
                          + (" or lower --guests" if count > 1 else ""))


def check_output(path: str | None) -> None:
    """Refuse an output file that cannot be written before a long run, not after it."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--output {path} is a directory; give a file name")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write --output {path}: {parent} is not a writable folder")


def write_output(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
