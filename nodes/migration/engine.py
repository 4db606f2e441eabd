"""Xen-style pre-copy live migration: the save side (`Sender`) and the restore side (`Receiver`).

The path of one page: the workload writes it through the guest's access path; in VP mode
with log-dirty on the hypervisor marks its pfn; a round CLEANs the bitmap and the sender
reads the frame through the hypervisor's P2M, canonicalises it if it is a page table, packs
it into a PAGE_DATA record and paces it onto the link; the receiver checks the record, hashes
the page as it arrived, uncanonicalises page tables for its own frames and writes the frame
it reserved for that pfn.

The hand-over follows libxl: the source sends END, the destination answers READY, the source
renames its paused copy `<name>--migratedaway` and sends PERMISSION_TO_GO, the destination
switches the guest back to P2M, resumes it and answers RESULT, and only then does the source
destroy its copy. Any failure before PERMISSION_TO_GO leaves the guest running on the source
in its original mode and frees every frame the destination reserved; a RESULT that never
comes leaves the paused copy for the control plane to settle (`resolve_handover`).

Injected faults (`nodes.faults.spec`) act at the stages marked `self.faults.at(...)` on the sender
and `self.faults.delay(...)` on the receiver.
"""

import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from nodes.errors import (
    ConfigError,
    MigbedError,
    MigrationCancelled,
    MigrationError,
    ModeError,
    StreamError,
)
from nodes.faults.destination import DestinationFaults
from nodes.faults.source import SourceFaults
from nodes.faults.stats import FaultStats
from nodes.migration import records
from nodes.migration.channel import Listener, Ticket, connect
from nodes.migration.link import LinkSender, Pacer
from nodes.migration.policy import Action, PrecopyStats
from nodes.migration.reader import RECV_CHUNK_PAGES, RecordReader
from nodes.migration.records import RecordType as RT
from nodes.migration.settings import MigrationSettings
from nodes.phase import Phase
from nodes.xen import pagetable
from nodes.xen.digest import digest, page_hashes
from nodes.xen.domain import Domain, DomainState
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.memory import MachineMemory
from nodes.xen.profiles import Mode

MIGRATED_AWAY = "--migratedaway"


class GuestRuntime(Protocol):
    """What a migration needs from the host beside the hypervisor: the guests' vCPUs."""

    def workload_spec(self, name: str) -> dict | None: ...
    def vcpu_context(self, name: str) -> dict: ...
    def stop_guest(self, name: str) -> None: ...
    def start_guest(self, dom: Domain, workload: dict | None, context: dict) -> None: ...


@dataclass
class RoundStats:
    index: int
    pages_sent: int = 0
    pages_skipped: int = 0
    pages_dirtied: int = 0
    bytes_sent: int = 0
    duration_seconds: float = 0.0
    final: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        dur = self.duration_seconds
        d["dirty_rate_pages_per_second"] = self.pages_dirtied / dur if dur > 0 else 0.0
        d["throughput_bytes_per_second"] = self.bytes_sent / dur if dur > 0 else 0.0
        return d


@dataclass
class Progress:
    """What an operator sees of a running migration (polled by the CLI and the metrics)."""

    migration_id: str
    guest: str
    status: str = "setup"          # setup, precopy, stop-and-copy, handover, completed, failed, cancelled
    round: int = 0
    pages_sent_total: int = 0
    bytes_sent_total: int = 0
    dirty_pages: int = 0
    remaining_bytes: int = 0
    expected_downtime_seconds: float | None = None
    throughput_bytes_per_second: float = 0.0
    rounds: list = field(default_factory=list)
    fault: dict | None = None      # a host-kill fault the sender waits at (`nodes.faults.spec`)

    def to_dict(self) -> dict:
        return asdict(self)


PHASES = ("setup", "precopy", "stop_and_copy", "handover", "verify", "cleanup")


