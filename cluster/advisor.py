"""`migbed advise`: which way to migrate a running guest, before migrating it.

Why: operators do not start a migration blind (KubeVirt measures the dirty rate first). The
advisor measures the guest where it runs (its writable working set, `nodes.host.dirtymeter`;
its pages' content, for XBZRLE and compression), runs the analytic model (`cluster.model`,
fed the measured curve instead of a set rate) once per algorithm and aid over the operator's
own migrate settings, and ranks them: those that meet the limits (converge, downtime within
the limit, done within the completion timeout) first, then by bytes sent, then by total time.
The first row is the cheapest that meets the limits, with the `migbed migrate` line that
runs it.

XBZRLE and compression are priced by what the sample measured: compression by zstd's ratio
over the sampled pages (every page); XBZRLE by its delta over the pages that changed, from
the second pass on (the first pass sends whole pages), solved against the model's own pass.
"""

from dataclasses import dataclass, field

from cluster import model
from cluster.model.block import settings_inputs
from nodes.errors import ConfigError
from nodes.migration.settings import MigrationSettings
from nodes.units import format_bytes
from workloads.spec import WorkloadSpec
from workloads.writableset import WssCurve

PAGE_WORD_BYTES = 8                  # the pfn word every page costs on the wire
FAULT_SECONDS = 0.001                # a post-copy fault's wait (0.91 ms measured here)
DIRTY_LIMIT_DEFAULT = 1 << 20        # QEMU's vcpu-dirty-limit default, 1 MB/s
TOLERANCE = 1.0 + 1e-9
SAME_BYTES = 1.02                    # bytes this close count as the same
SAME_SECONDS = 1.05                  # and total times this close


@dataclass(frozen=True)
class Candidate:
    """One way to migrate: its name, the settings it changes, the flags that say so."""

    name: str
    overrides: dict
    flags: tuple[str, ...]
    encoding: str = ""               # "xbzrle" | "compression" | ""


def candidates(base: MigrationSettings) -> list[Candidate]:
    """Every algorithm and aid the advisor weighs, over the operator's settings."""
    limit = base.dirty_limit_bytes_per_second or DIRTY_LIMIT_DEFAULT
    qemu = {"policy": "qemu"}
    return [
        Candidate("pre-copy (xen)", {"policy": "xen"}, ("--policy", "xen")),
        Candidate("pre-copy (xen-legacy)", {"policy": "xen-legacy"},
                  ("--policy", "xen-legacy")),
        Candidate("pre-copy (qemu)", qemu, ("--policy", "qemu")),
        Candidate("auto-converge", {**qemu, "auto_converge": True},
                  ("--policy", "qemu", "--auto-converge")),
        Candidate("dirty-limit", {**qemu, "dirty_limit_bytes_per_second": limit},
                  ("--policy", "qemu", "--dirty-limit", str(int(limit)))),
        Candidate("xbzrle", {**qemu, "xbzrle_cache_bytes": 64 << 20},
                  ("--policy", "qemu", "--xbzrle-cache", "64MiB"), "xbzrle"),
        Candidate("multifd+zstd", {**qemu, "multifd_channels": 2,
                                   "multifd_compression": "zstd"},
                  ("--policy", "qemu", "--multifd-channels", "2",
                   "--multifd-compression", "zstd"), "compression"),
        Candidate("hybrid", {**qemu, "postcopy_after_rounds": 1, "postcopy_allowed": True},
                  ("--policy", "qemu", "--postcopy-after", "1")),
        Candidate("post-copy", {**qemu, "postcopy_after_rounds": 0, "postcopy_allowed": True},
                  ("--policy", "qemu", "--postcopy")),
    ]


@dataclass
class Advice:
    """One candidate's prediction and verdict."""

    name: str
    flags: tuple[str, ...]
    converges: bool
    meets_limits: bool
    total_time_seconds: float
    downtime_seconds: float
    bytes_sent: float
    slowdown: float
    why: str = ""
    prediction: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "flags": list(self.flags), "converges": self.converges,
                "meets_limits": self.meets_limits,
                "total_time_seconds": self.total_time_seconds,
                "downtime_seconds": self.downtime_seconds, "bytes_sent": self.bytes_sent,
                "guest_slowdown": self.slowdown, "why": self.why}


