"""The hand-over, both sides of it, as libxl does it beside the stream.

    source                                   destination
    END  ------------------------------->    every page arrived? page tables valid?
         <-------------------------------    READY
    rename its copy `<name>--migratedaway`   (its vCPU made ready meanwhile, waiting)
    PERMISSION_TO_GO  ------------------>    P2M again, guest resumed
         <-------------------------------    RESULT (ok, resume time, its digest of the
                                             pages as they landed, taken after the resume)
    destroy its copy (after verify)

The destination's resume time is brought onto the source's clock (the offset measured at
setup, `nodes.migration.clock`) before the downtime is taken from it. The downtime (pause
to resume) holds only what must happen with the guest stopped: the vCPU was made when the
stream opened (a guest process: when the migration was prepared), parked, and only takes
its context here, the digest is taken once the guest runs.

Before PERMISSION_TO_GO the guest is the source's: any failure resumes it there. After it,
the guest is the destination's; a RESULT that never comes leaves the paused copy for the
control plane to settle (`resolve_handover`).
"""

import time
from typing import Protocol

from nodes.errors import MigbedError, MigrationError
from nodes.faults.at_destination import DestinationFaults
from nodes.migration.clock import to_source_clock
from nodes.migration.receive.landing import Landing
from nodes.migration.receive.reader import RecordReader
from nodes.migration.runtime import GuestRuntime
from nodes.migration.send.source_context import SourceContext
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Outcome, Phase
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode

MIGRATED_AWAY = "--migratedaway"


class HandoverReceiver(Protocol):
    """What the destination's side of the hand-over needs of its receiver
    (`nodes.migration.receive.receiver.Receiver`, which runs it: a Protocol, so that this module
    needs not import it back)."""

    faults: DestinationFaults
    landing: Landing
    status: str
    resume_wall: float | None

    def reply(self, rtype: RT, fields: dict | None = None) -> None: ...

    def make_vcpu(self) -> None: ...

    def resume(self) -> None: ...


class SourceHandover:
    """The source's side: READY in, PERMISSION_TO_GO out, RESULT in."""

    phase = Phase.HANDOVER

    def wanted(self, ctx: SourceContext) -> bool:
        return True

    def run(self, ctx: SourceContext) -> None:
        s, ch, flags, r = ctx.session, ctx.channel, ctx.handover, ctx.session.result
        ch.reader.expect(RT.RECEIVER_READY)
        s.hv.rename_domain(s.guest, s.guest + MIGRATED_AWAY)
        flags.renamed = True
        ch.send_record(RT.PERMISSION_TO_GO)
        ch.link.flush(s.settings.timeout_seconds)
        flags.handed_over = True
        s.faults.at(Phase.HANDOVER)
        try:
            result = ch.reader.expect(RT.RECEIVER_RESULT)
        except MigbedError as exc:
            raise MigrationError(
                f"hand-over status unknown ({exc}); the source copy is kept paused as "
                f"{s.guest}{MIGRATED_AWAY}") from None
        if not result.fields["ok"]:
            flags.handed_over = False
            raise MigrationError(f"destination failed to resume: {result.fields['error']}")
        r.resume_wall = to_source_clock(result.fields["resume_wall"], r.clock_offset_seconds)
        r.destination_digest = result.fields["digest"]
        r.downtime_source_seconds = time.monotonic() - flags.pause_mono
        ctx.resumed()


def destination_handover(rx: HandoverReceiver, reader: RecordReader) -> None:
    """The destination's side, once every page has arrived and the page tables are valid:
    READY out, PERMISSION_TO_GO in, the guest resumed, RESULT out."""
    rx.faults.delay(Phase.STOP_AND_COPY)
    rx.status = Outcome.READY
    rx.reply(RT.RECEIVER_READY, {"pages_received": rx.landing.pages_received})
    rx.make_vcpu()                      # the parked vCPU takes its context
    reader.expect(RT.PERMISSION_TO_GO)
    rx.faults.delay(Phase.HANDOVER)
    rx.resume()
    rx.reply(RT.RECEIVER_RESULT, {"ok": True, "error": None, "resume_wall": rx.resume_wall,
                                  "digest": rx.landing.digest()})


def resolve_handover(hv: Hypervisor, runtime: GuestRuntime, name: str, mode_before: str,
                     destination_resumed: bool) -> dict:
    """Settle a hand-over whose RESULT never reached the source (libxl leaves this to the
    admin; migbed's control plane asks the destination and tells the source here).

    Resumed there: the paused copy here is stale and goes, its digest taken first so the
    migration can still be verified. Not resumed (failed, or its host is dead): the paused
    copy here is the guest, and it resumes in its own mode."""
    away = name + MIGRATED_AWAY
    dom = hv.domain(away)
    if destination_resumed:
        digest = hv.canonical_digest(away)
        runtime.stop_guest(name)
        hv.destroy_domain(away, force=True)
        return {"source_digest": digest}
    hv.rename_domain(away, name)
    if dom.logdirty.enabled:
        hv.shadow_op(name, ShadowOp.OFF)
    hv.set_mode(name, Mode.parse(mode_before))
    hv.unpause(name)
    return {"resume_wall": time.time()}
