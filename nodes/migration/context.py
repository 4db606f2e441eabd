"""What the source's phases share (`SourceContext`) and what a phase is (`SourcePhase`).

A migration algorithm is a tuple of phases run in order against one context: the guest, its
settings and policy, the channel, the page pipeline, which pages still go (`cursor`), the
bitmap syncs so far (`sync`), the rounds done, and the result being built.
"""

import socket
import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nodes.errors import MigrationCancelled
from nodes.faults.source import SourceFaults
from nodes.migration import records
from nodes.migration.channel import Ticket
from nodes.migration.dirtysync import SyncLog
from nodes.migration.link import LinkSender, Pacer
from nodes.migration.pipeline import PagePipeline, PassCursor
from nodes.migration.policy import Decision, PrecopyPolicy
from nodes.migration.progress import PhaseClock, Progress, RoundStats
from nodes.migration.reader import RecordReader
from nodes.migration.records import RecordType as RT
from nodes.migration.results import SourceResult
from nodes.migration.runtime import GuestRuntime
from nodes.migration.settings import MigrationSettings
from nodes.phase import Phase
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode


@dataclass
class SourceContext:
    """What the source's phases share: the guest, its settings, the channel, the result."""

    hv: Hypervisor
    dom: Domain
    guest: str                     # the guest's name (the domain's until the hand-over)
    settings: MigrationSettings
    policy: PrecopyPolicy
    runtime: GuestRuntime
    progress: Progress
    cancel: threading.Event
    faults: SourceFaults
    ticket: Ticket
    shared_link: Pacer | None
    result: SourceResult
    clock: PhaseClock
    mode_before: Mode
    sock: socket.socket | None = None
    link: LinkSender | None = None
    reader: RecordReader | None = None
    pipeline: PagePipeline | None = None
    cursor: PassCursor | None = None
    sync: SyncLog | None = None
    p2m_sent: np.ndarray | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    current: object | None = None  # the pass under way, for a policy deciding mid-pass
    pause_mono: float | None = None
    renamed: bool = False          # the copy here is `<name>--migratedaway`
    handed_over: bool = False      # PERMISSION_TO_GO went out: the guest is the destination's
    decision: Decision | None = None   # how the live rounds ended
    # Post-copy allowed: its state (`nodes.migration.postcopy.source.PostcopySource`).
    postcopy: object | None = None

    def send_record(self, rtype: RT, fields: dict | None = None) -> int:
        return self.link.send([records.encode_record(rtype, fields)])

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationCancelled(f"migration of {self.guest} cancelled by the operator")

    def round_done(self, rnd: RoundStats) -> None:
        self.rounds.append(rnd)
        self.progress.round_done(rnd)

    def clean(self, now: float) -> int:
        """A bitmap sync: CLEAN log-dirty, mark what it shows; returns the pages newly
        marked. Counted in `sync` (QEMU's dirty-sync-count and its rate periods)."""
        bitmap, _ = self.hv.shadow_op(self.dom.name, ShadowOp.CLEAN)
        fresh = self.cursor.mark(bitmap)
        self.sync.synced(now, fresh, self.cursor.pending_pages, self.link.bytes_sent)
        self.progress.dirty_pages = int(fresh)
        return fresh


class SourcePhase(Protocol):
    phase: Phase

    def wanted(self, ctx: SourceContext) -> bool: ...

    def run(self, ctx: SourceContext) -> None: ...
