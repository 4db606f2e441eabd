"""The field table of a migration's settings: every setting once, with its API name (the
`MigrationSettings` keyword), the section that holds and checks it, its default as a user
writes it, the reader of its value, its help, its command-line flag and its scenario (TOML)
key. The sections (`settings_section`) take their fields from here, the CLI's options and the
sweep's knobs are generated from here, and so is the README's option table (with the guest's,
the workload's and the CLI's own rows, gathered in `cluster.fieldtable`).

Adding a setting is one row here, and its use (and its check in its section, if it has one).

A reader takes `(value, what)`: the value as the command line (text) or a scenario (a TOML
string, number or boolean) gives it, and what to call it in an error (`--bandwidth`,
`[migration] bandwidth`). A row whose `into` is set is a composite: not a field of its own,
it sets the fields `into` returns (`--postcopy-after` sets the rounds or the seconds).
"""

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from nodes.errors import ConfigError
from nodes.faults.spec import parse_fault
from nodes.migration.decide.downtimesteps import parse_downtime_steps
from nodes.migration.decide.policy import BUILTIN_POLICIES, POLICIES
from nodes.phase import Phase
from nodes.units import (
    parse_bandwidth_or_unlimited,
    parse_completion_timeout,
    parse_count,
    parse_positive_size,
    parse_rounds_or_duration,
    parse_seconds,
)

Reader = Callable[[Any, str], Any]

# What crosses the wire: QEMU's names (the wire section checks them, `nodes.migration.wire.capabilities`).
ZERO_PAGE_DETECTIONS = ("none", "legacy", "multifd")
COMPRESSIONS = ("none", "zlib", "zstd")
LEVELS = {"zlib": (0, 9), "zstd": (0, 20)}
MAX_MULTIFD_CHANNELS = 255              # QEMU's bound (a uint8)
ON_TIMEOUT = ("abort", "postcopy", "pause")   # `nodes.migration.decide.timeouts.OnTimeout`
POSTCOPY_OFF = "off"
MiB = 1024 * 1024
_OFF = ("off", "none", "unlimited", "never")


