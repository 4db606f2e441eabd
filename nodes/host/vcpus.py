"""The vCPUs as migrations need them (the `GuestRuntime` of `nodes.migration.runtime`,
mixed into `nodes.host.service.HostService`, which holds `vcpus`, `workloads` and `_retired`):
a leaving guest's context and its vCPU stopped, an arriving guest's vCPU made from the context
its source sent (made early and parked, for a post-copy destination, then given it); a
process guest resumed by a post-copy switch has its parked process armed for real faults on
its missing pages (`postcopy_faults`).

A guest's vCPUs are a thread (`workloads.vcpu.VCPU`) or a guest process
(`nodes.host.processvcpu.ProcessVCPU`), as it was created (`GuestSpec.vcpu`); an arriving
guest gets the kind it had on its source (GUEST_INFO's `vcpu`, `vcpus`)."""

import errno
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from nodes.errors import ConfigError, DomainStateError
from nodes.host.faultreader import FaultReader
from nodes.host.guestprocess import GuestProcessError
from nodes.host.processvcpu import ProcessVCPU
from nodes.host.specs import GuestSpec
from nodes.host.userfault import MODE_WP, kernel_support
from nodes.migration.clock import to_source_clock
from nodes.migration.guestinfo import VCPU_AUTO, VCPU_KINDS, GuestInfo
from nodes.migration.postcopy.pagefault import FaultsFactory, RequestPages
from nodes.migration.receive.receiver import Receiver
from nodes.migration.results import DestinationResult
from nodes.migration.settings import MigrationSettings
from nodes.xen.domain import Domain
from workloads.spec import WorkloadSpec
from workloads.vcpu import VCPU

POSTCOPY_REFUSED = ("post-copy of a process vCPU guest is not available here: this kernel's "
                    "userfaultfd lacks MISSING/MINOR faults on shared memory; migrate it by "
                    "pre-copy, or create it with --vcpu thread")


# The operator's default kind for guests that do not name one (`thread` or `process`), in the
# environment of the hosts' processes; unset, the default is a process wherever the kernel
# runs one whole (dirty logging and post-copy faults), a thread elsewhere.
DEFAULT_VCPU_ENV = "MIGBED_VCPU"


def default_vcpu_kind(spec: GuestSpec) -> str:
    """What `--vcpu auto` (the default) runs on this host. A program, or more than one vCPU,
    needs a process whatever the default (refused in one line where the kernel cannot);
    otherwise $MIGBED_VCPU if set, else `process` where this kernel's probe finds
    write-protect dirty logging and MISSING/MINOR faults on shared memory (so any
    migration of the guest can run), else `thread`."""
    if spec.workload.is_program or spec.vcpus > 1:
        return "process"
    chosen = os.environ.get(DEFAULT_VCPU_ENV, "")
    if chosen:
        if chosen not in VCPU_KINDS:
            raise ConfigError(f"${DEFAULT_VCPU_ENV}={chosen!r} is no vCPU kind; set it to "
                              "process or thread, or unset it")
        return chosen
    s = kernel_support()
    return "process" if s.dirty_log and s.missing_shmem and s.minor_shmem else "thread"


def resolved_spec(spec: GuestSpec) -> GuestSpec:
    """The spec with its vCPU kind as this host runs it (`auto` resolved); a process this
    kernel cannot run is refused here, in one line, before anything is made."""
    if spec.vcpu == VCPU_AUTO:
        spec = replace(spec, vcpu=default_vcpu_kind(spec))
    if spec.vcpu == "process":
        kernel_support().require()
    return spec


def vcpu_description(vcpu: VCPU | ProcessVCPU) -> dict:
    """What `migbed list` and a guest's status show of its vCPUs: kind, count, process."""
    if isinstance(vcpu, ProcessVCPU):
        return {"vcpu": "process", "vcpus": vcpu.vcpus, "pid": vcpu.pid}
    return {"vcpu": "thread", "vcpus": 1, "pid": None}


