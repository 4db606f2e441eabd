"""The settings a sweep scenario fixes or sweeps (its knobs): where each lives (the guest,
its workload, the migration's settings), how its TOML value is read, and how a plot labels
it; and the convergence aids an `aid` axis chooses between.

Values are read by the parsers of `nodes.units` (the CLI's own), so a value means the same in
a scenario as on the command line; the readers here cover what TOML types they do not.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from nodes.errors import ConfigError
from nodes.migration.settings import MigrationSettings
from nodes.units import (
    parse_bandwidth_or_unlimited,
    parse_count,
    parse_fraction,
    parse_positive_size,
    parse_rounds_or_duration,
    parse_seconds,
)
from workloads.spec import parse_rate

MiB = 1024 * 1024

# The convergence aids an `aid` axis chooses between, each as the MigrationSettings fields it
# sets: a non-converging guest run with and without each, side by side.
AIDS: dict[str, dict] = {
    "none": {},
    "auto-converge": {"auto_converge": True},                       # QEMU's defaults
    "dirty-limit": {"dirty_limit_bytes_per_second": 20e6},          # 20 MB/s per vCPU
    "pause-after-5s": {"completion_timeout_seconds": 5.0, "on_timeout": "pause"},
}


# -- how each setting is read: TOML types the units parsers do not cover ------------------------
def read_string(v, what: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{what} must be a string, got {v!r}")
    return v


def _flag(v, what: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{what} must be true or false, got {v!r}")
    return v


def _dirty_rate(v, what: str) -> float:
    try:
        return parse_rate(v)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


_seconds_or_zero = partial(parse_seconds, allow_zero=True)
POSTCOPY_OFF = "off"


def _postcopy_after(v, what: str) -> int | str:
    """When to switch to post-copy, as the scenario writes it: a number of live rounds, a
    duration ("1.5s", kept as written canonically), or "off" (pre-copy only)."""
    if isinstance(v, str) and v.strip().lower() in (POSTCOPY_OFF, "never", "none"):
        return POSTCOPY_OFF
    rounds, seconds = parse_rounds_or_duration(v, what)
    return rounds if rounds is not None else f"{seconds:g}s"


def postcopy_fields(value: int | str) -> dict:
    """The MigrationSettings fields of a `postcopy_after` value."""
    if value == POSTCOPY_OFF:
        return {"postcopy_after_rounds": None, "postcopy_after_seconds": None}
    rounds, seconds = parse_rounds_or_duration(value, "postcopy_after")
    return {"postcopy_after_rounds": rounds, "postcopy_after_seconds": seconds}


def settings_postcopy_after(mig: MigrationSettings) -> int | str:
    if mig.postcopy_after_rounds is not None:
        return mig.postcopy_after_rounds
    if mig.postcopy_after_seconds is not None:
        return f"{mig.postcopy_after_seconds:g}s"
    return POSTCOPY_OFF


def _optional(parse: Callable) -> Callable:
    """A value or "off" (also "none", "unlimited"): None, the setting left off."""
    def read(v, what: str):
        if isinstance(v, str) and v.strip().lower() in ("off", "none", "unlimited"):
            return None
        return parse(v, what)
    return read


def _percent(hi: int) -> Callable:
    return lambda v, what: parse_count(v, what, 1, hi)


def _aid(v, what: str) -> str:
    if v not in AIDS:
        raise ConfigError(f"{what}: {v!r} is not an aid; use one of {', '.join(AIDS)}")
    return v


@dataclass(frozen=True)
class Knob:
    """A setting a scenario fixes or sweeps: where it lives and how it is read."""

    section: str                  # guest | workload | migration
    field: str                    # field of Scenario / WorkloadSpec / MigrationSettings
    parse: Callable
    label: str                    # axis label, with the unit the plot shows
    scale: float = 1.0            # plotted value = value / scale


# The convergence aids (`nodes.migration.convergence`): fixed in [migration] or swept; `aid`
# (axes only) sets a whole aid at once, from AIDS above.
CONVERGENCE_KNOBS: dict[str, Knob] = {
    "auto_converge": Knob("migration", "auto_converge", _flag, "auto-converge"),
    "throttle_initial": Knob("migration", "throttle_initial", _percent(99),
                             "initial throttle (%)"),
    "throttle_increment": Knob("migration", "throttle_increment", _percent(99),
                               "throttle step (%)"),
    "max_throttle": Knob("migration", "max_throttle", _percent(99), "max throttle (%)"),
    "throttle_trigger_threshold": Knob("migration", "throttle_trigger_threshold",
                                       _percent(100), "trigger threshold (%)"),
    "throttle_tailslow": Knob("migration", "throttle_tailslow", _flag, "tailslow"),
    "dirty_limit": Knob("migration", "dirty_limit_bytes_per_second",
                        parse_bandwidth_or_unlimited, "dirty limit (MB/s)", 1e6),
    "dirty_limit_period": Knob("migration", "dirty_limit_period_seconds", parse_seconds,
                               "dirty-limit period (s)"),
    "completion_timeout": Knob("migration", "completion_timeout_seconds",
                               _optional(parse_seconds), "completion timeout (s)"),
    "on_timeout": Knob("migration", "on_timeout", read_string, "on timeout"),
    "progress_timeout": Knob("migration", "progress_timeout_seconds",
                             _optional(parse_seconds), "progress timeout (s)"),
    "aid": Knob("aid", "aid", _aid, "convergence aid"),
}

# TOML key -> knob. In [axes] the guest's memory is called guest_memory.
KNOBS: dict[str, Knob] = {
    "guest_memory": Knob("guest", "guest_memory_bytes", parse_positive_size,
                         "guest memory (MiB)", MiB),
    "mode": Knob("guest", "mode", read_string, "guest mode"),
    "pattern": Knob("workload", "pattern", read_string, "workload"),
    "dirty_rate": Knob("workload", "rate_pages_per_second", _dirty_rate,
                       "dirty rate (page writes/s)"),
    "hot_fraction": Knob("workload", "hot_fraction", parse_fraction,
                         "hot set (fraction of memory)"),
    "hot_share": Knob("workload", "hot_share", parse_fraction,
                      "writes to the hot set (fraction)"),
    "busy_seconds": Knob("workload", "busy_seconds", parse_seconds, "busy phase (s)"),
    "quiet_seconds": Knob("workload", "quiet_seconds", _seconds_or_zero, "quiet phase (s)"),
    "quiet_rate_fraction": Knob("workload", "quiet_rate_fraction", parse_fraction,
                                "quiet rate (fraction)"),
    "write_bytes": Knob("workload", "write_bytes", parse_positive_size,
                        "bytes rewritten per page write"),
    "fill": Knob("workload", "fill", read_string, "memory content"),
    "policy": Knob("migration", "policy", read_string, "policy"),
    "bandwidth": Knob("migration", "link_bytes_per_second", parse_bandwidth_or_unlimited,
                      "link bandwidth (MiB/s)", MiB),
    "rate_limit": Knob("migration", "rate_limit_bytes_per_second",
                       parse_bandwidth_or_unlimited, "rate limit (MiB/s)", MiB),
    "latency": Knob("migration", "latency_seconds", _seconds_or_zero, "latency (s)"),
    "downtime_limit": Knob("migration", "downtime_limit_seconds", parse_seconds,
                           "downtime limit (s)"),
    "max_iterations": Knob("migration", "max_iterations", parse_count, "live round cap"),
    **CONVERGENCE_KNOBS,
    "zero_page_detection": Knob("migration", "zero_page_detection", read_string,
                                "zero-page detection"),
    "xbzrle_cache": Knob("migration", "xbzrle_cache_bytes", parse_positive_size,
                         "XBZRLE cache (MiB)", MiB),
    "multifd_channels": Knob("migration", "multifd_channels", partial(parse_count, minimum=1),
                             "multifd channels"),
    "multifd_compression": Knob("migration", "multifd_compression", read_string,
                                "multifd compression"),
    # a pseudo-field: `postcopy_fields` turns it into the settings' two
    "postcopy_after": Knob("migration", "postcopy_after", _postcopy_after,
                           "switch to post-copy after"),
    "postcopy_bandwidth": Knob("migration", "postcopy_bandwidth_bytes_per_second",
                               parse_bandwidth_or_unlimited, "post-copy push (MiB/s)", MiB),
}
OFF_WHEN_ABSENT = {"max_iterations", "xbzrle_cache", "multifd_channels"}   # None: not set
FIXED_ONLY = {"migration": {"timeout": ("timeout_seconds", parse_seconds),
                             "verify": ("verify", _flag),
                             "postcopy_allowed": ("postcopy_allowed", _flag)},
               "guest": {"warmup": ("warmup_seconds", _seconds_or_zero)}}
SECTION_KEYS = {  # TOML key in its section -> knob name
    "guest": {"memory": "guest_memory", "mode": "mode"},
    "workload": {k: k for k, kn in KNOBS.items() if kn.section == "workload"},
    "migration": {k: k for k, kn in KNOBS.items() if kn.section == "migration"},
}
