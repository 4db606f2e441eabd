"""The model of a policy that decides after every chunk of sending (`mid_pass`: qemu), chunk by
chunk, in expected pages, driving the same `QemuPolicy` object the sender drives.

The guest's pages are laid out in pfn order as the workload writes them (a hotset's hot pages
first, then the cold ones, then the page tables, which nothing writes). Each stretch (a
`_Span`) holds the pages marked to send ahead of the scan cursor and behind it. A chunk sends
up to 50 ms of pages from the cursor on at the live rate; reaching the end of memory ends a
pass (a round) and the scan wraps. After each chunk the policy's bandwidth window may close;
before each, when the pending estimate (every marked page) is below the threshold, a bitmap
sync marks the pages dirtied since the last one that are not marked already: writes fall
uniformly over a stretch, and those that hit a page still marked (ahead of the cursor in the
first pass, every page is) add nothing. The migration stops when the policy says so; the stop-and-copy then sends what is
marked plus what was dirtied since the last sync.
"""

from dataclasses import dataclass

from cluster.model.workload import Region
from nodes.migration.dirtysync import SyncLog
from nodes.migration.policy import Action, PrecopyStats, QemuPolicy

_CHUNK_GUARD = 10_000_000       # a policy that never stops would loop forever


@dataclass
class _Span:
    lo: float                   # first pfn
    hi: float                   # one past the last
    region: Region | None       # how the workload writes it (None: never)
    ahead: float                # marked, not sent, ahead of the cursor in this pass
    behind: float = 0.0         # marked, not sent, behind it: the next pass's

    @property
    def pages(self) -> float:
        return self.hi - self.lo

    def dirtied(self, seconds: float) -> float:
        return self.region.distinct(seconds) if self.region is not None else 0.0


def layout(regions: list[Region], data_pages: int, guest_pages: int) -> list[_Span]:
    spans, at = [], 0.0
    for r in regions:
        spans.append(_Span(at, at + r.pages, r, r.pages))
        at += r.pages
    if at < data_pages:                                      # an idle guest's data pages
        spans.append(_Span(at, float(data_pages), None, data_pages - at))
    spans.append(_Span(float(data_pages), float(guest_pages), None,
                       float(guest_pages - data_pages)))     # its page tables
    return [s for s in spans if s.pages > 0]


class ContinuousRun:
    """Pre-copy under a mid-pass policy; `run()` fills `rounds` and the outcome fields."""

    def __init__(self, spans: list[_Span], policy: QemuPolicy, seconds_per_page: float,
                 wire_per_page: float, page_size: int, guest_pages: int):
        self.spans = spans
        self.policy = policy
        self.spp = seconds_per_page
        self.wire = wire_per_page
        self.page_size = page_size
        self.guest_pages = guest_pages
        self.now = 0.0
        self.sent_pages = 0.0
        self.cursor = 0.0
        self.last_sync = 0.0
        self.sync = SyncLog(page_size, guest_pages, 0.0)
        self.rounds: list[dict] = []        # index, pages_sent, pages_dirtied, start, end
        self.current: dict | None = self._open_pass()

    @property
    def marked(self) -> float:
        return sum(s.ahead + s.behind for s in self.spans)

    def _open_pass(self) -> dict:
        return {"index": len(self.rounds), "pages_sent": 0.0, "pages_dirtied": 0.0,
                "start": self.now, "end": self.now}

    def run(self):
        """Until the policy stops: check, then a chunk, then the window. Returns the
        Decision."""
        self.policy.start(0.0, 0)
        for _ in range(_CHUNK_GUARD):
            if self.policy.wants_exact(self.marked * self.page_size):
                self._sync()
            decision = self.policy.decide(self._stats())
            if decision.action is not Action.CONTINUE:
                if self.current is not None and (self.current["pages_sent"] > 0
                                                 or decision.action is not Action.POSTCOPY):
                    self._close_pass()
                return decision
            self._chunk()
            self.policy.window_closed(self.now, self.sent_pages * self.wire,
                                      self.sync.dirty_bytes_last_sync,
                                      self.sync.dirty_pages_per_second is not None)
        raise RuntimeError("the model's chunk guard was reached")

    def final_pages(self) -> float:
        """What the stop-and-copy sends: the marked pages and those dirtied since the sync."""
        return self.marked + sum(sum(self._fresh(s)) for s in self.spans)

    # -- the steps ------------------------------------------------------------------------
    def _fresh(self, s: _Span) -> tuple[float, float]:
        """Pages of `s` dirtied since the last sync and not marked already, ahead of the
        cursor and behind it: writes fall uniformly over the stretch, and each part's marks
        hide the writes that hit them."""
        written = s.dirtied(self.now - self.last_sync)
        if not written:
            return 0.0, 0.0
        width_ahead = min(s.pages, max(0.0, s.hi - max(self.cursor, s.lo)))
        width_behind = s.pages - width_ahead
        ahead = behind = 0.0
        if width_ahead > 0:
            ahead = written * width_ahead / s.pages * (1 - s.ahead / width_ahead)
        if width_behind > 0:
            behind = written * width_behind / s.pages * (1 - s.behind / width_behind)
        return max(0.0, ahead), max(0.0, behind)

    def _sync(self) -> None:
        fresh_total = 0.0
        for s in self.spans:
            ahead, behind = self._fresh(s)
            s.ahead += ahead
            s.behind += behind
            fresh_total += ahead + behind
        self.last_sync = self.now
        self.sync.synced(self.now, round(fresh_total), round(self.marked),
                         round(self.sent_pages * self.wire))
        if self.current is not None:
            self.current["pages_dirtied"] += fresh_total

    def _chunk(self) -> None:
        budget = self.policy.CHUNK_SECONDS / self.spp           # pages in one chunk
        while budget > 1e-9:
            if self.current is None:
                if self.marked <= 1e-9:
                    return                                      # all clean
                if len(self.rounds) >= self.policy.max_iterations:
                    return                                      # no pass past the cap
                self.current = self._open_pass()
            budget -= self._send(budget)
            if self.cursor >= self.guest_pages:                 # the pass wraps
                self._close_pass()
                self.cursor = 0.0
                for s in self.spans:
                    s.ahead, s.behind = s.ahead + s.behind, 0.0
                rule = getattr(self.policy, "rule", None)       # a switch after N rounds
                if rule is not None and rule.after_rounds is not None \
                        and len(self.rounds) >= rule.after_rounds:
                    return

    def _send(self, budget: float) -> float:
        """Up to `budget` pages from the cursor on; returns the pages sent."""
        sent = 0.0
        for s in self.spans:
            if self.cursor >= s.hi or sent >= budget:
                continue
            self.cursor = max(self.cursor, s.lo)
            take = min(s.ahead, budget - sent)
            width = s.hi - self.cursor
            if take < s.ahead:
                self.cursor += width * take / s.ahead
            else:
                self.cursor = s.hi
            s.ahead -= take
            sent += take
        if sent < budget:
            self.cursor = float(self.guest_pages)
        self.now += sent * self.spp
        self.sent_pages += sent
        self.current["pages_sent"] += sent
        self.current["end"] = self.now
        return sent if sent > 0 else budget

    def _close_pass(self) -> None:
        self.rounds.append(self.current)
        self.current = None

    def _stats(self) -> PrecopyStats:
        return PrecopyStats(
            iteration=len(self.rounds), dirty_count=round(self.marked),
            total_written=round(self.sent_pages), guest_pages=self.guest_pages,
            page_size=self.page_size, nominal_bytes_per_second=self.wire / self.spp,
            elapsed_seconds=self.now)
