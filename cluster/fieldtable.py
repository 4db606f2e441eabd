"""The one table of every user-facing setting: a migration's (`nodes.migration.fields`, where
`MigrationSettings`' sections take them from), the guest's, its workload's, and the CLI's own
(`--output`, `--timeline`, `--json`). Each row relates a setting's names: its flag, its key in
a scenario, its name in the API (`--dirty-rate`, `[workload] dirty_rate` and
`WorkloadSpec.rate_pages_per_second` are one row).

Generated from it: the CLI's options (`cluster.cli.options.add_field_options`), the sweep's
knobs (`cluster.sweep.knobs`) and the README's option table (`readme_table`, kept in sync by
tests/test_fieldtable.py; `python -m cluster.fieldtable` rewrites it). The guest's and the
workload's rows live here, not beside their specs, because `workloads` may import nothing
of migbed but its errors; their defaults are the specs' own (a test checks them).
"""

import re
import sys
from pathlib import Path
from typing import Any

from nodes.errors import ConfigError, ModeError
from nodes.migration.fields import (
    MIGRATION_FIELDS,
    Field,
    MiB,
    read_flag,
    read_string,
    seconds,
    seconds_or_zero,
    whole,
)
from nodes.migration.guestinfo import MAX_VCPUS, SPEC_VCPU_KINDS
from nodes.units import parse_count, parse_fraction, parse_positive_size
from nodes.xen.profiles import Mode
from workloads.content import FILLS
from workloads.spec import WORKLOADS, parse_rate


def read_dirty_rate(v: Any, what: str) -> float:
    try:
        return parse_rate(v)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def read_ops_rate(v: Any, what: str) -> float:
    """A program's operations per second, or `max` (0: as fast as its vCPU runs)."""
    if isinstance(v, str) and v.strip().lower() in ("max", "unlimited"):
        return 0.0
    try:
        value = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: cannot read {v!r}: give operations per second, e.g. "
                          f"20000, or 'max'") from None
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{what} must be a finite number >= 0, got {v!r}")
    return value


def read_skew(v: Any, what: str) -> float:
    try:
        value = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: cannot read {v!r}: give a skew, e.g. 0.99") from None
    if not 0 <= value <= 10:
        raise ConfigError(f"{what} must be in [0, 10] (0: uniform keys), got {v!r}")
    return value


def read_keys(v: Any, what: str) -> int:
    return parse_count(v, what)


def read_mode(v: Any, what: str) -> str:
    try:
        return Mode.parse(read_string(v, what)).value
    except ModeError as exc:
        raise ConfigError(str(exc)) from None


def read_seed(v: Any, what: str) -> int:
    return parse_count(v, what)


def read_speed(v: Any, what: str) -> float:
    try:
        speed = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: give a speed factor such as 2 (twice as fast), got "
                          f"{v!r}") from None
    if not 0 < speed < 1e6:
        raise ConfigError(f"{what} must be > 0 (1: as recorded), got {v!r}")
    return speed


