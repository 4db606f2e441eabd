"""How a `migbed` command line is read: the parser and its one-line error, the exit codes,
the argument types (the value parsers of `nodes.units` wrapped for argparse) and the option
groups several commands share, with what each group builds (a workload, migration settings,
a cluster spec). The migration's, the workload's and the guest's options are generated from
the field table (`cluster.fieldtable`): `add_field` makes a row's option, `field_values`
reads the rows back as the API's keywords.
"""

import argparse
import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cluster.fieldtable import WORKLOAD_FIELDS, field_named
from nodes.errors import ConfigError, MigbedError
from nodes.migration.fields import MIGRATION_FIELDS, Field
from nodes.units import format_bytes, parse_count, parse_positive_size, parse_size
from nodes.xen.profiles import PROFILES

if TYPE_CHECKING:
    from cluster.launch.launcher import ClusterSpec
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
    from cluster.launch.launcher import MAX_HOSTS
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


# -- options generated from the field table (`cluster.fieldtable`) ------------------------------
SECTION_TITLES = {"link": "the link", "switchover": "the switch-over",
                  "convergence": "convergence aids", "wire": "what crosses the wire",
                  "postcopy": "post-copy", "checks": "checks"}


def dest_of(row: Field) -> str:
    """Where argparse keeps a row's value: its flag's name (`--dirty-rate`: dirty_rate)."""
    return (row.flag or "").lstrip("-").replace("-", "_")


def add_field(p: Any, row: Field, **override: Any) -> None:
    """The argparse option of a table row; `override` changes what one command needs
    different (a default, the help, required)."""
    kw: dict[str, Any] = {"help": row.help_text(), "dest": dest_of(row)}
    if row.is_switch:
        kw["action"] = "store_true"          # --no-verify: True turns the default off
    elif row.is_list:
        kw.update(action="append", type=arg(row.read, row.flag), default=None)
    else:
        kw["default"] = row.value
        if row.choices:
            kw["choices"] = row.choices
        else:
            kw["type"] = arg(row.read, row.flag)
    if row.metavar and not row.is_switch:
        kw["metavar"] = row.metavar
    kw.update(override)
    p.add_argument(row.flag, *row.aliases, **kw)


def add_field_options(p: argparse.ArgumentParser, rows: Iterable[Field],
                      grouped: bool = False) -> None:
    """The options of `rows` that have a flag, in argument groups by section if `grouped`."""
    groups: dict[str, Any] = {}
    for row in rows:
        if not row.flag:
            continue
        where = p
        if grouped:
            if row.section not in groups:
                groups[row.section] = p.add_argument_group(SECTION_TITLES[row.section])
            where = groups[row.section]
        add_field(where, row)


def field_values(args: argparse.Namespace, rows: Iterable[Field]) -> dict:
    """The API's keywords from the options of `rows` this command has; two options that set
    the same field (`--postcopy`, `--postcopy-after`) are refused together."""
    values: dict = {}
    set_by: dict[str, Field] = {}
    for row in rows:
        if not row.flag or not hasattr(args, dest_of(row)):
            continue
        value = getattr(args, dest_of(row))
        if row.is_switch and row.default:
            value = not value                # --no-verify
        if row.is_list:
            value = tuple(value or ())
        if row.into is None:
            values[row.name] = value
            continue
        if value is None or value is False:
            continue                         # a composite not given sets nothing
        for name, v in row.into(value).items():
            if name in set_by:
                raise UsageError(f"give {set_by[name].flag} or {row.flag}, not both")
            set_by[name] = row
            values[name] = v
    return values


def add_workload_options(p: argparse.ArgumentParser) -> None:
    add_field_options(p, WORKLOAD_FIELDS)


def add_migration_options(p: argparse.ArgumentParser) -> None:
    """Every migration setting with a flag (the faults aside: `add_fault_option`), and
    `--json`."""
    add_field(p, field_named("json"))
    add_field_options(p, (f for f in MIGRATION_FIELDS if f.name != "faults"), grouped=True)


def add_fault_option(p: argparse.ArgumentParser) -> None:
    add_field(p, field_named("faults"))


def add_output_option(p: argparse.ArgumentParser) -> None:
    add_field(p, field_named("output"))


# -- what the option groups build ---------------------------------------------------------------
def workload_from(args: argparse.Namespace) -> "WorkloadSpec":
    from workloads.spec import WorkloadSpec
    return WorkloadSpec(**field_values(args, WORKLOAD_FIELDS))


def settings_from(args: argparse.Namespace) -> "MigrationSettings":
    from nodes.migration.settings import MigrationSettings
    return MigrationSettings(**field_values(args, MIGRATION_FIELDS))


def cluster_spec_from(args: argparse.Namespace,
                      address: str | None = None) -> "ClusterSpec":
    from cluster.launch.launcher import ClusterSpec, host_names, parse_profiles
    from cluster.launch.placement import parse_placement
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
                       data_ports=getattr(args, "data_ports", None),
                       racks=getattr(args, "racks", None),
                       host_link_bytes_per_second=getattr(args, "host_link", None),
                       uplink_bytes_per_second=getattr(args, "uplink", None))


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