class Phases:
    """Where a migration's time went, phase by phase (PHASES; a failed migration ends early),
    as QEMU reports setup-time beside total-time: each `end(name)` closes the phase that
    began where the last one ended."""

    def __init__(self, t0: float):
        self._last = t0
        self.seconds: dict[str, float] = {}

    def end(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.seconds[name] = now - self._last
        self._last = now


def guest_info(hv: Hypervisor, dom: Domain, migration_id: str, workload: dict | None) -> dict:
    """GUEST_INFO: what the destination needs to reserve frames and check compatibility."""
    return {"migration_id": migration_id, "name": dom.name, "pages": dom.npages,
            "data_pages": dom.data_pages, "page_table_pages": len(dom.pt_pfns),
            "page_size": hv.page_size,
            "mode_before": dom.mode.value, "mode_during": Mode.VP.value,
            "arch": hv.profile.arch, "profile": hv.profile.name, "workload": workload}


def check_migratable(hv: Hypervisor, name: str) -> Domain:
    """The source-side checks made before anything moves."""
    dom = hv.guest(name)
    if dom.mode is Mode.PEQM:
        raise ModeError(f"{name} is a P==M guest: its physical addresses are this host's "
                        "machine frames, so it cannot move")
    if dom.dma:
        raise ModeError(f"{name} has a DMA device: it cannot enter VP (shadow) mode, so its "
                        "writes cannot be logged and it cannot be live-migrated")
    if dom.migrating:
        raise MigrationError(f"{name} is already migrating")
    if dom.state is not DomainState.RUNNING:
        raise MigrationError(f"{name} is {dom.state.value}; only a running guest is migrated")
    return dom


class Sender:
    """The save side of one migration, run on a thread of the source host."""

    def __init__(self, hv: Hypervisor, name: str, ticket: Ticket, settings: MigrationSettings,
                 runtime: GuestRuntime, progress: Progress, cancel: threading.Event,
                 shared_link: Pacer | None = None, fault_stats: FaultStats | None = None):
        self.hv = hv
        self.dom = check_migratable(hv, name)
        self.name = name
        self.ticket = ticket
        self.settings = settings
        self.policy = settings.make_policy()
        self.runtime = runtime
        self.progress = progress
        self.cancel = cancel
        self.rounds: list[RoundStats] = []
        self.result: dict = {}
        self.shared_link = shared_link
        # Which pfns are page tables, once per migration, not in every round's path (the
        # final round's is inside the downtime).
        self.is_pt = np.zeros(self.dom.npages, dtype=bool)
        self.is_pt[self.dom.pt_pfns] = True
        self.faults = SourceFaults(settings.faults, progress, cancel, settings.timeout_seconds,
                                   fault_stats)

    # -- helpers ----------------------------------------------------------------------------
    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationCancelled(f"migration of {self.name} cancelled by the operator")

    def _send_record(self, rtype: RT, fields: dict | None = None) -> int:
        return self.link.send([records.encode_record(rtype, fields)])

    def _send_pages(self, pfns: np.ndarray, rnd: RoundStats, skip_redirtied: bool,
                    live: bool) -> None:
        """Send `pfns` in PAGE_DATA records of up to 1024 pages, straight from their frames.

        A live round reads pages while the guest writes them, as Xen's does: a page written
        while it is being sent has its dirty bit set and goes again in the next round."""
        dom = self.dom
        is_pt = self.is_pt
        memory = self.hv.memory
        for i in range(0, len(pfns), records.MAX_BATCH_PAGES):
            if live:
                self._check_cancel()
            batch = pfns[i:i + records.MAX_BATCH_PAGES]
            with dom.lock:
                if skip_redirtied:
                    redirtied = dom.logdirty.bitmap[batch]
                    if redirtied.any():
                        rnd.pages_skipped += int(np.count_nonzero(redirtied))
                        batch = batch[~redirtied]
                        if not len(batch):
                            continue
                mfns = dom.p2m[batch]
            pt_rows = np.flatnonzero(is_pt[batch])
            types = np.full(len(batch), records.PageType.NOTAB, dtype=np.uint8)
            if not len(pt_rows):
                pages = memory.buffers(mfns)                 # views of the frames, no copy
            else:
                # Page tables go canonical (pfns, not this host's mfns): those are copied.
                types[pt_rows] = records.PageType.L1TAB
                tables = pagetable.canonicalise(
                    memory.words[mfns[pt_rows]], dom.domid, self.hv.allocator.owner,
                    self.hv.allocator.pfn, memory.page_shift).view(np.uint8)
                pages, at = [], 0
                for row, table in zip(pt_rows.tolist(), tables, strict=True):
                    pages += memory.buffers(mfns[at:row])
                    pages.append(table)
                    at = row + 1
                pages += memory.buffers(mfns[at:])
            n = self.link.send(records.encode_page_data(batch, types, pages))
            if live:
                self.faults.at(Phase.PRECOPY, rnd.index)
            rnd.pages_sent += len(batch)
            rnd.bytes_sent += n
            p = self.progress
            p.pages_sent_total += len(batch)
            p.bytes_sent_total = self.link.bytes_sent
            p.remaining_bytes = max(0, (len(pfns) - i - len(batch))) * self.hv.page_size

    def _stats(self, iteration: int, dirty: int, t0: float) -> PrecopyStats:
        last = self.rounds[-1] if self.rounds else None
        measured = (last.bytes_sent / last.duration_seconds
                    if last and last.duration_seconds > 0 else None)
        return PrecopyStats(
            iteration=iteration, dirty_count=dirty,
            total_written=sum(r.pages_sent for r in self.rounds),
            guest_pages=self.dom.npages, page_size=self.hv.page_size,
            last_round_pages_sent=last.pages_sent if last else 0,
            last_round_pages_skipped=last.pages_skipped if last else 0,
            last_round_seconds=last.duration_seconds if last else 0.0,
            measured_bytes_per_second=measured,
            nominal_bytes_per_second=self.settings.nominal_bytes_per_second,
            elapsed_seconds=time.monotonic() - t0)

    def _update_expected(self, stats: PrecopyStats) -> None:
        p = self.progress
        p.dirty_pages = stats.dirty_count
        p.remaining_bytes = stats.pending_bytes
        # QEMU's expected-downtime: what is pending, at the throughput measured so far.
        bw = stats.measured_bytes_per_second or self.settings.link_bytes_per_second
        p.expected_downtime_seconds = stats.pending_bytes / bw if bw else None
        if stats.measured_bytes_per_second:
            p.throughput_bytes_per_second = stats.measured_bytes_per_second

    # -- the migration ------------------------------------------------------------------------
    def run(self) -> dict:
        """Migrate; returns the source side of the report. Never raises for migration errors."""
        hv, dom, s = self.hv, self.dom, self.settings
        t0 = time.monotonic()
        cpu0 = time.thread_time()
        self.mode_before = dom.mode
        dom.migrating = True
        handed_over = False
        self.renamed = False
        sock = None
        self.link = None
        self.result = {"status": "failed", "error": None, "stop_reason": None,
                       "mode_before": dom.mode.value, "mode_during": Mode.VP.value}
        phases = Phases(t0)
        end_mono = None    # the migration ends when the destination confirms the resume
        try:
            sock = connect(self.ticket, s.timeout_seconds)
            self.link = LinkSender(sock, s.link_bytes_per_second, s.latency_seconds,
                                   s.rate_limit_bytes_per_second, self.shared_link)
            reader = RecordReader(sock.recv_into)
            self.faults.attach(sock, self.link)
            self.faults.at(Phase.SETUP)
            # Step 2: shadow mode with log-dirty, before round 0 reads a single page.
            hv.set_mode(self.name, Mode.VP)
            hv.shadow_op(self.name, ShadowOp.ENABLE_LOGDIRTY)
            p2m_sent = dom.p2m.copy()
            self.link.send([records.encode_image_header(),
                            records.encode_domain_header(Mode.VP.value, hv.memory.page_shift)])
            self._send_record(RT.GUEST_INFO, guest_info(hv, dom, self.ticket.migration_id,
                                                         self.runtime.workload_spec(self.name)))
            self._send_record(RT.P2M_FRAMES, {"mfns": p2m_sent.astype("<u8").tobytes()})
            self._send_record(RT.STATIC_DATA_END)
            self.progress.status = "precopy"
            phases.end("setup")
            pending = np.arange(dom.npages, dtype=np.int64)
            iteration = 0
            while True:
                stats = self._stats(iteration, len(pending), t0)
                self._update_expected(stats)
                decision = self.policy.decide(stats)
                reason = decision.reason
                if decision.action is Action.ABORT:
                    raise MigrationError(f"policy {self.policy.name} aborted: {reason}")
                if decision.action is Action.STOP_AND_COPY:
                    self.result["stop_reason"] = reason
                    break
                rnd = RoundStats(index=iteration)
                self.progress.round = iteration
                start = time.monotonic()
                self._send_pages(pending, rnd, self.policy.skip_redirtied, live=True)
                self.faults.at(Phase.PRECOPY, iteration)     # a round that sent nothing
                rnd.duration_seconds = time.monotonic() - start
                bitmap, _ = hv.shadow_op(self.name, ShadowOp.CLEAN)
                pending = np.flatnonzero(bitmap)
                rnd.pages_dirtied = len(pending)
                self.rounds.append(rnd)
                self.progress.rounds.append(rnd.to_dict())
                iteration += 1
                self._check_cancel()
                if s.cancel_after_round is not None and rnd.index >= s.cancel_after_round:
                    raise MigrationCancelled(
                        f"cancelled after round {rnd.index} as asked (--cancel-after-round)")
            # Stop-and-copy: pause, final CLEAN, the rest at link speed, vCPU context, END.
            phases.end("precopy")
            self.progress.status = "stop-and-copy"
            with dom.lock:
                hv.pause(self.name)
                pause_wall = time.time()
                self.result["pause_wall"] = pause_wall
            pause_mono = time.monotonic()
            bitmap, _ = hv.shadow_op(self.name, ShadowOp.CLEAN)
            # Pending from the last live round, or dirtied since: a mask, not np.union1d,
            # whose first call imports numpy.ma (17 ms measured, inside the downtime).
            final_mask = bitmap.astype(bool, copy=True)
            final_mask[pending] = True
            final = np.flatnonzero(final_mask).astype(np.int64)
            self.link.lift_rate_limit()
            rnd = RoundStats(index=iteration, final=True)
            self._send_pages(final, rnd, skip_redirtied=False, live=False)
            if not np.array_equal(dom.p2m, p2m_sent):
                raise MigrationError("the guest's P2M changed during the live loop; the stream "
                                     "would be corrupt")
            self.faults.at(Phase.STOP_AND_COPY)
            self._send_record(RT.VCPU_CONTEXT, self.runtime.vcpu_context(self.name))
            self._send_record(RT.SOURCE_TIMING, {"pause_wall": pause_wall,
                                                 "final_round_pages": len(final)})
            self._send_record(RT.ROUND_STATS, {"rounds": [r.to_dict() for r in self.rounds]})
            self._send_record(RT.END)
            self.link.flush(s.timeout_seconds)
            rnd.duration_seconds = time.monotonic() - pause_mono
            self.rounds.append(rnd)
            self.progress.rounds.append(rnd.to_dict())
            self.progress.status = "handover"
            phases.end("stop_and_copy")
            ready = reader.expect(RT.RECEIVER_READY)
            self.result["destination_digest"] = ready.fields["digest"]
            hv.rename_domain(self.name, self.name + MIGRATED_AWAY)
            self.renamed = True
            self._send_record(RT.PERMISSION_TO_GO)
            self.link.flush(s.timeout_seconds)
            handed_over = True
            self.faults.at(Phase.HANDOVER)
            try:
                result = reader.expect(RT.RECEIVER_RESULT)
            except (MigbedError, OSError) as exc:
                raise MigrationError(
                    f"hand-over status unknown ({exc}); the source copy is kept paused as "
                    f"{self.name}{MIGRATED_AWAY}") from None
            if not result.fields["ok"]:
                handed_over = False
                raise MigrationError(f"destination failed to resume: {result.fields['error']}")
            end_mono = time.monotonic()
            phases.end("handover", end_mono)
            if s.verify:
                self.result["source_digest"] = hv.canonical_digest(self.name + MIGRATED_AWAY)
                phases.end("verify")
            self.result.update(
                status="completed", pause_wall=pause_wall,
                resume_wall=result.fields["resume_wall"],
                downtime_source_seconds=end_mono - pause_mono,
                destination_digest=ready.fields["digest"])
            self.runtime.stop_guest(self.name)
            hv.destroy_domain(self.name + MIGRATED_AWAY, force=True)
            phases.end("cleanup")
        except BaseException as exc:  # noqa: BLE001 - every failure must leave the guest safe
            self.result["status"] = ("cancelled" if isinstance(exc, MigrationCancelled)
                                     else "failed")
            self.result["error"] = _describe(exc)
            self.result["connection_lost"] = is_connection_loss(exc)
            if handed_over:
                # PERMISSION_TO_GO went out: whether the destination resumed is for the
                # control plane to find out (`resolve_handover`); the copy stays paused here.
                self.result["handover_unknown"] = True
            else:
                self._abort(str(self.result["error"]))
            if not isinstance(exc, Exception):
                raise
        finally:
            dom.migrating = False
            if self.link is not None:
                self.link.close()
            if sock is not None:
                sock.close()
            self.progress.status = self.result["status"]
        self.result.update(
            rounds=[r.to_dict() for r in self.rounds],
            pages_sent_total=sum(r.pages_sent for r in self.rounds),
            bytes_sent_total=self.link.bytes_sent if self.link else 0,
            # As QEMU's total-time: start to the guest running on the destination. What the
            # source does afterwards (migbed's verify, destroying its copy) is in the phases.
            total_time_seconds=(end_mono or time.monotonic()) - t0,
            cpu_seconds=time.thread_time() - cpu0, faults=list(self.faults.fired),
            phase_seconds=phases.seconds)
        return self.result

    def _abort(self, error: str) -> None:
        """Before the hand-over: the guest keeps running on the source, as it was."""
        hv, name = self.hv, self.name
        if self.link is not None:
            try:
                self.link.send([records.encode_record(RT.ABORT, {"error": error[:1000]})])
            except Exception:  # noqa: BLE001 - the peer may be gone; the abort is best effort
                pass
        if self.renamed:
            hv.rename_domain(name + MIGRATED_AWAY, name)
        dom = hv.domain(name)
        if dom.logdirty.enabled:
            hv.shadow_op(name, ShadowOp.OFF)
        hv.set_mode(name, self.mode_before)
        hv.unpause(name)
        if self.result.get("pause_wall"):
            # Paused for stop-and-copy, then resumed here: that pause was downtime too.
            self.result["resume_wall"] = time.time()


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MigbedError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"connection to the destination failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


class Receiver:
    """The restore side of one migration: reserves frames up front, then receives on a thread."""

    def __init__(self, hv: Hypervisor, info: dict, settings: MigrationSettings, address: str,
                 runtime: GuestRuntime, fault_stats: FaultStats | None = None):
        self.hv = hv
        self.settings = settings
        self.info = info
        self.runtime = runtime
        self.name = info["name"]
        self.faults = DestinationFaults(settings.faults, fault_stats)
        self.faults.check_memory(hv.name, self.name, info["pages"])
        self.conn = None                     # the data connection, once accepted
        self._conn_lock = threading.Lock()
        self._killed = False
        self.connection_lost = False
        if info["arch"] != hv.profile.arch:
            raise ModeError(
                f"cannot migrate a {info['arch']} guest to {hv.name}, a {hv.profile.arch} host "
                f"(profile {hv.profile.name}): guests move only between hosts of one "
                "architecture")
        self.mode_during = Mode.parse(info["mode_during"])
        before = Mode.parse(info["mode_before"])
        self.mode_after = before if before in hv.profile.guest_modes else None
        if self.mode_after is None:
            raise ModeError(f"{hv.name} (profile {hv.profile.name}) does not allow "
                            f"{before.value} guests; allowed: "
                            f"{', '.join(m.value for m in hv.profile.guest_modes)}")
        self.dom = hv.create_incoming(self.name, info["pages"], self.mode_during)
        self.dom.migrating = True
        populate_frames(hv.memory, self.dom.p2m)
        try:
            self.listener = Listener(address, info["migration_id"])
        except OSError as exc:
            hv.destroy_domain(self.name, force=True)
            raise MigrationError(f"cannot listen on {address}: {exc}") from None
        self.ticket = self.listener.ticket
        n = self.dom.npages
        self.hashes = np.zeros(n, dtype=np.uint64)
        self.received = np.zeros(n, dtype=bool)
        self.is_pt = np.zeros(n, dtype=bool)
        self.is_pt[self.dom.pt_pfns] = True
        self.pages_received = 0
        self.bytes_received = 0
        self.status = "waiting"
        self.error: str | None = None
        self.resume_wall: float | None = None
        self.timing: dict = {}
        self.cpu_seconds = 0.0
        self.source_rounds: list = []
        self.vcpu: dict = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"recv-{self.name}", daemon=True)
        self.thread.start()

    def _reply(self, sock, rtype: RT, fields: dict | None = None) -> None:
        if self.settings.latency_seconds:
            time.sleep(self.settings.latency_seconds)   # the back channel crosses the link too
        sock.sendall(records.encode_record(rtype, fields))

    def check_types(self, pfns: np.ndarray, types: np.ndarray) -> np.ndarray:
        """Which of these pages with data are page tables; they must be the guest's own."""
        is_table = types == records.PageType.L1TAB
        if not np.array_equal(is_table, self.is_pt[pfns]):
            raise StreamError("page types do not match the guest's page-table layout")
        return is_table

    def tables_in(self, pages: np.ndarray) -> np.ndarray:
        """Canonical page tables (as received) made this host's: pfns become its mfns."""
        try:
            return pagetable.uncanonicalise(pages.view(np.uint64), self.dom.p2m,
                                            self.hv.memory.page_shift)
        except ValueError as exc:
            raise StreamError(str(exc)) from None

    def _apply(self, pd: records.PageData) -> None:
        """A PAGE_DATA record decoded into a buffer of its own: hashed, then written."""
        mask = pd.data_mask
        pfns = pd.pfns[mask]
        types = pd.types[mask]
        is_table = self.check_types(pfns, types)
        pages = pd.pages
        if self.settings.verify:
            self.hashes[pfns] = page_hashes(pages)
        if is_table.any():
            pages = pages.copy()
            pages.view(np.uint64)[is_table] = self.tables_in(pages[is_table])
        self.hv.memory.write(self.dom.p2m[pfns], pages)
        self.received[pfns] = True
        self.pages_received += len(pfns)

    def _run(self) -> None:
        hv, s = self.hv, self.settings
        conn = None
        resumed = False
        cpu0 = time.thread_time()
        try:
            conn = self.listener.accept(s.timeout_seconds)
            self.listener.close()
            with self._conn_lock:
                self.conn = conn
                if self._killed:
                    raise MigrationError(f"{hv.name} died")
            self.status = "receiving"
            reader = RecordReader(conn.recv_into, reuse_page_buffer=True,
                                     page_sink=FrameSink(self),
                                     readv_into=lambda bufs: conn.recvmsg_into(bufs)[0])
            reader.guest_pages = self.dom.npages
            reader.read_image_header()
            dh = reader.read_domain_header()
            if dh.page_shift != hv.memory.page_shift:
                raise StreamError(f"page size {1 << dh.page_shift} differs from this host's "
                                  f"{hv.page_size}")
            gi = reader.expect(RT.GUEST_INFO).fields
            if gi["name"] != self.name or gi["pages"] != self.dom.npages:
                raise StreamError("GUEST_INFO does not match the migration this host expects")
            p2m = reader.expect(RT.P2M_FRAMES).fields["mfns"]
            if len(p2m) != 8 * self.dom.npages:
                raise StreamError("P2M_FRAMES length does not match the guest's pages")
            reader.expect(RT.STATIC_DATA_END)
            while True:
                rec = reader.expect(RT.PAGE_DATA, RT.VCPU_CONTEXT, RT.SOURCE_TIMING,
                                    RT.ROUND_STATS, RT.END)
                if rec.type == RT.PAGE_DATA:
                    if rec.fields["page_data"].pages is not None:   # not laid out for the sink
                        self._apply(rec.fields["page_data"])
                elif rec.type == RT.VCPU_CONTEXT:
                    self.vcpu = rec.fields
                elif rec.type == RT.SOURCE_TIMING:
                    self.timing = rec.fields
                elif rec.type == RT.ROUND_STATS:
                    self.source_rounds = rec.fields["rounds"]
                else:
                    break
            self.bytes_received = reader.bytes_read
            if not self.received.all():
                raise StreamError(f"{int(np.count_nonzero(~self.received))} pages never arrived")
            if not self.vcpu:
                raise StreamError("no VCPU_CONTEXT before END")
            problem = hv.check_page_tables(self.name)
            if problem:
                raise StreamError(f"page tables invalid after restore: {problem}")
            self.faults.delay(Phase.STOP_AND_COPY)
            self.status = "ready"
            self._reply(conn, RT.RECEIVER_READY, {"pages_received": self.pages_received,
                                                  "digest": self.digest()})
            reader.expect(RT.PERMISSION_TO_GO)
            self.faults.delay(Phase.HANDOVER)
            # Resume: back to the guest's own mode (P2M learns this host's frames), vCPU on.
            hv.set_mode(self.name, self.mode_after)
            with self.dom.lock:
                self.dom.state = DomainState.PAUSED
            self.runtime.start_guest(self.dom, self.info.get("workload"), self.vcpu)
            hv.unpause(self.name)
            self.resume_wall = time.time()
            resumed = True
            self.dom.migrating = False
            self._reply(conn, RT.RECEIVER_RESULT, {"ok": True, "error": None,
                                                   "resume_wall": self.resume_wall})
            self.status = "completed"
        except BaseException as exc:  # noqa: BLE001 - a failed restore must free its frames
            self.error = _describe(exc)
            self.status = "completed" if resumed else "failed"
            self.connection_lost = not resumed and is_connection_loss(exc)
            if conn is not None and not resumed:
                try:
                    conn.sendall(records.encode_record(RT.ABORT, {"error": self.error[:1000]}))
                except OSError:
                    pass
            if not resumed:
                self._discard()
            if not isinstance(exc, Exception):
                raise
        finally:
            self.listener.close()
            if conn is not None:
                conn.close()
            self.cpu_seconds = time.thread_time() - cpu0
            self.done.set()

    def _discard(self) -> None:
        try:
            self.hv.destroy_domain(self.name, force=True)
        except MigbedError:
            pass

    def digest(self) -> str | None:
        """The guest's digest from the pages as they landed; None when not verifying."""
        return digest(self.hashes) if self.settings.verify else None

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
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def report(self) -> dict:
        return {"status": self.status, "error": self.error,
                "mode_after": self.mode_after.value if self.resume_wall else None,
                "resume_wall": self.resume_wall, "pages_received": self.pages_received,
                "bytes_received": self.bytes_received, "source_timing": self.timing,
                "last_progress_wall": self.vcpu.get("last_progress_wall") if self.vcpu else None,
                "destination_digest": self.digest() if self.resume_wall else None,
                "faults": list(self.faults.fired), "connection_lost": self.connection_lost,
                "cpu_seconds": self.cpu_seconds}


