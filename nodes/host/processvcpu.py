"""A process vCPU as its host holds it: what `nodes.host.service` and a migration need of a
guest's vCPUs, the same as a thread vCPU's (`workloads.vcpu.VCPU`), for a guest process.

Why one shape for both: the host's control plane (list, status, counters), a migration's
measures (the guest's cost, its observed downtime, its rates, the throttle) and the hand-over
(the vCPU context out, a parked vCPU given it) read a vCPU the same way whichever kind runs
the guest. Here they read the control page and the shared progress log
(`nodes.host.guestcontrol`, `nodes.host.sharedlog`) instead of a thread's attributes.

Made, it installs itself in the domain (`Domain.vcpu_control`: the hypervisor's pause parks
the process, its unpause runs it) and the kernel's dirty log in place of the emulated one
(`Domain.logdirty`: a migration's log-dirty ENABLE / CLEAN / PEEK / OFF are write-protect and
PAGEMAP_SCAN); `stop` takes both back.
"""

from typing import ClassVar

import numpy as np

from nodes.errors import DomainStateError
from nodes.host.guestcontrol import (
    W_CPU_PERCENTAGE,
    W_LIMIT_SLEEP_NS,
    W_THROTTLE_SLEEP_NS,
    W_THROTTLED_RUN_NS,
    State,
)
from nodes.host.guestprocess import GuestProcess
from nodes.host.kerneldirty import KernelDirtyLog
from nodes.host.sharedlog import SharedProgressLog
from nodes.xen.domain import Domain
from nodes.xen.logdirty import LogDirty
from nodes.xen.memory import MachineMemory
from workloads.progresslog import ProgressReadings
from workloads.spec import WorkloadSpec

CONTEXT_WAIT_SECONDS = 1.0        # the context follows a park by microseconds; bounded


class ProcessWorkload:
    """The guest's workload, as the host reads it: counters from the control page, its
    state (the vCPU context) as the guest published it at its last pause."""

    def __init__(self, vcpu: "ProcessVCPU"):
        self._vcpu = vcpu

    @property
    def progress_pages(self) -> int:
        return self._vcpu.proc.ctl.progress_pages

    @property
    def pages_written_total(self) -> int:
        return self._vcpu.proc.ctl.pages_written_total

    @property
    def running_seconds(self) -> float:
        return self._vcpu.proc.ctl.workload_running_seconds

    def get_state(self) -> dict:
        """The vCPU context: one vCPU's workload state as a thread vCPU's is (so either kind
        may take it), N vCPUs' as {"vcpus": [...]}. Read after a pause."""
        ctl = self._vcpu.proc.ctl
        if ctl.state is not State.PAUSED or not ctl.wait_context(CONTEXT_WAIT_SECONDS):
            raise DomainStateError(f"{self._vcpu.domain.name}: the vCPU context is read "
                                   f"while its vCPUs are parked (they are "
                                   f"{ctl.state.name.lower()})")
        states = ctl.read_context()
        return states[0] if len(states) == 1 else {"vcpus": states}

    def restore(self, state: dict | None) -> None:
        self._vcpu.take_context(state)


