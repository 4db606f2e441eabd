"""`migbed sweep`: a grid of migrations described by a scenario file, with the model beside
every measurement (like QEMU guestperf's batch mode).

A scenario (TOML, parsed into the frozen `Scenario`) names the fixed settings and the axes to
sweep; every point of the grid is migrated `repeats` times on one cluster, from the first
host to the second, each run on a fresh guest. Before the grid, the sweep measures the
downtime floor of an idle guest of each size (what migbed adds to every downtime: hand-over,
vCPU context, resume) and gives it to the model as its fixed T_resume, so predicted
downtimes are comparable with measured ones.

Out come: one JSON per run (the report, its scenario and point, the predictions), a CSV of
every run (failed runs included, never dropped), a summary (agreement table: measured over
predicted pages sent, live rounds and downtime per point, and why they differ where they
differ by more than 20 %), and PNG plots (`cluster.plots`).

Scenario file layout (sizes and durations as in the CLI: "64MiB", "300ms"):

    name = "dirty-rate-vs-bandwidth"
    description = "..."
    repeats = 2
    seed = 1                      # workload seed of repeat r is seed + r
    [cluster]   hosts = 2, host_memory = "512MiB"
    [guest]     memory = "64MiB", mode = "p2m", warmup = "300ms"
    [workload]  pattern, dirty_rate (page writes/s or "max"), hot_fraction, hot_share, ...
    [migration] policy, bandwidth ("128MiB" per second or "unlimited"), rate_limit, latency,
                downtime_limit, max_iterations, timeout
    [axes]      any of guest_memory, mode, pattern, dirty_rate, hot_fraction, hot_share,
                policy, bandwidth, rate_limit, latency, downtime_limit, max_iterations = [...]
    [plot]      x = "dirty_rate" (the axis on the x axis), rounds_point = 0
"""

import csv
import itertools
import json
import math
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from nodes.errors import ConfigError, MigbedError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.units import format_bytes, parse_duration, parse_size
from workloads.spec import WorkloadSpec, parse_rate

MiB = 1024 * 1024
AGREEMENT_TOLERANCE = 0.2       # measured/predicted outside 1 +- this is flagged
CALIBRATION_WARMUPS = 2          # the first migrations of a fresh testbed pay one-time costs
CALIBRATION_RUNS = 3             # (imports, first calls) of ~10 ms: not part of the floor
CURVE_POINTS = 40
JITTER_FLOOR_SECONDS = 0.001     # downtimes closer than this are equal (the vCPU ticks at 1 ms)


# -- values: how each setting is read from TOML and written back ------------------------------
def _size(v, what):
    n = parse_size(v, what)
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {v!r}")
    return n


def _rate_or_unlimited(v, what):
    if isinstance(v, str) and v.strip().lower() in ("unlimited", "none", "off"):
        return None
    n = parse_size(v, what) if not isinstance(v, float) else v
    if not n > 0:
        raise ConfigError(f"{what} must be positive (per second) or \"unlimited\", got {v!r}")
    return float(n)


def _duration(v, what):
    return parse_duration(v, what)


def _number(v, what):
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{what} must be a number, got {v!r}")
    return float(v)


def _integer(v, what):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{what} must be a whole number, got {v!r}")
    return v


def _text(v, what):
    if not isinstance(v, str):
        raise ConfigError(f"{what} must be a string, got {v!r}")
    return v


def _boolean(v, what):
    if not isinstance(v, bool):
        raise ConfigError(f"{what} must be true or false, got {v!r}")
    return v


def _dirty_rate(v, what):
    try:
        return parse_rate(v)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Knob:
    """A setting a scenario fixes or sweeps: where it lives and how it is read."""

    section: str                  # guest | workload | migration
    field: str                    # field of Scenario / WorkloadSpec / MigrationSettings
    parse: Callable
    label: str                    # axis label, with the unit the plot shows
    scale: float = 1.0            # plotted value = value / scale


# TOML key -> knob. In [axes] the guest's memory is called guest_memory.
KNOBS: dict[str, Knob] = {
    "guest_memory": Knob("guest", "guest_memory_bytes", _size, "guest memory (MiB)", MiB),
    "mode": Knob("guest", "mode", _text, "guest mode"),
    "pattern": Knob("workload", "pattern", _text, "workload"),
    "dirty_rate": Knob("workload", "rate_pages_per_second", _dirty_rate,
                       "dirty rate (page writes/s)"),
    "hot_fraction": Knob("workload", "hot_fraction", _number, "hot set (fraction of memory)"),
    "hot_share": Knob("workload", "hot_share", _number, "writes to the hot set (fraction)"),
    "busy_seconds": Knob("workload", "busy_seconds", _duration, "busy phase (s)"),
    "quiet_seconds": Knob("workload", "quiet_seconds", _duration, "quiet phase (s)"),
    "quiet_rate_fraction": Knob("workload", "quiet_rate_fraction", _number,
                                "quiet rate (fraction)"),
    "policy": Knob("migration", "policy", _text, "policy"),
    "bandwidth": Knob("migration", "link_bytes_per_second", _rate_or_unlimited,
                      "link bandwidth (MiB/s)", MiB),
    "rate_limit": Knob("migration", "rate_limit_bytes_per_second", _rate_or_unlimited,
                       "rate limit (MiB/s)", MiB),
    "latency": Knob("migration", "latency_seconds", _duration, "latency (s)"),
    "downtime_limit": Knob("migration", "downtime_limit_seconds", _duration,
                           "downtime limit (s)"),
    "max_iterations": Knob("migration", "max_iterations", _integer, "live round cap"),
}
_FIXED_ONLY = {"migration": {"timeout": ("timeout_seconds", _duration),
                             "verify": ("verify", _boolean)},
               "guest": {"warmup": ("warmup_seconds", _duration)}}
