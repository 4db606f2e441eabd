"""A sweep scenario: the fixed settings, the axes to sweep and how to plot them, read from
and written back to TOML.

Scenario file layout (sizes and durations as in the CLI: "64MiB", "300ms"):

    name = "dirty-rate-vs-bandwidth"
    description = "..."
    repeats = 2
    seed = 1                      # workload seed of repeat r is seed + r
    faults = ["stall-link@round1:2s"]   # optional, injected into every run
    [cluster]   hosts = 2, host_memory = "512MiB", hosts_per_node = 1 (default: all on one)
    [guest]     memory = "64MiB", mode = "p2m", warmup = "300ms", vcpu = "auto" (or
                "process", "thread"), vcpus = 1
    [workload]  pattern, dirty_rate (page writes/s or "max"), hot_fraction, hot_share,
                write_bytes, fill ("zero", "random" or "text"), ...
    [migration] policy, bandwidth ("128MiB" per second or "unlimited"), rate_limit, latency,
                downtime_limit, max_iterations, timeout, verify, zero_page_detection,
                xbzrle_cache ("64MiB"), multifd_channels, multifd_compression, postcopy_after
                (a number of live rounds, 0 for pure post-copy, a duration such as "1.5s", or
                "off"), postcopy_bandwidth, postcopy_allowed, the convergence aids: every
                key of the README's option table (`cluster.fieldtable`)
    [axes]      any of guest_memory, mode, vcpu, vcpus, pattern, dirty_rate, hot_fraction, hot_share,
                write_bytes, fill, policy, zero_page_detection, xbzrle_cache,
                multifd_channels, multifd_compression, bandwidth, rate_limit, latency,
                downtime_limit, max_iterations, postcopy_after, postcopy_bandwidth = [...]
    [plot]      x = "dirty_rate" (the axis on the x axis), rounds_point = 0

Each setting (knob) and how its value is read is in `cluster.sweep.knobs`.
"""

import itertools
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomli_w

from cluster.sweep.knobs import (
    AIDS,
    FIXED_ONLY,
    KNOBS,
    OFF_WHEN_ABSENT,
    SECTION_KEYS,
    MiB,
    postcopy_fields,
    read_string,
    settings_postcopy_after,
)
from cluster.sweep.text import show
from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.units import parse_count, parse_positive_size
from workloads.spec import WorkloadSpec

_TOP_KEYS = {"name", "description", "repeats", "seed", "cluster", "guest", "workload",
             "migration", "axes", "plot", "faults"}


DEFAULT_GUEST_MEMORY = 64 * MiB