# -- readers: each refuses a bad value in one line naming what it read --------------------------
def read_string(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{what} must be a string, got {v!r}")
    return v


def read_flag(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{what} must be true or false, got {v!r}")
    return v


def optional(read: Reader) -> Reader:
    """A value or "off" (also "none", "unlimited"): None, the setting left off."""
    def read_or_off(v: Any, what: str) -> Any:
        if isinstance(v, str) and v.strip().lower() in _OFF:
            return None
        return read(v, what)
    return read_or_off


def whole(lo: int = 0, hi: int | None = None) -> Reader:
    return lambda v, what: parse_count(v, what, lo, hi)


def seconds(v: Any, what: str) -> float:
    return parse_seconds(v, what)


def seconds_or_zero(v: Any, what: str) -> float:
    return parse_seconds(v, what, allow_zero=True)


def postcopy_after(v: Any, what: str) -> int | str:
    """When to switch to post-copy, as a scenario writes it: a number of live rounds, a
    duration ("1.5s", kept as written canonically), or "off" (pre-copy only)."""
    if isinstance(v, str) and v.strip().lower() in _OFF:
        return POSTCOPY_OFF
    rounds, secs = parse_rounds_or_duration(v, what)
    return rounds if rounds is not None else f"{secs:g}s"


def postcopy_fields(value: int | str) -> dict:
    """The settings' fields of a `postcopy_after` value."""
    if value == POSTCOPY_OFF:
        return {"postcopy_after_rounds": None, "postcopy_after_seconds": None}
    rounds, secs = parse_rounds_or_duration(value, "postcopy_after")
    return {"postcopy_after_rounds": rounds, "postcopy_after_seconds": secs}


def settings_postcopy_after(s: Any) -> int | str:
    """The `postcopy_after` value of a migration's settings (a scenario's TOML)."""
    if s.postcopy_after_rounds is not None:
        return s.postcopy_after_rounds
    if s.postcopy_after_seconds is not None:
        return f"{s.postcopy_after_seconds:g}s"
    return POSTCOPY_OFF


def read_fault(v: Any, what: str) -> Any:
    """A fault as text (`KIND@STAGE[:ARG]`), `nodes.faults.spec`'s own message if bad."""
    return parse_fault(read_string(v, what))


def _step_delay_fields(value: tuple[float | None, float | None] | None) -> dict:
    absolute, per_gib = value or (None, None)
    return {"downtime_step_delay_seconds": absolute,
            "downtime_step_delay_per_gib_seconds": per_gib}


def _completion_fields(value: tuple[float | None, float | None] | None) -> dict:
    absolute, per_gib = value or (None, None)
    return {"completion_timeout_seconds": absolute,
            "completion_timeout_per_gib_seconds": per_gib}


# -- a row --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """One user-facing setting: its names everywhere, its default, how its value is read."""

    name: str                     # the API's name (a keyword of the section's owner)
    section: str                  # the section that holds and checks it
    default: Any                  # as a user writes it ("300ms", 20, False); None: off
    read: Reader                  # (value, what) -> value
    help: str                     # "{choices}" is filled in; "(default ...)" is appended
    flag: str | None = None       # on the command line (None: not there)
    toml: str | None = None       # in a scenario's table (None: not there)
    metavar: str | None = None
    choices: Collection[str] = ()  # a live collection (policies register themselves)
    label: str | None = None      # a sweep axis's label, its unit included (None: no axis)
    scale: float = 1.0            # plotted value = value / scale
    axis: str | None = None       # its [axes] name, when not its TOML key
    off_when_absent: bool = False  # None is left out of a written scenario (else "unlimited")
    into: Callable[[Any], dict] | None = None   # a composite: value -> the fields it sets
    aliases: tuple[str, ...] = ()  # older flags, still accepted

    @property
    def is_field(self) -> bool:
        """A field of its section (not a composite that sets others)."""
        return self.into is None

    @property
    def is_switch(self) -> bool:
        """A boolean: on the command line a flag without a value."""
        return isinstance(self.default, bool)

    @property
    def is_list(self) -> bool:
        """A tuple of what `read` reads: on the command line a repeatable option."""
        return isinstance(self.default, tuple)

    @property
    def value(self) -> Any:
        """The default as the program holds it: the default read by the row's own reader."""
        if self.default is None or self.is_switch or self.is_list:
            return self.default
        return self.read(self.default, self.flag or self.toml or self.name)

    @property
    def knob(self) -> str | None:
        """Its name as a sweep axis (None: not sweepable)."""
        return (self.axis or self.toml) if self.label else None

    def fields(self, value: Any) -> dict:
        """The section fields a value of this row sets."""
        return self.into(value) if self.into else {self.name: value}

    def help_text(self) -> str:
        text = self.help.replace("{choices}", ", ".join(self.choices))
        if self.default not in (None, ()) and not self.is_switch and self.into is None:
            text += f" (default {self.default})"
        return text


def _pct(name: str, qemu: str, default: int, hi: int, what: str, label: str) -> Field:
    return Field(name, "convergence", default, whole(1, hi),
                 f"auto-converge: {what} ({qemu}), 1-{hi}",
                 flag="--" + name.replace("_", "-"), toml=name, metavar="PCT", label=label)


def _level(codec: str) -> Field:
    lo, hi = LEVELS[codec]
    return Field(f"multifd_{codec}_level", "wire", 1, whole(lo, hi),
                 f"the channels' {codec} level, {lo}..{hi}, as QEMU's",
                 flag=f"--multifd-{codec}-level", toml=f"multifd_{codec}_level", metavar="L")


# -- the table ----------------------------------------------------------------------------------
MIGRATION_FIELDS: tuple[Field, ...] = (
    # link: the paced link the pages cross, and the waits across hosts
    Field("link_bytes_per_second", "link", "unlimited", parse_bandwidth_or_unlimited,
          "the link's speed per second, e.g. 128MiB; stop-and-copy never exceeds it",
          flag="--bandwidth", toml="bandwidth", metavar="RATE",
          label="link bandwidth (MiB/s)", scale=MiB),
    Field("rate_limit_bytes_per_second", "link", "unlimited", parse_bandwidth_or_unlimited,
          f"the migration's own throttle per second, lifted for {Phase.STOP_AND_COPY} as "
          "QEMU does", flag="--rate-limit", toml="rate_limit", metavar="RATE",
          label="rate limit (MiB/s)", scale=MiB),
    Field("latency_seconds", "link", "0s", seconds_or_zero,
          "one-way link latency, e.g. 5ms", flag="--latency", toml="latency",
          metavar="DURATION", label="latency (s)"),
    Field("link_shared", "link", False, read_flag,
          "the source host's uplink is shared fairly by its concurrent outgoing migrations "
          "that set this (host evacuation sets it)"),
    Field("timeout_seconds", "link", "30s", seconds,
          "the limit on every wait across hosts (after a post-copy switch: how long a broken "
          "link may take to come back before the migration pauses)",
          flag="--timeout", toml="timeout", metavar="DURATION"),
    # switchover: the pre-copy policy and its budget
    Field("policy", "switchover", "xen", read_string,
          f"pre-copy policy: {', '.join(BUILTIN_POLICIES)} (or one made with register_policy)",
          flag="--policy", toml="policy", metavar="NAME", choices=POLICIES, label="policy"),
    Field("downtime_limit_seconds", "switchover", "300ms", seconds,
          "the qemu policy's downtime limit", flag="--downtime-limit", toml="downtime_limit",
          metavar="DURATION", label="downtime limit (s)"),
    Field("max_iterations", "switchover", None, optional(whole()),
          "override the policy's cap on live rounds", flag="--max-iterations",
          toml="max_iterations", metavar="N", label="live round cap", off_when_absent=True),
    Field("subtract_fixed_downtime", "switchover", False, read_flag,
          "qemu policy: budget = downtime limit - the hand-over measured for this host pair "
          "(QEMU subtracts nothing)", flag="--subtract-fixed-downtime",
          toml="subtract_fixed_downtime"),
    # switchover, the qemu policy's only: downtime that adapts and stall detection
    # (`nodes.migration.decide.downtimesteps`, `nodes.migration.decide.stall`)
    Field("downtime_steps", "switchover", None, optional(parse_downtime_steps),
          "qemu policy: step the downtime limit up while the migration runs, STEPS+1 limits "
          "from START to END, e.g. 150ms..1050ms/5 (OpenStack's downtime steps); vep291 is "
          "KubeVirt's 150ms..1050ms ramp", flag="--downtime-steps", toml="downtime_steps",
          metavar="START..END/STEPS", off_when_absent=True),
    Field("downtime_step_delay", "switchover", None, optional(parse_completion_timeout),
          "how long each downtime step holds, e.g. 2s, or per GiB of guest memory, e.g. "
          "75s/GiB (OpenStack's default, used when not given)",
          flag="--downtime-step-delay", metavar="DURATION", into=_step_delay_fields),
    Field("downtime_step_delay_seconds", "switchover", None, optional(seconds),
          "how long each downtime step holds", toml="downtime_step_delay",
          label="downtime step delay (s)"),
    Field("downtime_step_delay_per_gib_seconds", "switchover", None, optional(seconds),
          "how long each downtime step holds per GiB of guest memory"),
    Field("switchover_on_stall_seconds", "switchover", None, optional(seconds),
          "qemu policy: when the remaining bytes have not reached a new low for DURATION, "
          "switch over at their next local minimum (KubeVirt's VEP 248; beats "
          "--progress-timeout)", flag="--switchover-on-stall", toml="switchover_on_stall",
          metavar="DURATION", label="switch-over on stall (s)"),
    Field("switchover_bandwidth_bytes_per_second", "switchover", None,
          parse_bandwidth_or_unlimited,
          "qemu policy: the bandwidth the switch-over decision uses instead of the measured "
          "one, e.g. 1GiB (QEMU's avail-switchover-bandwidth)",
          flag="--switchover-bandwidth", toml="switchover_bandwidth", metavar="RATE",
          label="switch-over bandwidth (MiB/s)", scale=MiB),
    # convergence: the aids that make pre-copy finish (`nodes.migration.decide.convergence`)
    Field("auto_converge", "convergence", False, read_flag,
          "throttle the guest's vCPU when it dirties faster than pages go (QEMU's "
          "auto-converge)", flag="--auto-converge", toml="auto_converge",
          label="auto-converge"),
    _pct("throttle_initial", "cpu-throttle-initial", 20, 99, "first throttle, %",
         "initial throttle (%)"),
    _pct("throttle_increment", "cpu-throttle-increment", 10, 99, "throttle step, %",
         "throttle step (%)"),
    _pct("max_throttle", "max-cpu-throttle", 99, 99, "highest throttle, %", "max throttle (%)"),
    _pct("throttle_trigger_threshold", "throttle-trigger-threshold", 50, 100,
         "a period is hot when it dirtied more than this % of what it sent",
         "trigger threshold (%)"),
    Field("throttle_tailslow", "convergence", False, read_flag,
          "auto-converge: smaller last steps (QEMU's cpu-throttle-tailslow)",
          flag="--throttle-tailslow", toml="throttle_tailslow", label="tailslow"),
    Field("dirty_limit_bytes_per_second", "convergence", None, parse_bandwidth_or_unlimited,
          "dirty-limit (QEMU 8.1+): slow a writing vCPU towards RATE of dirtied memory per "
          "second, e.g. 10MB (1MB = 10^6 bytes); exclusive with --auto-converge",
          flag="--dirty-limit", toml="dirty_limit", metavar="RATE",
          label="dirty limit (MB/s)", scale=1e6),
    Field("dirty_limit_period_seconds", "convergence", "1s", seconds,
          "dirty-limit: how often the vCPU's rate is measured, 1ms-1s",
          flag="--dirty-limit-period", toml="dirty_limit_period", metavar="DURATION",
          label="dirty-limit period (s)"),
    Field("completion_timeout", "convergence", None, optional(parse_completion_timeout),
          "give up after DURATION, e.g. 30s, or per GiB of guest memory, e.g. 10s/GiB "
          "(KubeVirt's completionTimeoutPerGiB); then see --on-timeout",
          flag="--completion-timeout", metavar="DURATION", into=_completion_fields),
    Field("completion_timeout_seconds", "convergence", None, optional(seconds),
          "give up after this long (then see on_timeout)", toml="completion_timeout",
          label="completion timeout (s)"),
    Field("completion_timeout_per_gib_seconds", "convergence", None, optional(seconds),
          "give up after this long per GiB of guest memory"),
    Field("on_timeout", "convergence", "abort", read_string,
          "after --completion-timeout: abort (the guest stays on its source), postcopy "
          "(switch; implies --postcopy-allowed) or pause (stop the guest and finish as "
          "stop-and-copy)", flag="--on-timeout", toml="on_timeout", choices=ON_TIMEOUT,
          label="on timeout"),
    Field("progress_timeout_seconds", "convergence", None, optional(seconds),
          "abort when the remaining bytes have not reached a new low for DURATION",
          flag="--progress-timeout", toml="progress_timeout", metavar="DURATION",
          label="progress timeout (s)"),
    Field("adaptive_rate", "convergence", False, read_flag,
          "xen-legacy: Xen's ADAPTIVE_SAVE rate (100 Mbit/s, raised each round to the dirty "
          "rate + 50, at most 500)", flag="--adaptive-rate", toml="adaptive_rate"),
    # wire: what crosses it (`nodes.migration.wire.capabilities`), QEMU's names and defaults
    Field("zero_page_detection", "wire", "multifd", read_string,
          "none, legacy (the sender looks) or multifd (QEMU's default: the channels look, "
          "else as legacy)", flag="--zero-page-detection", toml="zero_page_detection",
          metavar="WHERE", choices=ZERO_PAGE_DETECTIONS, label="zero-page detection"),
    Field("xbzrle_cache_bytes", "wire", None, optional(parse_positive_size),
          "XBZRLE delta pages with a cache of SIZE, a power of two (QEMU's default size is "
          "64MiB)", flag="--xbzrle-cache", toml="xbzrle_cache", metavar="SIZE",
          label="XBZRLE cache (MiB)", scale=MiB, off_when_absent=True),
    Field("multifd_channels", "wire", None, optional(whole(1, MAX_MULTIFD_CHANNELS)),
          "send pages over N more connections (QEMU's default is 2); refused with XBZRLE, as "
          "QEMU refuses it, and with post-copy", flag="--multifd-channels",
          toml="multifd_channels", metavar="N", label="multifd channels",
          off_when_absent=True),
    Field("multifd_compression", "wire", "none", read_string,
          "compress the channels' packets: {choices}", flag="--multifd-compression",
          toml="multifd_compression", metavar="CODEC", choices=COMPRESSIONS,
          label="multifd compression"),
    _level("zlib"),
    _level("zstd"),
    # postcopy: QEMU's postcopy-ram, when to switch, the push after it
    Field("postcopy", "postcopy", False, read_flag,
          "pure post-copy: switch at once, only the vCPU state moves before the guest runs "
          "on the destination (--postcopy-after 0)", flag="--postcopy",
          into=lambda on: {"postcopy_after_rounds": 0} if on else {}),
    Field("postcopy_after", "postcopy", None, postcopy_after,
          "hybrid: switch to post-copy after N live rounds (guestperf's post_copy_iters), or "
          "with a unit (1.5s, 500ms) that long after the start; off: never",
          flag="--postcopy-after", toml="postcopy_after", metavar="N|DURATION",
          label="switch to post-copy after", into=postcopy_fields),
    Field("postcopy_after_rounds", "postcopy", None, optional(whole()),
          "switch to post-copy after this many live rounds (0: pure post-copy)"),
    Field("postcopy_after_seconds", "postcopy", None, optional(seconds_or_zero),
          "switch to post-copy this long after the start"),
    Field("postcopy_allowed", "postcopy", False, read_flag,
          "QEMU's postcopy-ram capability (implied by the two above): `migbed "
          "migrate-postcopy GUEST` (or a policy) may switch the running migration",
          flag="--postcopy-allowed", toml="postcopy_allowed"),
    Field("postcopy_bandwidth_bytes_per_second", "postcopy", None,
          parse_bandwidth_or_unlimited,
          "the background push's limit after the switch, e.g. 64MiB (QEMU's "
          "max-postcopy-bandwidth; default unlimited); requested pages always go at once",
          flag="--postcopy-bandwidth", toml="postcopy_bandwidth", metavar="RATE",
          label="post-copy push (MiB/s)", scale=MiB),
    Field("postcopy_preempt", "postcopy", False, read_flag,
          "after the switch, send requested pages on a connection of their own, ahead of "
          "the background push (QEMU 8.0+'s postcopy-preempt)", flag="--postcopy-preempt",
          toml="postcopy_preempt", label="post-copy preempt"),
    # checks: what a run injects and checks
    Field("faults", "checks", (), read_fault,
          f"inject a fault, e.g. stall-link@round1:2s, kill-destination@{Phase.STOP_AND_COPY}"
          ", slow-link@round0:1MiB (repeatable; `migbed fault list` shows them all)",
          flag="--fault", metavar="KIND@STAGE[:ARG]"),
    Field("verify", "checks", True, read_flag,
          "skip the destination-equals-source memory check (in a scenario: verify = false)",
          flag="--no-verify", toml="verify"),
    Field("cancel_after_round", "checks", None, optional(whole()),
          "cancel the migration after live round N (tests the abort path)",
          flag="--cancel-after-round", toml="cancel_after_round", metavar="N"),
)


def rows_of(section: str) -> tuple[Field, ...]:
    """The fields (composites aside) a section holds, in the table's order."""
    return tuple(f for f in MIGRATION_FIELDS if f.section == section and f.is_field)


def settings_section(name: str) -> Callable[[type], type]:
    """Make a class a frozen section of a migration's settings: its fields are the table's
    rows of section `name` (name, default), so a new row needs no edit here; the class body
    holds the section's check (`__post_init__`)."""
    def build(cls: type) -> type:
        rows = rows_of(name)
        cls.__annotations__ = {f.name: Any for f in rows}
        for f in rows:
            setattr(cls, f.name, f.value)
        return dataclass(frozen=True)(cls)
    return build
