"""Post-copy's preempt channel (QEMU 8.0+'s postcopy-preempt): after the switch the pages the
destination's guest faults on go on a connection of their own, ahead of the background push,
instead of waiting their turn on the data channel behind it.

Why a second connection: on one stream a requested page waits for whatever the push has put
before it (QEMU: the socket's buffer; migbed: the push record on its way and the push
thread's pacing wait after it), however urgent. On its own connection, sent by a thread of its
own the moment it is asked for, it waits for nothing but its own bytes.

- `PreemptSender`, on the source: opened at the switch (before RUN) and again after each
  reconnect of a recovered link. The return path's reader hands it the requests
  (`PostcopySource.requested`); its thread takes the pages still unsent from the cursor (the
  push's, under the lock they share, so every page goes once, on one channel or the other),
  sends them, and charges their bytes to the wire the push is paced on: the push yields the
  bandwidth they took (the link stays the link), but the requested pages never queue behind
  the push's. Before the push's END its `finish` waits until nothing is in flight and ends
  the channel with END of its own.
- `PreemptReceiver`, on the destination: accepts that connection (the migration's token, then
  POSTCOPY_PREEMPT naming the migration) and lands its records through a `RecordSink` of its
  own into the one landing, telling its own `on_present` (the post-copy destination times
  faults by channel). At the data channel's END the destination waits for this channel's END
  too, so no page is still on its way when the pages are counted. A broken link drops both
  channels; the recovery opens both again.
"""

import collections
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from nodes.errors import ConnectionLost, MigbedError, StreamError
from nodes.migration.receive.landing import Landing
from nodes.migration.receive.reader import RecordReader
from nodes.migration.send.link import LinkSender
from nodes.migration.send.source_context import SourceContext
from nodes.migration.wire import records
from nodes.migration.wire.channel import Listener, connect, shut_down
from nodes.migration.wire.records import RecordType as RT
from nodes.migration.wire.zeropage import zero_frames

CHANNELS = ("main", "preempt")      # where a post-copy page lands from (the report's split)
INLINE_PAGES = 64                   # a request up to this many pages may go from the asker


class PreemptOwner(Protocol):
    """The post-copy state the sender counts into (`nodes.migration.postcopy.state.
    PostcopySource`): the cursor's lock it shares with the push, its request counters, and
    where a broken channel is told."""

    cursor_lock: threading.Lock
    pages_requested: int
    requests_already_sent: int
    preempt_channels: int

    def broke(self, exc: BaseException) -> None: ...