_SECTION_KEYS = {  # TOML key in its section -> knob name
    "guest": {"memory": "guest_memory", "mode": "mode"},
    "workload": {k: k for k, kn in KNOBS.items() if kn.section == "workload"},
    "migration": {k: k for k, kn in KNOBS.items() if kn.section == "migration"},
}


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
    guest_memory_bytes: int = 64 * MiB
    mode: str = "p2m"
    warmup_seconds: float = 0.3
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
        if self.warmup_seconds < 0:
            raise ConfigError("warmup must be >= 0")
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
        for i, point in enumerate(self.points()):   # every point must make valid specs
            try:
                self.specs(point)
            except ConfigError as exc:
                where = ", ".join(f"{k} = {_show(v)}" for k, v in point.items())
                raise ConfigError(f"point {i} ({where}): {exc}") from None

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

    def specs(self, point: dict, repeat: int = 0
              ) -> tuple[GuestSpec, MigrationSettings]:
        """The guest and migration settings of one run."""
        guest = {"guest_memory_bytes": self.guest_memory_bytes, "mode": self.mode}
        wl: dict = {"seed": self.seed + repeat}
        mig: dict = {}
        for name, value in point.items():
            knob = KNOBS[name]
            {"guest": guest, "workload": wl, "migration": mig}[knob.section][knob.field] = value
        workload = replace(self.workload, **wl)
        settings = replace(self.migration, **mig)
        spec = GuestSpec(name="sweep", memory_bytes=guest["guest_memory_bytes"],
                         mode=guest["mode"], workload=workload)
        return spec, settings

    def with_repeats(self, repeats: int) -> "Scenario":
        return replace(self, repeats=repeats)

    # -- (de)serialisation: one dict layout, the TOML file's ---------------------------------
    def to_dict(self) -> dict:
        wl, mig = self.workload, self.migration
        d: dict = {"name": self.name, "description": self.description,
                   "repeats": self.repeats, "seed": self.seed,
                   "cluster": {"hosts": self.hosts, "host_memory": self.host_memory_bytes},
                   "guest": {"memory": self.guest_memory_bytes, "mode": self.mode,
                             "warmup": self.warmup_seconds}}
        d["workload"] = {k: getattr(wl, KNOBS[k].field) for k in _SECTION_KEYS["workload"]}
        d["migration"] = {}
        for k in _SECTION_KEYS["migration"]:
            value = getattr(mig, KNOBS[k].field)
            if value is None and k == "max_iterations":
                continue
            d["migration"][k] = "unlimited" if value is None else value
        d["migration"]["timeout"] = mig.timeout_seconds
        d["migration"]["verify"] = mig.verify
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
        return _toml(self.to_dict())

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
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


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
    top = {"name", "description", "repeats", "seed", "cluster", "guest", "workload",
           "migration", "axes", "plot", "faults"}
    _no_unknown(d, top, "the scenario")
    if "name" not in d:
        raise ConfigError("the scenario needs a name (name = \"...\")")
    kw: dict = {"name": _text(d["name"], "name"),
                "description": _text(d.get("description", ""), "description"),
                "repeats": _integer(d.get("repeats", 1), "repeats"),
                "seed": _integer(d.get("seed", 0), "seed")}
    cl = _table(d, "cluster")
    _no_unknown(cl, {"hosts", "host_memory"}, "[cluster]")
    if "hosts" in cl:
        kw["hosts"] = _integer(cl["hosts"], "[cluster] hosts")
    if "host_memory" in cl:
        kw["host_memory_bytes"] = _size(cl["host_memory"], "[cluster] host_memory")

    sections = {s: _table(d, s) for s in ("guest", "workload", "migration")}
    values: dict[str, dict] = {"guest": {}, "workload": {}, "migration": {}}
    for sec, table in sections.items():
        allowed = set(_SECTION_KEYS[sec]) | set(_FIXED_ONLY.get(sec, {}))
        _no_unknown(table, allowed, f"[{sec}]")
        for key, raw in table.items():
            what = f"[{sec}] {key}"
            if key in _FIXED_ONLY.get(sec, {}):
                fname, parse = _FIXED_ONLY[sec][key]
            else:
                knob = KNOBS[_SECTION_KEYS[sec][key]]
                fname, parse = knob.field, knob.parse
            values[sec][fname] = parse(raw, what)
    guest = values["guest"]
    for fname in ("guest_memory_bytes", "mode", "warmup_seconds"):
        if fname in guest:
            kw[fname] = guest[fname]
    if "seed" in values["workload"]:
        raise ConfigError("[workload] seed: set the scenario's seed at the top instead")
    kw["workload"] = WorkloadSpec(**values["workload"])
    if "faults" in d:   # injected into every run, e.g. faults = ["stall-link@round1:2s"]
        from nodes.faults.spec import faults_from_toml
        values["migration"]["faults"] = faults_from_toml(d["faults"])
    kw["migration"] = MigrationSettings(**values["migration"])

    axes = []
    for name, raw in _table(d, "axes").items():
        if name not in KNOBS:
            raise ConfigError(f"unknown axis {name!r} in [axes]; sweepable: {', '.join(KNOBS)}")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"[axes] {name} must be a non-empty list of values")
        axes.append((name, tuple(KNOBS[name].parse(v, f"[axes] {name}") for v in raw)))
    kw["axes"] = tuple(axes)
    plot = _table(d, "plot")
    _no_unknown(plot, {"x", "rounds_point"}, "[plot]")
    if "x" in plot:
        kw["x_axis"] = _text(plot["x"], "[plot] x")
    if "rounds_point" in plot:
        kw["rounds_point"] = _integer(plot["rounds_point"], "[plot] rounds_point")
    return Scenario(**kw)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def _toml(d: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())]
    return "\n".join(lines) + "\n"