def check_process_guest(vcpu: str, settings: MigrationSettings | None = None) -> None:
    """A process guest: this host's kernel must run it (and, for a post-copy, resolve its
    faults); one ConfigError line otherwise, which says `--vcpu thread` works."""
    if vcpu != "process":
        return
    support = kernel_support()
    support.require()
    if settings is not None and settings.postcopy_allowed and not (
            support.missing_shmem and support.minor_shmem):
        raise ConfigError(POSTCOPY_REFUSED)


def check_vcpus_here(info: GuestInfo, settings: MigrationSettings) -> None:
    """An arriving guest's vCPUs can run here, migrated so."""
    check_process_guest(info.vcpu, settings)


class ProcessGuestFaults(FaultReader):
    """A process guest's post-copy faults; when every page has landed its range is
    write-protect registered again, as its launch registers it, so a later migration from
    here dirty-logs it."""

    def finish(self) -> None:
        super().finish()
        try:
            self.uffd.register(self.base, len(self.received) * self.page_size, MODE_WP)
        except OSError as exc:
            if exc.errno not in (errno.ESRCH, errno.ENOENT):   # the guest is gone
                raise


@dataclass(frozen=True)
class GuestBefore:
    """A leaving guest's vCPU as the migration began: what its cost is measured against."""

    slept: float              # seconds its vCPU had slept throttled
    pages: int                # pages it had gone through (writes; a `scan`'s reads)
    rate: float | None        # its page-write rate over the second before
    running_seconds: float    # how long its workload had run
    throttle: dict            # its throttle stats (`throttle_stats`)

    @classmethod
    def of(cls, vcpu: VCPU | ProcessVCPU, now_wall: float) -> "GuestBefore":
        return cls(vcpu.slept_seconds_total, vcpu.workload.progress_pages,
                   vcpu.write_rate(now_wall - 1.0, now_wall), vcpu.workload.running_seconds,
                   vcpu.throttle_stats())

    def throttle_obtained(self, vcpu: VCPU | ProcessVCPU) -> float | None:
        """The cpu-throttle the vCPU obtained since, in percent: its sleeps over its sleeps
        and the slices it ran before them (None: no throttle ran)."""
        now = vcpu.throttle_stats()
        slept = now["throttle_sleep_seconds"] - self.throttle["throttle_sleep_seconds"]
        ran = now["throttled_run_seconds"] - self.throttle["throttled_run_seconds"]
        return 100 * slept / (slept + ran) if slept + ran > 0 else None


# How long the destination waits for a resumed guest's first sign of life when measuring the
# downtime the guest saw; a guest that shows none in that time reports None.
GUEST_PROGRESS_WAIT_SECONDS = 2.0


