"""multifd: a migration's pages over N more TCP connections, as QEMU's multifd.c does it.

Each channel is a connection to the destination's listener presenting the migration's token,
then a MULTIFD_HELLO record saying which channel it is. On the source (`SourceChannels`) the
pipeline hands pages over in packets of 128 (`PACKET_PAGES`) to the next idle channel, round
robin from the last one used, skipping busy ones; each channel's thread finds the packet's
zero pages (multifd zero-page detection), compresses the rest (`nodes.migration.wire.compression`)
and sends the packet as PAGE_DATA (or PAGE_COMPRESSED) on its own `LinkSender`. The channels
share the main link's pacer and its rate limit, so N channels are as fast as one link.

Once per pass every channel syncs (QEMU's multifd_send_sync_main): each sends MULTIFD_SYNC
after its last packet, the main thread waits for all of them, then sends MULTIFD_FLUSH on the
main channel. On the destination (`DestinationChannels`) each channel's thread asks its
reader for the next packet and lands it into the one `Landing` through a `RecordSink` of
its own (as the main receiver does, the reader knowing nothing of the landing), and stops at a MULTIFD_SYNC until
the main reader, at the matching MULTIFD_FLUSH, has seen every channel reach it: so no page
of the next pass lands before this pass's copy of it, on whatever channel. Every control
record on the main channel waits for a sync first, so nothing sent before it is still on
its way (the drain, the vCPU context, END).

A channel that breaks fails the migration: its error is kept, the other side's readers and
senders are woken, and the migration ends as any failed one does (the guest resumes on its
source; the destination stops its channels before it frees the frames).
"""

import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from nodes.errors import ConnectionLost, MigrationError, StreamError
from nodes.migration.receive.reader import RecordReader
from nodes.migration.send.link import LinkSender, Pacer
from nodes.migration.wire import compression, encoded, records
from nodes.migration.wire.channel import Listener, Ticket, connect, shut_down
from nodes.migration.wire.records import RecordType as RT
from nodes.migration.wire.zeropage import zero_frames

PACKET_PAGES = 128           # QEMU: 512 KiB of 4 KiB pages per packet


class _Channel:
    """One sending channel: its link, its thread, and the job it is doing (None: idle)."""

    def __init__(self, index: int, sock: socket.socket, link: LinkSender):
        self.index = index
        self.sock = sock
        self.link = link
        self.job: tuple | None = None
        self.thread: threading.Thread | None = None
        self.cpu_seconds = 0.0


