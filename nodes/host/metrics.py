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
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from nodes.errors import ConfigError
from nodes.host.collectors import HostCollector, add_wire, dirtied, wire_totals
from nodes.host.hostview import HostView
from nodes.phase import TIMED, Phase

if TYPE_CHECKING:
    from nodes.migration.progress import Progress
    from nodes.migration.receive.receiver import Receiver
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

    def __init__(self, host: HostView):
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
        # What crossed the wire in ended migrations, by page type and encoding
        # (`nodes.host.collectors.WIRE_COUNTERS` names them).
        self.wire_totals: dict = wire_totals()
        self.outgoing: dict[str, _Outgoing] = {}
        self.incoming: dict[str, Receiver] = {}
        self._migration_histograms()
        self._measurement_gauges()
        self.registry.register(HostCollector(self))
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint: str | None = None

    def _migration_histograms(self) -> None:
        """Ended migrations' downtimes and times, and a program guest's brownout and
        blackout, by guest and policy."""
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
        self.app_brownout = Histogram(
            "migbed_migration_app_brownout_seconds",
            "A program guest's brownout through a migration, by the one definition "
            "(workloads.brownout: time in 10 ms bins below 90 % of its 2 s baseline, from the "
            "start until 5 s after the end), set by the control plane on the host the guest "
            "runs on after it (the report's application block).",
            HISTOGRAM_LABELS, buckets=TOTAL_TIME_BUCKETS_SECONDS, registry=self.registry)
        self.app_blackout = Histogram(
            "migbed_migration_app_blackout_seconds",
            "A program guest's blackout through a migration: its longest gap between two "
            "completed operations (the report's application block).",
            HISTOGRAM_LABELS, buckets=DOWNTIME_BUCKETS_SECONDS, registry=self.registry)

    def _measurement_gauges(self) -> None:
        """`migbed dirtyrate`'s last measurement of each guest here, beside its true rate."""
        self.dirty_rate = Gauge(
            "migbed_guest_dirty_rate_measured_pages_per_second",
            "The last dirty rate `migbed dirtyrate` measured of a guest on this host, by mode "
            "(QEMU's calc-dirty-rate: page-sampling, dirty-bitmap, dirty-ring), set when the "
            "measurement ends.", ("host", "guest", "mode"), registry=self.registry)
        self.dirty_rate_true = Gauge(
            "migbed_guest_dirty_rate_true_pages_per_second",
            "The guest's true rate over the same window, from its own counters: distinct "
            "pages written (for dirty-ring, page writes, which it counts). Beside the "
            "measured one, the bias of each mode.", ("host", "guest", "mode"),
            registry=self.registry)
        self.dirty_rate_window = Gauge(
            "migbed_guest_dirty_rate_window_seconds",
            "The window of that measurement (QEMU documents a longer window reporting a "
            "lower rate).", ("host", "guest", "mode"), registry=self.registry)

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
            self.dirtied_pages_total += max(dirtied(p.rounds),
                                            sum(r.pages_dirtied for r in result.rounds))
            self.rounds_total += max(len(p.rounds), len(result.rounds))
            add_wire(self.wire_totals, result)
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

    def application_felt(self, guest: str, policy: str, brownout_seconds: float | None,
                         blackout_seconds: float | None) -> None:
        """What a program guest's application felt through a migration that brought it
        here (or left it here), as the control plane computed it (`cluster.appfeel`)."""
        labels = self._labels(guest, policy)
        if brownout_seconds is not None:
            self.app_brownout.labels(**labels).observe(brownout_seconds)
        if blackout_seconds is not None:
            self.app_blackout.labels(**labels).observe(blackout_seconds)

    def dirty_rate_measured(self, guest: str, result: dict) -> None:
        """A dirty-rate measurement has ended (`nodes.host.dirtymeter`): its estimate, the
        guest's true rate beside it (when its counters give one) and its window."""
        labels = {"host": self.host.name, "guest": guest, "mode": result["mode"]}
        self.dirty_rate.labels(**labels).set(result["pages_per_second"])
        self.dirty_rate_window.labels(**labels).set(result["window_seconds"])
        true = result.get("true_writes_per_second" if result["mode"] == "dirty-ring"
                          else "true_pages_per_second")
        if true is not None:
            self.dirty_rate_true.labels(**labels).set(true)

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



