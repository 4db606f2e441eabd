"""Counting faults per host, for its /metrics: faults injected here, and migrations whose
connection was lost (the peer host or the link went away without an ABORT)."""

import threading
from collections import Counter
from collections.abc import Iterator

from nodes.faults.spec import FaultSpec


class FaultStats:
    """Per host: faults injected here, and migrations whose connection was lost under them
    (the peer host or the link went away without an ABORT)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.injected: Counter = Counter()         # (kind, stage) -> count
        self.connection_lost: Counter = Counter()  # role ("source", "destination") -> count

    def count_injected(self, fault: FaultSpec) -> None:
        with self.lock:
            self.injected[(fault.kind, fault.stage)] += 1

    def count_connection_lost(self, role: str) -> None:
        with self.lock:
            self.connection_lost[role] += 1


class FaultCollector:
    """A prometheus_client custom collector for one host's `FaultStats`."""

    def __init__(self, host: str, stats: FaultStats):
        self.host = host
        self.stats = stats

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        from prometheus_client.metrics_core import CounterMetricFamily
        injected = CounterMetricFamily(
            "migbed_faults_injected", "Faults injected on this host, by kind and stage.",
            labels=["host", "kind", "stage"])
        lost = CounterMetricFamily(
            "migbed_migration_connection_lost", "Migrations whose peer host or link vanished "
            "without an ABORT, as this host saw it, by this host's role.",
            labels=["host", "role"])
        with self.stats.lock:
            for (kind, stage), n in sorted(self.stats.injected.items()):
                injected.add_metric([self.host, kind, stage], n)
            for role in ("source", "destination"):
                lost.add_metric([self.host, role], self.stats.connection_lost[role])
        yield injected
        yield lost