class ProcessVCPU(ProgressReadings):
    """The host's handle on a guest process (see the module docstring)."""

    kind: ClassVar[str] = "process"

    def __init__(self, memory: MachineMemory, dom: Domain, spec: WorkloadSpec, vcpus: int = 1,
                 *, parked: bool = False, missing: np.ndarray | None = None):
        """`missing`: a guest resumed by a post-copy switch (`GuestProcess.launch`)."""
        self.domain, self.spec, self.vcpus = dom, spec, vcpus
        self.proc = GuestProcess.launch(memory, dom, spec, vcpus=vcpus, parked=parked,
                                        missing=missing)
        try:
            self.dirty_log = KernelDirtyLog(self.proc.pid, self.proc.uffd, self.proc.base,
                                            dom.npages, memory.page_size)
        except BaseException:
            self.proc.stop()                 # no process left behind a failed start
            raise
        self.pid = self.proc.pid
        self.log = SharedProgressLog(self.proc.ctl)
        self.workload = ProcessWorkload(self)
        self.error: BaseException | None = None
        self.started = not parked
        with dom.lock:
            dom.logdirty = self.dirty_log
            dom.vcpu_control = self

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start: the process runs from its launch (a parked one from its
        context, `take_context`)."""

    def take_context(self, state: dict | None) -> None:
        """A parked guest (a migration's destination) gets its vCPU context: its vCPUs
        build their workloads from it and stay parked until the domain is unpaused."""
        if self.started:
            raise DomainStateError(f"{self.domain.name}: its vCPUs already have a context")
        if state is None:
            states = [None] * self.vcpus
        else:
            states = state["vcpus"] if "vcpus" in state else [state]
        if len(states) != self.vcpus:
            raise DomainStateError(f"{self.domain.name}: a context of {len(states)} vCPUs "
                                   f"for a guest of {self.vcpus}")
        self.proc.start(states)
        self.started = True

    def arm_postcopy(self, missing: np.ndarray) -> None:
        """A parked guest (not yet given its context) at a post-copy switch: its process
        faults where `missing` is set from now on (`GuestProcess.arm_postcopy`)."""
        if self.started:
            raise DomainStateError(f"{self.domain.name}: armed for post-copy after its "
                                   "vCPUs were given their context")
        self.proc.arm_postcopy(missing)

    def pause(self) -> None:
        """`Domain.vcpu_control`: park every vCPU (within a millisecond, measured)."""
        if self.started:
            self.proc.pause()

    def unpause(self) -> None:
        self.proc.resume()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """The process goes, and the domain gets the emulated log and no control back."""
        dom = self.domain
        with dom.lock:
            if dom.vcpu_control is self:
                dom.vcpu_control = None
            if dom.logdirty is self.dirty_log:
                dom.logdirty = LogDirty(dom.npages)
        self.proc.stop(timeout or 2.0)
        self.dirty_log.close()
        return True

    def wait_awake(self, timeout: float = 0.05) -> bool:
        """A throttle sleep ends before its vCPU parks, logged; what a paused guest's vCPUs
        write after their pause (their last record, the context) is waited for here."""
        ctl = self.proc.ctl
        return ctl.state is not State.PAUSED or ctl.wait_context(max(timeout, 0.05))

    @property
    def alive(self) -> bool:
        return self.proc.alive

    # -- counters ------------------------------------------------------------------------
    @property
    def pages_written_total(self) -> int:
        return self.proc.ctl.pages_written_total

    @property
    def progress_pages(self) -> int:
        return self.proc.ctl.progress_pages

    def vcpu_writes(self) -> list[int]:
        return self.proc.ctl.vcpu_writes()

    # -- the throttle --------------------------------------------------------------------
    def set_throttle(self, cpu_percentage: int = 0, ring_pages: int = 0,
                     ring_full_sleep_seconds: float = 0.0) -> None:
        """As `VCPU.set_throttle`, for every vCPU of the guest (each its own slices and its
        own dirty ring, as QEMU throttles each vCPU)."""
        if not 0 <= cpu_percentage <= 99:
            raise ValueError(f"cpu_percentage must be 0-99, got {cpu_percentage}")
        if ring_pages < 0 or ring_full_sleep_seconds < 0:
            raise ValueError("ring_pages and ring_full_sleep_seconds must be >= 0")
        self.proc.ctl.set_throttle(cpu_percentage, ring_pages, ring_full_sleep_seconds)

    @property
    def cpu_percentage(self) -> int:
        """The throttle its vCPUs are given now (`VCPU.cpu_percentage`), from the control
        page's word the host writes."""
        return int(self.proc.ctl.u64[W_CPU_PERCENTAGE])

    def throttle_stats(self) -> dict:
        ctl = self.proc.ctl
        return {"pages_written_total": self.pages_written_total,
                "throttle_sleep_seconds": ctl.seconds(W_THROTTLE_SLEEP_NS),
                "dirty_limit_sleep_seconds": ctl.seconds(W_LIMIT_SLEEP_NS),
                "throttled_run_seconds": ctl.seconds(W_THROTTLED_RUN_NS),
                "vcpu_pages_written": ctl.vcpu_writes()}

    @property
    def slept_seconds_total(self) -> float:
        ctl = self.proc.ctl
        return ctl.seconds(W_THROTTLE_SLEEP_NS) + ctl.seconds(W_LIMIT_SLEEP_NS)
