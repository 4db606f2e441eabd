"""The vCPUs as migrations need them (the `GuestRuntime` of `nodes.migration.runtime`,
mixed into `nodes.host.service.HostService`, which holds `vcpus`, `workloads` and `_retired`):
a leaving guest's context and its vCPU stopped, an arriving guest's vCPU made from the context
its source sent (made early and parked, for a post-copy destination, then given it)."""

from nodes.xen.domain import Domain
from workloads.spec import WorkloadSpec


class GuestVCPUs:
    def workload_spec(self, name: str) -> dict | None:
        spec = self.workloads.get(name)
        return spec.to_dict() if spec else None

    def vcpu_context(self, name: str) -> dict:
        vcpu = self.vcpus.get(name)
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
