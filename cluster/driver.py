"""Driving one migration between two hosts: the control plane, and the report.

The steps, each a call on a host handle (Ray actor calls in the cluster): check the guest on
the source; have the destination reserve frames and issue a ticket (nothing has moved if this
fails); start the source's sender, which streams straight to the destination over TCP;
poll progress; collect both sides; build the report. The data never passes through here.
A paused post-copy resumes the same way (`recover_migration`).
"""

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from cluster.appfeel import attach_application
from cluster.model.block import model_block
from cluster.postcopy_control import settle_switched
from cluster.report import MigrationReport
from cluster.settle import FaultControl
from nodes.errors import MigbedError, MigrationError
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.progress import Progress
from nodes.migration.settings import MigrationSettings
from workloads.brownout import AFTER_SECONDS
from workloads.spec import PROGRAMS

POLL_SECONDS = 0.1
FIRST_POLL_SECONDS = 0.005   # progress polls start fast and back off to POLL_SECONDS


def new_migration_id() -> str:
    return uuid.uuid4().hex[:12]


def run_migration(src, dst, guest: str, settings: MigrationSettings,
                  on_progress: Callable[[Progress], None] | None = None,
                  migration_id: str | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  application_after_seconds: float | None = None) -> MigrationReport:
    """Migrate `guest` from host handle `src` to `dst`. Raises for errors before anything
    moves (bad guest, no room, incompatible hosts); returns a report for everything after.
    A program guest's report waits `application_after_seconds` past the end for its
    application block (`cluster.appfeel`: the brownout's span)."""
    ran = migrate_once(src, dst, guest, settings, on_progress, migration_id, should_cancel)
    return with_application(ran, src, dst, application_after_seconds)


@dataclass
class Ran:
    """A migration that has ended, and what its application block needs of it."""

    report: MigrationReport
    info: GuestInfo
    start_wall: float
    end_wall: float


def migrate_once(src, dst, guest: str, settings: MigrationSettings,
                 on_progress: Callable[[Progress], None] | None = None,
                 migration_id: str | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> Ran:
    """The migration itself, to its end (the scheduler frees its slot here, before the
    application's wait)."""
    if src.name == dst.name:
        raise MigrationError(f"{guest} is already on {src.name}; pick another destination")
    mid = migration_id or new_migration_id()
    timeout = settings.timeout_seconds
    info = src.call("guest_info", guest, mid, timeout=timeout)
    ticket = dst.call("prepare_incoming", info, settings, timeout=timeout)
    ticket = replace(ticket, host=dst.name)    # the pair's measured hand-over is per host
    start_wall = time.time()
    pending = src.call_async("migrate_out", guest, ticket, settings)
    control = FaultControl(src, dst, mid, guest, settings)
    report = follow(pending, control, src, dst, guest, info, settings, on_progress,
                    should_cancel)
    return Ran(report, info, start_wall, time.time())


def with_application(ran: Ran, src, dst,
                     application_after_seconds: float | None = None) -> MigrationReport:
    """The report, with a program guest's application block read
    `application_after_seconds` (default: the brownout's span) after the end."""
    report = ran.report
    if (ran.info.workload or {}).get("pattern") in PROGRAMS and report.guest_host in (
            src.name, dst.name):
        host = dst if report.guest_host == dst.name else src
        attach_application(report, host, ran.start_wall, ran.end_wall, None,
                           AFTER_SECONDS if application_after_seconds is None
                           else application_after_seconds)
    return report


def recover_migration(src, dst, paused: dict,
                      on_progress: Callable[[Progress], None] | None = None) -> MigrationReport:
    """Resume a paused post-copy (`paused`: an entry of the source's `paused_migrations`):
    the link is back; the report once it ends (or pauses again)."""
    settings: MigrationSettings = paused["settings"]
    mid, guest = paused["migration_id"], paused["guest"]
    pending = src.call_async("migrate_recover", mid)
    control = FaultControl(src, dst, mid, guest, settings)
    return follow(pending, control, src, dst, guest, paused["info"], settings, on_progress)


def follow(pending, control: FaultControl, src, dst, guest: str, info: GuestInfo,
           settings: MigrationSettings, on_progress: Callable[[Progress], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> MigrationReport:
    """Poll a running sender (`pending`, the source's migrate_out or migrate_recover) until
    it returns, settle both sides and build the report."""
    mid, timeout = control.mid, settings.timeout_seconds
    cancelled = False
    poll = FIRST_POLL_SECONDS
    while not pending.done():
        if on_progress is not None or control.armed:
            try:
                p = src.call("migration_progress", mid, timeout=timeout)
            except MigbedError:
                p = None
            if p and on_progress is not None:
                on_progress(p)
            control.poll(p)      # carries out a host kill the sender waits for
        if should_cancel is not None and not cancelled and should_cancel():
            try:
                src.call("cancel_migration", mid, timeout=timeout)
            except MigbedError:
                pass
            cancelled = True
        pending.wait(poll)        # returns the moment the migration ends
        poll = FIRST_POLL_SECONDS if control.armed else min(2 * poll, POLL_SECONDS)
    # Both sides, whatever became of them (a dead host, an unanswered hand-over).
    settled = control.settle(pending, info, settle_switched)
    source = settled.source
    if on_progress is not None and source.rounds:
        # The rounds that ended after the last poll (a short migration can end between two).
        on_progress(Progress(mid, guest, status=source.status,
                             rounds=[r.to_dict() for r in source.rounds]))
    report = MigrationReport.build(mid, guest, src.name, dst.name, info, settings, settled)
    report.model = model_block(report, info.workload, settings,
                               fixed_downtime=source.fixed_downtime)
    return report
