"""`migbed trace info --plot`: a trace's dirty rate over time and its writable working set
curve on one figure, its content figures in the title, so a trace can be judged at a glance
before it is replayed."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from cluster.timeline import check_image_path  # noqa: E402
from nodes.errors import ConfigError  # noqa: E402
from workloads.tracefile import Trace  # noqa: E402
from workloads.tracestats import content_figures, rate_series, wss_curve  # noqa: E402


def draw_trace(trace: Trace, path: str | Path, label: str) -> Path:
    """Two panels: pages written per second per interval; distinct pages per window."""
    path = check_image_path(path, "--plot")
    fig, (rate_ax, wss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    t, rate = rate_series(trace)
    rate_ax.plot(t, rate, lw=0.8)
    rate_ax.set_xlabel("time (s)")
    rate_ax.set_ylabel("pages written per second")
    rate_ax.set_title("dirty rate")
    curve = wss_curve(trace)
    if curve:
        wss_ax.plot([w for w, _ in curve], [p for _, p in curve], marker="o")
        wss_ax.set_xscale("log")
    wss_ax.set_xlabel("window (s)")
    wss_ax.set_ylabel("distinct pages written")
    wss_ax.set_title("writable working set")
    c = content_figures(trace)
    fig.suptitle(f"{label}: zero {c.zero_fraction:.0%}, compression {c.compression_ratio:.1f}x,"
                 f" XBZRLE delta {c.xbzrle_delta_bytes:.0f} B ({c.sampled_pages} samples)")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
