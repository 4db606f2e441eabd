"""A migration over time, as guestperf plots one: what `migbed migrate --timeline` and
`migbed plot` draw from reports (PNG, matplotlib's Agg backend: no display needed).

Time since the migration started is on x, shared by three panels:

1. the guest's own page-write rate (how much the migration slowed it; dashed, the dirty
   rate the sender measured),
2. the migration's throughput (dotted, the link's speed when it is limited),
3. the bytes still to send.

Round boundaries are dotted lines, the pause a dashed one and the resume a dash-dot one, with
the downtime between them shaded. Any other event of the history (a post-copy switch, a
throttle step) is a labelled line, and a phase beyond pre-copy's own is a hatched band, so a
new algorithm shows the same way without new code here. Several reports on one plot are one
colour each, each from its own start. A report saved before reports had a
`progress_history` is drawn from its rounds: a point at each round's end.

Every artist carries a gid naming what it shows ("guest-rate", "round", "pause",
"downtime", ...), so tests read the figure, not its pixels.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from nodes.errors import ConfigError  # noqa: E402
from nodes.phase import ENDED, Phase  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cluster.report import MigrationReport

MiB = 1024 * 1024
KNOWN_EVENTS = ("phase", "end", "round-end", "pause", "resume")
# Pre-copy's phases are drawn by their events; a post-copy switch and its push (and any later
# algorithm's phase) get a hatched band over their samples.
OWN_PHASES = ({p.value for p in Phase} - {Phase.SWITCH, Phase.POSTCOPY}) | set(ENDED)
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


def check_image_path(path: str | Path, option: str) -> Path:
    """Refuse a plot file that cannot be written, before a run rather than after it."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"{option} {path}: give a file ending in "
                          f"{', '.join(IMAGE_SUFFIXES)} (e.g. timeline.png)")
    folder = path.resolve().parent
    if path.is_dir() or not folder.is_dir():
        raise ConfigError(f"cannot write {option} {path}: {folder} is not a folder")
    return path


def report_label(report: "MigrationReport") -> str:
    return f"{report.guest} {report.policy} ({report.status})"


def history_of(report: "MigrationReport") -> list[dict]:
    """The report's progress history; for a report saved without one, a coarse one from its
    rounds: a sample at the end of each, their own throughput and dirty rate."""
    if report.progress_history:
        return report.progress_history
    t = float(report.phase_seconds.get("setup") or 0.0)
    sent = 0
    out = [{"t_seconds": 0.0, "event": "phase", "phase": Phase.SETUP.value,
            "bytes_sent_total": 0, "remaining_bytes": report.guest_memory_bytes}]
    for r in report.rounds:
        if r.get("final"):
            pause = float(report.phase_seconds.get("setup", 0.0)
                          + report.phase_seconds.get("precopy", t))
            out.append({"t_seconds": pause, "event": "pause",
                        "phase": Phase.STOP_AND_COPY.value, "bytes_sent_total": sent})
            t = pause
        t += float(r.get("duration_seconds") or 0.0)
        sent += int(r.get("bytes_sent") or r.get("pages_sent", 0) * report.page_size)
        out.append({"t_seconds": t, "event": "round-end", "round": r.get("index"),
                    "bytes_sent_total": sent,
                    "throughput_bytes_per_second": r.get("throughput_bytes_per_second"),
                    "dirty_rate_pages_per_second": r.get("dirty_rate_pages_per_second")})
    return out


def _value(sample: dict, key: str, scale: float = 1.0) -> float:
    v = sample.get(key)
    return float("nan") if v is None else v / scale


def _times(history: list[dict], event: str) -> list[float]:
    return [s["t_seconds"] for s in history if s.get("event") == event]


def _downtime_span(report: "MigrationReport", history: list[dict]) -> tuple[float, float] | None:
    """(pause, resume) seconds: the history's events, else pause + downtime_seconds."""
    pauses = _times(history, "pause")
    if not pauses:
        return None
    resumes = [t for t in _times(history, "resume") if t >= pauses[-1]]
    if resumes:
        return pauses[-1], resumes[0]
    if report.downtime_seconds is not None:
        return pauses[-1], pauses[-1] + report.downtime_seconds
    return None


def timeline_figure(reports: Sequence["MigrationReport"], labels: Sequence[str] | None = None,
                    title: str | None = None) -> "Figure":
    """The figure of `reports` (one colour each): see the module docstring."""
    if not reports:
        raise ConfigError("a timeline needs at least one report")
    labels = list(labels) if labels is not None else _labels(reports)
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10.0, 8.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (report, label) in enumerate(zip(reports, labels, strict=True)):
        _draw_report(axes, report, label, colours[i % len(colours)])
    _draw_applications(axes[0], reports, colours)
    axes[0].set_ylabel("guest page writes/s")
    axes[1].set_ylabel("throughput (MiB/s)")
    axes[2].set_ylabel("remaining (MiB)")
    axes[2].set_xlabel("seconds since the migration started")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    keys = [Line2D([], [], color="grey", ls=":", label="round boundary"),
            Line2D([], [], color="grey", ls="--", label="pause"),
            Line2D([], [], color="grey", ls="-.", label="resume"),
            Patch(color="grey", alpha=0.25, label="downtime"),
            Line2D([], [], color="grey", ls=(0, (4, 2)), lw=1, label="dirty rate")]
    handles, _ = axes[0].get_legend_handles_labels()
    axes[0].legend(handles=handles + keys, fontsize=7, loc="upper left",
                   bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title or "migration timeline", fontsize=10)
    fig.tight_layout()
    return fig


