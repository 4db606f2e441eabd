"""Prometheus metrics of one host: its own registry, served on its own /metrics port.

Every host is its own exporter, as a node exporter is per machine. Live state (frames, guests,
modes, migration counters, the progress of running migrations) is read by a custom collector
at scrape time, from counters the host keeps anyway: a scrape never walks guest memory and
never takes a guest's lock. Only what must be remembered between scrapes is pushed, at the
moment it is known: the downtime and total-time histograms (on the source, when its sender
ends) and the guest-observed downtime (on the destination, when it measures it), plus the
pages and bytes of migrations that have ended.

Names follow Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` on counters,
labels `host` and, where they apply, `guest`, `profile`, `policy`, `status`, `mode`.
"""

import errno
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodes.errors import ConfigError
from nodes.phase import ENDED, TIMED, Phase
from nodes.xen.domain import DomainState
from nodes.xen.profiles import Mode

if TYPE_CHECKING:
    from nodes.host.service import HostService
    from nodes.migration.destination import Receiver
    from nodes.migration.progress import Progress
    from nodes.migration.results import SourceResult
    from nodes.migration.settings import MigrationSettings

# Resolve 1 ms to 10 s (a 1-2-5 series); total time goes on to a minute.
DOWNTIME_BUCKETS_SECONDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
                            1.0, 2.0, 5.0, 10.0)
TOTAL_TIME_BUCKETS_SECONDS = DOWNTIME_BUCKETS_SECONDS + (20.0, 30.0, 60.0)
HISTOGRAM_LABELS = ("host", "guest", "profile", "policy")
# The phases a source's time is timed in: the total time's, then verify and cleanup.
TIMED_PHASES = (*TIMED, Phase.VERIFY, Phase.CLEANUP)
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
# How often the server thread checks for shutdown; bounds how long `close()` takes.
SERVER_POLL_SECONDS = 0.05


class _Outgoing:
    """A running outgoing migration, as the metrics see it."""

    def __init__(self, guest: str, progress: "Progress", settings: "MigrationSettings"):
        self.guest = guest
        self.progress = progress
        self.settings = settings


