"""The restore side of a migration: frames reserved up front, then the stream received on a
thread of the destination host.

Its steps: accept the source's connection (it must present the migration's token); read the
headers, GUEST_INFO, the P2M frame list and STATIC_DATA_END; land every PAGE_DATA record
(`nodes.migration.receive.landing`) until END; check that every page arrived and the page tables are
valid; then the hand-over (`nodes.migration.handover`). Any failure before the resume frees
every frame it reserved and tells the source why (ABORT). A post-copy switch (POSTCOPY_RUN)
hands the rest to `nodes.migration.postcopy.postcopy_destination`: the guest resumes here at once and
its missing pages arrive while it runs.
"""

import socket
import threading
import time

import numpy as np

from nodes.errors import (
    ConfigError,
    ConnectionLost,
    MigbedError,
    MigrationError,
    ModeError,
    PeerAborted,
    StreamError,
    describe_failure,
)
from nodes.faults.at_destination import DestinationFaults
from nodes.faults.stats import FaultStats
from nodes.migration import clock
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.handover import destination_handover
from nodes.migration.postcopy.postcopy_destination import PostcopyDestination
from nodes.migration.receive.landing import Landing
from nodes.migration.receive.reader import RecordReader
from nodes.migration.results import DestinationResult
from nodes.migration.runtime import GuestRuntime
from nodes.migration.send.multifd import DestinationChannels
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import pagesets, records
from nodes.migration.wire.channel import Listener, shut_down
from nodes.migration.wire.records import RecordType as RT
from nodes.phase import Outcome
from nodes.xen.domain import DomainState
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.memory import MachineMemory
from nodes.xen.profiles import Mode


