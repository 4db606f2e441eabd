"""The source's setup: the data channel opened (`open_context`, which makes the context
every phase runs against), then (`Setup`) the guest switched P2M -> VP with log-dirty on
before round 0 reads a single page, the image and domain headers, GUEST_INFO, the P2M frame
list (once), STATIC_DATA_END, and the hosts' clocks measured.

Before the context exists a failure has no channel to tell the destination on; once the
channel is open, it is told (ABORT) by whoever gives the guest back (`send_abort`).
"""

import time

import numpy as np

from nodes.errors import describe_failure
from nodes.migration import clock
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.receive.reader import RecordReader
from nodes.migration.send.dirtysync import SyncLog
from nodes.migration.send.link import LinkSender
from nodes.migration.send.pipeline import PagePipeline
from nodes.migration.send.source_context import (
    Channel,
    Pages,
    Session,
    SourceContext,
    SwitchOver,
    new_link,
)
from nodes.migration.wire import records
from nodes.migration.wire.channel import connect
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Phase
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode


def guest_info(hv: Hypervisor, dom: Domain, migration_id: str,
               workload: dict | None, vcpu: str = "thread", vcpus: int = 1) -> GuestInfo:
    """GUEST_INFO: what the destination needs to reserve frames and check compatibility,
    and to make the guest's vCPUs of the kind that ran them here."""
    return GuestInfo(migration_id=migration_id, name=dom.name, pages=dom.npages,
                     data_pages=dom.data_pages, page_table_pages=len(dom.pt_pfns),
                     page_size=hv.page_size, mode_before=dom.mode.value,
                     mode_during=Mode.VP.value, arch=hv.profile.arch, profile=hv.profile.name,
                     workload=workload, vcpu=vcpu, vcpus=vcpus)


def open_context(s: Session, switch: SwitchOver) -> SourceContext:
    """Setup's first step: the data channel and the pages' pipeline, which make the context
    every phase runs against. If the pipeline cannot be made (multifd's channels), the
    destination is told (ABORT) and the channel closed here: there is no context yet."""
    sock = connect(s.ticket, s.settings.timeout_seconds)
    link = None
    sync = SyncLog(s.hv.page_size, s.dom.npages)          # started once log-dirty is on
    try:
        # A mid-pass policy keeps QEMU's rate limit itself, as a budget per 100 ms window.
        link = new_link(s, sock, None if switch.policy.mid_pass
                        else s.settings.rate_limit_bytes_per_second)
        reader = RecordReader(sock.recv_into)
        pipeline = PagePipeline.for_migration(s.hv, s.dom, link, s.progress, s.settings,
                                              s.ticket, lambda: sync.count)
    except BaseException as exc:
        if link is not None:
            send_abort(link, describe_failure(exc, "the destination"))
            link.close()
        sock.close()
        raise
    ctx = SourceContext(s, switch, Channel(sock, pipeline.link, reader),   # multifd: its channels
                        Pages(pipeline, pipeline.cursor, sync, np.empty_like(s.dom.p2m)))
    link.wait = ctx.link_wait
    return ctx


class Setup:
    """The channel (opened by the sender: `open_context`), P2M -> VP, log-dirty on, the
    headers, GUEST_INFO, the P2M frames, the hosts' clocks."""

    phase = Phase.SETUP

    def wanted(self, ctx: SourceContext) -> bool:
        return True

    def run(self, ctx: SourceContext) -> None:
        s, pages, link = ctx.session, ctx.pages, ctx.channel.link
        hv, dom = s.hv, s.dom
        s.faults.attach(ctx.channel.sock, link)
        s.faults.at(Phase.SETUP)
        # Shadow mode with log-dirty, before round 0 reads a single page.
        hv.set_mode(dom.name, Mode.VP)
        hv.shadow_op(dom.name, ShadowOp.ENABLE_LOGDIRTY)
        pages.p2m_sent[:] = dom.p2m
        link.send([records.encode_image_header(),
                   records.encode_domain_header(Mode.VP.value, hv.memory.page_shift)])
        ctx.send_record(RT.GUEST_INFO, guest_info(
            hv, dom, s.ticket.migration_id, s.runtime.workload_spec(dom.name),
            **s.runtime.vcpu_config(dom.name)).to_dict())
        ctx.send_record(RT.P2M_FRAMES, {"mfns": pages.p2m_sent.astype("<u8").tobytes()})
        ctx.send_record(RT.STATIC_DATA_END)
        _measure_clock(ctx)
        pages.sync.start(time.monotonic(), link.bytes_sent)


def _measure_clock(ctx: SourceContext) -> None:
    """The destination's clock against this one's (`nodes.migration.clock`), while nothing
    else is in flight on the channel."""
    ch, r = ctx.channel, ctx.session.result

    def send(fields: dict) -> None:
        ch.send_record(RT.CLOCK_PROBE, fields)
        ch.link.flush(ctx.session.settings.timeout_seconds)
    est = clock.measure(send, lambda: ch.reader.expect(RT.CLOCK_REPLY).fields)
    r.clock_offset_seconds = est.offset_seconds
    r.clock_rtt_seconds = est.rtt_seconds


def send_abort(link: LinkSender, error: str) -> None:
    """ABORT to the destination, best effort: the peer may be gone."""
    try:
        link.send([records.encode_record(RT.ABORT, {"error": error[:1000]})])
    except Exception:  # noqa: BLE001 - the peer may be gone; the abort is best effort
        pass

