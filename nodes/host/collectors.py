"""The live half of a host's /metrics: a prometheus_client custom collector that reads the
host's state at scrape time (frames, guests, modes, migration counters, the progress of
running migrations), from counters the host keeps anyway, so a scrape never walks guest
memory and never takes a guest's lock. `nodes.host.metrics` registers it.
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodes.host.hostview import HostView
from nodes.host.processvcpu import ProcessVCPU
from nodes.migration.receive.receiver import Receiver
from nodes.phase import ENDED, TIMED
from nodes.xen.domain import DomainState
from nodes.xen.profiles import Mode


class ScrapedMetrics(Protocol):
    """What the collector reads of `nodes.host.metrics.HostMetrics`, which registers it (a
    Protocol, so that this module needs not import the registering one back): the host, and
    under `lock` the running migrations and the totals of those that have ended."""

    host: HostView
    lock: AbstractContextManager
    outgoing: dict       # migration id -> a running one's guest, progress and settings
    incoming: dict[str, Receiver]
    wire_totals: dict    # `wire_totals()`, folded in by `add_wire`
    sent_pages_total: int
    sent_bytes_total: int
    dirtied_pages_total: int
    rounds_total: int
    received_pages_total: int
    received_bytes_total: int


def dirtied(rounds: list) -> int:
    """Pages dirtied over these rounds (progress dicts)."""
    return sum(int(r.get("pages_dirtied", 0)) for r in rounds)


class HostCollector:
    """Reads a host's live state at scrape time (a prometheus_client custom collector)."""

    def __init__(self, metrics: ScrapedMetrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []    # names vary with guests; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        h = m.host
        host = h.name
        hv = h.hv
        yield from self._host(host, hv)
        yield from self._guests(host, h)
        yield from _vcpus(host, h)
        yield from self._migrations(host, m)

    # -- the host -------------------------------------------------------------------------
    @staticmethod
    def _host(host: str, hv) -> Iterator[Metric]:
        info = GaugeMetricFamily("migbed_host_info", "The host's architecture profile (always 1).",
                                 labels=["host", "profile", "arch"])
        info.add_metric([host, hv.profile.name, hv.profile.arch], 1)
        yield info
        yield host_metric("migbed_host_memory_bytes", "Machine memory of the host.", host,
                   hv.memory.total_bytes)
        yield host_metric("migbed_host_page_size_bytes", "Page (and frame) size of the host.",
                   host, hv.page_size)
        counts = hv.allocator.counts()      # counted on the frame-owner table, no guest memory
        frames = GaugeMetricFamily(
            "migbed_host_frames", "Machine frames by state: free, used (dom0, guests, "
            "arriving guests) and reserved (the hypervisor's own).", labels=["host", "state"])
        for state in ("free", "used", "reserved"):
            frames.add_metric([host, state], counts[state])
        yield frames

    # -- guests -----------------------------------------------------------------------------
    @staticmethod
    def _guests(host: str, h: HostView) -> Iterator[Metric]:
        by_mode = dict.fromkeys((m.value for m in Mode), 0)
        info = GaugeMetricFamily("migbed_guest_info", "A guest on this host and its workload "
                                 "(always 1).", labels=["host", "guest", "workload"])
        mode = GaugeMetricFamily("migbed_guest_mode", "The guest's memory mode: 1 for the mode "
                                 "it is in, 0 for the others.", labels=["host", "guest", "mode"])
        state = GaugeMetricFamily("migbed_guest_state", "The guest's state: 1 for the state it "
                                  "is in, 0 for the others.", labels=["host", "guest", "state"])
        memory = GaugeMetricFamily("migbed_guest_memory_bytes", "Memory of the guest.",
                                   labels=["host", "guest"])
        migrating = GaugeMetricFamily("migbed_guest_migrating", "1 while the guest is migrating.",
                                      labels=["host", "guest"])
        dirty = GaugeMetricFamily(
            "migbed_guest_dirty_pages", "Pages the log-dirty bitmap has marked since its last "
            "CLEAN (0 when log-dirty mode is off).", labels=["host", "guest"])
        writes = CounterMetricFamily(
            "migbed_guest_page_writes", "Page writes made by the guest's vCPU, carried over "
            "migrations (its rate is the guest's dirty rate).", labels=["host", "guest"])
        app_ops = CounterMetricFamily(
            "migbed_guest_app_operations", "Operations a program guest's client completed "
            "(kvstore requests, stream chunks, sort runs and merges, matmul blocks), carried "
            "over migrations: its rate is what its application does.", labels=["host", "guest"])
        for dom in list(h.hv.domains.values()):
            # dom0 is the toolstack; a `<name>--migratedaway` copy is the hand-over's remains.
            if dom.is_dom0 or "--" in dom.name:
                continue
            g = dom.name
            by_mode[dom.mode.value] += 1
            spec = h.workloads.get(g)
            info.add_metric([host, g, spec.pattern if spec else "none"], 1)
            for m in Mode:
                mode.add_metric([host, g, m.value], 1 if dom.mode is m else 0)
            for s in DomainState:
                state.add_metric([host, g, s.value], 1 if dom.state is s else 0)
            memory.add_metric([host, g], dom.memory_bytes)
            migrating.add_metric([host, g], 1 if dom.migrating else 0)
            dirty.add_metric([host, g], dom.logdirty.fault_count if dom.logdirty.enabled else 0)
            vcpu = h.vcpus.get(g)
            if vcpu is not None:    # an arriving guest has no vCPU (and no writes) yet
                writes.add_metric([host, g], vcpu.pages_written_total)
                if spec is not None and spec.is_program:
                    app_ops.add_metric([host, g], vcpu.progress_pages)
        guests = GaugeMetricFamily("migbed_host_guests", "Guests on the host by memory mode "
                                   "(arriving guests included, dom0 not).",
                                   labels=["host", "mode"])
        for mode_name, n in by_mode.items():
            guests.add_metric([host, mode_name], n)
        yield guests
        yield from (info, mode, state, memory, migrating, dirty, writes, app_ops)

    # -- migrations ---------------------------------------------------------------------------
    @staticmethod
    def _migrations(host: str, m: ScrapedMetrics) -> Iterator[Metric]:
        yield from _migration_counts(host, m.host.migration_counts)
        with m.lock:
            outgoing = list(m.outgoing.values())
            incoming = list(m.incoming.values())
            totals = _traffic(m, outgoing, incoming)
        progress = GaugeMetricFamily("migbed_migrations_in_progress", "Migrations running on "
                                     "this host, as source (outgoing) or destination "
                                     "(incoming).", labels=["host", "direction"])
        progress.add_metric([host, "outgoing"], len(outgoing))
        progress.add_metric([host, "incoming"], sum(1 for r in incoming if not r.done.is_set()))
        yield progress
        yield from _running(host, outgoing)
        yield from _traffic_counters(host, totals)
        yield from _wire_counters(host, m.wire_totals, outgoing)


def _vcpus(host: str, h: HostView) -> Iterator[Metric]:
    """What runs each guest: its vCPUs' kind and count, and for a guest process its pid and
    the pages the kernel's dirty log reported written over every CLEAN (read from the log the
    host holds: a scrape scans no page table)."""
    count = GaugeMetricFamily("migbed_guest_vcpus", "The guest's vCPUs, labelled with their "
                              "kind: threads of the host, or threads of a guest process.",
                              labels=["host", "guest", "kind"])
    pid = GaugeMetricFamily("migbed_guest_process_pid", "The pid of a process guest's "
                            "process on its host.", labels=["host", "guest"])
    written = CounterMetricFamily(
        "migbed_guest_kernel_written_pages", "Pages the kernel's dirty log (userfaultfd "
        "write-protect and PAGEMAP_SCAN) reported a process guest wrote, over every CLEAN "
        "on this host (the report's shadow_faults, summed).", labels=["host", "guest"])
    for g, vcpu in list(h.vcpus.items()):
        if isinstance(vcpu, ProcessVCPU):
            count.add_metric([host, g, "process"], vcpu.vcpus)
            pid.add_metric([host, g], vcpu.pid)
            written.add_metric([host, g], vcpu.dirty_log.pages_reported_total)
        else:
            count.add_metric([host, g, "thread"], 1)
    yield from (count, pid, written)


def _migration_counts(host: str, counts: dict) -> Iterator[Metric]:
    yield host_metric("migbed_migrations_started", "Migrations this host started as the source.",
               host, counts.get("started", 0), counter=True)
    ended = CounterMetricFamily("migbed_migrations_finished", "Migrations this host ran as "
                                "the source, by how they ended.", labels=["host", "status"])
    for status in ENDED:
        ended.add_metric([host, status], counts.get(status, 0))
    yield ended


_RUNNING_GAUGES = {
    "round": ("migbed_migration_round", "Round the running migration is in (0: the "
              "first full copy)."),
    "phase": ("migbed_migration_phase", "Phase of the running migration: 1 for the "
              "phase it is in, 0 for the others."),
    "dirty": ("migbed_migration_dirty_pages", "Pages dirtied during the last round of "
              "the running migration, to be sent next."),
    "sent": ("migbed_migration_last_round_pages_sent", "Pages sent in the last finished "
             "round of the running migration."),
    "dirtied": ("migbed_migration_last_round_pages_dirtied", "Pages dirtied during the "
                "last finished round of the running migration."),
    "remaining": ("migbed_migration_remaining_bytes", "Bytes the running migration "
                  "still has to send, as far as it knows."),
    "expected": ("migbed_migration_expected_downtime_seconds", "Downtime the running "
                 "migration would have if it stopped now (QEMU's expected-downtime)."),
    "downtime_limit": ("migbed_migration_downtime_limit_seconds", "The qemu policy's "
                       "downtime limit in force for the running migration (it steps up with "
                       "--downtime-steps)."),
    "throughput": ("migbed_migration_throughput_bytes_per_second", "Throughput of the "
                   "running migration's last round on the link."),
    "limit": ("migbed_migration_link_limit_bytes_per_second", "Speed of the link the "
              "running migration uses (only when the link is limited)."),
    "throttle": ("migbed_migration_cpu_throttle_ratio", "Auto-converge's throttle of the "
                 "running migration's guest: the share of its vCPU's time taken (QEMU's "
                 "cpu-throttle-percentage / 100)."),
    "dirty_limit": ("migbed_migration_dirty_limit_throttle_time_per_round_seconds",
                    "Dirty-limit: the sleep the guest's vCPU takes each time its dirty ring "
                    "fills (QEMU's dirty-limit-throttle-time-per-round)."),
}


def _running(host: str, outgoing: list) -> Iterator[Metric]:
    """Per running migration (label `guest`), on its source: where it stands."""
    fams = {k: GaugeMetricFamily(name, doc, labels=["host", "guest"] + (
        ["phase"] if k == "phase" else [])) for k, (name, doc) in _RUNNING_GAUGES.items()}
    for out in outgoing:
        p, g = out.progress, out.guest
        fams["round"].add_metric([host, g], p.round)
        for phase in TIMED:
            fams["phase"].add_metric([host, g, phase.value], 1 if p.status == phase else 0)
        fams["dirty"].add_metric([host, g], p.dirty_pages)
        last = p.rounds[-1] if p.rounds else None
        fams["sent"].add_metric([host, g], last["pages_sent"] if last else 0)
        fams["dirtied"].add_metric([host, g], last["pages_dirtied"] if last else 0)
        fams["remaining"].add_metric([host, g], p.remaining_bytes)
        if p.expected_downtime_seconds is not None:
            fams["expected"].add_metric([host, g], p.expected_downtime_seconds)
        if p.downtime_limit_seconds is not None:
            fams["downtime_limit"].add_metric([host, g], p.downtime_limit_seconds)
        fams["throughput"].add_metric([host, g], p.throughput_bytes_per_second)
        if out.settings.link_bytes_per_second:
            fams["limit"].add_metric([host, g], out.settings.link_bytes_per_second)
        fams["throttle"].add_metric([host, g], p.cpu_throttle_percentage / 100)
        fams["dirty_limit"].add_metric([host, g], p.dirty_limit_throttle_time_per_round_us / 1e6)
    yield from fams.values()


def _traffic(m: ScrapedMetrics, outgoing: list, incoming: list) -> dict:
    """What ended migrations moved, plus what running ones have moved so far."""
    totals = {"sent_pages": m.sent_pages_total, "sent_bytes": m.sent_bytes_total,
              "dirtied": m.dirtied_pages_total, "rounds": m.rounds_total,
              "received_pages": m.received_pages_total,
              "received_bytes": m.received_bytes_total}
    for out in outgoing:
        p = out.progress
        rounds = list(p.rounds)
        totals["sent_pages"] += p.pages_sent_total
        totals["sent_bytes"] += p.bytes_sent_total
        totals["dirtied"] += dirtied(rounds)
        totals["rounds"] += len(rounds)
    for recv in incoming:
        totals["received_pages"] += recv.landing.pages_received
        totals["received_bytes"] += recv.bytes_received
    return totals


def _traffic_counters(host: str, totals: dict) -> Iterator[Metric]:
    yield host_metric("migbed_migration_rounds", "Pre-copy rounds (the final stop-and-copy one "
               "included) this host has finished as a source.", host, totals["rounds"],
               counter=True)
    yield host_metric("migbed_migration_sent_pages", "Guest pages this host has sent as a "
               "migration source.", host, totals["sent_pages"], counter=True)
    yield host_metric("migbed_migration_sent_bytes", "Bytes of migration streams this host has "
               "sent (pages and every other record).", host, totals["sent_bytes"],
               counter=True)
    yield host_metric("migbed_migration_dirtied_pages", "Pages the guests dirtied during rounds "
               "of migrations from this host (each round's log-dirty count).", host,
               totals["dirtied"], counter=True)
    yield host_metric("migbed_migration_received_pages", "Guest pages this host has received as a "
               "migration destination.", host, totals["received_pages"], counter=True)
    yield host_metric("migbed_migration_received_bytes", "Bytes of migration streams this host has "
               "received, counted as they arrive.", host, totals["received_bytes"],
               counter=True)


def host_metric(name: str, doc: str, host: str, value: float, counter: bool = False) -> Metric:
    """One gauge (or counter) family of one sample labelled with the host."""
    cls = CounterMetricFamily if counter else GaugeMetricFamily
    fam = cls(name, doc, labels=["host"])
    fam.add_metric([host], value)
    return fam


# -- what crossed the wire: pages by type, XBZRLE, multifd ---------------------------------------
WIRE_COUNTERS = {
    "normal_pages": ("migbed_migration_normal_pages", "Guest pages this host sent whole as a "
                     "migration source (QEMU's normal)."),
    "zero_pages": ("migbed_migration_zero_pages", "Zero pages this host sent as a source, a "
                   "pfn word each (QEMU's duplicate)."),
    "xbzrle_pages": ("migbed_migration_xbzrle_pages", "Pages XBZRLE found in its cache "
                     "(encoded, overflowed or unchanged), in ended migrations."),
    "xbzrle_bytes": ("migbed_migration_xbzrle_bytes", "Bytes of XBZRLE deltas (and of its "
                     "overflowed pages), in ended migrations."),
    "xbzrle_cache_miss": ("migbed_migration_xbzrle_cache_miss", "Pages XBZRLE did not find in "
                          "its cache, in ended migrations."),
    "xbzrle_overflow": ("migbed_migration_xbzrle_overflow", "Pages whose XBZRLE delta would "
                        "have been longer than the page, in ended migrations."),
    "multifd_raw_bytes": ("migbed_migration_multifd_compression_input_bytes", "Page bytes "
                          "multifd channels gave their compressor, in ended migrations."),
    "multifd_compressed_bytes": ("migbed_migration_multifd_compression_output_bytes",
                                 "What the compressor made of them."),
}


def wire_totals() -> dict:
    return {**dict.fromkeys(WIRE_COUNTERS, 0), "channel_bytes": {}}


def add_wire(totals: dict, result) -> None:
    """Fold an ended migration's pages by type, XBZRLE and multifd counts into `totals`."""
    totals["normal_pages"] += sum(r.normal_pages for r in result.rounds)
    totals["zero_pages"] += sum(r.zero_pages for r in result.rounds)
    x = result.wire.get("xbzrle")
    if x:
        for key in ("pages", "bytes", "cache_miss", "overflow"):
            totals[f"xbzrle_{key}"] += x[key]
    m = result.wire.get("multifd")
    if m:
        totals["multifd_raw_bytes"] += m["raw_bytes"]
        totals["multifd_compressed_bytes"] += m["compressed_bytes"]
        for i, n in enumerate(m["bytes_per_channel"]):
            totals["channel_bytes"][str(i)] = totals["channel_bytes"].get(str(i), 0) + n


def _wire_counters(host: str, totals: dict, outgoing: list) -> Iterator[Metric]:
    running = dict.fromkeys(("normal_pages", "zero_pages"), 0)
    for out in outgoing:                         # the finished rounds of running migrations
        for r in list(out.progress.rounds):
            for key in running:
                running[key] += int(r.get(key, 0))
    for key, (name, doc) in WIRE_COUNTERS.items():
        yield host_metric(name, doc, host, totals[key] + running.get(key, 0), counter=True)
    per = CounterMetricFamily("migbed_migration_multifd_sent_bytes", "Bytes each multifd "
                              "channel carried, in ended migrations from this host.",
                              labels=["host", "channel"])
    for channel, n in sorted(totals["channel_bytes"].items()):
        per.add_metric([host, channel], n)
    yield per
