"""Recovering a post-copy migration whose link broke, as QEMU's postcopy recovery does it.

After the switch neither side may give up: the guest runs on the destination, whose missing
pages only the source has. A broken link (an I/O error, a corrupt record, no progress for the
timeout) pauses the migration on both sides (`postcopy-paused`): the guest keeps running on
the destination, a vCPU touching a missing page waits.

- The source (`reconnect`) opens a new connection to the destination, with the migration's
  ticket (its listener stays open while post-copy is possible), and sends POSTCOPY_RECOVER; it
  retries for the migration's timeout, then stays paused until `migrate-recover`, which is the
  operator saying the link is back (a cut link stays down until then).
- The destination (`accept_recovery`) waits for that connection as long as it takes (its
  guest depends on it), answers with the set of pages it has (RECV_BITMAP), asks again for
  the pages its vCPU still waits for, and says again when its guest resumed. With post-copy
  preempt both open the preempt channel again once the bitmap has crossed.
- The source then sends every page the destination does not have, once more from pfn 0:
  whatever was in flight when the link broke goes again; nothing is applied twice, since the
  landing takes only pages still missing.
"""

import socket
import time
from typing import TYPE_CHECKING

from nodes.errors import GuestLost, MigbedError, MigrationError, PostcopyPaused
from nodes.migration.postcopy import nativefault
from nodes.migration.postcopy.preempt import PreemptSender
from nodes.migration.receive.reader import RecordReader
from nodes.migration.send.source_context import Channel, SourceContext
from nodes.migration.wire import pagesets, records
from nodes.migration.wire.channel import Listener, connect
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Outcome, Phase

if TYPE_CHECKING:
    from nodes.migration.postcopy.state import PostcopySource

RETRY_SECONDS = 0.05           # between a source's connection attempts
ACCEPT_POLL_SECONDS = 0.1      # how often a waiting destination looks whether to go on


def still_paused(ctx: SourceContext, pc: "PostcopySource", timeout: float) -> PostcopyPaused:
    return PostcopyPaused(
        f"the link to the destination broke after the post-copy switch ({pc.broken}) and "
        f"did not come back within {timeout:g} s: the migration is {Outcome.PAUSED}, the guest "
        f"runs on the destination; once the link is back run "
        f"`migbed migrate-recover {ctx.session.guest}`")


# -- the source ---------------------------------------------------------------------------------
def reconnect(ctx: SourceContext, pc: "PostcopySource", timeout: float) -> bool:
    """A new connection to the destination within `timeout`, and every page it lacks marked
    to go again; False if the link did not come back (the migration stays paused)."""
    s = ctx.session
    t0 = time.monotonic()
    deadline = t0 + timeout
    s.progress.status = Outcome.PAUSED
    wire = _drop_connection(ctx, pc)
    try:
        while True:
            if s.faults.killed:
                raise GuestLost(f"{s.hv.name} died after the post-copy switch")
            if not s.faults.link_down and _attempt(ctx, pc, wire,
                                                   max(0.05, deadline - time.monotonic())):
                break
            if time.monotonic() >= deadline:
                return False
            time.sleep(RETRY_SECONDS)
    finally:
        pc.paused_seconds += time.monotonic() - t0
    pc.paused = False
    pc.recoveries += 1
    s.progress.status = Phase.POSTCOPY.value
    return True


def _drop_connection(ctx: SourceContext, pc: "PostcopySource"):
    """Close the broken connection (its return-path reader ends with it); returns its wire's
    pacer (a slowed link stays slow), None if it was dropped already."""
    channel, wire = ctx.channel, None
    if not channel.dropped:
        pc.earlier_links_bytes += channel.link.bytes_sent
        wire = (channel.link.link, channel.link.shared)
        channel.drop()
    pc.close()
    return wire


def _attempt(ctx: SourceContext, pc: "PostcopySource", wire, timeout: float) -> bool:
    s = ctx.session
    try:
        sock = connect(s.ticket, timeout)
    except MigrationError:
        return False
    dom = s.dom
    try:
        link = ctx.open_link(sock, None)
        if wire is not None:
            link.link, link.shared = wire
        link.send([records.encode_record(RT.POSTCOPY_RECOVER,
                                         {"migration_id": s.ticket.migration_id})])
        reader = RecordReader(sock.recv_into)
        reader.page_size, reader.guest_pages = s.hv.page_size, dom.npages
        received = pagesets.decode_bitmap(reader.expect(RT.RECV_BITMAP).fields["bitmap"],
                                         dom.npages)
    except (MigbedError, OSError):
        sock.close()
        return False
    with pc.cursor_lock:
        ctx.pages.cursor.reset(~received)
    ctx.channel = Channel(sock, link, reader)
    ctx.pages.pipeline.link = link
    s.faults.attach(sock, link)
    try:                                   # its extra channel again, before any request
        if pc.native is not None:          # the native fault channel (preempt's, if asked)
            nativefault.reopen_source(ctx, pc)
        elif s.settings.postcopy_preempt:
            pc.preempt = PreemptSender(ctx, pc)
    except (MigbedError, OSError):
        pc.earlier_links_bytes += link.bytes_sent
        ctx.channel.drop()
        return False
    pc.start_reader(ctx.channel, dom.npages)
    return True


# -- the destination ----------------------------------------------------------------------------
def accept_recovery(listener: Listener, migration_id: str, timeout: float,
                    go_on) -> tuple[socket.socket, RecordReader] | None:
    """One source connection that presents the migration's token and POSTCOPY_RECOVER for
    this migration, waiting for as long as `go_on()` says (None once it says stop)."""
    while go_on():
        try:
            conn = listener.accept_once(ACCEPT_POLL_SECONDS)
        except OSError:
            return None                     # the listener was closed: this host is going
        if conn is None:
            continue
        conn.settimeout(timeout)
        reader = RecordReader(conn.recv_into)
        try:
            rec = reader.expect(RT.POSTCOPY_RECOVER)
        except MigbedError:
            conn.close()
            continue
        if rec.fields["migration_id"] != migration_id:
            conn.close()
            continue
        return conn, reader
    return None