class GuestVCPUs:
    def workload_spec(self, name: str) -> dict | None:
        spec = self.workloads.get(name)
        return spec.to_dict() if spec else None

    def vcpu_config(self, name: str) -> dict:
        vcpu = self.vcpus.get(name)
        d = vcpu_description(vcpu) if vcpu is not None else {"vcpu": "thread", "vcpus": 1}
        return {"vcpu": d["vcpu"], "vcpus": d["vcpus"]}

    def pages_written(self, name: str) -> int | None:
        vcpu = self.vcpus.get(name)
        return vcpu.pages_written_total if vcpu is not None else None

    def vcpu_context(self, name: str) -> dict:
        vcpu = self.vcpus.get(name)
        if vcpu is not None:
            vcpu.wait_awake()            # a throttle sleep the pause ended is in the log
        if vcpu is None:
            return {"vcpu_id": 0, "workload_state": None, "last_progress_wall": None,
                    "pages_written_total": 0}
        return {"vcpu_id": 0, "workload_state": vcpu.workload.get_state(),
                "last_progress_wall": vcpu.last_progress_wall,
                "pages_written_total": int(vcpu.pages_written_total)}

    def stop_guest(self, name: str) -> None:
        """The guest has left this host: stop its vCPU, keep its progress for the report."""
        vcpu = self._drop_vcpu(name)
        if vcpu is not None:
            self._retired[name] = vcpu

    def start_guest(self, dom: Domain, info: GuestInfo, context: dict) -> None:
        vcpu = self.vcpus.get(dom.name)
        state = context.get("workload_state")
        if vcpu is not None and vcpu.domain is dom:       # prepared: it only needs its context
            if isinstance(vcpu, ProcessVCPU):
                vcpu.take_context(state)
            elif state is not None:
                vcpu.workload.restore(state)
            return
        vcpu = self._start_vcpu(dom, _spec(info), state, kind=info.vcpu, vcpus=info.vcpus,
                                parked=True)
        if isinstance(vcpu, ProcessVCPU):
            vcpu.take_context(state)

    def prepare_guest(self, dom: Domain, info: GuestInfo) -> None:
        self._start_vcpu(dom, _spec(info), None, kind=info.vcpu, vcpus=info.vcpus,
                         parked=True)

    def discard_guest(self, name: str) -> None:
        self._drop_vcpu(name)

    def postcopy_faults(self, dom: Domain, info: GuestInfo) -> FaultsFactory | None:
        if info.vcpu != "process":
            return None
        return lambda received, request: self._resume_by_postcopy(dom, info, received, request)

    def _resume_by_postcopy(self, dom: Domain, info: GuestInfo, received: np.ndarray,
                            request: RequestPages) -> "ProcessGuestFaults":
        """At the switch: the guest's process, parked since the migration began, is armed
        for faults on the pages not `received` (it leaves write-protect for MISSING and
        MINOR faults, `ProcessVCPU.arm_postcopy`): a wake-up, where launching a process
        inside the switch cost ~10 ms of downtime. A prepared process that cannot be armed
        (gone, or not parked) is replaced by one launched armed. Its faults are read from
        here on."""
        prepared = self.vcpus.get(dom.name)
        vcpu = None
        if (isinstance(prepared, ProcessVCPU) and prepared.domain is dom
                and not prepared.started and prepared.alive):
            try:
                prepared.arm_postcopy(~received)
                vcpu = prepared
            except (GuestProcessError, DomainStateError):
                vcpu = None
        if vcpu is None:
            vcpu = ProcessVCPU(self.hv.memory, dom, _spec(info), info.vcpus, parked=True,
                               missing=~received)
            self.vcpus[dom.name] = vcpu
            if prepared is not None:
                prepared.stop()
        gp = vcpu.proc
        return ProcessGuestFaults(gp.uffd, gp.base, gp.page_size, received, request,
                                  pid=gp.pid, name=dom.name, map_starts=gp.map_starts).start()

    def throttle_guest(self, name: str, cpu_percentage: int = 0, ring_pages: int = 0,
                       ring_full_sleep_seconds: float = 0.0) -> None:
        vcpu = self.vcpus.get(name)
        if vcpu is not None:
            vcpu.set_throttle(cpu_percentage, ring_pages, ring_full_sleep_seconds)

    def vcpu_throttle_stats(self, name: str) -> dict:
        vcpu = self.vcpus.get(name) or self._retired.get(name)
        return vcpu.throttle_stats() if vcpu is not None else dict(VCPU.NO_THROTTLE_STATS)

    def measured_fixed_downtime(self, destination: str) -> float | None:
        return self._fixed_downtime.get(destination)

    def guest_gap(self, recv: Receiver, result: DestinationResult) -> float | None:
        """The guest's own gap across the hand-over: its last progress on the source to its
        first here (waiting, bounded, for a resumed guest's first sign of life), on the
        source's clock."""
        vcpu = self.vcpus.get(recv.name)
        last = result.last_progress_wall
        if not recv.resume_wall or vcpu is None or last is None:
            return None
        offset = (recv.timing or {}).get("clock_offset_seconds")   # last is the source's
        # Its first progress after its last on the source (it ran here only once resumed): a
        # guest quicker than the resume's stamp would be read from its next record.
        since = min(recv.resume_wall, last + (offset or 0.0))
        deadline = time.monotonic() + GUEST_PROGRESS_WAIT_SECONDS
        first = vcpu.first_progress_after(since)
        while first is None and time.monotonic() < deadline:
            time.sleep(0.002)
            first = vcpu.first_progress_after(since)
        if first is None:
            return None
        return to_source_clock(first, offset) - last


def _spec(info: GuestInfo) -> WorkloadSpec:
    return WorkloadSpec.from_dict(info.workload) if info.workload else WorkloadSpec()
