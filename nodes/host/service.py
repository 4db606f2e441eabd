"""One emulated host: a hypervisor, its guests' vCPUs, and both ends of its migrations.

`HostService` is plain Python so the whole host, migrations included, can be tested in one
process without Ray; `nodes.host.actor` makes it a Ray actor (one per Ray node) for the cluster.
Its public methods are the host's control plane: each takes and returns values Ray can pickle
across processes: typed ones where components meet (`GuestSpec`, `GuestInfo`, `Ticket`,
`MigrationSettings`, the results, the `Progress` snapshot), plain ones otherwise.
"""

import collections
import threading
import time

import numpy as np

from nodes.errors import MigrationError, MigrationStillRunning
from nodes.faults.at_source import SourceFaults
from nodes.faults.stats import FaultCollector, FaultStats
from nodes.host.appview import application_view
from nodes.host.dirtymeter import GuestMeasuring
from nodes.host.health import HostHealth
from nodes.host.metrics import HostMetrics
from nodes.host.overview import RecentMigrations, snapshot
from nodes.host.pacedrates import PacedRates
from nodes.host.postcopy import PostcopyControl
from nodes.host.postcopy_metrics import PostcopyCollector, PostcopyTotals
from nodes.host.processvcpu import ProcessVCPU
from nodes.host.specs import GuestSpec, HostConfig
from nodes.host.vcpus import (
    GuestBefore,
    GuestVCPUs,
    check_vcpus_here,
    resolved_spec,
    vcpu_description,
)
from nodes.migration.decide.fixeddowntime import handover_fixed_seconds
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.postcopy.postcopy_source import plan
from nodes.migration.progress import Progress
from nodes.migration.receive.receiver import Receiver, validate_info
from nodes.migration.results import DestinationResult, SourceResult
from nodes.migration.send.link import Pacer
from nodes.migration.send.opening import guest_info
from nodes.migration.send.sender import Sender, check_migratable
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire.channel import Ticket
from nodes.phase import ENDED, Outcome
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor
from workloads.patterns import make_workload
from workloads.spec import WorkloadSpec
from workloads.vcpu import VCPU

KEEP_ENDED_PROGRESS = 64