class FrameSink:
    """Where the receiver's PAGE_DATA pages land, in chunks of up to RECV_CHUNK_PAGES, each
    hashed as it lands, while still in cache. A chunk inside one superpage extent lands
    straight in its frames (the kernel copies it there from the socket) and is hashed where
    it lies. A chunk of scattered frames lands in one staging buffer, is hashed there, and
    is then written to its frames. Page tables arrive canonical: they are kept aside and
    written to their frames, made this host's, once the record is complete."""

    def __init__(self, receiver: "Receiver"):
        self.rx = receiver
        self.memory = receiver.hv.memory
        self.staging = np.empty((RECV_CHUNK_PAGES, self.memory.page_size), dtype=np.uint8)

    def buffers(self, pfns: np.ndarray, types: np.ndarray) -> list[list]:
        mask = records.data_mask(types)
        self.pfns = pfns[mask]
        self.is_table = self.rx.check_types(self.pfns, types[mask])
        mfns = self.mfns = self.rx.dom.p2m[self.pfns]
        self.tables = np.flatnonzero(self.is_table)
        self.scratch = np.empty((len(self.tables), self.memory.page_size), dtype=np.uint8)
        n = len(mfns)
        # A chunk lies in one run of frames if no break (a jump, or a page table) is in it.
        jump = np.ones(n, dtype=bool)
        jump[1:] = np.diff(mfns) != 1
        jump[self.tables] = True
        jump[self.tables[self.tables + 1 < n] + 1] = True
        breaks = np.cumsum(jump)
        self.chunks: list[tuple[int, int, bool]] = []
        chunks = []
        frames = self.memory.frames
        step = RECV_CHUNK_PAGES
        for start in range(0, n, step):
            stop = min(start + step, n)
            whole = breaks[stop - 1] == breaks[start] and not self.is_table[start]
            self.chunks.append((start, stop, whole))
            if whole:
                chunks.append([frames[mfns[start]:mfns[start] + stop - start].reshape(-1)])
            else:
                chunks.append([self.staging[:stop - start].reshape(-1)])
        return chunks

    def landed(self, index: int) -> None:
        start, stop, whole = self.chunks[index]
        if whole:
            if self.rx.settings.verify:
                pages = self.memory.frames[self.mfns[start]:self.mfns[start] + stop - start]
                self.rx.hashes[self.pfns[start:stop]] = page_hashes(pages)
            return
        pages = self.staging[:stop - start]
        if self.rx.settings.verify:
            self.rx.hashes[self.pfns[start:stop]] = page_hashes(pages)
        tables = self.is_table[start:stop]
        if tables.any():
            at = np.flatnonzero((self.tables >= start) & (self.tables < stop))
            self.scratch[at] = pages[tables]
            self.memory.write(self.mfns[start:stop][~tables], pages[~tables])
        else:
            self.memory.write(self.mfns[start:stop], pages)

    def done(self) -> None:
        rx = self.rx
        if len(self.tables):
            self.memory.write(self.mfns[self.tables], rx.tables_in(self.scratch).view(np.uint8))
        rx.received[self.pfns] = True
        rx.pages_received += len(self.pfns)


