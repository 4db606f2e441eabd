"""The model's pages by type: which pages are zero when a migration starts, which are still
zero when the first pass reaches them, and what a page of each type costs on the wire.

A zero page costs its pfn word (8 bytes) and a share of its record's header; a normal page
its bytes as well. Before the migration, a guest filled with content (`fill` random or text)
has no zero data page; a fresh one (`fill` zero) has written the distinct pages its workload
wrote while it ran (`warmup_seconds`: a region's H (1 - exp(-w t / H)) for uniform writes).
Page tables are never zero. While the first pass runs, the workload keeps writing: a zero
page the cursor has not reached yet becomes a normal one with the probability that a write
hit it first. The pass reaches a stretch's pages one after another at the stretch's own
pace, so that probability is integrated over the stretch's time, solved with its length
(which depends on how many of its pages are still zero).
"""

import math

from nodes.errors import ConfigError
from workloads.spec import WorkloadSpec
from workloads.writableset import WssCurve

RECORD_SHARE_BYTES = 32.0 / 1024   # a PAGE_DATA record's header, over its 1024 pages
PFN_WORD_BYTES = 8.0


def wire_bytes(page_size: int, zero: bool) -> float:
    """Bytes on the wire of one page of this type, its record's header shared out."""
    return PFN_WORD_BYTES + RECORD_SHARE_BYTES + (0.0 if zero else page_size)


def zero_at_start(spans: list, workload: WorkloadSpec, data_pages: int, warmup_seconds: float,
                  detection: str, wss: WssCurve | None = None) -> list[float]:
    """Zero pages of each stretch (`continuous._Span`) when the migration starts: the share a
    measured curve's content sample found (`zero_measured`), else what the workload wrote."""
    if wss is not None and wss.zero_fraction is not None:
        return zero_measured(spans, data_pages, wss.zero_fraction, detection)
    if not warmup_seconds >= 0 or math.isinf(warmup_seconds):
        raise ConfigError(f"warm-up must be a finite number of seconds >= 0, got "
                          f"{warmup_seconds!r}")
    if detection == "none" or workload.fill != "zero":
        return [0.0] * len(spans)
    out = []
    for s in spans:
        if s.lo >= data_pages:                        # page tables
            out.append(0.0)
        else:
            out.append(max(0.0, s.pages - s.dirtied(warmup_seconds)))
    return out


def zero_measured(spans: list, data_pages: int, zero_fraction: float,
                  detection: str) -> list[float]:
    """Zero pages of each stretch when the share of zero data pages was measured (a WSS
    curve's content sample): a program loads its data once (STREAM's input arrays, a store's
    keys), so which pages hold something is not what its steady writes say. The zeros are
    laid in the stretches written least per page first: a page that is written often is not
    zero."""
    if detection == "none":
        return [0.0] * len(spans)
    left = min(1.0, max(0.0, zero_fraction)) * data_pages
    out = [0.0] * len(spans)
    data = [i for i, s in enumerate(spans) if s.lo < data_pages]
    for i in sorted(data, key=lambda i: (spans[i].region.rate / spans[i].pages
                                         if spans[i].region is not None else 0.0)):
        out[i] = min(spans[i].pages, left)
        left -= out[i]
    return out


def first_pass(spans: list, zeros: list[float], normal_seconds: float,
               zero_seconds: float) -> tuple[float, float]:
    """(seconds, zero pages sent) of a pass over every page, the stretches in pfn order,
    each page costing `normal_seconds` or `zero_seconds` to send."""
    t = sent_zero = 0.0
    for s, z in zip(spans, zeros, strict=True):
        rate = s.region.rate / s.pages if s.region is not None and s.pages else 0.0
        left = z
        seconds = s.pages * normal_seconds
        for _ in range(6):                            # length and survivors, together
            left = z * _survive(rate, t, seconds)
            seconds = left * zero_seconds + (s.pages - left) * normal_seconds
        t += seconds
        sent_zero += left
    return t, sent_zero


def _survive(rate: float, t0: float, seconds: float) -> float:
    """The share of pages, reached evenly over [t0, t0 + seconds], not written before."""
    if rate <= 0:
        return 1.0
    if seconds <= 0:
        return math.exp(-rate * t0)
    return (math.exp(-rate * t0) - math.exp(-rate * (t0 + seconds))) / (rate * seconds)