def draw_timeline(reports: Sequence["MigrationReport"], path: str | Path,
                  labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Draw the timeline of `reports` into `path` (PNG, SVG or PDF); returns the path."""
    path = check_image_path(path, "timeline")
    fig = timeline_figure(reports, labels, title)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


def _labels(reports: Sequence["MigrationReport"]) -> list[str]:
    labels = [report_label(r) for r in reports]
    if len(set(labels)) < len(labels):     # the same guest and policy twice: tell them apart
        labels = [f"{lab} {r.migration_id}" for lab, r in zip(labels, reports, strict=True)]
    return labels


def _draw_report(axes, report: "MigrationReport", label: str, colour) -> None:
    history = history_of(report)
    t = [s["t_seconds"] for s in history]
    series = ((0, "guest-rate", "guest_page_write_rate_pages_per_second", 1.0, "-"),
              (0, "dirty-rate", "dirty_rate_pages_per_second", 1.0, (0, (4, 2))),
              (1, "throughput", "throughput_bytes_per_second", MiB, "-"),
              (2, "remaining", "remaining_bytes", MiB, "-"))
    for row, gid, key, scale, style in series:
        (line,) = axes[row].plot(t, [_value(s, key, scale) for s in history], ls=style,
                                 color=colour, lw=1.0 if gid == "dirty-rate" else 1.6,
                                 marker="." if len(history) < 30 else None,
                                 label=label if gid == "guest-rate" else f"_{label} {gid}")
        line.set_gid(gid)
    if report.link_bytes_per_second:
        axes[1].axhline(report.link_bytes_per_second / MiB, color=colour, ls=":", lw=1,
                        gid="link")
    _draw_events(axes, report, history, colour)


def _draw_applications(ax, reports: Sequence["MigrationReport"], colours: list) -> None:
    """A program guest's operations per second (its application block's 100 ms samples,
    from 2 s before to 5 s after), on a right-hand axis of the first panel, dash-dotted."""
    apps = [(r.application, colours[i % len(colours)]) for i, r in enumerate(reports)
            if getattr(r, "application", None) is not None and r.application.samples]
    if not apps:
        return
    twin = ax.twinx()
    for app, colour in apps:
        (line,) = twin.plot([s["t_seconds"] for s in app.samples],
                            [s["ops_per_second"] for s in app.samples], color=colour,
                            ls="-.", lw=1.0, alpha=0.8)
        line.set_gid("app-ops")
    twin.set_ylabel("application ops/s (-.)", fontsize=8)
    twin.set_ylim(bottom=0)


def _draw_events(axes, report: "MigrationReport", history: list[dict], colour) -> None:
    for ax in axes:
        for x in _times(history, "round-end"):
            ax.axvline(x, color=colour, ls=":", lw=0.8, alpha=0.6, gid="round")
        for x in _times(history, "pause"):
            ax.axvline(x, color=colour, ls="--", lw=1.0, gid="pause")
    span = _downtime_span(report, history)
    if span is not None:
        for ax in axes:
            ax.axvline(span[1], color=colour, ls="-.", lw=1.0, gid="resume")
            ax.axvspan(span[0], span[1], color=colour, alpha=0.25, lw=0, gid="downtime")
        axes[0].annotate(f"downtime {(span[1] - span[0]) * 1000:.1f} ms", (span[1], 1.0),
                         xycoords=("data", "axes fraction"), fontsize=7, color=colour,
                         ha="left", va="top", rotation=90, gid="downtime-label")
    for s in history:
        event = s.get("event")
        if event and event not in KNOWN_EVENTS:     # post-copy, throttle, ...: as they come
            for ax in axes:
                ax.axvline(s["t_seconds"], color=colour, ls=(0, (1, 3)), lw=1.2,
                           gid=f"event:{event}")
            axes[0].annotate(event, (s["t_seconds"], 0.0), xycoords=("data", "axes fraction"),
                             fontsize=7, color=colour, rotation=90, va="bottom")
    _draw_other_phases(axes, history, colour)


def _draw_other_phases(axes, history: list[dict], colour) -> None:
    """A phase pre-copy does not have (post-copy, ...) as a hatched band over its samples."""
    spans: dict[str, list[float]] = {}
    for s in history:
        phase = s.get("phase")
        if phase and phase not in OWN_PHASES:
            spans.setdefault(phase, []).append(s["t_seconds"])
    for phase, ts in spans.items():
        for ax in axes:
            ax.axvspan(min(ts), max(ts), facecolor="none", edgecolor=colour, hatch="//",
                       alpha=0.4, gid=f"phase:{phase}")
        axes[2].annotate(phase, (min(ts), 1.0), xycoords=("data", "axes fraction"),
                         fontsize=7, color=colour, va="top")