# -- the source ---------------------------------------------------------------------------------
class PreemptSender:
    """The source's preempt channel and its thread; see the module docstring."""

    def __init__(self, ctx: SourceContext, owner: PreemptOwner):
        s = ctx.session
        sock = connect(s.ticket, s.settings.timeout_seconds)
        try:
            self.link = LinkSender(sock, None, s.settings.latency_seconds)
            self.link.send([records.encode_record(
                RT.POSTCOPY_PREEMPT, {"migration_id": s.ticket.migration_id})])
        except BaseException:
            sock.close()
            raise
        self.sock, self.ctx, self.owner = sock, ctx, owner
        owner.preempt_channels += 1
        self.wire = ctx.channel.link.link          # the pacer the push goes at
        self.pages = self.zero_pages = 0
        self.cond = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self.busy = self.closed = self.stopping = False
        self.thread = threading.Thread(target=self._run, name="postcopy-preempt", daemon=True)
        self.thread.start()

    @property
    def bytes_sent(self) -> int:
        return self.link.bytes_sent

    def ask(self, pfns: np.ndarray) -> bool:
        """Send these pages now; False once the channel is closed (the caller's push then
        serves them). A small request with nothing in flight is sent by the asking thread
        itself (the return path's reader): a fault's page then waits for no thread's
        wake-up here (measured, ~0.1 ms of a fault on this loaded machine); others queue for
        this channel's thread. One sender at a time either way (`busy`)."""
        with self.cond:
            if self.closed:
                return False
            if self.busy or self.queue or len(pfns) > INLINE_PAGES:
                self.queue.append(pfns)
                self.cond.notify_all()
                return True
            self.busy = True
        try:
            self._serve(pfns)
        except BaseException as exc:  # noqa: BLE001 - a broken channel is the push's news
            self._broken(exc)
        finally:
            with self.cond:
                self.busy = False
                self.cond.notify_all()
        return True

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.busy or (not self.queue and not self.closed):
                        self.cond.wait()
                    if not self.queue:
                        return
                    asked = list(self.queue)
                    self.queue.clear()
                    self.busy = True
                try:
                    for pfns in asked:
                        self._serve(pfns)
                finally:
                    with self.cond:
                        self.busy = False
                        self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - a broken channel is the push's news
            self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        with self.cond:
            self.closed = True               # later requests: the push serves them
            self.queue.clear()               # (the recovery asks for these again)
            self.cond.notify_all()
        if not self.stopping:
            self.owner.broke(exc)

    def _serve(self, pfns: np.ndarray) -> None:
        """The pages of one request still unsent, taken from the push's cursor and sent;
        the push then goes on after the last of them, as without preempt."""
        cursor, owner = self.ctx.pages.cursor, self.owner
        with owner.cursor_lock:
            wanted = cursor.take_these(pfns)
            owner.requests_already_sent += len(pfns) - len(wanted)
            owner.pages_requested += len(wanted)
            if len(wanted):
                cursor.seek(int(wanted[-1]) + 1)
        for i in range(0, len(wanted), records.MAX_BATCH_PAGES):
            self._send(wanted[i:i + records.MAX_BATCH_PAGES])

    def _send(self, pfns: np.ndarray) -> None:
        pipeline, dom = self.ctx.pages.pipeline, self.ctx.session.dom
        with dom.lock:
            mfns = dom.p2m[pfns]
        zero = None
        if pipeline.find_zero:
            zero = zero_frames(pipeline.memory, mfns) & ~pipeline.encoder.is_pt[pfns]
            self.zero_pages += int(np.count_nonzero(zero))
        n = self.link.send(pipeline.encoder.encode(pfns, mfns, zero))
        self.wire.charge(n, time.monotonic())     # the push yields the bytes these took
        self.pages += len(pfns)

    def finish(self, timeout: float) -> None:
        """No more requests here (later ones go to the push, which finds them sent): wait
        until nothing is in flight, then END on this channel."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            while self.queue or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionLost(f"the preempt channel did not drain in {timeout:g} s")
                self.cond.wait(left)
        self.thread.join(timeout)
        self.link.send([records.encode_record(RT.END)])
        self.link.flush(timeout)

    def close(self) -> None:
        """Stop the thread and drop the connection (the migration ended, or the link broke)."""
        with self.cond:
            self.closed = self.stopping = True
            self.queue.clear()
            self.cond.notify_all()
        self.link.close()
        shut_down(self.sock)
        self.sock.close()
        self.thread.join(5.0)


# -- the destination ----------------------------------------------------------------------------
class PreemptReceiver:
    """The destination's preempt channel and the thread that lands its pages."""

    def __init__(self, listener: Listener, migration_id: str, landing: Landing,
                 on_present: Callable[[np.ndarray], None], timeout: float):
        try:
            conn = listener.accept(timeout)
        except (MigbedError, OSError) as exc:
            raise ConnectionLost(f"the preempt channel did not connect: {exc}") from None
        try:
            reader = RecordReader(conn.recv_into, reuse_page_buffer=True, pages_in_place=True,
                                  readv_into=lambda bufs: conn.recvmsg_into(bufs)[0])
            reader.page_size = landing.memory.page_size
            reader.guest_pages = landing.dom.npages
            hello = reader.expect(RT.POSTCOPY_PREEMPT).fields
            if hello["migration_id"] != migration_id:
                raise StreamError("a preempt channel for another migration")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, MigbedError | OSError):
                raise ConnectionLost(f"the preempt channel did not open: {exc}") from None
            raise
        conn.settimeout(None)            # quiet while the guest faults on nothing
        self.conn, self.reader = conn, reader
        self.sink = landing.sink(on_present)
        self.ended = False
        self.error: BaseException | None = None
        self.closing = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="postcopy-preempt-recv",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                rec = self.reader.expect(RT.PAGE_DATA, RT.END)
                if rec.type == RT.END:
                    self.ended = True
                    return
                self.sink.land(rec.fields["page_data"])
        except BaseException as exc:  # noqa: BLE001 - kept for the data channel's END
            if not self.closing:
                self.error = exc
        finally:
            self.done.set()

    def wait_end(self, timeout: float) -> None:
        """The data channel's END came: this channel's END too, every page of it landed."""
        if not self.done.wait(timeout):
            raise ConnectionLost(f"the preempt channel did not end within {timeout:g} s")
        if not self.ended:
            raise ConnectionLost(f"the preempt channel broke: {self.error}")

    def close(self) -> None:
        """Stop landing (before the frames may go, or when the link broke)."""
        self.closing = True
        shut_down(self.conn)
        self.thread.join(5.0)
        self.conn.close()