def settings_for(base: MigrationSettings, overrides: dict) -> MigrationSettings:
    d = base.to_dict()
    for key in ("auto_converge", "dirty_limit_bytes_per_second", "xbzrle_cache_bytes",
                "multifd_channels", "multifd_compression", "postcopy", "postcopy_after",
                "postcopy_after_rounds", "postcopy_after_seconds", "postcopy_allowed"):
        d.pop(key, None)
    d.update(overrides)
    return MigrationSettings.from_dict(d)


def _page_bytes(page_size: int, content: dict, encoding: str, first: float,
                total: float) -> float | None:
    """What a normal page costs on the wire under `encoding`, averaged over the migration's
    `total` pages of which the `first` pass goes whole (XBZRLE)."""
    whole = page_size + PAGE_WORD_BYTES
    if encoding == "compression":
        return page_size * content["compression_ratio"] + PAGE_WORD_BYTES
    if encoding == "xbzrle" and total > 0:
        later = page_size * max(content["xbzrle_ratio"], 1 / page_size) + PAGE_WORD_BYTES
        return (min(first, total) * whole + max(0.0, total - first) * later) / total
    return None


def _cap_by_compressor(common: dict, content: dict, s: MigrationSettings,
                       page_size: int) -> None:
    """Compression is bounded by the compressor too: its channels take at most the measured
    zstd speed each in page bytes, which leaves ratio x that on the wire."""
    speed = content.get("compression_bytes_per_second")
    if not speed:
        return
    wire = speed * (s.multifd_channels or 1) * (
        content["compression_ratio"] + PAGE_WORD_BYTES / page_size)
    for key in ("link_bytes_per_second", "rate_limit_bytes_per_second"):
        if common[key] is not None:
            common[key] = min(common[key], wire)


def predict_one(cand: Candidate, base: MigrationSettings, curve: WssCurve, content: dict,
                memory_bytes: int, workload: WorkloadSpec) -> Advice:
    """The model's prediction for one candidate, and whether it meets the limits."""
    s = settings_for(base, cand.overrides)
    common = dict(guest_memory_bytes=memory_bytes, page_size=curve.page_size,
                  workload=workload, link_bytes_per_second=s.link_bytes_per_second,
                  rate_limit_bytes_per_second=s.rate_limit_bytes_per_second, wss=curve,
                  warmup_seconds=60.0, **settings_inputs(s, memory_bytes))
    if cand.encoding == "compression":
        _cap_by_compressor(common, content, s, curve.page_size)
    pred = model.predict(**common)
    if cand.encoding:
        first = max(0.0, curve.guest_pages - pred.zero_pages)   # the first pass goes whole
        pred = model.predict(page_bytes=_page_bytes(curve.page_size, content, cand.encoding,
                                                    first, pred.pages_sent_total), **common)
    return _verdict(cand, s, pred, curve)


def _verdict(cand: Candidate, s: MigrationSettings, pred, curve: WssCurve) -> Advice:
    post = pred.postcopy
    converges = bool(pred.converged or post is not None)
    timeout = s.completion_timeout_seconds
    if timeout is None and s.completion_timeout_per_gib_seconds is not None:
        timeout = s.completion_timeout_per_gib_seconds * curve.guest_pages * curve.page_size / (1 << 30)
    why = []
    if not converges:
        why.append(f"does not converge ({pred.stop_reason})")
    if pred.downtime_seconds > s.downtime_limit_seconds * TOLERANCE:
        why.append(f"downtime {pred.downtime_seconds * 1000:.0f} ms over the limit")
    if timeout is not None and pred.total_time_seconds > timeout * TOLERANCE:
        why.append(f"total {pred.total_time_seconds:.1f} s over the completion timeout")
    return Advice(cand.name, cand.flags, converges, not why, pred.total_time_seconds,
                  pred.downtime_seconds, pred.bytes_sent_total, _slowdown(s, pred, curve),
                  "; ".join(why), pred.to_dict())