class HostMetrics:
    """The metrics registry of one host, and its HTTP server once `serve` is called."""

    def __init__(self, host: "HostService"):
        self.host = host
        self.registry = CollectorRegistry(auto_describe=False)
        self.lock = threading.Lock()
        # Totals of migrations that have ended; running ones are added at scrape time.
        self.sent_pages_total = 0
        self.sent_bytes_total = 0
        self.dirtied_pages_total = 0
        self.rounds_total = 0
        self.received_pages_total = 0
        self.received_bytes_total = 0
        self.outgoing: dict[str, _Outgoing] = {}
        self.incoming: dict[str, Receiver] = {}
        self.downtime = Histogram(
            "migbed_migration_downtime_seconds",
            "Downtime of completed migrations, measured on the source host: from the pause "
            "on the source to the resume on the destination (the report's downtime_seconds).",
            HISTOGRAM_LABELS, buckets=DOWNTIME_BUCKETS_SECONDS, registry=self.registry)
        self.total_time = Histogram(
            "migbed_migration_total_time_seconds",
            "Total time of completed migrations, measured on the source host (the report's "
            "total_time_seconds).",
            HISTOGRAM_LABELS, buckets=TOTAL_TIME_BUCKETS_SECONDS, registry=self.registry)
        self.phase_time = Histogram(
            "migbed_migration_phase_duration_seconds",
            "Seconds each phase of completed migrations took, measured on the source host "
            "(the report's phase_seconds): setup, precopy, stop-and-copy and handover make "
            "up total_time_seconds; verify and cleanup come after.",
            (*HISTOGRAM_LABELS, "phase"), buckets=TOTAL_TIME_BUCKETS_SECONDS,
            registry=self.registry)
        self.guest_downtime = Histogram(
            "migbed_migration_guest_observed_downtime_seconds",
            "Downtime the guest itself saw across the hand-over, measured on the destination "
            "host: from its last progress on the source to its first here. The report's "
            "guest_observed_downtime_seconds is the larger of this and the longest stall on "
            "the source before the pause.",
            HISTOGRAM_LABELS, buckets=DOWNTIME_BUCKETS_SECONDS, registry=self.registry)
        self.registry.register(HostCollector(self))
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint: str | None = None

    # -- events, from the host ---------------------------------------------------------------
    def _labels(self, guest: str, policy: str) -> dict[str, str]:
        return {"host": self.host.name, "guest": guest,
                "profile": self.host.hv.profile.name, "policy": policy}

    def outgoing_started(self, migration_id: str, guest: str, progress: "Progress",
                         settings: "MigrationSettings") -> None:
        labels = self._labels(guest, settings.policy)
        # Create the series at zero now, so Prometheus sees them before the first
        # observation and rate()/increase() count it.
        self.downtime.labels(**labels)
        self.total_time.labels(**labels)
        for phase in TIMED_PHASES:
            self.phase_time.labels(**labels, phase=phase.value)
        with self.lock:
            self.outgoing[migration_id] = _Outgoing(guest, progress, settings)

    def outgoing_finished(self, migration_id: str, result: "SourceResult") -> None:
        """The source's sender has ended: fold its traffic into the totals, observe times."""
        with self.lock:
            out = self.outgoing.pop(migration_id, None)
            if out is None:
                return
            p = out.progress
            # The progress counts pages of a round cut short; the result counts the records
            # sent after the last page: take the larger of each, as the wire carried them.
            self.sent_pages_total += max(p.pages_sent_total, result.pages_sent_total)
            self.sent_bytes_total += max(p.bytes_sent_total, result.bytes_sent_total)
            self.dirtied_pages_total += max(_dirtied(p.rounds),
                                            sum(r.pages_dirtied for r in result.rounds))
            self.rounds_total += max(len(p.rounds), len(result.rounds))
        if result.completed and result.pause_wall and result.resume_wall:
            labels = self._labels(out.guest, out.settings.policy)
            self.downtime.labels(**labels).observe(result.resume_wall - result.pause_wall)
            self.total_time.labels(**labels).observe(result.total_time_seconds)
            for key, seconds in result.phase_seconds.items():
                self.phase_time.labels(**labels, phase=Phase.parse(key).value).observe(seconds)

    def incoming_started(self, migration_id: str, receiver: "Receiver") -> None:
        self.guest_downtime.labels(**self._labels(receiver.name, receiver.settings.policy))
        with self.lock:
            self.incoming[migration_id] = receiver

    def incoming_finished(self, migration_id: str,
                          guest_observed_downtime_seconds: float | None) -> None:
        """The destination has reported (or abandoned) an incoming migration."""
        with self.lock:
            recv = self.incoming.pop(migration_id, None)
            if recv is None:
                return
            self.received_pages_total += recv.landing.pages_received
            self.received_bytes_total += recv.bytes_received
        if guest_observed_downtime_seconds is not None:
            self.guest_downtime.labels(**self._labels(recv.name, recv.settings.policy)).observe(
                guest_observed_downtime_seconds)

    # -- exposition -----------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition, as a scrape gets it (for tests and one-off looks)."""
        return generate_latest(self.registry)

    def serve(self, address: str = "127.0.0.1", port: int = 0,
              advertised_address: str | None = None) -> str:
        """Serve /metrics on `address:port` (0: a free port); returns "address:port".

        A wildcard bind is advertised as `advertised_address` (the host's reachable address).
        """
        if self._server is not None:
            raise ConfigError(f"metrics of {self.host.name} are already served at "
                              f"{self.endpoint}")
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port must be 0..65535, got {port}")
        try:
            server = make_server(address, port, make_wsgi_app(self.registry),
                                 ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"metrics port {port} on {address} is in use; pick another "
                                  "or 0 for a free one") from None
            raise ConfigError(f"cannot serve metrics of {self.host.name} on {address}:{port}: "
                              f"{exc.strerror or exc}") from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": SERVER_POLL_SECONDS},
                                        name=f"metrics-{self.host.name}", daemon=True)
        self._thread.start()
        shown = address
        if address in WILDCARD_ADDRESSES:
            shown = advertised_address or "127.0.0.1"
        self.endpoint = f"{shown}:{server.server_port}"
        return self.endpoint

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self.endpoint = None


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for every scrape."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def _dirtied(rounds: list) -> int:
    return sum(int(r.get("pages_dirtied", 0)) for r in rounds)


