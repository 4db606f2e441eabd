"""A per-pass model's pass cut short by a post-copy switch after a time: what it sent until
then, and what it leaves the push (a switch after a number of rounds ends a pass whole);
and the discard set a switch between whole passes leaves (`missing_at_switch`)."""

import math

from cluster.model.continuous import layout
from cluster.model.postcopy_model import MissingRange
from cluster.model.rounds import PAGES_PER_RECORD, Guest, ModelRound, PreCopy


def cut_round(run: PreCopy, guest: Guest, seconds: float) -> None:
    """A pass cut short after `seconds` (a switch after a time, between records as the
    sender cuts it): its pages in pfn order until then; the rest, and what the guest dirtied
    meanwhile, are left to send."""
    data_pages = guest.guest_pages - -(-guest.guest_pages // (guest.page_size // 8))
    spans = layout(guest.regions, data_pages, guest.guest_pages)
    to_send = ([s.pages for s in spans] if run.dirty_by_region is None else
               [d for d in _region_values(spans, run.dirty_by_region)])
    sent = min(run.dirty, math.ceil(seconds / guest.seconds_per_page / PAGES_PER_RECORD)
               * PAGES_PER_RECORD)
    duration = sent * guest.seconds_per_page
    left, missing, dirtied_total = sent, [], 0.0
    for s, n in zip(spans, to_send, strict=True):
        unsent = n - min(n, left)
        left -= n - unsent
        dirtied = s.dirtied(duration)
        dirtied_total += dirtied
        fresh = dirtied * (1 - unsent / s.pages) if s.pages else 0.0
        missing.append(MissingRange(s.lo, s.hi, unsent + fresh))
    run.rounds.append(ModelRound(index=len(run.rounds), pages_sent=sent, pages_skipped=0.0,
                                 pages_dirtied=dirtied_total, duration_seconds=duration))
    run.total_written += sent
    run.elapsed += duration
    run.missing = missing
    run.dirty = sum(m.missing for m in missing)
    run.syncs += 1


def _region_values(spans: list, by_region: list[float]) -> list[float]:
    values = iter(by_region)
    return [next(values) if s.region is not None else 0.0 for s in spans]


def missing_at_switch(run: PreCopy, guest: Guest, data_pages: int) -> list[MissingRange]:
    """The discard set after the per-pass rounds: every page if none ran, else what the
    last round's writes dirtied (as it would have been sent next)."""
    spans = layout(guest.regions, data_pages, guest.guest_pages)
    if not run.rounds:
        return [MissingRange(s.lo, s.hi, s.pages) for s in spans]
    dirty = iter(run.dirty_by_region or [0.0] * len(guest.regions))
    return [MissingRange(s.lo, s.hi, next(dirty) if s.region is not None else 0.0)
            for s in spans]