def read_bytes(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise ConfigError(f"{what} must be bytes, got {type(v).__name__}")
    return v


def read_vcpu_kind(v: Any, what: str) -> str:
    v = read_string(v, what)
    if v not in SPEC_VCPU_KINDS:
        raise ConfigError(f"{what}: {v!r} is no vCPU kind; use auto, process or thread")
    return v


# The guest (`GuestSpec`, and a scenario's [guest]); a command may give its own default.
# `guest_memory_bytes` is GuestSpec's `memory_bytes` (`create` also takes it as --memory).
GUEST_FIELDS: tuple[Field, ...] = (
    Field("guest_memory_bytes", "guest", "64MiB", parse_positive_size,
          "guest memory", flag="--guest-memory", toml="memory",
          axis="guest_memory", metavar="SIZE", label="guest memory (MiB)", scale=MiB),
    Field("mode", "guest", "p2m", read_mode, "guest memory mode: p2m, vp or p==m",
          flag="--mode", toml="mode", label="guest mode"),
    Field("dma", "guest", False, read_flag, "give the guest a DMA device",
          flag="--dma"),
    Field("vcpu", "guest", "auto", read_vcpu_kind,
          "what runs the guest's vCPUs: {choices} (process: a guest process whose writes "
          "the kernel logs, Linux 6.7+; thread: a thread of its host, logged by the Xen "
          "model; auto: process where the host's kernel runs one, else thread, or "
          "$MIGBED_VCPU)", flag="--vcpu", toml="vcpu", metavar="KIND",
          choices=SPEC_VCPU_KINDS,
          label="vCPU kind"),
    Field("vcpus", "guest", 1, whole(1, MAX_VCPUS),
          f"how many vCPUs, 1-{MAX_VCPUS} (process guests; the dirty rate is their total, "
          "each writes its own pages)", flag="--vcpus", toml="vcpus", metavar="N",
          label="vCPUs"),
    Field("warmup_seconds", "guest", "300ms", seconds_or_zero,
          "run the workload this long before migrating", flag="--warmup", toml="warmup",
          metavar="DURATION"),
)

# The workload (`WorkloadSpec`, and a scenario's [workload]).
WORKLOAD_FIELDS: tuple[Field, ...] = (
    Field("pattern", "workload", "idle", read_string, "memory workload: {choices}",
          flag="--workload", toml="pattern", metavar="PATTERN", choices=WORKLOADS,
          label="workload", aliases=("--pattern",)),
    Field("rate_pages_per_second", "workload", "max", read_dirty_rate,
          "page writes per second, or max (as fast as it can; idle writes nothing, scan "
          "reads this many pages a second)", flag="--dirty-rate", toml="dirty_rate",
          metavar="PAGES_PER_S", label="dirty rate (page writes/s)"),
    Field("seed", "workload", 0, read_seed, "workload seed", flag="--seed"),
    Field("hot_fraction", "workload", 0.1, parse_fraction,
          "hotset: share of pages in the writable working set", flag="--hot-fraction",
          toml="hot_fraction", label="hot set (fraction of memory)"),
    Field("hot_share", "workload", 0.9, parse_fraction,
          "hotset: share of writes that hit it", flag="--hot-share", toml="hot_share",
          label="writes to the hot set (fraction)"),
    Field("busy_seconds", "workload", "1s", seconds, "phased: the busy phase, at the rate",
          toml="busy_seconds", label="busy phase (s)"),
    Field("quiet_seconds", "workload", "1s", seconds_or_zero, "phased: the quiet phase",
          toml="quiet_seconds", label="quiet phase (s)"),
    Field("quiet_rate_fraction", "workload", 0.0, parse_fraction,
          "phased: the quiet phase's rate, a fraction of the rate",
          toml="quiet_rate_fraction", label="quiet rate (fraction)"),
    Field("write_bytes", "workload", 8, parse_positive_size,
          "bytes of its page each write rewrites, 8 (the counter alone) to the page size",
          flag="--write-bytes", toml="write_bytes", metavar="N",
          label="bytes rewritten per page write"),
    Field("fill", "workload", "zero", read_string,
          "what the guest's memory holds before the workload starts: {choices} (zero: as a "
          "fresh guest)", flag="--fill", toml="fill", metavar="CONTENT", choices=FILLS,
          label="memory content"),
    # The programs (`workloads.program`): kvstore, stream, sort, matmul.
    Field("ops_per_second", "workload", "max", read_ops_rate,
          "programs: operations per second, or max (as fast as the vCPU runs)",
          flag="--ops-per-second", toml="ops_per_second", metavar="N",
          label="program operations/s"),
    Field("zipf", "workload", 0.99, read_skew,
          "kvstore: Zipf skew of the keys its client asks for (0: uniform)", flag="--zipf",
          toml="zipf", metavar="S", label="Zipf skew"),
    Field("get_ratio", "workload", 0.9, parse_fraction,
          "kvstore: share of its requests that are gets (the rest are sets)",
          flag="--get-ratio", toml="get_ratio", metavar="FRACTION", label="get ratio"),
    Field("value_size", "workload", 256, parse_positive_size, "kvstore: bytes per value",
          flag="--value-size", toml="value_size", metavar="SIZE", label="value size (B)"),
    Field("keys", "workload", 0, read_keys,
          "kvstore: how many keys (0: as many as fill half the guest's memory)",
          flag="--keys", toml="keys", metavar="N", label="keys"),
    Field("trace", "workload", "", read_string,
          "trace: the recorded trace to replay, a file or a shipped trace's name (`migbed "
          "trace list`); the guest's memory is sized from it unless given",
          flag="--trace", toml="trace", metavar="FILE|NAME", label="trace"),
    Field("trace_speed", "workload", 1.0, read_speed,
          "trace: replay this many times as fast as recorded", flag="--trace-speed",
          toml="trace_speed", metavar="X", label="trace speed (x)"),
    Field("trace_loop", "workload", False, read_flag,
          "trace: start the trace again when it ends (else the guest idles)",
          flag="--trace-loop", toml="trace_loop", label="trace loops"),
    Field("trace_bytes", "workload", b"", read_bytes,
          "trace: the trace's bytes, read from --trace when the spec is made (so they "
          "travel with the guest)"),
)

# The CLI's own: where a command's results go.
CLI_FIELDS: tuple[Field, ...] = (
    Field("output", "cli", None, read_string,
          "also write the report as JSON (what `plot` and `compare` read)", flag="--output",
          metavar="FILE"),
    Field("timeline", "cli", None, read_string,
          "also draw the migration over time (.png, .svg or .pdf): the guest's write rate, "
          "throughput, bytes left, rounds, pause, resume and downtime", flag="--timeline",
          metavar="FILE.png"),
    Field("json", "cli", False, read_flag, "print the report alone, as JSON",
          flag="--json"),
    Field("from_file", "cli", None, read_string,
          "create: boot every guest of a file of [[guest]] tables (create's own keys: name, "
          "host, memory, mode, workload, dirty_rate, ...) and [[template]] tables (a count "
          "spread over hosts)", flag="--from", metavar="FILE.toml"),
)

FIELDS: tuple[Field, ...] = MIGRATION_FIELDS + GUEST_FIELDS + WORKLOAD_FIELDS + CLI_FIELDS


def field_named(name: str, section: str | None = None) -> Field:
    """The row of `name` (in `section`, when names repeat across sections)."""
    for f in FIELDS:
        if f.name == name and section in (None, f.section):
            return f
    raise KeyError(name)


# -- the README's option table ----------------------------------------------------------------
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- migration options: generated from cluster/fieldtable.py; " \
        "python -m cluster.fieldtable rewrites it -->"
END = "<!-- end of the generated migration options -->"


def readme_rows() -> tuple[Field, ...]:
    """What the README's table lists: every migration setting a user gives (on the command
    line or in a scenario), then the CLI's own options."""
    return tuple(f for f in MIGRATION_FIELDS + CLI_FIELDS if f.flag or f.toml)


def readme_table() -> str:
    lines = ["| option | scenario `[migration]` key | meaning |", "|---|---|---|"]
    for f in readme_rows():
        flag = f"{f.flag} {f.metavar}" if f.flag and f.metavar else f.flag
        cells = [f"`{c}`" if c else "-" for c in (flag, f.toml)] + [f.help_text()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    """The generated table as README.md holds it (None: its markers are missing)."""
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    return m.group(1) if m else None


def write_readme(path: Path = README) -> None:
    text = path.read_text()
    if readme_block(text) is None:
        raise ConfigError(f"{path} has no {BEGIN!r} ... {END!r} markers")
    start = text.index(BEGIN) + len(BEGIN) + 1
    path.write_text(text[:start] + readme_table() + "\n" + text[text.index(END):])


if __name__ == "__main__":
    write_readme(Path(sys.argv[1]) if len(sys.argv) > 1 else README)
