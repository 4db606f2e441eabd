"""A bench run's figures (samples of one quantity, summarised as median, min and max), the
ratios of their medians and its conclusions, and how they are shown."""

import statistics
import time
import uuid
from dataclasses import dataclass, field

from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.machine import commit, machine


@dataclass
class Figure:
    """One measured quantity: its samples, summarised as median, min and max."""

    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        s = self.samples
        return {"unit": self.unit, "median": statistics.median(s) if s else None,
                "min": min(s) if s else None, "max": max(s) if s else None,
                "samples": s, "note": self.note}


class Results:
    """The figures, ratios and conclusions of one bench run, and how to print them."""

    def __init__(self, options: BenchOptions):
        self.options = options
        self.started_wall = time.time()
        self.figures: dict[str, Figure] = {}
        self.ratios: dict[str, float | None] = {}
        self.conclusions: list[str] = []
        self.errors: dict[str, str] = {}

    def add(self, name: str, unit: str, value: float, note: str = "") -> None:
        fig = self.figures.setdefault(name, Figure(unit))
        fig.samples.append(float(value))
        if note:
            fig.note = note

    def median(self, name: str) -> float | None:
        fig = self.figures.get(name)
        return statistics.median(fig.samples) if fig and fig.samples else None

    def ratio(self, name: str, num: str, den: str) -> float | None:
        a, b = self.median(num), self.median(den)
        self.ratios[name] = a / b if a is not None and b else None
        return self.ratios[name]

    def to_dict(self) -> dict:
        """What `--output`/`--save` writes: the figures with the machine, the commit and the
        options they were measured with (what `--compare` holds a later run against)."""
        return {"bench": {"options": self.options.to_dict(), "machine": machine(),
                          **commit(), "started": time.strftime(
                              "%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_wall))},
                "figures": {k: f.to_dict() for k, f in self.figures.items()},
                "ratios": self.ratios, "conclusions": self.conclusions,
                "errors": self.errors}

    def _renderables(self) -> list:
        from cluster.console import bench_renderables
        heading = (f"migbed bench{' (quick: numbers mean nothing)' if self.options.quick else ''}"
                   f" on {machine()['cpus']} CPUs")
        rows = []
        for name, fig in self.figures.items():
            d = fig.to_dict()
            rows.append((name, format_value(d["median"], fig.unit),
                         format_value(d["min"], fig.unit), format_value(d["max"], fig.unit),
                         unit_label(fig.unit)))
        return bench_renderables(heading, rows, self.ratios, self.conclusions, self.errors)

    def table(self) -> str:
        """The figures, ratios, conclusions and errors as plain text."""
        from cluster.console import render_text
        return render_text(*self._renderables())

    def show(self) -> None:
        """The same on stdout, in colour on a terminal."""
        from cluster.console import show
        show(*self._renderables())


def unit_label(unit: str) -> str:
    """The unit a figure is shown in."""
    return {"bytes_per_second": "MiB/s", "seconds": "ms", "bytes": "MiB"}.get(unit, unit)


def format_value(value: float | None, unit: str) -> str:
    """A figure's value in the unit it is shown in (`unit_label`)."""
    if value is None:
        return "-"
    if unit == "bytes_per_second" or unit == "bytes":
        return f"{value / MiB:.1f}"
    if unit == "seconds":
        return f"{value * 1000:.2f}"
    return f"{value:.4g}"


def mib_per_second(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / MiB:.0f} MiB/s"


def unique_name(prefix: str) -> str:
    """A guest name no other bench run uses (`bench-` names are the bench's own)."""
    return f"bench-{prefix}-{uuid.uuid4().hex[:6]}"
