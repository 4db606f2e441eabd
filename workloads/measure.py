"""How fast a workload can dirty a guest's memory here, in its current mode.

Why: a pre-copy migration converges only if the link outruns the dirty rate, so benchmarks
need the page-write rate a vCPU actually sustains (P2M writes are plain stores; VP with
log-dirty pays for marking the bitmap) to pick rates that are meaningful on this machine.
"""

import time

from workloads.guest import Guest
from workloads.patterns import make_workload
from workloads.spec import WorkloadSpec
from workloads.vcpu import VCPU


def measure_rate(domain: Guest, spec: WorkloadSpec, seconds: float,
                 tick_seconds: float = 0.001) -> float:
    """Page writes per second one vCPU running `spec` sustains on `domain` over `seconds`.

    The domain must be running; its memory is written (counters bumped), nothing else changes.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    vcpu = VCPU(domain, make_workload(spec, domain.data_pages), tick_seconds)
    start_pages = vcpu.pages_written_total
    start_seconds = time.monotonic()
    vcpu.start()
    try:
        time.sleep(seconds)
    finally:
        vcpu.stop()
        elapsed_seconds = time.monotonic() - start_seconds
    if vcpu.error is not None:
        raise vcpu.error
    return (vcpu.pages_written_total - start_pages) / elapsed_seconds
