"""The process section: process vCPUs against thread vCPUs, paired in the same run (issue 22).

Each repeat migrates a thread guest and then a process guest of the same size and workload
between the same two hosts, back to back, so a slow patch of this (shared, noisy) machine
weighs on both kinds alike; the figures are medians of the repeats and the ratios are
process over thread.

- throughput: an idle guest whose memory is random (every page goes whole), pre-copy over an
  unlimited link: bytes on the wire over the migration's time.
- downtime floor: the same migrations' pause on the source to resume on the destination
  (libvirt's definition), and the guest's own view of its gap (its last progress on the source
  to its first on the destination: `guest_observed_downtime_seconds`); their difference per
  migration is the part of the gap the guest sees beyond pause-to-resume.
- post-copy: a guest writing uniformly migrated by pure post-copy with its push slowed, so
  its vCPU faults; the report's mean fault latency (request to landed) beside a raw one-page
  round trip between the same two hosts measured in the same repeat, and the switch's
  downtime (pause to resume, the guest's own gap); then each kind again with
  `--postcopy-preempt` (its fault latency beside the same round trip).

Where this kernel cannot run a process vCPU (`nodes.host.userfault.kernel_support`), the
section says so in its conclusions and measures nothing.
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.bench.bench_options import BenchOptions, MiB
from cluster.bench.figures import Results, unique_name
from cluster.bench.postcopy_bench import raw_round_trip_seconds
from nodes.phase import Outcome
from nodes.units import format_bytes

if TYPE_CHECKING:
    from cluster.report import MigrationReport
    from cluster.testbed import Testbed

KINDS = ("thread", "process")
PUSH_BYTES_PER_SECOND = 8 * MiB       # the post-copy guests' push: slow, so their vCPUs fault
POSTCOPY_RATE = 20000.0               # page writes/s of the post-copy guests
ROUND_TRIPS = 100


def bench_process(tb: "Testbed", opts: BenchOptions, res: Results,
                  say: Callable[[str], None]) -> None:
    from nodes.host.userfault import kernel_support
    support = kernel_support()
    if not support.dirty_log:
        res.conclusions.append(f"process vCPUs not measured: {support.reason}")
        return
    a, b = list(tb.hosts)[:2]
    _idle_pairs(tb, a, b, opts, res, say)
    if support.missing_shmem and support.minor_shmem:
        _postcopy_pairs(tb, a, b, opts, res, say)
    _ratios_and_conclusions(res, opts)


class _Guests:
    """One guest of each kind, migrated back and forth between two hosts."""

    def __init__(self, tb: "Testbed", a: str, b: str, prefix: str, size: int, workload):
        from nodes.host.specs import GuestSpec
        self.tb, self.a, self.b = tb, a, b
        self.names = {k: unique_name(f"{prefix}-{k[0]}") for k in KINDS}
        self.where = dict.fromkeys(KINDS, a)
        for kind, name in self.names.items():
            tb.create(a, GuestSpec(name, size, workload=workload, vcpu=kind))

    def migrate(self, kind: str, settings) -> "MigrationReport":
        dest = self.b if self.where[kind] == self.a else self.a
        r = self.tb.migrate(self.names[kind], dest, settings)
        self.where[kind] = dest
        if r.status != Outcome.COMPLETED or r.integrity.verified is False:
            raise RuntimeError(f"{kind} guest migration {r.status}: {r.error}")
        return r

    def destroy(self) -> None:
        for name in self.names.values():
            try:
                self.tb.destroy(name)
            except Exception:  # noqa: BLE001 - a failed migration may have left it elsewhere
                pass


def _idle_pairs(tb: "Testbed", a: str, b: str, opts: BenchOptions, res: Results,
                say: Callable[[str], None]) -> None:
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    size = opts.process_guest_memory_bytes
    guests = _Guests(tb, a, b, "vk-idle", size, WorkloadSpec("idle", fill="random"))
    what = f"idle {format_bytes(size)} guest, random memory, pre-copy, unlimited link"
    try:
        for kind in KINDS:                   # the first migration of each into cold frames
            guests.migrate(kind, MigrationSettings())
        for i in range(opts.repeats):
            for kind in KINDS:
                r = guests.migrate(kind, MigrationSettings())
                res.add(f"process_bench_{kind}_throughput_bytes_per_second", "bytes_per_second",
                        r.throughput_bytes_per_second, f"{kind} vCPU: {what}")
                res.add(f"process_bench_{kind}_downtime_idle_seconds", "seconds",
                        r.downtime_seconds, f"{kind} vCPU: pause on the source to resume on "
                        f"the destination, {what}")
                seen = r.guest_observed_downtime_seconds
                if seen is not None:
                    res.add(f"process_bench_{kind}_guest_observed_idle_seconds", "seconds", seen,
                            f"{kind} vCPU: the guest's last progress on the source to its "
                            "first on the destination")
                    res.add(f"process_bench_{kind}_guest_observed_excess_seconds", "seconds",
                            seen - r.downtime_seconds, f"{kind} vCPU: guest-observed downtime "
                            "less pause-to-resume, per migration")
                _gap_parts(res, kind, r)
                say(f"  {kind} idle {i + 1}/{opts.repeats}: "
                    f"{r.throughput_bytes_per_second / MiB:.0f} MiB/s, downtime "
                    f"{r.downtime_seconds * 1000:.2f} ms, guest saw "
                    f"{'-' if seen is None else f'{seen * 1000:.2f}'} ms")
    finally:
        guests.destroy()


def _gap_parts(res: Results, kind: str, r: "MigrationReport") -> None:
    """The guest-observed downtime's two parts: its gap across the hand-over (less
    pause-to-resume: what the hand-over adds to what the guest sees) and its longest gap on
    the source while the migration ran (its own stalls on this machine)."""
    across = r.guest_gap_across_handover_seconds
    if across is not None:
        res.add(f"process_bench_{kind}_handover_gap_excess_seconds", "seconds",
                across - r.downtime_seconds, f"{kind} vCPU: the guest's gap across the "
                "hand-over less pause-to-resume, per migration")
    if r.guest_gap_on_source_seconds is not None:
        res.add(f"process_bench_{kind}_source_gap_seconds", "seconds",
                r.guest_gap_on_source_seconds, f"{kind} vCPU: the guest's longest gap on the "
                "source while the migration ran")


def _postcopy_pairs(tb: "Testbed", a: str, b: str, opts: BenchOptions, res: Results,
                    say: Callable[[str], None]) -> None:
    from nodes.migration.settings import MigrationSettings
    from workloads.spec import WorkloadSpec
    size = opts.process_guest_memory_bytes
    guests = _Guests(tb, a, b, "vk-pc", size, WorkloadSpec("uniform", POSTCOPY_RATE, seed=5))
    settings = MigrationSettings(postcopy_after_rounds=0,
                                 postcopy_bandwidth_bytes_per_second=PUSH_BYTES_PER_SECOND)
    preempt = MigrationSettings(postcopy_after_rounds=0, postcopy_preempt=True,
                                postcopy_bandwidth_bytes_per_second=PUSH_BYTES_PER_SECOND)
    what = (f"{format_bytes(size)} guest writing uniformly at {POSTCOPY_RATE:g} pages/s, pure "
            f"post-copy, push at {format_bytes(PUSH_BYTES_PER_SECOND)}/s")
    try:
        time.sleep(0.1)
        for i in range(opts.repeats):
            for kind in KINDS:
                r = guests.migrate(kind, settings)
                pc = r.postcopy
                res.add(f"process_bench_{kind}_postcopy_downtime_seconds", "seconds",
                        r.downtime_seconds, f"{kind} vCPU: the post-copy switch, pause to "
                        f"resume, {what}")
                if r.guest_observed_downtime_seconds is not None:
                    res.add(f"process_bench_{kind}_postcopy_guest_observed_seconds", "seconds",
                            r.guest_observed_downtime_seconds,
                            f"{kind} vCPU: the guest's own gap across the post-copy switch")
                if pc is not None and pc.fault_latency_mean_seconds is not None:
                    res.add(f"process_bench_{kind}_fault_latency_mean_seconds", "seconds",
                            pc.fault_latency_mean_seconds, f"{kind} vCPU: a page request to "
                            f"the page landed, mean, {what}")
            for kind in KINDS:             # the same with the preempt channel, paired
                r = guests.migrate(kind, preempt)
                if r.postcopy is not None and r.postcopy.fault_latency_mean_seconds is not None:
                    res.add(f"process_bench_{kind}_preempt_fault_latency_mean_seconds",
                            "seconds", r.postcopy.fault_latency_mean_seconds,
                            f"{kind} vCPU: the same with --postcopy-preempt")
            rtt = raw_round_trip_seconds(tb.host(a), tb.host(b),
                                         20 if opts.quick else ROUND_TRIPS)
            res.add("process_bench_page_round_trip_seconds", "seconds", rtt,
                    "raw: a REQ_PAGES record one way, a one-page PAGE_DATA back, between the "
                    "same two hosts, right after the repeat's migrations (median)")
            say(f"  post-copy {i + 1}/{opts.repeats}: fault latency thread "
                f"{_ms(res, 'thread_fault_latency_mean')}, process "
                f"{_ms(res, 'process_fault_latency_mean')} (with preempt "
                f"{_ms(res, 'thread_preempt_fault_latency_mean')}, "
                f"{_ms(res, 'process_preempt_fault_latency_mean')}), raw round trip "
                f"{rtt * 1000:.3f} ms")
    finally:
        guests.destroy()


def _ms(res: Results, key: str) -> str:
    fig = res.figures.get(f"process_bench_{key}_seconds")
    return f"{fig.samples[-1] * 1000:.3f} ms" if fig and fig.samples else "-"


def _ratios_and_conclusions(res: Results, opts: BenchOptions) -> None:
    p, t = "process_bench_process_", "process_bench_thread_"
    for label, key in (("throughput", "throughput_bytes_per_second"),
                       ("idle downtime", "downtime_idle_seconds"),
                       ("guest-observed idle downtime", "guest_observed_idle_seconds"),
                       ("post-copy switch downtime", "postcopy_downtime_seconds"),
                       ("fault latency", "fault_latency_mean_seconds")):
        res.ratio(f"process / thread vCPU: {label}", p + key, t + key)
    rtt = "process_bench_page_round_trip_seconds"
    for kind in KINDS:
        res.ratio(f"{kind} vCPU fault latency / raw page round trip",
                  f"process_bench_{kind}_fault_latency_mean_seconds", rtt)
        res.ratio(f"{kind} vCPU fault latency with --postcopy-preempt / raw page round trip",
                  f"process_bench_{kind}_preempt_fault_latency_mean_seconds", rtt)
    for kind in KINDS:
        down = res.median(f"process_bench_{kind}_downtime_idle_seconds")
        seen = res.median(f"process_bench_{kind}_guest_observed_idle_seconds")
        excess = res.figures.get(f"process_bench_{kind}_guest_observed_excess_seconds")
        thru = res.median(f"process_bench_{kind}_throughput_bytes_per_second")
        if down is None or thru is None:
            continue
        line = (f"{kind} vCPU, idle {format_bytes(opts.process_guest_memory_bytes)} guest: "
                f"{thru / MiB:.0f} MiB/s, pause to resume {down * 1000:.2f} ms")
        if seen is not None and excess is not None:
            d = excess.to_dict()
            line += (f", the guest saw {seen * 1000:.2f} ms (excess median "
                     f"{d['median'] * 1000:.2f} ms, {d['min'] * 1000:.2f}-"
                     f"{d['max'] * 1000:.2f}")
            hand = res.median(f"process_bench_{kind}_handover_gap_excess_seconds")
            src = res.median(f"process_bench_{kind}_source_gap_seconds")
            if hand is not None and src is not None:
                line += (f"; across the hand-over {hand * 1000:.2f} ms beyond pause-to-resume,"
                         f" its longest gap on the source {src * 1000:.2f} ms")
            line += ")"
        lat = res.median(f"process_bench_{kind}_fault_latency_mean_seconds")
        r = res.median(rtt)
        if lat is not None and r:
            line += (f"; post-copy fault {lat * 1000:.3f} ms = {lat / r:.1f}x a raw page round "
                     f"trip ({r * 1000:.3f} ms)")
        res.conclusions.append(line)