def _slowdown(s: MigrationSettings, pred, curve: WssCurve) -> float:
    """The share of its running time the guest loses: the throttle's at the end, the dirty
    limit's cut of its rate, or post-copy's fault waits over the post-copy phase."""
    if pred.postcopy is not None:
        seconds = pred.postcopy.postcopy_seconds
        return min(1.0, pred.postcopy.expected_faults * FAULT_SECONDS / seconds) if seconds else 0.0
    if pred.cpu_throttle_percentage:
        return pred.cpu_throttle_percentage / 100
    if s.dirty_limit_bytes_per_second and any(sleep for _, sleep in pred.dirty_limit_schedule):
        rate = curve.rate_pages_per_second * curve.page_size
        return max(0.0, 1 - s.dirty_limit_bytes_per_second / rate) if rate else 0.0
    return 0.0


def rank(advice: list, *, meets=lambda a: a.meets_limits, sent=lambda a: a.bytes_sent,
         took=lambda a: a.total_time_seconds) -> list:
    """Those meeting the limits first, then by bytes sent, then by total time; bytes within
    `SAME_BYTES` of the fewest and times within `SAME_SECONDS` of the shortest count as the
    same, and then the simpler candidate (earlier in `candidates`) wins: an aid that does not
    help is not advised. The accessors let a check rank measured runs by the same rule."""
    left, out = list(advice), []
    while left:
        pool = [a for a in left if meets(a)] or left
        fewest = min(sent(a) for a in pool)
        pool = [a for a in pool if sent(a) <= fewest * SAME_BYTES]
        shortest = min(took(a) for a in pool)
        best = next(a for a in pool if took(a) <= shortest * SAME_SECONDS)
        out.append(best)
        left.remove(best)
    return out


def advise(curve: WssCurve, content: dict, base: MigrationSettings, memory_bytes: int,
           workload: WorkloadSpec) -> list[Advice]:
    """Every candidate, predicted and ranked."""
    if base.link_bytes_per_second is None and base.rate_limit_bytes_per_second is None:
        raise ConfigError("advise needs the link's bandwidth (--bandwidth, e.g. 125MB): the "
                          "model cannot price a migration over an unlimited link")
    return rank([predict_one(c, base, curve, content, memory_bytes, workload)
                 for c in candidates(base)])


# The flags a candidate decides (and how many values each takes): the operator's own are
# left out of the advised line, as `settings_for` leaves them out of its settings.
CANDIDATE_FLAGS = {"--policy": 1, "--auto-converge": 0, "--dirty-limit": 1,
                   "--xbzrle-cache": 1, "--multifd-channels": 1, "--multifd-compression": 1,
                   "--postcopy": 0, "--postcopy-after": 1, "--postcopy-allowed": 0}


def migrate_line(guest: str, destination: str, base_flags: list[str], best: Advice) -> str:
    """The `migbed migrate` command that runs the advice (the operator's flags, then its)."""
    kept, i = [], 0
    while i < len(base_flags):
        name, has_value = base_flags[i].split("=", 1)[0], "=" in base_flags[i]
        if name in CANDIDATE_FLAGS:
            i += 1 + (0 if has_value else CANDIDATE_FLAGS[name])
            continue
        kept.append(base_flags[i])
        i += 1
    return " ".join(["migbed", "migrate", guest, destination, *kept, *best.flags])


def summary(curve: WssCurve, content: dict) -> str:
    rate = curve.distinct(1.0)
    return (f"measured: dirty rate {rate:.0f} pages/s "
            f"({format_bytes(rate * curve.page_size)}/s over 1 s), WWS {curve.wws_pages:.0f} "
            f"pages ({format_bytes(curve.wws_pages * curve.page_size)}); content: "
            f"{content['zero_fraction'] * 100:.0f} % zero, zstd {content['compression_ratio']:.3f}"
            f", XBZRLE {content['xbzrle_ratio']:.3f} of a page")