class SourceChannels:
    """The sending side: the channels, the main link they stand beside, and their syncs. It
    is the migration's link for everyone else (`send`, `flush`, `bytes_sent`, the faults'
    seams), so the phases and the policy see every channel's bytes."""

    def __init__(self, main: LinkSender, ticket: Ticket, count: int, memory, *,
                 timeout: float, latency: float, find_zero: bool, codec: str | None,
                 level: int | None, buffers_of: Callable):
        self.main = main
        self.memory = memory
        self.timeout = timeout
        self.find_zero = find_zero
        self.buffers_of = buffers_of          # (pfns, mfns, types) -> the pages' buffers
        self.codec = codec
        self.level = level
        self.lock = threading.Lock()          # the round's counters, shared with the pipeline
        self._cond = threading.Condition()
        self._last = -1
        self._dirty = False                   # packets handed out since the last sync
        self._closing = False
        self.error: BaseException | None = None
        self.syncs = 0
        self.raw_bytes = 0                    # page bytes given to the compressor
        self.compressed_bytes = 0             # what it made of them
        self.channels: list[_Channel] = []
        try:
            for i in range(count):
                sock = connect(ticket, timeout)
                link = LinkSender(sock, latency_seconds=latency, shared_link=main.link)
                link.rate_limit, link.rate_limited = main.rate_limit, main.rate_limited
                link.send([records.encode_record(RT.MULTIFD_HELLO, {
                    "migration_id": ticket.migration_id, "channel": i, "channels": count})])
                self.channels.append(_Channel(i, sock, link))
        except BaseException:
            self.close()
            raise
        for ch in self.channels:
            ch.thread = threading.Thread(target=self._run, args=(ch,), daemon=True,
                                         name=f"multifd-send-{ch.index}")
            ch.thread.start()

    # -- the link, as the phases see it ----------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self.main.bytes_sent + sum(ch.link.bytes_sent for ch in self.channels)

    @property
    def tamper(self):
        return self.main.tamper

    @tamper.setter
    def tamper(self, value) -> None:
        self.main.tamper = value

    def send(self, buffers: list) -> int:
        """A control record on the main channel, once every page handed out before it has
        gone (a sync, when packets went since the last one)."""
        if self._dirty:
            self.sync()
        return self.main.send(buffers)

    def flush(self, timeout: float) -> None:
        if self._dirty:
            self.sync()
        self.main.flush(timeout)
        for ch in self.channels:
            ch.link.flush(timeout)

    def lift_rate_limit(self) -> None:
        self.main.lift_rate_limit()
        for ch in self.channels:
            ch.link.rate_limited = False

    def set_link_rate(self, bytes_per_second: float | None) -> None:
        """A slow-link fault: the one wire all channels share gets slower."""
        pacer = Pacer(bytes_per_second)
        for link in (self.main, *(ch.link for ch in self.channels)):
            link.link, link.shared = pacer, True

    def cut(self, index: int) -> None:
        """A cut-channel fault: channel `index`'s connection goes down."""
        shut_down(self.channels[index].sock)

    # -- packets and syncs -----------------------------------------------------------------
    def dispatch(self, pfns: np.ndarray, mfns: np.ndarray, types: np.ndarray, rnd) -> None:
        """Pages in packets of PACKET_PAGES, each to the next idle channel."""
        for at in range(0, len(pfns), PACKET_PAGES):
            part = slice(at, at + PACKET_PAGES)
            self._hand(("pages", pfns[part], mfns[part], types[part].copy(), rnd))
            with self.lock:
                self._dirty = True

    def sync(self) -> None:
        """Every channel sends MULTIFD_SYNC after its packets; once all have, the main
        channel sends MULTIFD_FLUSH of the same number."""
        self.syncs += 1
        for ch in self.channels:
            self._hand(("sync", self.syncs), ch)
        self._wait(lambda: all(ch.job is None for ch in self.channels))
        self._dirty = False
        self.main.send([records.encode_record(RT.MULTIFD_FLUSH, {"sync": self.syncs})])

    def _hand(self, job: tuple, to: _Channel | None = None) -> None:
        with self._cond:
            def pick():
                if to is not None:
                    return to if to.job is None else None
                n = len(self.channels)
                for k in range(1, n + 1):
                    ch = self.channels[(self._last + k) % n]
                    if ch.job is None:
                        return ch
                return None
            self._wait_locked(lambda: pick() is not None)
            ch = pick()
            self._last = ch.index if to is None else self._last
            ch.job = job
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self._cond:
            self._wait_locked(ready)

    def _wait_locked(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        while not ready():
            self._raise()
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(f"no multifd channel was free within {self.timeout:g} s")
            self._cond.wait(min(left, 0.1))
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # -- a channel's thread ------------------------------------------------------------------
    def _run(self, ch: _Channel) -> None:
        cpu0 = time.thread_time()
        packer = (compression.Compressor(self.codec, self.level) if self.codec else None)
        try:
            while True:
                with self._cond:
                    while ch.job is None and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        return
                    job = ch.job
                if job[0] == "sync":
                    ch.link.send([records.encode_record(RT.MULTIFD_SYNC, {"sync": job[1]})])
                else:
                    self._packet(ch, packer, *job[1:])
                with self._cond:
                    ch.job = None
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - kept, and raised in the main thread
            with self._cond:
                if self.error is None and not self._closing:
                    self.error = (exc if isinstance(exc, ConnectionLost | MigrationError)
                                  else MigrationError(f"{type(exc).__name__}: {exc}"))
                    self.error = type(self.error)(
                        f"multifd channel {ch.index}: {self.error}")
                self._cond.notify_all()
        finally:
            ch.cpu_seconds = time.thread_time() - cpu0

    def _packet(self, ch: _Channel, packer, pfns, mfns, types, rnd) -> None:
        zeros = 0
        if self.find_zero:
            zero = zero_frames(self.memory, mfns) & (types == records.PageType.NOTAB)
            types[zero] = records.PageType.ZERO
            zeros = int(np.count_nonzero(zero))
        pages = self.buffers_of(pfns, mfns, types)
        normal = len(pfns) - zeros
        if packer is not None and normal:
            payload = packer.compress(pages)
            n = ch.link.send(encoded.encode_compressed(pfns, types, packer.code, payload))
            with self.lock:
                self.raw_bytes += normal * self.memory.page_size
                self.compressed_bytes += len(payload)
        else:
            n = ch.link.send(records.encode_page_data(pfns, types, pages))
        with self.lock:
            rnd.bytes_sent += n
            rnd.zero_pages += zeros
            rnd.normal_pages += normal

    # -- the end -------------------------------------------------------------------------------
    def stats(self) -> dict:
        ratio = self.raw_bytes / self.compressed_bytes if self.compressed_bytes else None
        return {"channels": len(self.channels),
                "bytes_per_channel": [ch.link.bytes_sent for ch in self.channels],
                "compression": self.codec or "none", "compression_level": self.level,
                "compression_ratio": ratio, "raw_bytes": self.raw_bytes,
                "compressed_bytes": self.compressed_bytes, "syncs": self.syncs,
                "cpu_seconds_source": sum(ch.cpu_seconds for ch in self.channels)}

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for ch in self.channels:
            ch.link.close()
            shut_down(ch.sock)
            if ch.thread is not None:
                ch.thread.join(self.timeout)
            ch.sock.close()
        self.main.close()


class DestinationChannels:
    """The receiving side: N channels accepted on the migration's listener, each read by a
    thread of its own into a sink of the one landing, held at every MULTIFD_SYNC until the
    main reader's MULTIFD_FLUSH of that number (`flush`)."""

    def __init__(self, listener: Listener, count: int, migration_id: str, landing, *,
                 timeout: float, guest_pages: int, wake: Callable[[], None]):
        self.landing = landing
        self.timeout = timeout
        self.wake = wake                      # interrupts the main reader when a channel fails
        self._cond = threading.Condition()
        self.reached = [0] * count
        self.ended = [False] * count
        self.released = 0
        self.error: BaseException | None = None
        self._closing = False
        self.cpu_seconds = 0.0
        self.socks: list[socket.socket] = []
        readers: dict[int, RecordReader] = {}
        try:
            for _ in range(count):
                sock = listener.accept(timeout)
                self.socks.append(sock)
                reader = RecordReader(sock.recv_into, reuse_page_buffer=True,
                                      pages_in_place=True,
                                      readv_into=lambda bufs, s=sock: s.recvmsg_into(bufs)[0])
                reader.page_size = landing.memory.page_size
                reader.guest_pages = guest_pages
                hello = reader.expect(RT.MULTIFD_HELLO).fields
                index = hello["channel"]
                if (hello["migration_id"] != migration_id or hello["channels"] != count
                        or not 0 <= index < count or index in readers):
                    raise StreamError(f"a multifd channel said hello as channel {index} of "
                                      f"{hello['channels']}, not one this migration expects")
                readers[index] = reader
        except BaseException:
            self.close()
            raise
        self.threads = [threading.Thread(target=self._run, args=(i, readers[i]), daemon=True,
                                         name=f"multifd-recv-{i}") for i in range(count)]
        for t in self.threads:
            t.start()

    def flush(self, sync: int) -> None:
        """MULTIFD_FLUSH `sync` on the main channel: wait until every channel has landed all
        it got before its MULTIFD_SYNC of that number, then let them go on."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while not all(r >= sync for r in self.reached):
                if self.error is not None:
                    raise self.error
                gone = [i for i, e in enumerate(self.ended) if e and self.reached[i] < sync]
                if gone:
                    raise ConnectionLost(f"multifd channel {gone[0]} closed before sync {sync}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionLost(f"multifd channels did not reach sync {sync} within "
                                         f"{self.timeout:g} s")
                self._cond.wait(min(left, 0.1))
            self.released = sync
            self._cond.notify_all()

    def _run(self, index: int, reader: RecordReader) -> None:
        cpu0 = time.thread_time()
        sink = self.landing.sink()                # this channel's record under way
        try:
            while True:
                rec = reader.expect(RT.PAGE_DATA, RT.PAGE_COMPRESSED, RT.MULTIFD_SYNC)
                if rec.type == RT.MULTIFD_SYNC:
                    self._synced(index, rec.fields["sync"])
                    continue
                sink.land(rec.fields["page_data"])     # compressed ones decoded whole
        except BaseException as exc:  # noqa: BLE001 - kept for the main reader to raise
            with self._cond:
                if not self._closing and self.error is None:
                    self.error = type(exc)(f"multifd channel {index}: {exc}") \
                        if isinstance(exc, StreamError | ConnectionLost) else \
                        StreamError(f"multifd channel {index}: {type(exc).__name__}: {exc}")
                    self._cond.notify_all()
                    closing = False
                else:
                    closing = True
            if not closing:
                self.wake()
        finally:
            with self._cond:
                self.ended[index] = True
                self.cpu_seconds += time.thread_time() - cpu0
                self._cond.notify_all()

    def _synced(self, index: int, sync: int) -> None:
        with self._cond:
            if sync != self.reached[index] + 1:
                raise StreamError(f"MULTIFD_SYNC {sync} after {self.reached[index]}")
            self.reached[index] = sync
            self._cond.notify_all()
            deadline = time.monotonic() + self.timeout
            while self.released < sync and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionLost(f"no MULTIFD_FLUSH {sync} within {self.timeout:g} s")
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        """Stop every channel before the frames they land into may be freed."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for sock in self.socks:
            shut_down(sock)
        for t in getattr(self, "threads", []):
            t.join(self.timeout)
        for sock in self.socks:
            sock.close()
