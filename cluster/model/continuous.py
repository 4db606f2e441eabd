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
first pass, every page is) add nothing. The migration stops when the switch-over arbiter
(`nodes.migration.decide.switchover`, the sender's own) says so; the stop-and-copy then sends what is
marked plus what was dirtied since the last sync.
"""

import math
from dataclasses import dataclass

from cluster.model.throttle_model import ModelThrottle, running_share
from cluster.model.workload import Region
from nodes.migration.decide.policy import Action, Decision, PrecopyStats, QemuPolicy
from nodes.migration.decide.switchover import Arbiter, Moment
from nodes.migration.decide.throttle import forced_sync_due
from nodes.migration.send.dirtysync import SyncLog

_CHUNK_GUARD = 10_000_000       # a policy that never stops would loop forever


@dataclass
class _Span:
    lo: float                   # first pfn
    hi: float                   # one past the last
    region: Region | None       # how the workload writes it (None: never)
    ahead: float                # marked, not sent, ahead of the cursor in this pass
    behind: float = 0.0         # marked, not sent, behind it: the next pass's
    zero: float = 0.0           # of `ahead` in the first pass, pages still zero (`pagetypes`)
    zero_at: float = 0.0        # the guest's time when `zero` was last brought up to date

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

    def __init__(self, spans: list[_Span], arbiter: Arbiter, seconds_per_page: float,
                 wire_per_page: float, page_size: int, guest_pages: int,
                 throttle: ModelThrottle | None = None, zero_wire: float = 0.0):
        self.spans = spans
        self.arbiter = arbiter              # its policy, the timeouts, the switch rule
        self.policy: QemuPolicy = arbiter.policy
        self.spp = seconds_per_page
        self.wire = wire_per_page
        self.zero_wire = zero_wire          # a zero page's bytes; it costs its share of time
        self.zero_spp = seconds_per_page * zero_wire / wire_per_page
        self.sent_bytes = 0.0
        self.page_size = page_size
        self.guest_pages = guest_pages
        self.now = 0.0
        self.sent_pages = 0.0
        self.cursor = 0.0
        self.last_sync = 0.0
        self.sync = SyncLog(page_size, guest_pages, 0.0)
        self.throttle = throttle
        self.guest_now = 0.0                # the vCPU's running time (throttled time is not)
        self.guest_last_sync = 0.0
        self.rounds: list[dict] = []        # index, pages_sent, pages_dirtied, start, end
        self.current: dict | None = self._open_pass()

    @property
    def marked(self) -> float:
        return sum(s.ahead + s.behind for s in self.spans)

    def _open_pass(self) -> dict:
        return {"index": len(self.rounds), "pages_sent": 0.0, "pages_dirtied": 0.0,
                "start": self.now, "end": self.now, "cpu_throttle_percentage": 0}

    def run(self) -> Decision:
        """Until the arbiter stops: check, then a chunk, then the window. Returns the
        Decision."""
        self.policy.start(0.0, 0)
        for _ in range(_CHUNK_GUARD):
            forced = forced_sync_due(isinstance(self.throttle, ModelThrottle), self.now,
                                     self.last_sync)
            if self.policy.wants_exact(self.marked * self.page_size) or forced:
                self._sync()
            decision = self.arbiter.decide(Moment(self._stats(), self.now,
                                                  round(self.marked) * self.page_size))
            if decision.action is not Action.CONTINUE:
                if self.current is not None and (self.current["pages_sent"] > 0
                                                 or decision.action is not Action.POSTCOPY):
                    self._close_pass()
                elif self.current is not None:       # not a round: its syncs' to the last
                    unsent, self.current = self.current, None
                    self._dirtied(unsent["pages_dirtied"])
                return decision
            self._chunk()
            if self.throttle is not None:
                self.throttle.tick(self.now)
            self.policy.window_closed(self.now, self.sent_bytes,
                                      self.sync.dirty_bytes_last_sync,
                                      self.sync.dirty_pages_per_second is not None)
        raise RuntimeError("the model's chunk guard was reached")

    def pause_sync(self) -> None:
        """The sync at the pause, as the sender counts it: what was dirtied since the last
        sync is the last round's (`SourceContext.dirtied`)."""
        self._dirtied(sum(sum(self._fresh(s)) for s in self.spans))

    def _dirtied(self, fresh: float) -> None:
        """A sync's fresh pages, counted in the pass under way, else the last round."""
        if self.current is not None:
            self.current["pages_dirtied"] += fresh
        elif self.rounds:
            self.rounds[-1]["pages_dirtied"] += fresh

    def final_pages(self) -> float:
        """What the stop-and-copy sends: the marked pages and those dirtied since the sync."""
        return self.marked + sum(sum(self._fresh(s)) for s in self.spans)

    def final_zero_pages(self) -> float:
        """Of those, the zero pages a first pass cut short left behind."""
        for s in self.spans:
            self._age_zero(s)
        return sum(s.zero for s in self.spans)

    def _age_zero(self, s: _Span) -> None:
        """Zero pages ahead of the cursor the workload has written since: normal now."""
        if s.zero and s.region is not None:
            s.zero *= math.exp(-s.region.rate / s.pages * (self.guest_now - s.zero_at))
        s.zero_at = self.guest_now

    # -- the steps ------------------------------------------------------------------------
    def _fresh(self, s: _Span) -> tuple[float, float]:
        """Pages of `s` dirtied since the last sync and not marked already, ahead of the
        cursor and behind it: writes fall uniformly over the stretch, and each part's marks
        hide the writes that hit them."""
        written = s.dirtied(self.guest_now - self.guest_last_sync)
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
        self.last_sync, self.guest_last_sync = self.now, self.guest_now
        period = self.sync.synced(self.now, round(fresh_total), round(self.marked),
                                  round(self.sent_bytes))
        if self.throttle is not None:
            self.throttle.period_closed(period, self.now)
        self._dirtied(fresh_total)

    def _chunk(self) -> None:
        budget = self.policy.CHUNK_SECONDS                      # seconds of sending
        while budget > 1e-12:
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
                    s.ahead, s.behind, s.zero = s.ahead + s.behind, 0.0, 0.0
                if self.arbiter.switch_after(len(self.rounds)):
                    return                              # a switch after N rounds

    def _send(self, budget: float) -> float:
        """Up to `budget` seconds of pages from the cursor on (a zero page costs its pfn
        word's share); returns the seconds spent."""
        used = sent = zero_sent = 0.0
        for s in self.spans:
            if self.cursor >= s.hi or used >= budget:
                continue
            self.cursor = max(self.cursor, s.lo)
            self._age_zero(s)
            share = s.zero / s.ahead if s.ahead > 0 else 0.0
            cost = share * self.zero_spp + (1 - share) * self.spp
            take = min(s.ahead, (budget - used) / cost) if cost > 0 else s.ahead
            width = s.hi - self.cursor
            if take < s.ahead:
                self.cursor += width * take / s.ahead
            else:
                self.cursor = s.hi
            s.ahead -= take
            s.zero -= take * share
            used += take * cost
            sent += take
            zero_sent += take * share
        if used < budget:
            self.cursor = float(self.guest_pages)
        self.now += used
        self.guest_now += used * running_share(self.throttle)
        self.sent_pages += sent
        self.sent_bytes += (sent - zero_sent) * self.wire + zero_sent * self.zero_wire
        self.current["pages_sent"] += sent
        self.current["zero_pages"] = self.current.get("zero_pages", 0.0) + zero_sent
        self.current["end"] = self.now
        return used if used > 0 else budget

    def _close_pass(self) -> None:
        if self.throttle is not None:
            self.current["cpu_throttle_percentage"] = self.throttle.percentage
        self.rounds.append(self.current)
        self.current = None

    def _stats(self) -> PrecopyStats:
        return PrecopyStats(
            iteration=len(self.rounds), dirty_count=round(self.marked),
            total_written=round(self.sent_pages), guest_pages=self.guest_pages,
            page_size=self.page_size, nominal_bytes_per_second=self.wire / self.spp,
            elapsed_seconds=self.now)
