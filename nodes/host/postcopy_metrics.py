"""A host's post-copy metrics: a prometheus_client custom collector over the post-copy state
of its running migrations (read at scrape time, as `nodes.host.collectors` reads the rest),
plus the totals of those that have ended (`PostcopyTotals`, folded in as each ends).

As a source: switches, page requests received (QEMU's postcopy-requests), pages sent on
request and by the push, bytes by stage (precopy, downtime, postcopy), and whether a running
migration is paused. As a destination: pages still missing, the vCPU time blocked on faults,
the faults, and the request-to-landed latency of requested pages (a histogram in QEMU 10.1's
log2 buckets from 1 us, labelled `fault_path`: "emulated" for a thread vCPU's `PageFaults`,
"uffd" for a process guest's real faults, its `nodes.host.faultreader.FaultReader`; the
"uffd" series appears once such a guest has faulted here); and with post-copy preempt, the
same latency by the channel each requested page landed from (`main`, `preempt`), and the
bytes each channel carried after the switch.
"""

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from nodes.host.collectors import host_metric
from nodes.migration.postcopy.pagefault import LATENCY_BUCKETS, latency_bounds
from nodes.migration.postcopy.preempt import CHANNELS
from nodes.phase import Outcome

if TYPE_CHECKING:
    from nodes.migration.receive.receiver import Receiver
    from nodes.migration.results import SourceResult
    from nodes.migration.send.sender import Sender

STAGES = ("precopy", "downtime", "postcopy")
EMULATED = "emulated"           # the fault path every host has (its series always exported)


def no_latency() -> np.ndarray:
    return np.zeros(LATENCY_BUCKETS + 1, dtype=np.int64)


class PostcopyTotals:
    """What the ended migrations of a host add to its post-copy counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.switches = 0
        self.requests = 0
        self.sent = {"requested": 0, "pushed": 0}
        self.stage_bytes = dict.fromkeys(STAGES, 0)
        self.blocked_seconds = 0.0
        self.faults = 0
        self.latency_counts = {EMULATED: no_latency()}    # fault path -> bucket counts
        self.latency_sum = {EMULATED: 0.0}
        self.channel_bytes = dict.fromkeys(CHANNELS, 0)   # post-copy bytes by channel
        self.channel_counts = {ch: no_latency() for ch in CHANNELS}
        self.channel_sum = dict.fromkeys(CHANNELS, 0.0)

    def source_ended(self, result: "SourceResult") -> None:
        with self.lock:
            for stage in STAGES:
                self.stage_bytes[stage] += getattr(result, f"{stage}_bytes")
            if not result.switched:
                return
            self.switches += 1
            self.requests += result.postcopy_requests
            block = result.postcopy or {}
            self.sent["requested"] += block.get("pages_requested", 0)
            self.sent["pushed"] += block.get("pages_pushed", 0)
            for ch, n in (block.get("channel_bytes") or {}).items():
                self.channel_bytes[ch] = self.channel_bytes.get(ch, 0) + n

    def destination_ended(self, recv: "Receiver") -> None:
        pc = recv.postcopy
        if pc is None:
            return
        with self.lock:
            self.blocked_seconds += pc.faults.blocked_seconds
            self.faults += pc.faults.faults
            add_latency(self.latency_counts, self.latency_sum, pc.faults)
            add_channels(self.channel_counts, self.channel_sum, pc)


def add_latency(counts: dict[str, np.ndarray], sums: dict[str, float], faults) -> None:
    """Fold one fault handler's latency into the per-path totals (its `fault_path`)."""
    path = faults.fault_path
    counts[path] = counts.get(path, no_latency()) + faults.latency.counts
    sums[path] = sums.get(path, 0.0) + faults.latency.sum_seconds


def add_channels(counts: dict[str, np.ndarray], sums: dict[str, float], pc) -> None:
    """Fold a post-copy destination's latency by channel into the totals."""
    for ch, lat in pc.by_channel.items():
        counts[ch] = counts.get(ch, no_latency()) + lat.counts
        sums[ch] = sums.get(ch, 0.0) + lat.sum_seconds


def histogram(name: str, doc: str, host: str, label: str, counts: dict[str, np.ndarray],
              sums: dict[str, float]) -> HistogramMetricFamily:
    """A latency histogram in the log2 buckets, one series per value of `label`."""
    fam = HistogramMetricFamily(name, doc, labels=["host", label])
    for key, key_counts in sorted(counts.items()):
        cumulative = np.cumsum(key_counts)
        buckets = [("+Inf" if b == float("inf") else repr(b), float(c))
                   for b, c in zip(latency_bounds(), cumulative, strict=True)]
        fam.add_metric([host, key], buckets, sum_value=sums[key])
    return fam