def validate_info(info: GuestInfo) -> GuestInfo:
    """GUEST_INFO as a control-plane argument: checked like a record from the wire."""
    try:
        body = records.msgpack.packb(info.to_dict(), use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad guest info: {exc}") from None
    fields = records.decode_fields(RT.GUEST_INFO, body)
    if not 0 < fields["pages"] <= records.MAX_GUEST_PAGES:
        raise ConfigError(f"bad guest size {fields['pages']} pages")
    return GuestInfo.from_dict(fields)


def populate_frames(memory: MachineMemory, mfns: np.ndarray) -> None:
    """Back reserved frames with RAM now, before the stream starts, as a real destination's
    memory already is. Host memory is lazily allocated (see `nodes.xen.memory`), so otherwise
    the first write to each frame takes a page fault inside the data path: measured at
    ~10 us per 4 KiB page here, which made round 0 of a migration into never-used frames
    three times slower than the same round into frames used before. The frames are free,
    hence already zero: writing zeros changes nothing but residency."""
    for i in range(0, len(mfns), records.MAX_BATCH_PAGES):
        memory.frames[mfns[i:i + records.MAX_BATCH_PAGES]] = 0


def modes_for(hv: Hypervisor, info: GuestInfo) -> tuple[Mode, Mode]:
    """(mode while arriving, mode after the resume) for a guest this host can take."""
    if info.arch != hv.profile.arch:
        raise ModeError(
            f"cannot migrate a {info.arch} guest to {hv.name}, a {hv.profile.arch} host "
            f"(profile {hv.profile.name}): guests move only between hosts of one "
            "architecture")
    before = Mode.parse(info.mode_before)
    if before not in hv.profile.guest_modes:
        raise ModeError(f"{hv.name} (profile {hv.profile.name}) does not allow "
                        f"{before.value} guests; allowed: "
                        f"{', '.join(m.value for m in hv.profile.guest_modes)}")
    return Mode.parse(info.mode_during), before


class Receiver:
    """The restore side of one migration: reserves frames up front, then receives on a thread."""

    def __init__(self, hv: Hypervisor, info: GuestInfo, settings: MigrationSettings, address: str,
                 runtime: GuestRuntime, fault_stats: FaultStats | None = None,
                 data_ports: tuple[int, int] | None = None):
        self.hv = hv
        self.settings = settings
        self.info = info
        self.runtime = runtime
        self.name = info.name
        self.faults = DestinationFaults(settings.faults, fault_stats)
        self.faults.check_memory(hv.name, self.name, info.pages)
        self.mode_during, self.mode_after = modes_for(hv, info)
        self.dom = hv.create_incoming(self.name, info.pages, self.mode_during)
        self.dom.migrating = True
        populate_frames(hv.memory, self.dom.p2m)
        try:
            self.listener = Listener(address, info.migration_id, data_ports)
        except OSError as exc:
            hv.destroy_domain(self.name, force=True)
            raise MigrationError(f"cannot listen on {address}: {exc}") from None
        # A guest process takes milliseconds to launch: it is made now, parked, as a
        # destination QEMU is started with -incoming before the migration begins, so the
        # stream's setup waits for none. A thread vCPU is made when the stream opens.
        self.vcpu_made = False
        if info.vcpu == "process":
            try:
                runtime.prepare_guest(self.dom, info)
            except BaseException:
                self.listener.close()
                hv.destroy_domain(self.name, force=True)
                raise
            self.vcpu_made = True
        self.ticket = self.listener.ticket
        self.landing = Landing(hv.memory, self.dom, settings.verify)
        self.conn: socket.socket | None = None       # the data connection, once accepted
        self.multifd: DestinationChannels | None = None   # its channels, if it has any
        self._conn_lock = threading.Lock()
        self._killed = False
        self.connection_lost = False
        self.reader: RecordReader | None = None
        self.status = Outcome.WAITING
        self.error: str | None = None
        self.resume_wall: float | None = None
        self.timing: dict = {}
        self.cpu_seconds = 0.0
        self.source_rounds: list = []
        self.vcpu: dict = {}
        self.discard: np.ndarray | None = None        # post-copy: the switch's discard set
        self.postcopy_run: dict = {}                   # post-copy: RUN's fields
        self.postcopy: PostcopyDestination | None = None   # once the guest resumed in post-copy
        self.bytes_earlier = 0                          # of connections that broke (post-copy)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"recv-{self.name}", daemon=True)
        self.thread.start()

    # -- the steps ---------------------------------------------------------------------
    def _run(self) -> None:
        cpu0 = time.thread_time()
        try:
            self._accept()
            self.status = Outcome.RECEIVING
            self.reader = reader = RecordReader(self.conn.recv_into, reuse_page_buffer=True,
                                  pages_in_place=True,
                                  readv_into=lambda bufs: self.conn.recvmsg_into(bufs)[0])
            reader.guest_pages = self.dom.npages
            self._read_static(reader)
            # The vCPU now (if not made already), parked until the guest runs: neither a
            # stop-and-copy's hand-over nor a post-copy switch then waits for a thread to
            # start inside the downtime.
            if not self.vcpu_made:
                self.runtime.prepare_guest(self.dom, self.info)
                self.vcpu_made = True
            if self._receive(reader):
                PostcopyDestination(self, self.discard, self.runtime.postcopy_faults(
                    self.dom, self.info)).run(reader)
            else:
                self._check_arrived()
                destination_handover(self, reader)
            self.status = Outcome.COMPLETED
        except BaseException as exc:  # noqa: BLE001 - a failed restore must free its frames
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.listener.close()
            if self.multifd is not None:
                self.multifd.close()
            if self.conn is not None:
                self.conn.close()
            self.cpu_seconds = time.thread_time() - cpu0
            self.done.set()

    def _accept(self) -> None:
        conn = self.listener.accept(self.settings.timeout_seconds)
        if self.settings.multifd_channels is not None:
            self.multifd = DestinationChannels(
                self.listener, self.settings.multifd_channels, self.info.migration_id,
                self.landing, timeout=self.settings.timeout_seconds,
                guest_pages=self.dom.npages, wake=lambda: _stop_reading(conn))
        if not self.settings.postcopy_allowed:     # else kept for a post-copy's reconnects
            self.listener.close()
        with self._conn_lock:
            self.conn = conn
            if self._killed:
                raise MigrationError(f"{self.hv.name} died")

    def _read_static(self, reader: RecordReader) -> None:
        """Headers, GUEST_INFO, the P2M frame list, STATIC_DATA_END: all checked."""
        reader.read_image_header()
        dh = reader.read_domain_header()
        if dh.page_shift != self.hv.memory.page_shift:
            raise StreamError(f"page size {1 << dh.page_shift} differs from this host's "
                              f"{self.hv.page_size}")
        gi = reader.expect(RT.GUEST_INFO).fields
        if gi["name"] != self.name or gi["pages"] != self.dom.npages:
            raise StreamError("GUEST_INFO does not match the migration this host expects")
        p2m = reader.expect(RT.P2M_FRAMES).fields["mfns"]
        if len(p2m) != 8 * self.dom.npages:
            raise StreamError("P2M_FRAMES length does not match the guest's pages")
        reader.expect(RT.STATIC_DATA_END)

    def _receive(self, reader: RecordReader) -> bool:
        """Every record up to END (False) or a post-copy switch's RUN (True), each asked of
        the reader and dealt with here: pages land as they come (`Landing.land`)."""
        while True:
            rec = reader.expect(RT.PAGE_DATA, RT.VCPU_CONTEXT, RT.SOURCE_TIMING,
                                RT.ROUND_STATS, RT.SYNC, RT.CLOCK_PROBE, RT.END,
                                RT.PAGE_XBZRLE, RT.MULTIFD_FLUSH, RT.POSTCOPY_DISCARD,
                                RT.POSTCOPY_RUN)
            if rec.type == RT.CLOCK_PROBE:      # stamped now, answered at once
                received = time.time()
                self.reply(RT.CLOCK_REPLY, clock.answer(rec.fields, received, time.time()))
            elif rec.type == RT.PAGE_DATA:         # its pages received into their frames
                self.landing.land(rec.fields["page_data"])
            elif rec.type == RT.PAGE_XBZRLE:
                self.landing.land_deltas(rec.fields["page_data"])
            elif rec.type == RT.MULTIFD_FLUSH:    # the channels' pages before it have landed
                if self.multifd is None:
                    raise StreamError("MULTIFD_FLUSH in a migration without channels")
                self.multifd.flush(rec.fields["sync"])
            elif rec.type == RT.VCPU_CONTEXT:
                self.vcpu = rec.fields
            elif rec.type == RT.SOURCE_TIMING:
                self.timing = rec.fields
            elif rec.type == RT.ROUND_STATS:
                self.source_rounds = rec.fields["rounds"]
            elif rec.type == RT.SYNC:           # everything before it has landed
                self.reply(RT.SYNC_ACK, {"pages_received": self.landing.pages_received})
            elif rec.type == RT.POSTCOPY_DISCARD:
                self.discard = pagesets.decode_bitmap(rec.fields["bitmap"], self.dom.npages)
            elif rec.type == RT.POSTCOPY_RUN:
                if self.discard is None:
                    raise StreamError("POSTCOPY_RUN without the discard set before it")
                self.postcopy_run = rec.fields
                return True
            else:
                return False

    def _check_arrived(self) -> None:
        if self.landing.missing_pages:
            raise StreamError(f"{self.landing.missing_pages} pages never arrived")
        if not self.vcpu:
            raise StreamError("no VCPU_CONTEXT before END")
        problem = self.hv.check_page_tables(self.name)
        if problem:
            raise StreamError(f"page tables invalid after restore: {problem}")

    def reply(self, rtype: RT, fields: dict | None = None) -> None:
        """A record back to the source (the back channel crosses the link too)."""
        if self.settings.latency_seconds:
            time.sleep(self.settings.latency_seconds)
        try:
            self.conn.sendall(records.encode_record(rtype, fields))
        except OSError as exc:
            raise ConnectionLost(f"connection to the source lost: {exc.strerror or exc}") \
                from None

    def make_vcpu(self) -> None:
        """The guest's vCPU (made parked when the stream opened) takes the context its
        source sent; it waits until the resume."""
        self.runtime.start_guest(self.dom, self.info, self.vcpu)
        self.vcpu_made = True

    def resume(self) -> None:
        """Back to the guest's own mode (P2M learns this host's frames), and it runs."""
        hv = self.hv
        hv.set_mode(self.name, self.mode_after)
        with self.dom.lock:
            self.dom.state = DomainState.PAUSED
        hv.unpause(self.name)
        self.resume_wall = time.time()
        self.dom.migrating = False

    def _fail(self, exc: BaseException) -> None:
        if self.multifd is not None:      # no channel lands into frames about to be freed
            if self.multifd.error is not None and not isinstance(exc, PeerAborted):
                exc = self.multifd.error      # the channel that broke, not what it woke
            self.multifd.close()
        if self.postcopy is not None:         # resumed in post-copy: the guest is lost
            self.postcopy.fail(describe_failure(exc, "the source"))
            return
        resumed = self.resume_wall is not None
        self.error = describe_failure(exc, "the source")
        self.status = Outcome.COMPLETED if resumed else Outcome.FAILED
        self.connection_lost = not resumed and isinstance(exc, ConnectionLost | OSError)
        if resumed:
            return
        if self.conn is not None:
            try:
                self.conn.sendall(records.encode_record(RT.ABORT, {"error": self.error[:1000]}))
            except OSError:
                pass
        if self.vcpu_made:
            self.runtime.discard_guest(self.name)
        try:
            self.hv.destroy_domain(self.name, force=True)
        except MigbedError:
            pass

    # -- the connection, which a post-copy's recovery replaces ----------------------------
    @property
    def killed(self) -> bool:
        return self._killed

    def drop_connection(self) -> None:
        with self._conn_lock:
            conn, self.conn = self.conn, None
        if self.reader is not None:
            self.bytes_earlier += self.reader.bytes_read
            self.reader = None
        if conn is not None:
            shut_down(conn)
            conn.close()

    def attach_connection(self, conn: socket.socket) -> RecordReader:
        """A source's new connection: the stream goes on on it, pages into the landing."""
        with self._conn_lock:
            self.conn = conn
            if self._killed:
                raise MigrationError(f"{self.hv.name} died")
        self.reader = reader = RecordReader(
            conn.recv_into, reuse_page_buffer=True, pages_in_place=True,
            readv_into=lambda bufs: conn.recvmsg_into(bufs)[0])
        reader.page_size, reader.guest_pages = self.hv.page_size, self.dom.npages
        return reader

    # -- the control plane's calls ------------------------------------------------------
    def cancel(self) -> None:
        """Abandon an incoming migration that never connected (frees the reserved frames)."""
        self.faults.interrupt()
        self.listener.close()

    def kill(self) -> None:
        """This (in-process) host died: the connection drops, the restore stops."""
        with self._conn_lock:
            self._killed = True
            conn = self.conn
        self.cancel()
        if conn is not None:
            shut_down(conn)

    def lose(self, why: str) -> None:
        """After a post-copy switch the source died: the guest cannot complete here."""
        if self.postcopy is not None:
            self.postcopy.lose(why)

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    @property
    def bytes_received(self) -> int:
        """Bytes of the stream read so far (live, for /metrics)."""
        reader = self.reader
        return self.bytes_earlier + (reader.bytes_read if reader is not None else 0)

    def result(self) -> DestinationResult:
        pc = self.postcopy
        resumed = self.resume_wall is not None and (pc is None or pc.done)
        return DestinationResult(
            status=self.status, error=self.error,
            mode_after=self.mode_after.value if resumed else None,
            resume_wall=self.resume_wall, pages_received=self.landing.pages_received,
            bytes_received=self.bytes_received, source_timing=self.timing,
            last_progress_wall=self.vcpu.get("last_progress_wall") if self.vcpu else None,
            destination_digest=self.landing.digest() if resumed else None,
            faults=list(self.faults.fired), connection_lost=self.connection_lost,
            cpu_seconds=self.cpu_seconds,
            multifd_cpu_seconds=self.multifd.cpu_seconds if self.multifd else None,
            postcopy=pc.stats() if pc is not None else None)


def _stop_reading(conn: socket.socket) -> None:
    """A channel failed: the main reader stops waiting for its next record."""
    try:
        conn.shutdown(socket.SHUT_RD)
    except OSError:
        pass

