"""`migbed bench --compare OLD.json`: this run's figures beside a saved run's, as a
performance team tracks migration performance over time (propolis #324).

Each figure is its median with the min-max of its repeats. A figure has *changed* when the
new median lies outside the old run's min-max and the old median outside the new run's: two
runs whose ranges each hold the other's median are noise of the same machine. One repeat on
either side (a range of one value) is still compared by that rule, which then says little;
the table shows the repeats. What differed between the two runs (machine, commit, options)
is said above the table, since a changed figure may be that and not the code.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cluster.inputfile import read_json
from nodes.errors import ConfigError

# What differing between two runs is worth saying: machine keys, then option keys.
MACHINE_KEYS = ("cpus", "cpus_usable", "cpu_model", "memory_bytes", "kernel",
                "socket_buffers", "python", "ray", "numpy")


@dataclass(frozen=True)
class FigureChange:
    """One figure in both runs (or in one: `old` or `new` is None)."""

    name: str
    unit: str
    old: dict | None          # {"median", "min", "max", "samples"}
    new: dict | None

    @property
    def ratio(self) -> float | None:
        """New median over old median."""
        if not self.old or not self.new:
            return None
        a, b = self.new.get("median"), self.old.get("median")
        return a / b if a is not None and b else None

    @property
    def changed(self) -> bool | None:
        """The issue's rule (module docstring); None when either run lacks the figure."""
        if not _summarised(self.old) or not _summarised(self.new):
            return None
        o, n = self.old, self.new
        return (not o["min"] <= n["median"] <= o["max"]
                and not n["min"] <= o["median"] <= n["max"])


@dataclass
class Comparison:
    old_path: str
    figures: list[FigureChange] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)   # machine, commit, options

    @property
    def changed(self) -> list[FigureChange]:
        return [f for f in self.figures if f.changed]

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """(figure, unit, old, new, new/old, change) as a person reads them."""
        from cluster.bench.figures import format_value, unit_label
        out = []
        for f in self.figures:
            def cell(fig: dict | None, unit: str = f.unit) -> str:
                if not _summarised(fig):
                    return "-"
                return (f"{format_value(fig['median'], unit)} ({format_value(fig['min'], unit)}"
                        f"-{format_value(fig['max'], unit)})")
            ratio = "-" if f.ratio is None else f"{f.ratio:.3f}"
            flag = {True: "CHANGED", False: "", None: "only new" if not f.old else
                    "only old" if not f.new else "-"}[f.changed]
            out.append((f.name, unit_label(f.unit), cell(f.old), cell(f.new), ratio, flag))
        return out

    def to_dict(self) -> dict:
        return {"old": self.old_path, "differences": self.differences,
                "figures": [{"name": f.name, "unit": f.unit, "old": f.old, "new": f.new,
                             "ratio": f.ratio, "changed": f.changed} for f in self.figures]}


def _summarised(fig: dict | None) -> bool:
    return bool(fig) and all(isinstance(fig.get(k), int | float) and math.isfinite(fig[k])
                             for k in ("median", "min", "max"))


def load_saved(path: str | Path) -> dict:
    """A run saved by `migbed bench --output/--save`; a one-line ConfigError otherwise."""
    path = Path(path)
    data = read_json(path, "a saved bench run", label=f"--compare {path}")
    figures = data.get("figures") if isinstance(data, dict) else None
    if not isinstance(figures, dict) or not all(isinstance(f, dict) for f in figures.values()):
        raise ConfigError(f"--compare {path} is not a saved bench run (no figures); write "
                          "one with `migbed bench --save FILE`")
    return data


def compare(old: dict, new: dict, old_path: str = "") -> Comparison:
    """Every figure of either run, the new run's order first."""
    old, new = _plain(old), _plain(new)
    out = Comparison(old_path, differences=_differences(old.get("bench") or {},
                                                        new.get("bench") or {}))
    old_figs, new_figs = old["figures"], new["figures"]
    for name in [*new_figs, *(n for n in old_figs if n not in new_figs)]:
        o, n = old_figs.get(name), new_figs.get(name)
        out.figures.append(FigureChange(name, (n or o).get("unit", ""), o, n))
    return out


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("commit") != new.get("commit") or old.get("dirty") or new.get("dirty"):
        out.append(f"commit {_commit(old)} -> {_commit(new)}")
    om, nm = old.get("machine") or {}, new.get("machine") or {}
    for key in MACHINE_KEYS:
        if key in om and key in nm and om[key] != nm[key]:
            out.append(f"machine {key}: {om[key]} -> {nm[key]}")
    oo, no = old.get("options") or {}, new.get("options") or {}
    for key in sorted(set(oo) | set(no)):
        if key in oo and key in no and oo[key] != no[key]:
            out.append(f"option {key}: {oo[key]} -> {no[key]}")
    return out


def _plain(data: dict) -> dict:
    """As JSON holds it (tuples are lists), so a live run compares with a saved one."""
    return json.loads(json.dumps(data, default=str))


def _commit(run: dict) -> str:
    c = run.get("commit")
    return "unknown" if not c else c[:12] + (" (uncommitted changes)" if run.get("dirty") else "")
