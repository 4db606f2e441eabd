"""Post-copy preempt in the bench's post-copy section: the fault latency of a busy guest under
a push that saturates the link, without and with `--postcopy-preempt`, paired: each repeat
migrates the same guest both ways back to back (its own faults, the same link and load), and
the figure is their ratio (the issue's target: at most 0.5).

The push saturates the link because nothing else limits it: a 64 MiB/s link, no post-copy
bandwidth. Without preempt a requested page waits for the push record ahead of it and the
push's pacing wait; with it the page goes on its own connection the moment it is asked for.

The guest is a thread vCPU's: a process guest's faults take the native fault path
(`nodes.migration.postcopy.nativefault`), whose channel is a connection of its own with or
without preempt, so the pair would measure nothing of preempt.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.figures import Results, unique_name
from nodes.phase import Outcome

if TYPE_CHECKING:
    from cluster.testbed import Testbed

LINK_BYTES_PER_SECOND = 64 * MiB       # the push goes at this, the link's whole speed
DIRTY_RATE = 20000.0                   # pages/s: the guest faults all through the push


def bench_preempt(tb: "Testbed", a: str, b: str, opts: BenchOptions, res: Results,
                  say: Callable[[str], None]) -> None:
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    name = unique_name("pc-preempt")
    tb.create(a, GuestSpec(name, opts.dirty_guest_memory_bytes, vcpu="thread",
                           workload=WorkloadSpec("uniform", DIRTY_RATE, seed=3, fill="random")))
    where = a
    try:
        for i in range(opts.repeats):
            means = {}
            for preempt in (False, True):
                where = b if where == a else a
                r = tb.migrate(name, where, MigrationSettings(
                    link_bytes_per_second=LINK_BYTES_PER_SECOND, postcopy_after_rounds=0,
                    postcopy_preempt=preempt))
                if r.status != Outcome.COMPLETED or r.postcopy is None:
                    raise RuntimeError(f"post-copy migration {r.status}: {r.error}")
                means[preempt] = r.postcopy.fault_latency_mean_seconds
            if None in means.values():
                continue                          # a run without a fault: no pair
            res.add("fault_latency_saturated_mean_seconds", "seconds", means[False],
                    "mean fault latency, pure post-copy, the push saturating a 64 MiB/s link")
            res.add("fault_latency_preempt_mean_seconds", "seconds", means[True],
                    "the same with --postcopy-preempt (requested pages on their own channel)")
            res.add("preempt_fault_latency_ratio", "ratio", means[True] / means[False],
                    "with preempt over without, paired in one repeat (target <= 0.5)")
            say(f"  preempt {i + 1}/{opts.repeats}: fault latency {means[False] * 1000:.2f} "
                f"ms without, {means[True] * 1000:.2f} ms with")
    finally:
        tb.destroy(name)
    ratio = res.median("preempt_fault_latency_ratio")
    if ratio is not None:
        res.conclusions.append(
            f"post-copy preempt: fault latency under a saturating push "
            f"{res.median('fault_latency_preempt_mean_seconds') * 1000:.2f} ms against "
            f"{res.median('fault_latency_saturated_mean_seconds') * 1000:.2f} ms without "
            f"({ratio:.2f}x, paired)")
