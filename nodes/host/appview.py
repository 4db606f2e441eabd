"""A program guest as its host sees it from outside (`application_view`): whether each of its
programs' own invariants hold, and what its client felt (the application log it keeps in its
memory, `workloads.applog`).

Why a snapshot: a program's invariants hold between its operations, and its vCPUs run; so the
guest is paused (its vCPUs park at a batch boundary, as for a migration's stop-and-copy) for
as long as a copy of its data pages takes, then runs on while the copy is checked. The check
is the program's own (`Program.check`, e.g. the key-value store's checksum pass over every
key), run over the copy beside the migration's page digests.
"""

import numpy as np

from nodes.errors import ConfigError
from nodes.host.guestvcpu import split_pages, vcpu_spec
from nodes.xen.domain import Domain
from nodes.xen.hypervisor import Hypervisor
from workloads.patterns import make_workload
from workloads.program import J_OPS, Program
from workloads.spec import WorkloadSpec


def snapshot(hv: Hypervisor, dom: Domain) -> np.ndarray:
    """A copy of the guest's data pages (data pages x page size), taken paused."""
    pfns = np.arange(dom.data_pages, dtype=np.int64)
    running = dom.is_running
    if running:
        hv.pause(dom.name)
    try:
        with dom.lock:
            return hv.memory.frames[dom.p2m[pfns]].copy()
    finally:
        if running:
            hv.unpause(dom.name)


def programs_over(frames: np.ndarray, spec: WorkloadSpec, vcpus: int,
                  page_size: int) -> list[Program]:
    """The guest's programs (one per vCPU, on its slice, as `nodes.host.guestvcpu` runs
    them), bound to `frames` (a copy)."""
    out = []
    for i, (lo, hi) in enumerate(split_pages(len(frames), vcpus)):
        prog = make_workload(vcpu_spec(spec, vcpus, i), hi - lo, None, page_size)
        assert isinstance(prog, Program)
        prog.bind(frames[lo:hi])
        out.append(prog)
    return out


def application_view(hv: Hypervisor, dom: Domain, spec: WorkloadSpec | None,
                     vcpus: int) -> dict:
    """The guest's programs' checks and logs: {"program", "checks": [...], "ok",
    "logs": [read_applog dicts]} (ConfigError for a guest that runs no program)."""
    if spec is None or not spec.is_program:
        raise ConfigError(f"{dom.name} runs no program workload (its workload is "
                          f"{spec.pattern if spec else 'unknown'})")
    progs = programs_over(snapshot(hv, dom), spec, vcpus, hv.page_size)
    checks = [p.check() for p in progs]
    return {"program": spec.pattern, "vcpus": vcpus, "checks": checks,
            "ok": all(c["ok"] for c in checks), "loaded": all(p.loaded for p in progs),
            "ops_total": sum(int(p.journal[J_OPS]) for p in progs),
            "logs": [p.read_log() for p in progs]}
