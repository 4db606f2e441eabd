"""The vCPUs as migrations need them (the `GuestRuntime` of `nodes.migration.runtime`,
mixed into `nodes.host.service.HostService`, which holds `vcpus`, `workloads` and `_retired`):
a leaving guest's context and its vCPU stopped, an arriving guest's vCPU made from the context
its source sent (made early and parked, for a post-copy destination, then given it)."""

from dataclasses import dataclass

from nodes.xen.domain import Domain
from workloads.spec import WorkloadSpec
from workloads.vcpu import VCPU


@dataclass(frozen=True)
class GuestBefore:
    """A leaving guest's vCPU as the migration began: what its cost is measured against."""

    slept: float              # seconds its vCPU had slept throttled
    pages: int                # pages it had gone through (writes; a `scan`'s reads)
    rate: float | None        # its page-write rate over the second before
    running_seconds: float    # how long its workload had run

    @classmethod
    def of(cls, vcpu: VCPU, now_wall: float) -> "GuestBefore":
        return cls(vcpu.slept_seconds_total, vcpu.workload.progress_pages,
                   vcpu.write_rate(now_wall - 1.0, now_wall), vcpu.workload.running_seconds)


class GuestVCPUs:
    def workload_spec(self, name: str) -> dict | None:
        spec = self.workloads.get(name)
        return spec.to_dict() if spec else None

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

    def start_guest(self, dom: Domain, workload: dict | None, context: dict) -> None:
        vcpu = self.vcpus.get(dom.name)
        state = context.get("workload_state")
        if vcpu is not None and vcpu.domain is dom:       # prepared: it only needs its context
            if state is not None:
                vcpu.workload.restore(state)
            return
        spec = WorkloadSpec.from_dict(workload) if workload else WorkloadSpec()
        self._start_vcpu(dom, spec, state)

    def prepare_guest(self, dom: Domain, workload: dict | None) -> None:
        spec = WorkloadSpec.from_dict(workload) if workload else WorkloadSpec()
        self._start_vcpu(dom, spec, None)

    def discard_guest(self, name: str) -> None:
        self._drop_vcpu(name)

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