def populate_frames(memory: MachineMemory, mfns: np.ndarray) -> None:
    """Back reserved frames with RAM now, before the stream starts, as a real destination's
    memory already is. Host memory is lazily allocated (see `nodes.xen.memory`), so otherwise
    the first write to each frame takes a page fault inside the data path: measured at
    ~10 us per 4 KiB page here, which made round 0 of a migration into never-used frames
    three times slower than the same round into frames used before. The frames are free,
    hence already zero: writing zeros changes nothing but residency."""
    for i in range(0, len(mfns), records.MAX_BATCH_PAGES):
        memory.frames[mfns[i:i + records.MAX_BATCH_PAGES]] = 0


def validate_info(info: dict) -> dict:
    """GUEST_INFO as a control-plane argument: checked like a record from the wire."""
    try:
        body = records.msgpack.packb(info, use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad guest info: {exc}") from None
    fields = records.decode_fields(RT.GUEST_INFO, body)
    if not 0 < fields["pages"] <= records.MAX_GUEST_PAGES:
        raise ConfigError(f"bad guest size {fields['pages']} pages")
    return fields


def is_connection_loss(exc: BaseException) -> bool:
    """The peer or the link went away mid-migration (as opposed to a refused stream)."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, StreamError) and "truncated" in str(exc)