# -- the scenario ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """A sweep: fixed settings, axes (knob name, values) and how to plot. All values in base
    units (bytes, seconds, page writes per second); None rates mean unlimited."""

    name: str
    description: str = ""
    repeats: int = 1
    seed: int = 0
    hosts: int = 2
    host_memory_bytes: int = 512 * MiB
    hosts_per_node: int | None = None       # None: all on one Ray node (`cluster.launch.placement`)
    guest_memory_bytes: int = 64 * MiB     # DEFAULT_GUEST_MEMORY (a trace's: from its trace)
    mode: str = "p2m"
    warmup_seconds: float = 0.3
    vcpu: str = "auto"                      # what runs the guest's vCPUs (GuestSpec.vcpu)
    vcpus: int = 1
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    axes: tuple[tuple[str, tuple], ...] = ()
    x_axis: str | None = None
    rounds_point: int = 0

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"scenario name {self.name!r} must be letters, digits, '-', "
                              "'_' or '.' (it names the results folder)")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.hosts < 2:
            raise ConfigError(f"a sweep needs at least 2 hosts, got {self.hosts}")
        if self.hosts_per_node is not None and self.hosts_per_node < 1:
            raise ConfigError(f"[cluster] hosts_per_node must be >= 1, got "
                              f"{self.hosts_per_node}")
        if self.warmup_seconds < 0:
            raise ConfigError("warmup must be >= 0")
        self._check_axes()
        for i, point in enumerate(self.points()):   # every point must make valid specs
            try:
                self.specs(point)
            except ConfigError as exc:
                where = ", ".join(f"{k} = {show(v)}" for k, v in point.items())
                raise ConfigError(f"point {i} ({where}): {exc}") from None

    def _check_axes(self) -> None:
        names = [a for a, _ in self.axes]
        if len(set(names)) != len(names):
            raise ConfigError("an axis is named twice")
        for name, values in self.axes:
            if name not in KNOBS:
                raise ConfigError(f"unknown axis {name!r}; sweepable: {', '.join(KNOBS)}")
            if not values:
                raise ConfigError(f"axis {name} has no values")
        if self.x_axis is not None and self.x_axis not in names:
            raise ConfigError(f"[plot] x = {self.x_axis!r} is not one of the axes "
                              f"({', '.join(names) or 'none'})")
        if not 0 <= self.rounds_point < max(1, self.point_count):
            raise ConfigError(f"[plot] rounds_point must be 0..{self.point_count - 1}")

    # -- the grid --------------------------------------------------------------------------
    @property
    def point_count(self) -> int:
        return math.prod(len(v) for _, v in self.axes) if self.axes else 1

    @property
    def x(self) -> str | None:
        """The axis on the plots' x axis: [plot] x, else the first axis."""
        return self.x_axis or (self.axes[0][0] if self.axes else None)

    def points(self) -> list[dict]:
        names = [a for a, _ in self.axes]
        return [dict(zip(names, combo, strict=True))
                for combo in itertools.product(*(v for _, v in self.axes))]

    def series(self) -> list[dict]:
        """Every combination of the axes other than x: one curve each on the plots."""
        others = [(k, v) for k, v in self.axes if k != self.x]
        return [dict(zip([k for k, _ in others], combo, strict=True))
                for combo in itertools.product(*(v for _, v in others))]

    def specs(self, point: dict, repeat: int = 0
              ) -> tuple[GuestSpec, MigrationSettings]:
        """The guest and migration settings of one run."""
        guest = {"guest_memory_bytes": self.guest_memory_bytes, "mode": self.mode,
                 "vcpu": self.vcpu, "vcpus": self.vcpus}
        wl: dict = {"seed": self.seed + repeat}
        mig: dict = {}
        for name, value in point.items():
            knob = KNOBS[name]
            if knob.section == "aid":
                mig.update(AIDS[value])
                continue
            {"guest": guest, "workload": wl, "migration": mig}[knob.section][knob.field] = value
        if "postcopy_after" in mig:
            mig.update(postcopy_fields(mig.pop("postcopy_after")))
        workload = replace(self.workload, **wl)
        settings = replace(self.migration, **mig)
        if workload.pattern == "trace" and guest["guest_memory_bytes"] == DEFAULT_GUEST_MEMORY:
            guest["guest_memory_bytes"] = 0     # a trace's guest: sized from its trace
        spec = GuestSpec(name="sweep", memory_bytes=guest["guest_memory_bytes"],
                         mode=guest["mode"], workload=workload, vcpu=guest["vcpu"],
                         vcpus=guest["vcpus"])
        return spec, settings

    def with_repeats(self, repeats: int) -> "Scenario":
        return replace(self, repeats=repeats)

    # -- (de)serialisation: one dict layout, the TOML file's ---------------------------------
    def to_dict(self) -> dict:
        wl, mig = self.workload, self.migration
        d: dict = {"name": self.name, "description": self.description,
                   "repeats": self.repeats, "seed": self.seed,
                   "cluster": {"hosts": self.hosts, "host_memory": self.host_memory_bytes,
                               **({"hosts_per_node": self.hosts_per_node}
                                  if self.hosts_per_node is not None else {})},
                   "guest": {"memory": self.guest_memory_bytes, "mode": self.mode,
                             "warmup": self.warmup_seconds,
                             **({"vcpu": self.vcpu, "vcpus": self.vcpus}
                                if (self.vcpu, self.vcpus) != ("auto", 1) else {})}}
        d["workload"] = {k: getattr(wl, KNOBS[k].field) for k in SECTION_KEYS["workload"]}
        d["migration"] = {}
        for k in SECTION_KEYS["migration"]:
            if k == "postcopy_after":
                d["migration"][k] = settings_postcopy_after(mig)
                continue
            value = getattr(mig, KNOBS[k].field)
            if value is None and k in OFF_WHEN_ABSENT:
                continue
            d["migration"][k] = "unlimited" if value is None else value
        for k, (name, _) in FIXED_ONLY["migration"].items():   # timeout, verify, ...
            if getattr(mig, name) is not None:
                d["migration"][k] = getattr(mig, name)
        if mig.faults:
            d["faults"] = [f.to_text() for f in mig.faults]
        d["axes"] = {name: ["unlimited" if v is None else v for v in values]
                     for name, values in self.axes}
        d["plot"] = {"rounds_point": self.rounds_point}
        if self.x_axis is not None:
            d["plot"]["x"] = self.x_axis
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scenario":
        return _build(d)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> "Scenario":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}") from None
        return _build(data)