class HostCollector:
    """Reads a host's live state at scrape time (a prometheus_client custom collector)."""

    def __init__(self, metrics: HostMetrics):
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
        yield from self._migrations(host, m)

    # -- the host -------------------------------------------------------------------------
    @staticmethod
    def _host(host: str, hv) -> Iterator[Metric]:
        info = GaugeMetricFamily("migbed_host_info", "The host's architecture profile (always 1).",
                                 labels=["host", "profile", "arch"])
        info.add_metric([host, hv.profile.name, hv.profile.arch], 1)
        yield info
        yield _one("migbed_host_memory_bytes", "Machine memory of the host.", host,
                   hv.memory.total_bytes)
        yield _one("migbed_host_page_size_bytes", "Page (and frame) size of the host.",
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
    def _guests(host: str, h: "HostService") -> Iterator[Metric]:
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
        guests = GaugeMetricFamily("migbed_host_guests", "Guests on the host by memory mode "
                                   "(arriving guests included, dom0 not).",
                                   labels=["host", "mode"])
        for mode_name, n in by_mode.items():
            guests.add_metric([host, mode_name], n)
        yield guests
        yield from (info, mode, state, memory, migrating, dirty, writes)

    # -- migrations ---------------------------------------------------------------------------
    @staticmethod
    def _migrations(host: str, m: HostMetrics) -> Iterator[Metric]:
        counts = dict(m.host.migration_counts)
        yield _one("migbed_migrations_started", "Migrations this host started as the source.",
                   host, counts.get("started", 0), counter=True)
        ended = CounterMetricFamily("migbed_migrations_finished", "Migrations this host ran as "
                                    "the source, by how they ended.", labels=["host", "status"])
        for status in ENDED:
            ended.add_metric([host, status], counts.get(status, 0))
        yield ended

        gauges = {
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
            "throughput": ("migbed_migration_throughput_bytes_per_second", "Throughput of the "
                           "running migration's last round on the link."),
            "limit": ("migbed_migration_link_limit_bytes_per_second", "Speed of the link the "
                      "running migration uses (only when the link is limited)."),
        }
        fams = {k: GaugeMetricFamily(name, doc, labels=["host", "guest"] + (
            ["phase"] if k == "phase" else [])) for k, (name, doc) in gauges.items()}
        with m.lock:
            totals = {"sent_pages": m.sent_pages_total, "sent_bytes": m.sent_bytes_total,
                      "dirtied": m.dirtied_pages_total, "rounds": m.rounds_total,
                      "received_pages": m.received_pages_total,
                      "received_bytes": m.received_bytes_total}
            outgoing = list(m.outgoing.values())
            incoming = list(m.incoming.values())
            for out in outgoing:
                p = out.progress
                rounds = list(p.rounds)
                totals["sent_pages"] += p.pages_sent_total
                totals["sent_bytes"] += p.bytes_sent_total
                totals["dirtied"] += _dirtied(rounds)
                totals["rounds"] += len(rounds)
            for recv in incoming:
                totals["received_pages"] += recv.landing.pages_received
                totals["received_bytes"] += recv.bytes_received
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
            fams["throughput"].add_metric([host, g], p.throughput_bytes_per_second)
            if out.settings.link_bytes_per_second:
                fams["limit"].add_metric([host, g], out.settings.link_bytes_per_second)
        progress = GaugeMetricFamily("migbed_migrations_in_progress", "Migrations running on "
                                     "this host, as source (outgoing) or destination "
                                     "(incoming).", labels=["host", "direction"])
        progress.add_metric([host, "outgoing"], len(outgoing))
        progress.add_metric([host, "incoming"], sum(1 for r in incoming if not r.done.is_set()))
        yield progress
        yield from fams.values()
        yield _one("migbed_migration_rounds", "Pre-copy rounds (the final stop-and-copy one "
                   "included) this host has finished as a source.", host, totals["rounds"],
                   counter=True)
        yield _one("migbed_migration_sent_pages", "Guest pages this host has sent as a "
                   "migration source.", host, totals["sent_pages"], counter=True)
        yield _one("migbed_migration_sent_bytes", "Bytes of migration streams this host has "
                   "sent (pages and every other record).", host, totals["sent_bytes"],
                   counter=True)
        yield _one("migbed_migration_dirtied_pages", "Pages the guests dirtied during rounds "
                   "of migrations from this host (each round's log-dirty count).", host,
                   totals["dirtied"], counter=True)
        yield _one("migbed_migration_received_pages", "Guest pages this host has received as a "
                   "migration destination.", host, totals["received_pages"], counter=True)
        yield _one("migbed_migration_received_bytes", "Bytes of migration streams this host has "
                   "received, counted as they arrive.", host,
                   totals["received_bytes"], counter=True)


def _one(name: str, doc: str, host: str, value: float, counter: bool = False) -> Metric:
    cls = CounterMetricFamily if counter else GaugeMetricFamily
    fam = cls(name, doc, labels=["host"])
    fam.add_metric([host], value)
    return fam
