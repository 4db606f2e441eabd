"""Bitmap syncs, counted and timed as QEMU counts them (ram.c `migration_bitmap_sync`).

A sync is the moment the sender learns what the guest dirtied: a CLEAN of the log-dirty
bitmap here. `count` is QEMU's dirty-sync-count: 1 after setup (log-dirty enabled, every
page to send), one more at every sync, the final one of stop-and-copy included; for the xen
policies it counts their CLEANs the same way, so migbed's numbers line up with
`query-migrate`'s. `dirty_bytes_last_sync` is what was left to send after the last sync (the
numerator of QEMU's expected-downtime). Syncs are grouped into periods of at least a second,
as QEMU measures its dirty-pages-rate over them; each `synced` that closes a period returns
it (the auto-converge trigger looks at periods).
"""

from dataclasses import dataclass

PERIOD_SECONDS = 1.0


@dataclass(frozen=True)
class SyncPeriod:
    """A period between two syncs at least a second apart, as QEMU's rate counters see it."""

    seconds: float
    dirtied_pages: int     # pages newly marked dirty by the syncs in the period
    sent_bytes: int        # bytes the migration sent in the period

    @property
    def dirty_pages_per_second(self) -> float:
        return self.dirtied_pages / self.seconds if self.seconds > 0 else 0.0


class SyncLog:
    """The syncs of one migration, from log-dirty's start (`start`: at `now` if given, else
    when the sender's setup has turned log-dirty on)."""

    def __init__(self, page_size: int, guest_pages: int, now: float | None = None,
                 bytes_sent: int = 0):
        self.page_size = page_size
        self.count = 0                                   # log-dirty is not on yet
        self.dirty_bytes_last_sync = guest_pages * page_size
        self.dirty_pages_per_second: float | None = None
        self.periods: list[SyncPeriod] = []
        self._period_start = self.last_sync_at = 0.0
        self._period_dirtied = 0
        self._period_bytes0 = 0
        if now is not None:
            self.start(now, bytes_sent)

    def start(self, now: float, bytes_sent: int = 0) -> None:
        """Log-dirty is on and every page is to send: setup's sync, the first one counted;
        the first rate period starts here, `bytes_sent` already sent before it."""
        self.count = 1
        self._period_start = self.last_sync_at = now
        self._period_bytes0 = bytes_sent

    def synced(self, now: float, dirtied_pages: int, pending_pages: int,
               bytes_sent: int) -> SyncPeriod | None:
        """A sync found `dirtied_pages` newly dirty, leaving `pending_pages` to send."""
        self.count += 1
        self.last_sync_at = now
        self.dirty_bytes_last_sync = pending_pages * self.page_size
        self._period_dirtied += dirtied_pages
        if now <= self._period_start + PERIOD_SECONDS:
            return None
        period = SyncPeriod(now - self._period_start, self._period_dirtied,
                            bytes_sent - self._period_bytes0)
        self.periods.append(period)
        self.dirty_pages_per_second = period.dirty_pages_per_second
        self._period_start, self._period_dirtied, self._period_bytes0 = now, 0, bytes_sent
        return period