def load_scenario(path: str | Path) -> Scenario:
    """A scenario file; any problem is a ConfigError of one line naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc.strerror or exc}") from None
    try:
        return Scenario.from_toml(text)
    except (TypeError, ValueError) as exc:     # ConfigError is a ValueError
        raise ConfigError(f"{path}: {exc}") from None


# -- reading the TOML layout -----------------------------------------------------------------
def _table(d: dict, key: str) -> dict:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _no_unknown(table: dict, allowed, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known: "
                          f"{', '.join(sorted(allowed))}")


def _build(d: dict) -> Scenario:
    if not isinstance(d, dict):
        raise ConfigError("a scenario is a table of settings")
    _no_unknown(d, _TOP_KEYS, "the scenario")
    if "name" not in d:
        raise ConfigError("the scenario needs a name (name = \"...\")")
    kw: dict = {"name": read_string(d["name"], "name"),
                "description": read_string(d.get("description", ""), "description"),
                "repeats": parse_count(d.get("repeats", 1), "repeats", 1),
                "seed": parse_count(d.get("seed", 0), "seed")}
    kw.update(_cluster(_table(d, "cluster")))
    kw.update(_fixed(d))
    kw["axes"] = _axes(_table(d, "axes"))
    kw.update(_plot(_table(d, "plot")))
    return Scenario(**kw)


def _cluster(cl: dict) -> dict:
    _no_unknown(cl, {"hosts", "host_memory", "hosts_per_node"}, "[cluster]")
    kw: dict = {}
    if "hosts" in cl:
        kw["hosts"] = parse_count(cl["hosts"], "[cluster] hosts")
    if "hosts_per_node" in cl:
        kw["hosts_per_node"] = parse_count(cl["hosts_per_node"], "[cluster] hosts_per_node", 1)
    if "host_memory" in cl:
        kw["host_memory_bytes"] = parse_positive_size(cl["host_memory"], "[cluster] host_memory")
    return kw


def _fixed(d: dict) -> dict:
    """The [guest], [workload] and [migration] settings (and `faults`) every run shares."""
    values: dict[str, dict] = {"guest": {}, "workload": {}, "migration": {}}
    for sec in values:
        table = _table(d, sec)
        _no_unknown(table, set(SECTION_KEYS[sec]) | set(FIXED_ONLY.get(sec, {})), f"[{sec}]")
        for key, raw in table.items():
            if key in FIXED_ONLY.get(sec, {}):
                fname, parse = FIXED_ONLY[sec][key]
            else:
                knob = KNOBS[SECTION_KEYS[sec][key]]
                fname, parse = knob.field, knob.parse
            values[sec][fname] = parse(raw, f"[{sec}] {key}")
    if "postcopy_after" in values["migration"]:
        values["migration"].update(postcopy_fields(values["migration"].pop("postcopy_after")))
    kw = dict(values["guest"])   # guest_memory_bytes, mode, warmup_seconds
    kw["workload"] = WorkloadSpec(**values["workload"])
    if "faults" in d:   # injected into every run, e.g. faults = ["stall-link@round1:2s"]
        from nodes.faults.spec import faults_from_toml
        values["migration"]["faults"] = faults_from_toml(d["faults"])
    kw["migration"] = MigrationSettings(**values["migration"])
    return kw


def _axes(table: dict) -> tuple[tuple[str, tuple], ...]:
    axes = []
    for name, raw in table.items():
        if name not in KNOBS:
            raise ConfigError(f"unknown axis {name!r} in [axes]; sweepable: {', '.join(KNOBS)}")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"[axes] {name} must be a non-empty list of values")
        axes.append((name, tuple(KNOBS[name].parse(v, f"[axes] {name}") for v in raw)))
    return tuple(axes)


def _plot(plot: dict) -> dict:
    _no_unknown(plot, {"x", "rounds_point"}, "[plot]")
    kw: dict = {}
    if "x" in plot:
        kw["x_axis"] = read_string(plot["x"], "[plot] x")
    if "rounds_point" in plot:
        kw["rounds_point"] = parse_count(plot["rounds_point"], "[plot] rounds_point")
    return kw
