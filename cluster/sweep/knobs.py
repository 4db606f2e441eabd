"""The settings a sweep scenario fixes or sweeps (its knobs), generated from the field table
(`cluster.fieldtable`): where each lives (the guest, its workload, the migration's settings),
how its TOML value is read, and how a plot labels it; and the convergence aids an `aid` axis
chooses between.

A row's reader is the CLI's own, so a value means the same in a scenario as on the command
line.
"""

from collections.abc import Callable
from dataclasses import dataclass

from cluster.fieldtable import GUEST_FIELDS, WORKLOAD_FIELDS
from nodes.errors import ConfigError
from nodes.migration.fields import (
    MIGRATION_FIELDS,
    Field,
    MiB,
    postcopy_fields,
    read_string,
    settings_postcopy_after,
)

__all__ = ["AIDS", "FIXED_ONLY", "KNOBS", "OFF_WHEN_ABSENT", "SECTION_KEYS", "Knob", "MiB",
           "postcopy_fields", "read_string", "settings_postcopy_after"]

# The convergence aids an `aid` axis chooses between, each as the MigrationSettings fields it
# sets: a non-converging guest run with and without each, side by side.
AIDS: dict[str, dict] = {
    "none": {},
    "auto-converge": {"auto_converge": True},                       # QEMU's defaults
    "dirty-limit": {"dirty_limit_bytes_per_second": 20e6},          # 20 MB/s per vCPU
    "pause-after-5s": {"completion_timeout_seconds": 5.0, "on_timeout": "pause"},
    # ... and post-copy, the other way to finish (issue 23's programs x algorithms sweep)
    "hybrid": {"postcopy_after_rounds": 1},
    "post-copy": {"postcopy_after_rounds": 0},
    # ... and XBZRLE, for a sweep of algorithms (scenarios/traces-vs-algorithms.toml)
    "xbzrle": {"xbzrle_cache_bytes": 64 * 1024 * 1024},             # QEMU's default cache
}


def _aid(v, what: str) -> str:
    if v not in AIDS:
        raise ConfigError(f"{what}: {v!r} is not an aid; use one of {', '.join(AIDS)}")
    return v


@dataclass(frozen=True)
class Knob:
    """A setting a scenario fixes or sweeps: where it lives and how it is read."""

    section: str                  # guest | workload | migration (its TOML table) | aid
    field: str                    # field of Scenario / WorkloadSpec / MigrationSettings
    parse: Callable
    label: str                    # axis label, with the unit the plot shows
    scale: float = 1.0            # plotted value = value / scale


# The rows of the field table a scenario reads, by its TOML table.
TABLES: dict[str, tuple[Field, ...]] = {"guest": GUEST_FIELDS, "workload": WORKLOAD_FIELDS,
                                         "migration": MIGRATION_FIELDS}


def _knobs() -> dict[str, Knob]:
    """Knob name -> knob: every row with an axis label, then `aid` (axes only, a whole
    convergence aid at once from AIDS)."""
    knobs = {f.knob: Knob(table, f.name, f.read, f.label, f.scale)
             for table, rows in TABLES.items() for f in rows if f.knob}
    knobs["aid"] = Knob("aid", "aid", _aid, "convergence aid")
    return knobs


KNOBS: dict[str, Knob] = _knobs()
# None is left out of a written scenario for these (else it is written "unlimited").
OFF_WHEN_ABSENT = {f.knob for rows in TABLES.values() for f in rows if f.off_when_absent}
# In a scenario's table but not an axis: TOML key -> (field, reader).
FIXED_ONLY = {table: {f.toml: (f.name, f.read) for f in rows if f.toml and not f.label}
              for table, rows in TABLES.items()}
# TOML key in its table -> knob name (in [axes] the guest's memory is called guest_memory).
SECTION_KEYS = {table: {f.toml: f.knob for f in rows if f.knob}
                for table, rows in TABLES.items()}