class PostcopyCollector:
    """Reads the host's post-copy state at scrape time (see the module docstring)."""

    def __init__(self, host: str, senders: "dict[str, Sender]",
                 incoming: "dict[str, Receiver]", totals: PostcopyTotals):
        """`senders` and `incoming`: the host's own (migration id -> its sender, its
        receiver), read at each scrape."""
        self.name = host
        self.senders = senders
        self.incoming = incoming
        self.totals = totals

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        t, name = self.totals, self.name
        senders = list(self.senders.values())
        receivers = [r for r in list(self.incoming.values()) if r.postcopy is not None]
        with t.lock:
            switches, requests = t.switches, t.requests
            sent, stage_bytes = dict(t.sent), dict(t.stage_bytes)
            blocked, faults = t.blocked_seconds, t.faults
            counts = {k: v.copy() for k, v in t.latency_counts.items()}
            latency_sum = dict(t.latency_sum)
        paused = 0
        for sender in senders:
            pc = sender.switch.postcopy
            if pc is None:
                continue
            paused += sender.session.progress.status == Outcome.PAUSED
            if pc.switched:
                switches += 1
                requests += pc.requests
                sent["requested"] += pc.pages_requested
                sent["pushed"] += pc.pages_pushed
        fam = GaugeMetricFamily(
            "migbed_migration_postcopy_paused", "Migrations from this host paused on a broken "
            "link after their post-copy switch (postcopy-paused).", labels=["host"])
        fam.add_metric([name], paused)
        yield fam
        yield host_metric("migbed_migration_postcopy_switches", "Migrations from this host that "
                          "switched to post-copy.", name, switches, counter=True)
        yield host_metric("migbed_migration_postcopy_requests", "Page requests this host received "
                          "as a post-copy source (QEMU's postcopy-requests: each page one).",
                          name, requests, counter=True)
        pages = CounterMetricFamily(
            "migbed_migration_postcopy_sent_pages", "Pages this host sent after post-copy "
            "switches, because they were requested or by the background push.",
            labels=["host", "reason"])
        for reason, n in sent.items():
            pages.add_metric([name, reason], n)
        yield pages
        stages = CounterMetricFamily(
            "migbed_migration_stage_sent_bytes", "Bytes of ended migrations from this host, "
            "by when they were sent: while the guest ran here (precopy), while it was paused "
            "(downtime), after a post-copy switch (postcopy), as QEMU's precopy-bytes, "
            "downtime-bytes and postcopy-bytes.", labels=["host", "stage"])
        for stage, n in stage_bytes.items():
            stages.add_metric([name, stage], n)
        yield stages
        yield from self._destination(name, receivers, blocked, faults, counts, latency_sum)
        yield from self._channels(name, receivers)

    def _channels(self, name: str, receivers: list) -> Iterator[Metric]:
        """Post-copy preempt's split: the bytes of ended migrations by channel (source), the
        fault latency by the channel each page landed from (destination, running ones too)."""
        t = self.totals
        with t.lock:
            sent = dict(t.channel_bytes)
            counts = {k: v.copy() for k, v in t.channel_counts.items()}
            sums = dict(t.channel_sum)
        for recv in receivers:
            add_channels(counts, sums, recv.postcopy)
        fam = CounterMetricFamily(
            "migbed_migration_postcopy_channel_sent_bytes", "Bytes of ended migrations from "
            "this host sent after their post-copy switch, by channel: the data channel (main, "
            "the push), post-copy preempt's own (preempt, requested pages) or a process guest's "
            "native fault channel (native).",
            labels=["host", "channel"])
        for ch, n in sent.items():
            fam.add_metric([name, ch], n)
        yield fam
        yield histogram(
            "migbed_migration_postcopy_channel_fault_latency_seconds", "Request-to-landed "
            "time of each page a post-copy guest here asked for, by the channel it landed "
            "from: main (behind the push), preempt (its own connection) or native (a process "
            "guest's native fault channel, counted when its post-copy ends).", name, "channel",
            counts, sums)

    @staticmethod
    def _destination(name: str, receivers: list, blocked: float, faults: int,
                     counts: dict[str, np.ndarray],
                     latency_sum: dict[str, float]) -> Iterator[Metric]:
        missing = GaugeMetricFamily(
            "migbed_migration_postcopy_missing_pages", "Pages a guest running here in "
            "post-copy still lacks.", labels=["host", "guest"])
        for recv in receivers:
            pc = recv.postcopy
            missing.add_metric([name, recv.name], 0 if pc.done else recv.landing.missing_pages)
            blocked += pc.faults.blocked_seconds
            faults += pc.faults.faults
            add_latency(counts, latency_sum, pc.faults)
        yield missing
        yield host_metric("migbed_migration_postcopy_blocktime_seconds", "Time the vCPUs of guests "
                          "arriving here by post-copy waited for missing pages (QEMU's "
                          "postcopy-blocktime).", name, blocked, counter=True)
        yield host_metric("migbed_migration_postcopy_faults", "Times a vCPU of a guest arriving "
                          "here by post-copy blocked on missing pages.", name, faults, counter=True)
        yield histogram(
            "migbed_migration_postcopy_fault_latency_seconds", "Request-to-landed time of each "
            "page a post-copy guest here asked for (QEMU 10.1's postcopy-latency), in log2 "
            "buckets from 1 us, by fault path: the Xen model's (emulated) or a process "
            "guest's userfaultfd (uffd).", name, "fault_path", counts, latency_sum)