def _show(v) -> str:
    if v is None:
        return "unlimited"
    return f"{v:g}" if isinstance(v, float) else str(v)


# -- running --------------------------------------------------------------------------------
@dataclass
class SweepResult:
    scenario: Scenario
    folder: Path
    rows: list[dict]
    agreement: list[dict]
    calibration: dict
    explanations: list[str]

    @property
    def failed_runs(self) -> int:
        return sum(1 for r in self.rows if r["status"] != "completed")

    def summary_text(self) -> str:
        return summary_text(self)


class ProgressBar:
    """A one-line progress bar on stderr (a line per run when stderr is not a terminal)."""

    def __init__(self, total: int, out=None, width: int = 30):
        out = out or sys.stderr
        self.total, self.out, self.width, self.done = total, out, width, 0
        self.tty = hasattr(out, "isatty") and out.isatty()

    def step(self, text: str) -> None:
        self.done += 1
        filled = self.width * self.done // max(1, self.total)
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {text}"
        if self.tty:
            print("\r" + bar[:150].ljust(150), end="", file=self.out, flush=True)
            if self.done == self.total:
                print(file=self.out)
        else:
            print(bar, file=self.out, flush=True)


def run_sweep(scenario: Scenario, output: str | Path | None = None, *, in_process: bool = False,
              plots: bool = True, testbed=None, progress_out=None) -> SweepResult:
    """Run every point of `scenario` `repeats` times on one cluster and write the results.
    `testbed`: use this one (needs the scenario's hosts); None starts one and closes it."""
    from cluster.launcher import ClusterSpec
    from cluster.testbed import Testbed
    progress_out = progress_out or sys.stderr
    folder = Path(output) if output else Path("results") / (
        f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        (folder / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {folder}: {exc.strerror or exc}") from None
    own = None
    if testbed is None:
        spec = ClusterSpec(hosts=scenario.hosts, host_memory_bytes=scenario.host_memory_bytes)
        where = "in-process hosts" if in_process else "a local Ray cluster"
        print(f"sweep {scenario.name}: starting {where} ({scenario.hosts} hosts of "
              f"{format_bytes(scenario.host_memory_bytes)})", file=progress_out, flush=True)
        own = testbed = Testbed.in_process(spec) if in_process else Testbed.local(spec)
    if len(testbed.hosts) < 2:
        raise ConfigError("a sweep needs a testbed of at least 2 hosts")
    src, dst = list(testbed.hosts)[:2]
    points = scenario.points()
    rows: list[dict] = []
    try:
        keys = sorted({_calibration_key(scenario, p) for p in points},
                      key=lambda k: tuple(-1 if v is None else v for v in k))
        bar = ProgressBar(len(keys) + len(points) * scenario.repeats, progress_out)
        calibration = {}
        for key in keys:
            calibration[key] = _calibrate(testbed, src, dst, scenario, key)
            bar.step(f"downtime floor, {_calibration_name(key)}: "
                     f"{_ms(calibration[key].get('floor_seconds'))}")
        for i, point in enumerate(points):
            for r in range(scenario.repeats):
                row = _run_one(testbed, src, dst, scenario, i, point, r,
                               calibration[_calibration_key(scenario, point)], folder)
                rows.append(row)
                bar.step(f"point {i} repeat {r}: {_point_text(point)} -> {row['status']}"
                         + (f" ({row['error']})" if row["error"] else ""))
    finally:
        if own is not None:
            own.close()
    agreement = agreement_table(scenario, rows)
    explanations = explain(scenario, rows, agreement, calibration)
    result = SweepResult(scenario, folder, rows, agreement,
                         {_calibration_name(k): v for k, v in calibration.items()},
                         explanations)
    _write_outputs(result, calibration, plots)
    return result


CalibrationKey = tuple[int, float, float | None, float | None]


def _calibration_name(key: CalibrationKey) -> str:
    memory, latency, link, limit = key
    return (f"idle {format_bytes(memory)} guest, link "
            f"{'unlimited' if link is None else format_bytes(link) + '/s'}"
            + (f", rate limit {format_bytes(limit)}/s" if limit else "")
            + f", latency {latency * 1000:g} ms")


def _calibration_key(scenario: Scenario, point: dict) -> CalibrationKey:
    spec, settings = scenario.specs(point)
    return (spec.memory_bytes, settings.latency_seconds, settings.link_bytes_per_second,
            settings.rate_limit_bytes_per_second)


def _calibrate(tb, src: str, dst: str, scenario: Scenario, key: CalibrationKey) -> dict:
    """The downtime floor of an idle guest of this size over this link: the model's
    T_resume is the floor less the one latency the model already counts. The link matters:
    over an unlimited link the sender runs up to the socket buffers (8 MiB) ahead of the
    receiver, and the stop-and-copy waits behind that backlog (measured ~3 ms more)."""
    memory, latency, link, limit = key
    name = f"sweep-idle-{memory // MiB}m"
    floors: list[float] = []
    error = None
    try:
        tb.create(src, GuestSpec(name, memory, scenario.mode))
        where = src
        for i in range(CALIBRATION_WARMUPS + CALIBRATION_RUNS):
            where = dst if where == src else src
            rep = tb.migrate(name, where, MigrationSettings(
                link_bytes_per_second=link, rate_limit_bytes_per_second=limit,
                latency_seconds=latency, timeout_seconds=scenario.migration.timeout_seconds))
            if rep.status != "completed" or rep.downtime_seconds is None:
                error = rep.error
            elif i >= CALIBRATION_WARMUPS:
                floors.append(rep.downtime_seconds)
    except MigbedError as exc:
        error = str(exc)
    finally:
        _destroy(tb, name)
    if not floors:
        return {"floor_seconds": None, "resume_seconds": 0.0, "samples": [],
                "error": error or "no idle migration completed"}
    floor = statistics.median(floors)
    return {"floor_seconds": floor, "resume_seconds": max(0.0, floor - latency),
            "samples": floors, "spread_seconds": max(floors) - min(floors), "error": error}


def _destroy(tb, name: str) -> None:
    try:
        tb.destroy(name)
    except MigbedError:
        pass


def _run_one(tb, src: str, dst: str, scenario: Scenario, index: int, point: dict, repeat: int,
             calib: dict, folder: Path) -> dict:
    from cluster.driver import model_block
    spec, settings = scenario.specs(point, repeat)
    name = f"sweep-{index}-{repeat}"
    spec = replace(spec, name=name)
    row: dict = {"scenario": scenario.name, "point": index, "repeat": repeat}
    row.update({f"axis_{k}": _show(v) for k, v in point.items()})
    row.update(status="failed", error=None)
    report = None
    achieved = None
    try:
        tb.create(src, spec)
        host = tb.host(src)
        before, t0 = host.call("guest_status", name).get("pages_written_total", 0), time.monotonic()
        time.sleep(scenario.warmup_seconds)
        after = host.call("guest_status", name).get("pages_written_total", 0)
        elapsed = time.monotonic() - t0
        achieved = (after - before) / elapsed if elapsed > 0 else None
        report = tb.migrate(name, dst, settings)
        row["status"], row["error"] = report.status, report.error
    except Exception as exc:  # noqa: BLE001 - a failed run is a row, never dropped
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        _destroy(tb, name)
    wl = spec.workload
    rate = achieved if wl.unlimited else None
    model = (model_block(report, wl.to_dict(), settings, calib["resume_seconds"], rate)
             if report is not None else None)
    row.update(_row_fields(spec, settings, report, model, achieved))
    run_file = folder / "runs" / f"point{index:03d}-repeat{repeat}.json"
    row["json"] = str(run_file.relative_to(folder))
    doc = {"scenario": scenario.to_dict(), "point": {k: _show(v) for k, v in point.items()},
           "repeat": repeat, "status": row["status"], "error": row["error"],
           "calibration": calib, "achieved_dirty_rate_pages_per_second": achieved,
           "report": report.to_dict() if report is not None else None, "model": model}
    run_file.write_text(json.dumps(doc, indent=2, default=_json_default))
    return row


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"cannot serialise {type(o).__name__}")


def _row_fields(spec: GuestSpec, settings: MigrationSettings, report, model: dict | None,
                achieved: float | None) -> dict:
    wl = spec.workload
    out = {"policy": settings.policy, "guest_memory_bytes": spec.memory_bytes,
           "pattern": wl.pattern, "dirty_rate_pages_per_second": wl.rate_pages_per_second,
           "achieved_dirty_rate_pages_per_second": achieved,
           "hot_fraction": wl.hot_fraction, "hot_share": wl.hot_share,
           "link_bytes_per_second": settings.link_bytes_per_second,
           "rate_limit_bytes_per_second": settings.rate_limit_bytes_per_second,
           "latency_seconds": settings.latency_seconds}
    meas = {"measured_throughput_bytes_per_second": None, "pages_sent_total": None,
            "live_rounds": None, "final_round_pages": None, "downtime_seconds": None,
            "guest_observed_downtime_seconds": None, "total_time_seconds": None,
            "stop_reason": None, "verified": None, "pages_skipped_total": None}
    if report is not None:
        final = [r for r in report.rounds if r.get("final")]
        meas.update(
            measured_throughput_bytes_per_second=(model or {}).get("bandwidth_bytes_per_second"),
            pages_sent_total=report.pages_sent_total, live_rounds=report.live_rounds,
            final_round_pages=final[-1]["pages_sent"] if final else None,
            downtime_seconds=report.downtime_seconds,
            guest_observed_downtime_seconds=report.guest_observed_downtime_seconds,
            total_time_seconds=report.total_time_seconds, stop_reason=report.stop_reason,
            verified=report.integrity.verified,
            pages_skipped_total=sum(r["pages_skipped"] for r in report.rounds))
    out.update(meas)
    for prefix, block in (("predicted", (model or {})),
                          ("nominal", ((model or {}).get("nominal") or {}))):
        pred = block.get("prediction") or {}
        out.update({
            f"{prefix}_pages_sent_total": pred.get("pages_sent_total"),
            f"{prefix}_live_rounds": pred.get("live_rounds"),
            f"{prefix}_final_pages": pred.get("final_pages"),
            f"{prefix}_downtime_seconds": pred.get("downtime_seconds"),
            f"{prefix}_total_time_seconds": pred.get("total_time_seconds"),
            f"{prefix}_stop_reason": pred.get("stop_reason"),
            f"{prefix}_converged": pred.get("converged"),
            f"{prefix}_lambda_ratio": pred.get("lambda_ratio"),
            f"{prefix}_pages_skipped_total": (sum(r["pages_skipped"] for r in pred["rounds"])
                                              if pred else None),
            f"{prefix}_last_live_round_pages": _last_live(pred)})
    cmp_ = (model or {}).get("comparison") or {}
    out.update({k: cmp_.get(k) for k in ("pages_sent_ratio", "rounds_ratio", "downtime_ratio",
                                         "total_time_ratio")})
    out["model_error"] = (model or {}).get("error")
    return out


def _last_live(pred: dict) -> float | None:
    """Pages the last live round of a prediction sent and skipped (what xen-legacy tests)."""
    live = [r for r in (pred or {}).get("rounds", []) if not r["final"]]
    return live[-1]["pages_sent"] + live[-1]["pages_skipped"] if live else None


def _point_text(point: dict) -> str:
    """Axis values as a person reads them: sizes in MiB, times in ms."""
    return ", ".join(f"{k}={_human(k, v)}" for k, v in point.items()) or "(single point)"


def _human(axis: str, value) -> str:
    if isinstance(value, str) and value != "unlimited":
        try:                                  # already shown canonically (an `axes` dict)
            value = float(value)
        except ValueError:
            return value
    if value is None or value == "unlimited":
        return "unlimited"
    if axis in ("guest_memory",):
        return format_bytes(value).replace(" ", "")
    if axis in ("bandwidth", "rate_limit"):
        return format_bytes(value).replace(" ", "") + "/s"
    if axis in ("latency", "downtime_limit", "busy_seconds", "quiet_seconds"):
        return f"{value * 1000:g}ms"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


# -- agreement ------------------------------------------------------------------------------
METRICS = (("pages_sent", "pages_sent_total", "predicted_pages_sent_total"),
           ("rounds", "live_rounds", "predicted_live_rounds"),
           ("downtime", "downtime_seconds", "predicted_downtime_seconds"))


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def agreement_table(scenario: Scenario, rows: list[dict]) -> list[dict]:
    """Per point: medians of measured and predicted (model at the measured throughput) and
    their ratio, for pages sent, live rounds and downtime; `flags` names the metrics off by
    more than AGREEMENT_TOLERANCE."""
    out = []
    for i, point in enumerate(scenario.points()):
        runs = [r for r in rows if r["point"] == i]
        done = [r for r in runs if r["status"] == "completed"]
        entry = {"point": i, "axes": {k: _show(v) for k, v in point.items()},
                 "runs": len(runs), "completed": len(done), "flags": []}
        for metric, mkey, pkey in METRICS:
            m = _median([r[mkey] for r in done])
            p = _median([r[pkey] for r in done])
            ratio = m / p if m is not None and p else (1.0 if m == p == 0 else None)
            entry[metric] = {"measured": m, "predicted": p, "ratio": ratio}
            if ratio is None and m is not None and p == 0 and m > 0:
                entry["flags"].append(metric)
            elif ratio is not None and abs(ratio - 1) > AGREEMENT_TOLERANCE:
                entry["flags"].append(metric)
        out.append(entry)
    return out


def explain(scenario: Scenario, rows: list[dict], agreement: list[dict],
            calibration: dict) -> list[str]:
    """Why each flagged point differs, from what the runs themselves show."""
    notes = []
    for entry in agreement:
        if entry["completed"] < entry["runs"]:
            errs = {r["error"] for r in rows if r["point"] == entry["point"]
                    and r["status"] != "completed"}
            notes.append(f"point {entry['point']}: {entry['runs'] - entry['completed']} of "
                         f"{entry['runs']} runs failed ({'; '.join(sorted(map(str, errs)))})")
        if not entry["flags"]:
            continue
        runs = [r for r in rows if r["point"] == entry["point"] and r["status"] == "completed"]
        for metric in entry["flags"]:
            why = _why(metric, entry, runs, scenario, calibration)
            notes.append(f"point {entry['point']} ({_point_text(entry['axes'])}) {metric} "
                         f"x{_ratio_text(entry[metric]['ratio'])}: {why}")
    return notes


def _ratio_text(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def _why(metric: str, entry: dict, runs: list[dict], scenario: Scenario,
         calibration: dict) -> str:
    """The first explanation the runs support. Each rule comes from an investigation of a
    disagreement seen in the ready scenarios (README, "Benchmarks, sweeps and the analytic
    model")."""
    def med(key: str) -> float | None:
        return _median([r[key] for r in runs])
    policy = runs[0]["policy"] if runs else scenario.migration.policy
    rounds_m, rounds_p = entry["rounds"]["measured"], entry["rounds"]["predicted"]
    final_m, final_p = med("final_round_pages"), med("predicted_final_pages")
    skipped_m, skipped_p = med("pages_skipped_total"), med("predicted_pages_skipped_total")
    stops_m = sorted({r["stop_reason"] for r in runs if r["stop_reason"]})
    stops_p = sorted({r["predicted_stop_reason"] for r in runs if r["predicted_stop_reason"]})
    lam = med("predicted_lambda_ratio")
    last_p = med("predicted_last_live_round_pages")
    near = (f" (the model's last live round moved {last_p:.0f} pages, its final round "
            f"{final_p:.0f})" if last_p is not None and final_p is not None else "")
    spread = _median([c.get("spread_seconds") for c in calibration.values()])

    if (_skips(policy) and skipped_p is not None and skipped_m is not None
            and skipped_p > 1.1 * skipped_m + 20):
        return (f"a bug in the model, not in migbed: the model lets the sender skip a page "
                f"re-dirtied at any moment before it reaches it ({skipped_p:.0f} pages "
                f"skipped), while migbed, like Xen's xc_domain_save, PEEKs the dirty bitmap "
                f"once per 1024-page batch ({skipped_m:.0f} skipped; a round shorter than "
                f"one batch skips nothing). So migbed sends more per round and reaches "
                f"{policy}'s cap after {_n(rounds_m)} live rounds, not {_n(rounds_p)}, with "
                f"{_n(final_m)} pages left for the final round, not {_n(final_p)}. A model "
                "that skips per batch reproduces these runs")
    if metric == "downtime":
        m, p = entry["downtime"]["measured"], entry["downtime"]["predicted"]
        jitter = max(2 * (spread or 0.0), JITTER_FLOOR_SECONDS)
        if m is not None and p is not None and abs(m - p) <= jitter:
            return (f"a real effect of small numbers: {_ms(m)} measured vs {_ms(p)} "
                    f"predicted differ by less than the jitter of the fixed hand-over cost "
                    f"({_ms(jitter)}: twice the spread of the idle downtime floor, at least "
                    f"the vCPU's 1 ms tick), which is most of either; the final round is "
                    f"{_n(final_m)} pages measured, {_n(final_p)} predicted")
        if final_m is not None and final_p and abs(final_m / final_p - 1) > AGREEMENT_TOLERANCE:
            return (f"the final round holds {_n(final_m)} pages measured vs {_n(final_p)} "
                    "predicted" + _stop_reason(stops_m, stops_p, policy, rounds_m, rounds_p,
                                               lam, near))
        return (f"the stop-and-copy of {_n(final_m)} pages took {_ms(m)} where the model "
                f"expects {_ms(p)}: the pause, final CLEAN and hand-over ran slower than "
                "the idle floor measured (a loaded host)")
    if metric == "rounds" or rounds_m != rounds_p:
        return (f"{_n(rounds_m)} live rounds measured vs {_n(rounds_p)} predicted"
                + _stop_reason(stops_m, stops_p, policy, rounds_m, rounds_p, lam, near))
    return ("the same number of rounds sent different volumes: the pages dirtied per round "
            "differ from the expected distinct pages (round_pages_sent_ratios in the run "
            "JSON show which round)")


def _skips(policy: str) -> bool:
    """Whether a policy skips pages re-dirtied during a round (xen-legacy does)."""
    from nodes.migration.policy import make_policy
    try:
        return make_policy(policy).skip_redirtied
    except (ConfigError, TypeError):
        return False


def _on_cap(stops: list) -> bool:
    """Whether pre-copy ended on a policy's cap (rounds or volume), not on its threshold."""
    return any("cap" in s or "x the guest's memory" in s for s in stops)


def _stop_reason(stops_m: list, stops_p: list, policy: str, rounds_m, rounds_p,
                 lam: float | None, near: str = "") -> str:
    if lam is not None and lam >= 1 and (_on_cap(stops_m) or _on_cap(stops_p)):
        return (f"; lambda = {lam:.2f} >= 1: no convergence, both stop on {policy}'s cap, "
                "and how much is left then depends on how fast the dirty set saturates")
    if stops_m != stops_p:
        return (f"; the runs stopped on '{'; '.join(stops_m)}', the model on "
                f"'{'; '.join(stops_p)}'")
    if rounds_m is not None and rounds_p is not None and abs(rounds_m - rounds_p) <= 1:
        return (f"; both stop on '{'; '.join(stops_m)}', one round apart: near {policy}'s "
                f"threshold{near} the expected dirty count and the random one measured cross "
                "it in neighbouring rounds (a real effect the expected-value model leaves "
                "out)")
    return ""


# -- outputs --------------------------------------------------------------------------------
def summary_text(result: SweepResult) -> str:
    sc = result.scenario
    lines = [f"sweep {sc.name}: {len(result.rows)} runs over {sc.point_count} points, "
             f"{result.failed_runs} failed" + (f" ({sc.description})" if sc.description else ""),
             ""]
    for key, c in result.calibration.items():
        spread = c.get("spread_seconds")
        lines.append(f"downtime floor ({key}): {_ms(c.get('floor_seconds'))}"
                     + (f", spread {_ms(spread)}" if spread is not None else "")
                     + f" -> model T_resume {_ms(c.get('resume_seconds'))}"
                     + (f" ({c['error']})" if c.get("error") else ""))
    lines += ["", "agreement: measured / predicted (model at the measured throughput)",
              f"{'point':>5}  {'axes':<44} {'pages sent':>16} {'live rounds':>16} "
              f"{'downtime':>22}"]
    for e in result.agreement:
        ps, rn, dt = e["pages_sent"], e["rounds"], e["downtime"]
        flag = "  <-- " + ",".join(e["flags"]) if e["flags"] else ""
        lines.append(
            f"{e['point']:>5}  {_point_text(e['axes'])[:44]:<44} "
            f"{_n(ps['measured']):>6}/{_n(ps['predicted']):<6}{_r(ps['ratio']):>4} "
            f"{_n(rn['measured']):>6}/{_n(rn['predicted']):<6}{_r(rn['ratio']):>4} "
            f"{_msn(dt['measured']):>8}/{_msn(dt['predicted']):<8}{_r(dt['ratio']):>5}{flag}")
    flagged = sum(1 for e in result.agreement if e["flags"])
    lines += ["", f"{flagged} of {len(result.agreement)} points differ by more than "
              f"{AGREEMENT_TOLERANCE:.0%} somewhere" + (":" if result.explanations else "")]
    lines += [f"- {n}" for n in result.explanations]
    return "\n".join(lines)


def _n(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _msn(v) -> str:
    return "-" if v is None else f"{v * 1000:.1f}ms"


def _r(v) -> str:
    return "  -" if v is None else f" {v:.2f}"


CSV_NAME = "sweep.csv"


def _write_outputs(result: SweepResult, calibration: dict, plots: bool) -> None:
    folder = result.folder
    columns: list[str] = []
    for row in result.rows:
        columns += [k for k in row if k not in columns]
    with open(folder / CSV_NAME, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in result.rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    summary = {"scenario": result.scenario.to_dict(), "calibration": result.calibration,
               "agreement": result.agreement, "explanations": result.explanations,
               "runs": len(result.rows), "failed_runs": result.failed_runs}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (folder / "summary.txt").write_text(summary_text(result) + "\n")
    (folder / "scenario.toml").write_text(result.scenario.to_toml())
    if plots:
        from cluster import plots as pl
        curves = model_curves(result, calibration)
        pl.draw_all(result.scenario, result.rows, curves, _rounds_for_plot(result), folder)


def _rounds_for_plot(result: SweepResult) -> dict | None:
    """Measured and predicted pages per round of the scenario's chosen point (first run
    that completed)."""
    i = result.scenario.rounds_point
    for row in result.rows:
        if row["point"] == i and row["status"] == "completed":
            doc = json.loads((result.folder / row["json"]).read_text())
            pred = ((doc.get("model") or {}).get("prediction") or {}).get("rounds", [])
            return {"point": i, "axes": _point_text(result.scenario.points()[i]),
                    "measured": [r["pages_sent"] for r in doc["report"]["rounds"]],
                    "predicted": [r["pages_sent"] for r in pred]}
    return None


def model_curves(result: SweepResult, calibration: dict) -> list[dict]:
    """The model's downtime and total time along the x axis, one curve per series (every
    combination of the other axes), at the nominal bandwidth where the link is set, else at
    the series' median measured throughput."""
    from cluster.model import predict
    sc = result.scenario
    x = sc.x
    if x is None:
        return []
    x_values = dict(sc.axes)[x]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in x_values)
    if numeric and len(x_values) > 1:
        lo, hi = min(x_values), max(x_values)
        if lo > 0 and hi / lo > 8:
            xs = [lo * (hi / lo) ** (k / (CURVE_POINTS - 1)) for k in range(CURVE_POINTS)]
        else:
            xs = [lo + (hi - lo) * k / (CURVE_POINTS - 1) for k in range(CURVE_POINTS)]
        if isinstance(x_values[0], int):
            xs = sorted({int(round(v)) for v in xs})
    else:
        xs = list(x_values)
    curves = []
    for series in series_of(sc):
        runs = [r for r in result.rows if r["status"] == "completed"
                and all(r.get(f"axis_{k}") == _show(v) for k, v in series.items())]
        throughput = _median([r["measured_throughput_bytes_per_second"] for r in runs])
        achieved = _median([r["achieved_dirty_rate_pages_per_second"] for r in runs])
        ys_down, ys_total, ys_pages = [], [], []
        for xv in xs:
            spec, settings = sc.specs({**series, x: xv})
            calib = calibration.get((spec.memory_bytes, settings.latency_seconds,
                                     settings.link_bytes_per_second,
                                     settings.rate_limit_bytes_per_second))
            if calib is None:     # x sweeps a calibrated setting: take the nearest floor
                calib = _nearest_calibration(calibration, spec, settings)
            link, limit = settings.link_bytes_per_second, settings.rate_limit_bytes_per_second
            if link is None and limit is None:
                link = throughput
            try:
                pred = predict(
                    guest_memory_bytes=spec.memory_bytes, workload=spec.workload,
                    link_bytes_per_second=link, rate_limit_bytes_per_second=limit,
                    policy=settings.policy, downtime_limit_seconds=settings.downtime_limit_seconds,
                    latency_seconds=settings.latency_seconds,
                    resume_seconds=calib.get("resume_seconds", 0.0),
                    dirty_rate_pages_per_second=achieved if spec.workload.unlimited else None,
                    policy_settings=({"max_iterations": settings.max_iterations}
                                     if settings.max_iterations is not None else None))
                ys_down.append(pred.downtime_seconds)
                ys_total.append(pred.total_time_seconds)
                ys_pages.append(pred.pages_sent_total)
            except (ConfigError, ValueError):
                ys_down.append(None)
                ys_total.append(None)
                ys_pages.append(None)
        curves.append({"series": series, "label": _point_text(series) or "model",
                       "x": xs, "downtime_seconds": ys_down, "total_time_seconds": ys_total,
                       "pages_sent_total": ys_pages})
    return curves


def _nearest_calibration(calibration: dict, spec: GuestSpec,
                         settings: MigrationSettings) -> dict:
    """The calibration of the closest guest size and link, for model curves between the
    swept values."""
    def distance(key: CalibrationKey) -> tuple:
        memory, latency, link, limit = key
        return (abs(math.log(memory / spec.memory_bytes)), abs(latency - settings.latency_seconds),
                abs(math.log((link or 1e12) / (settings.link_bytes_per_second or 1e12))),
                abs(math.log((limit or 1e12) / (settings.rate_limit_bytes_per_second or 1e12))))
    if not calibration:
        return {}
    return calibration[min(calibration, key=distance)]


def series_of(sc: Scenario) -> list[dict]:
    """Every combination of the axes other than x."""
    others = [(k, v) for k, v in sc.axes if k != sc.x]
    return [dict(zip([k for k, _ in others], combo, strict=True))
            for combo in itertools.product(*(v for _, v in others))]


__all__ = ["KNOBS", "Scenario", "SweepResult", "agreement_table", "load_scenario",
           "run_sweep"]


