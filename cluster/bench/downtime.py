"""The downtime section: the floor migbed adds to every downtime (an idle guest: hand-over,
vCPU context, resume), and the downtime with a final round of about 50 pages.

Both definitions are reported, so either can be held against a real hypervisor: pause on the
source to resume on the destination (libvirt's, the report's `downtime_seconds`), and the
guest's stop to the last byte sent (QEMU's `downtime`, migbed's stop-and-copy phase).
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.bench.bench_options import BenchOptions
from cluster.bench.figures import Results, unique_name
from nodes.phase import Outcome
from nodes.units import format_bytes

if TYPE_CHECKING:
    from cluster.testbed import Testbed

FINAL_ROUND_PAGES = 50          # Xen's stop threshold: the downtime section's final round


def bench_downtime(tb: "Testbed", opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    """Downtime with a final round of ~50 pages: a hot set of exactly 50 pages written all
    the time, one live round (max_iterations=1), so the final round is the hot set."""
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    a, b = list(tb.hosts)[:2]
    size = opts.downtime_guest_memory_bytes
    _idle_downtimes(tb, a, b, size, opts.repeats, res)
    page = 4096
    pages = size // page
    data_pages = pages - -(-pages // (page // 8))
    spec = WorkloadSpec("hotset", 20000.0, seed=7, hot_fraction=FINAL_ROUND_PAGES / data_pages,
                        hot_share=1.0)
    name = unique_name("hot50")
    tb.create(a, GuestSpec(name, size, workload=spec))
    try:
        time.sleep(0.2)
        where = a
        for i in range(opts.repeats):
            dest = b if where == a else a
            r = tb.migrate(name, dest, MigrationSettings(max_iterations=1))
            where = dest
            if r.status != Outcome.COMPLETED:
                raise RuntimeError(f"migration {r.status}: {r.error}")
            final = r.rounds[-1]["pages_sent"]
            res.add("downtime_50_page_final_round_seconds", "seconds", r.downtime_seconds,
                    "hot set of 50 pages, one live round, then stop-and-copy")
            res.add("stop_and_copy_50_page_seconds", "seconds",
                    r.phase_seconds["stop_and_copy"],
                    "QEMU's downtime: the guest's stop to the last byte sent")
            res.add("final_round_pages", "pages", final)
            if r.guest_observed_downtime_seconds is not None:
                res.add("downtime_50_page_guest_observed_seconds", "seconds",
                        r.guest_observed_downtime_seconds)
            say(f"  50-page final round {i + 1}/{opts.repeats}: {final} pages, "
                f"{r.downtime_seconds * 1000:.1f} ms")
    finally:
        tb.destroy(name)
    floor = res.median("downtime_idle_seconds")
    fifty = res.median("downtime_50_page_final_round_seconds")
    stop = res.median("stop_and_copy_idle_seconds")
    if floor is not None and fifty is not None:
        res.conclusions.append(
            f"downtime floor {floor * 1000:.2f} ms pause to resume for an idle "
            f"{format_bytes(size)} guest (stop-and-copy {stop * 1000:.2f} ms, QEMU's "
            f"definition); with a ~50-page final round {fifty * 1000:.2f} ms")


def _idle_downtimes(tb: "Testbed", a: str, b: str, size: int, repeats: int, res: Results) -> None:
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    name = unique_name("idle")
    tb.create(a, GuestSpec(name, size))
    try:
        where = a
        for _ in range(repeats):
            where = b if where == a else a
            r = tb.migrate(name, where, MigrationSettings())
            if r.status != Outcome.COMPLETED:
                raise RuntimeError(f"idle migration {r.status}: {r.error}")
            res.add("downtime_idle_seconds", "seconds", r.downtime_seconds,
                    f"pause on the source to resume on the destination (libvirt's), idle "
                    f"{format_bytes(size)} guest")
            res.add("stop_and_copy_idle_seconds", "seconds", r.phase_seconds["stop_and_copy"],
                    "QEMU's downtime: the guest's stop to the last byte sent")
            res.add("handover_idle_seconds", "seconds", r.phase_seconds["handover"],
                    "END to the destination's RESULT")
            if r.guest_observed_downtime_seconds is not None:
                res.add("downtime_idle_guest_observed_seconds", "seconds",
                        r.guest_observed_downtime_seconds)
    finally:
        tb.destroy(name)