class HostService(GuestVCPUs, PostcopyControl, HostHealth, GuestMeasuring, PacedRates):
    def __init__(self, config: HostConfig):
        self.config = config
        self.name = config.name
        self.hv = Hypervisor(config.name, config.memory_bytes, config.page_size,
                             config.reserved_bytes, config.profile, config.dom0_memory_bytes,
                             config.seed, config.superpages)
        self.vcpus: dict[str, VCPU | ProcessVCPU] = {}    # a thread, or a guest process
        self.workloads: dict[str, WorkloadSpec] = {}
        self._retired: dict[str, VCPU | ProcessVCPU] = {}
        self.incoming: dict[str, Receiver] = {}
        self.outgoing: dict[str, Progress] = {}
        self._cancel: dict[str, threading.Event] = {}
        self.migration_counts = dict.fromkeys(("started", *ENDED), 0)
        self.lock = threading.RLock()
        self.metrics = HostMetrics(self)
        self.fault_stats = FaultStats()
        self.metrics.registry.register(FaultCollector(config.name, self.fault_stats))
        self._senders: dict[str, Sender] = {}         # outgoing migration -> its sender
        self.postcopy_totals = PostcopyTotals()
        self.metrics.registry.register(PostcopyCollector(
            self.name, self._senders, self.incoming, self.postcopy_totals))
        self._faults: dict[str, SourceFaults] = {}   # outgoing migration -> its fault seam
        self._paused: dict[str, tuple] = {}           # paused post-copy -> (sender, start, info)
        self._before: dict[str, GuestBefore] = {}     # outgoing -> its guest when it began
        self._uplinks: dict[float, Pacer] = {}        # link speed -> this host's shared uplink
        self._ended: collections.deque = collections.deque()   # ended outgoing, oldest first
        self._fixed_downtime: dict[str, float] = {}   # destination host -> its measured part
        self.recent = RecentMigrations()              # summaries for `migbed top`, both sides
        self._measuring: set[str] = set()             # guests a measurement holds (dirtymeter)
        self.dead = False
        if config.metrics_port is not None:
            self.metrics.serve(config.metrics_address, config.metrics_port,
                               advertised_address=config.address)

    # -- the host ---------------------------------------------------------------------------
    def ping(self) -> str:
        return self.name

    def snapshot(self) -> dict:
        """What `migbed top` shows of this host, in one call (`nodes.host.overview`)."""
        return snapshot(self)

    def metrics_endpoint(self) -> str | None:
        """"address:port" of this host's Prometheus /metrics, or None if it serves none."""
        return self.metrics.endpoint

    def describe(self) -> dict:
        d = self.hv.describe()
        d["address"] = self.config.address
        d["profile_summary"] = self.hv.profile.summary
        d["guest_modes"] = [m.value for m in self.hv.profile.guest_modes]
        d["superpages"] = self.config.superpages
        return d

    def list_guests(self) -> list[dict]:
        out = []
        for d in self.hv.list_domains():
            d["host"] = self.name
            spec = self.workloads.get(d["name"])
            if spec is not None:
                d["workload"] = spec.pattern
                d["dirty_rate_pages_per_second"] = spec.rate_pages_per_second
            vcpu = self.vcpus.get(d["name"])
            d["pages_written_total"] = vcpu.pages_written_total if vcpu else 0
            if vcpu is not None:
                d.update(vcpu_description(vcpu))
            out.append(d)
        return out

    # -- guests -------------------------------------------------------------------------------
    def create_guest(self, spec: GuestSpec) -> dict:
        """Boot a guest as `spec` says; its description says what runs its vCPUs (an `auto`
        spec's kind as this host chose it)."""
        spec = resolved_spec(spec)
        with self.lock:
            dom = self.hv.create_domain(spec.name, spec.memory_bytes, spec.mode, spec.dma)
            try:
                self._start_vcpu(dom, spec.workload, None, fill=True, kind=spec.vcpu,
                                 vcpus=spec.vcpus)
            except Exception:
                self._drop_vcpu(spec.name)
                self.hv.destroy_domain(spec.name, force=True)
                raise
            return dom.describe() | vcpu_description(self.vcpus[spec.name])

    def _start_vcpu(self, dom: Domain, spec: WorkloadSpec, state: dict | None, *,
                    fill: bool = False, kind: str = "thread", vcpus: int = 1,
                    parked: bool = False) -> VCPU | ProcessVCPU:
        """The guest's vCPUs, of `kind`: a thread running the workload from `state`, or a
        guest process (`parked`: waiting for its context, a migration's destination)."""
        page_size = dom.memory.page_size
        if fill:                     # a new guest: its memory as the spec says, before it runs
            make_workload(spec, dom.data_pages, None, page_size).fill(dom)
        if kind == "process":        # its state, if any, goes to the process (take_context)
            vcpu = self.vcpus[dom.name] = ProcessVCPU(self.hv.memory, dom, spec, vcpus,
                                                      parked=parked)
            self.workloads[dom.name] = spec
            return vcpu
        workload = make_workload(spec, dom.data_pages, state, page_size)
        self.workloads[dom.name] = spec
        vcpu = self.vcpus[dom.name] = VCPU(dom, workload)
        vcpu.start()
        return vcpu

    def destroy_guest(self, name: str) -> None:
        with self.lock:
            dom = self.hv.guest(name)
            if dom.migrating:       # the hypervisor's refusal, before its vCPUs are touched
                self.hv.destroy_domain(name)
            self._drop_vcpu(name)   # a process stops writing before its frames are freed
            self.hv.destroy_domain(name)

    def _drop_vcpu(self, name: str) -> VCPU | ProcessVCPU | None:
        vcpu = self.vcpus.pop(name, None)
        self.workloads.pop(name, None)
        if vcpu is not None:
            vcpu.stop()
        return vcpu

    def pause_guest(self, name: str) -> None:
        self.hv.pause(name)

    def unpause_guest(self, name: str) -> None:
        self.hv.unpause(name)

    def guest_status(self, name: str) -> dict:
        dom = self.hv.domain(name)
        d = dom.describe()
        d["host"] = self.name
        vcpu = self.vcpus.get(name)
        if vcpu is not None:
            d["pages_written_total"] = vcpu.pages_written_total
            d["progress_pages_total"] = vcpu.progress_pages
            d["last_progress_wall"] = vcpu.last_progress_wall
            d["vcpu_alive"] = vcpu.alive
            d["workload"] = self.workloads[name].to_dict()
            d.update(vcpu_description(vcpu))
        d["migrating"] = dom.migrating
        d["logdirty"] = dom.logdirty.enabled
        return d

    def guest_digest(self, name: str) -> str:
        return self.hv.canonical_digest(name)

    def page_table_problem(self, name: str) -> str | None:
        return self.hv.check_page_tables(name)

    def guest_application(self, name: str, felt: dict | None = None) -> dict:
        """A program guest's invariants and its client's log (`nodes.host.appview`); `felt`
        (the control plane's brownout / blackout of a migration, with its policy) goes to
        this host's metrics first."""
        if felt is not None:
            self.metrics.application_felt(name, **felt)
            return {}
        return application_view(self.hv, self.hv.domain(name), self.workloads.get(name),
                                self.vcpu_config(name)["vcpus"])

    def guest_counters(self, name: str) -> np.ndarray:
        """Word 0 of every data page: the workloads' per-page write counters (for checks)."""
        dom = self.hv.domain(name)
        pfns = np.arange(dom.data_pages, dtype=np.int64) + dom.pfn_base
        with dom.lock:
            return dom.memory.words[dom.p2m[pfns - dom.pfn_base], 0].copy()

    def frame_counts(self) -> dict:
        return self.hv.frame_counts()

    def guest_frames(self) -> dict[str, int]:
        """Frames owned per domain, read from the M2P table (for leak checks)."""
        owners = self.hv.allocator.owner
        out = {}
        for d in self.hv.domains.values():
            out[d.name] = int(np.count_nonzero(owners == d.domid))
        return out

    # -- migration: destination side ---------------------------------------------------------
    def prepare_incoming(self, info: GuestInfo, settings: MigrationSettings) -> Ticket:
        """Reserve frames for an arriving guest and listen for its stream; returns the ticket."""
        info = validate_info(info)
        check_vcpus_here(info, settings)
        with self.lock:
            mid = info.migration_id
            if mid in self.incoming:
                raise MigrationError(f"migration {mid} is already expected here")
            recv = Receiver(self.hv, info, settings, self.config.address, self,
                            self.fault_stats, self.config.data_ports)
            self.incoming[mid] = recv
            self.metrics.incoming_started(mid, recv)
            return recv.ticket

    def incoming_report(self, migration_id: str, timeout: float = 60.0) -> DestinationResult:
        """Wait for an incoming migration to end; the destination's result."""
        recv = self.incoming.get(migration_id)
        if recv is None:
            raise MigrationError(f"no incoming migration {migration_id} on {self.name}")
        if not recv.wait(timeout):
            raise MigrationStillRunning(f"incoming migration {migration_id} still running "
                                        f"after {timeout:g} s")
        result = recv.result()
        result.guest_observed_downtime_seconds = self.guest_gap(recv, result)
        self.postcopy_rates(recv, result)
        del self.incoming[migration_id]
        if recv.connection_lost:
            self.fault_stats.count_connection_lost("destination")
        self.postcopy_totals.destination_ended(recv)
        self.metrics.incoming_finished(migration_id, result.guest_observed_downtime_seconds)
        self.recent.destination_ended(self.name, migration_id, recv, result)
        return result

    # -- migration: source side ------------------------------------------------------------------
    def check_migratable(self, name: str) -> dict:
        self.refuse_while_measured(name)
        dom = check_migratable(self.hv, name)
        return {"name": dom.name, "pages": dom.npages, "mode": dom.mode.value,
                "arch": self.hv.profile.arch, "profile": self.hv.profile.name}

    def guest_info(self, name: str, migration_id: str) -> GuestInfo:
        dom = check_migratable(self.hv, name)
        return guest_info(self.hv, dom, migration_id, self.workload_spec(name),
                          **self.vcpu_config(name))

    def migrate_out(self, name: str, ticket: Ticket,
                    settings: MigrationSettings) -> SourceResult:
        """Run a migration to the destination that issued `ticket`; blocks until it ends."""
        mid = ticket.migration_id
        progress = Progress(mid, name)
        cancel = threading.Event()
        info = self.guest_info(name, mid)
        algorithm, postcopy = plan(settings)
        with self.lock:
            self.refuse_while_measured(name)
            sender = Sender(self.hv, name, ticket, settings, self, progress, cancel,
                            self._uplink(settings), self.fault_stats, algorithm, postcopy)
            self.outgoing[mid] = progress
            self._cancel[mid] = cancel
            self._faults[mid] = sender.faults
            self.pace_sender(mid, sender.faults)
            self._senders[mid] = sender
            self.migration_counts["started"] += 1
            self.metrics.outgoing_started(mid, name, progress, settings)
        start_wall = time.time()
        vcpu = self.vcpus.get(name)      # the guest's cost: its write rate, read now
        if vcpu is not None:
            self._before[mid] = GuestBefore.of(vcpu, start_wall)
        try:
            result = sender.run()
        except BaseException:
            self._sender_gone(mid)
            raise
        return self._sender_ended(mid, name, sender, result, start_wall, info)

    def _sender_ended(self, mid: str, name: str, sender: Sender, result: SourceResult,
                      start_wall: float, info: GuestInfo) -> SourceResult:
        """A sender returned: a paused post-copy is kept for `migrate_recover` (it is still
        running); anything else has ended, and is counted."""
        result.profile = self.hv.profile.name
        before = self._before.get(mid)
        vcpu = self._retired.pop(name, None) or self.vcpus.get(name)
        if vcpu is not None:
            end_wall = result.pause_wall or time.time()
            result.source_longest_gap_seconds = vcpu.longest_gap(start_wall, end_wall)
            if before is not None:
                result.guest_cost = vcpu.cost(start_wall, end_wall, before.pages, before.rate,
                                              vcpu.slept_seconds_total - before.slept)
                result.guest_cost["cpu_throttle_obtained_percentage"] = \
                    before.throttle_obtained(vcpu)
            self.postcopy_rate_before(vcpu, start_wall, result)
        if before is not None:
            result.workload_running_seconds = before.running_seconds
        if result.status == Outcome.PAUSED:
            with self.lock:
                self._paused[mid] = (sender, start_wall, info)
            return result
        fixed = result.fixed_downtime
        if result.completed and fixed and "handover" in result.phase_seconds:
            self._fixed_downtime[sender.session.ticket.host] = handover_fixed_seconds(
                result.phase_seconds["handover"], fixed["round_trip_seconds"])
        self._sender_gone(mid)
        if result.connection_lost:
            self.fault_stats.count_connection_lost("source")
        self.migration_counts[result.status] += 1
        self.postcopy_totals.source_ended(result)
        self.metrics.outgoing_finished(mid, result)
        self.recent.source_ended(self.name, mid, name, sender.session.settings, result)
        return result

    def _sender_gone(self, mid: str) -> None:
        self._before.pop(mid, None)
        self._cancel.pop(mid, None)
        self._faults.pop(mid, None)
        self._senders.pop(mid, None)
        self._forget_ended(mid)

    def _forget_ended(self, migration_id: str) -> None:
        """Keep the progress of the last KEEP_ENDED_PROGRESS ended migrations (for a late
        poll), not of every one: a soak of thousands must not grow the host."""
        with self.lock:
            self._ended.append(migration_id)
            while len(self._ended) > KEEP_ENDED_PROGRESS:
                self.outgoing.pop(self._ended.popleft(), None)

    def migration_progress(self, migration_id: str) -> Progress | None:
        """A snapshot of an outgoing migration's progress; None if it is not known here."""
        p = self.outgoing.get(migration_id)
        return p.snapshot() if p else None

    def cancel_migration(self, migration_id: str) -> bool:
        ev = self._cancel.get(migration_id)
        if ev is None or self.switched(migration_id):
            return False        # ended, or past a post-copy switch (QEMU cannot cancel then)
        ev.set()
        return True

    def abandon_incoming(self, migration_id: str) -> DestinationResult | None:
        """The source gave up (or never connected): free the reserved frames. Returns the
        destination's result, None if the migration was not expected here."""
        recv = self.incoming.pop(migration_id, None)
        if recv is None:
            return None
        recv.cancel()
        recv.wait(recv.settings.timeout_seconds)
        if recv.connection_lost:
            self.fault_stats.count_connection_lost("destination")
        self.postcopy_totals.destination_ended(recv)
        self.metrics.incoming_finished(migration_id, None)
        result = recv.result()
        self.recent.destination_ended(self.name, migration_id, recv, result)
        return result

    # -- the shared uplink ---------------------------------------------------------------------
    def _uplink(self, settings: MigrationSettings) -> Pacer | None:
        """This host's outgoing link, shared by its concurrent `link_shared` migrations."""
        rate = settings.link_bytes_per_second
        if not settings.link_shared or rate is None:
            return None
        with self.lock:
            return self._uplinks.setdefault(rate, Pacer(rate))

    def shutdown(self) -> None:
        for name in list(self.vcpus):
            self._drop_vcpu(name)
        self.metrics.close()

