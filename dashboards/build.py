"""Build migbed's Grafana dashboard as code, with Grafana's own typed builders.

Run `python dashboards/build.py` after changing a panel: it rewrites `migbed.json` (the
dashboard, Grafana schema 41, Prometheus datasource and hosts and guests as variables) and
`prometheus.yml` (the scrape config of the compose file) beside this script. A test checks
that both files are what this script makes, loads the dashboard back through the SDK's model,
and evaluates every panel's query against a real Prometheus scraping a real cluster.

Panels query the raw metrics (nothing depends on the recording rules, so the dashboard works
on any Prometheus that scrapes migbed); `$__rate_interval` and `$__range` are Grafana's.
"""

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    TimePicker,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
DASHBOARD_FILE = HERE / "migbed.json"
COMPOSE_PROMETHEUS_FILE = HERE / "prometheus.yml"
UID = "migbed-overview"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label selectors with the dashboard's variables.
H = 'host=~"$host"'
HG = 'host=~"$host", guest=~"$guest"'


class Panels:
    """Hands out panel ids in order, so the JSON is stable from one build to the next."""

    def __init__(self) -> None:
        self.next_id = 1

    def take(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> Row:
        return Row(title).id(self.take())

    def _common(self, panel, title: str, description: str, width: int, height: int):
        return (panel.id(self.take()).title(title).description(description).datasource(PROMETHEUS)
                .span(width).height(height))


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
          fmt: PromQueryFormat | None = None) -> Dataquery:
    q = Dataquery().expr(expr).ref_id(ref).datasource(PROMETHEUS)
    if legend:
        q = q.legend_format(legend)
    q = q.instant() if instant else q.range()
    if fmt is not None:
        q = q.format(fmt)
    return q


def with_queries(panel, queries: list[Dataquery]):
    for q in queries:
        panel = panel.with_target(q)
    return panel


def legend_bottom() -> VizLegendOptions:
    return (VizLegendOptions().display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM).show_legend(True))


def build_dashboard() -> Dashboard:
    p = Panels()

    def ts(title, description, unit, queries, width=12, height=8, stacked=False, bars=False):
        panel = p._common(timeseries.Panel(), title, description, width, height).unit(unit)
        panel = panel.legend(legend_bottom())
        if stacked:
            panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(30)
        if bars:
            panel = panel.draw_style(GraphDrawStyle.BARS).fill_opacity(60)
        return with_queries(panel, queries)

    def single(title, description, expr, unit="short", width=4):
        panel = (p._common(stat.Panel(), title, description, width, 4).unit(unit)
                 .reduce_options(ReduceDataOptions().calcs(["lastNotNull"])))
        return panel.with_target(query(expr, instant=True))

    def distribution(title, description, metric):
        panel = (p._common(bargauge.Panel(), title, description, 12, 8).unit("short")
                 .display_mode(BarGaugeDisplayMode.GRADIENT)
                 .orientation(VizOrientation.VERTICAL)
                 .reduce_options(ReduceDataOptions().calcs(["lastNotNull"])))
        return panel.with_target(query(
            f"sum by (le) (increase({metric}_bucket{{{HG}}}[$__range]))", "{{le}}",
            instant=True, fmt=PromQueryFormat.HEATMAP))

    def quantiles(title, description, metric):
        qs = [query(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{HG}}}[5m])))",
                    f"p{round(q * 100)}", ref) for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))]
        return ts(title, description, "s", qs)

    mode_code = (f'max by (guest) (migbed_guest_mode{{{HG}, mode="p2m"}}) + '
                 f'2 * max by (guest) (migbed_guest_mode{{{HG}, mode="vp"}})')
    modes = ValueMap({"0": ValueMappingResult(text="p==m", color="purple", index=0),
                      "1": ValueMappingResult(text="p2m", color="green", index=1),
                      "2": ValueMappingResult(text="vp (shadow)", color="orange", index=2)})

    d = (
        Dashboard("migbed: hosts, guests and live migrations")
        .uid(UID)
        .description("Emulated Xen-style hosts and pre-copy live migration, from the "
                     "Prometheus metrics every migbed host serves. Built by "
                     "dashboards/build.py.")
        .tags(["migbed", "live-migration"])
        .refresh("5s")
        .time("now-15m", "now")
        .timepicker(TimePicker().refresh_intervals(["1s", "5s", "10s", "30s", "1m", "5m"]))
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("host").label("Host").datasource(PROMETHEUS)
            .query("label_values(migbed_host_info, host)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.NATURAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all")))
        .with_variable(
            QueryVariable("guest").label("Guest").datasource(PROMETHEUS)
            .query(f"label_values(migbed_guest_info{{{H}}}, guest)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.NATURAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all")))

        # -- the cluster -----------------------------------------------------------------
        .with_row(p.row("Cluster"))
        .with_panel(single("Hosts", "Hosts whose /metrics Prometheus scrapes.",
                           f"count(migbed_host_info{{{H}}})"))
        .with_panel(single("Hosts not answering", "Listed targets whose last scrape failed.",
                           f"sum(1 - up{{{H}}})"))
        .with_panel(single("Guests", "Guests on the hosts (arriving ones included).",
                           f"sum(migbed_host_guests{{{H}}})"))
        .with_panel(single("Migrations running", "Outgoing migrations in progress.",
                           f'sum(migbed_migrations_in_progress{{{H}, direction="outgoing"}})'))
        .with_panel(single("Migrations completed", "Since the hosts started.",
                           f'sum(migbed_migrations_finished_total{{{H}, status="completed"}})'))
        .with_panel(single("Migrations failed or cancelled", "Since the hosts started.",
                           f'sum(migbed_migrations_finished_total{{{H}, status!="completed"}})'))
        .with_panel(ts(
            "Host memory by frame state", "Machine frames free, used (dom0 and guests) and "
            "reserved by the hypervisor, in bytes.", "bytes",
            [query(f"sum by (host, state) (migbed_host_frames{{{H}}} * on (host) group_left () "
                   f"migbed_host_page_size_bytes{{{H}}})", "{{host}} {{state}}")],
            stacked=True))
        .with_panel(ts(
            "Guests by memory mode", "P==M, P2M and VP (shadow) guests; a migrating guest "
            "is VP on both ends.", "short",
            [query(f"sum by (mode) (migbed_host_guests{{{H}}})", "{{mode}}")], stacked=True))
        .with_panel(with_queries(
            p._common(table.Panel(), "Guest list", "Every guest, its host and memory now.", 24, 6)
            .unit("bytes"),
            [query(f"migbed_guest_memory_bytes{{{HG}}}", instant=True,
                   fmt=PromQueryFormat.TABLE)]))

        # -- migrations -------------------------------------------------------------------
        .with_row(p.row("Migrations"))
        .with_panel(ts(
            "Migrations per minute", "Migrations that ended in the last minute, by how they "
            "ended.", "short",
            [query(f"sum by (status) (increase(migbed_migrations_finished_total{{{H}}}[1m]))",
                   "{{status}}")]))
        .with_panel(ts(
            "Round of each running migration", "0 is the first full copy; the last round is "
            "the stop-and-copy.", "short",
            [query(f"max by (guest) (migbed_migration_round{{{HG}}})", "{{guest}}")]))
        .with_panel(ts(
            "Pages sent vs dirtied per round", "The last finished round of each running "
            "migration: a migration converges while it sends more than the guest dirties.",
            "short",
            [query(f"max by (guest) (migbed_migration_last_round_pages_sent{{{HG}}})",
                   "{{guest}} sent", "A"),
             query(f"max by (guest) (migbed_migration_last_round_pages_dirtied{{{HG}}})",
                   "{{guest}} dirtied", "B")], bars=True))
        .with_panel(ts(
            "Link throughput against its limit", "Bytes on the wire per second, each running "
            "migration's last-round throughput, and the link's speed.", "Bps",
            [query(f"sum by (host) (rate(migbed_migration_sent_bytes_total{{{H}}}"
                   "[$__rate_interval]))", "{{host}} on the wire", "A"),
             query(f"max by (guest) (migbed_migration_throughput_bytes_per_second{{{HG}}})",
                   "{{guest}} last round", "B"),
             query(f"max by (guest) (migbed_migration_link_limit_bytes_per_second{{{HG}}})",
                   "{{guest}} link limit", "C")]))
        .with_panel(ts(
            "Expected downtime of running migrations", "What the downtime would be if the "
            "migration stopped now: bytes still to send over the measured throughput "
            "(QEMU's expected-downtime).", "s",
            [query(f"max by (guest) (migbed_migration_expected_downtime_seconds{{{HG}}})",
                   "{{guest}}")]))
        .with_panel(ts(
            "Dirty pages in the last round", "Pages the guest dirtied during the last round, "
            "which the next round must send.", "short",
            [query(f"max by (guest) (migbed_migration_dirty_pages{{{HG}}})", "{{guest}}")]))
        .with_panel(distribution(
            "Downtime distribution", "Completed migrations over the time range, by downtime "
            "bucket (pause on the source to resume on the destination).",
            "migbed_migration_downtime_seconds"))
        .with_panel(distribution(
            "Total time distribution", "Completed migrations over the time range, by total "
            "time bucket.", "migbed_migration_total_time_seconds"))
        .with_panel(ts(
            "Where the time goes (5m)", "Mean seconds per phase of the migrations completed "
            "in the last five minutes: setup, precopy, stop_and_copy and handover make up "
            "the total time; verify and cleanup are the source's work after it.", "s",
            [query("sum by (phase) (rate(migbed_migration_phase_duration_seconds_sum"
                   f"{{{HG}}}[5m])) / sum by (phase) (rate("
                   f"migbed_migration_phase_duration_seconds_count{{{HG}}}[5m]))",
                   "{{phase}}")], bars=True))
        .with_panel(quantiles(
            "Downtime quantiles (5m)", "Quantiles of the downtime of migrations completed in "
            "the last five minutes.", "migbed_migration_downtime_seconds"))
        .with_panel(quantiles(
            "Guest-observed downtime quantiles (5m)", "The stall the guests themselves saw "
            "across the hand-over, measured on the destination.",
            "migbed_migration_guest_observed_downtime_seconds"))
        .with_panel(with_queries(
            p._common(bargauge.Panel(), "Failures", "Migrations that failed or were "
                      "cancelled over the time range, by source host.", 12, 8).unit("short")
            .display_mode(BarGaugeDisplayMode.BASIC)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"])),
            [query(f'sum by (host, status) (increase(migbed_migrations_finished_total{{{H}, '
                   'status!="completed"}[$__range]))', "{{host}} {{status}}", instant=True)]))
        .with_panel(ts(
            "Pages sent and received per host", "Guest pages per second leaving sources "
            "and arriving at destinations.", "short",
            [query(f"sum by (host) (rate(migbed_migration_sent_pages_total{{{H}}}"
                   "[$__rate_interval]))", "{{host}} sent", "A"),
             query(f"sum by (host) (rate(migbed_migration_received_pages_total{{{H}}}"
                   "[$__rate_interval]))", "{{host}} received", "B")]))

        # -- guests -----------------------------------------------------------------------
        .with_row(p.row("Guests"))
        .with_panel(ts(
            "Dirty rate", "Page writes per second of each guest's vCPU (its dirty rate), "
            "wherever it runs.", "short",
            [query(f"sum by (guest) (rate(migbed_guest_page_writes_total{{{HG}}}"
                   "[$__rate_interval]))", "{{guest}}")]))
        .with_panel(with_queries(
            p._common(statetimeline.Panel(), "Memory mode over time", "P2M guests switch to "
                      "VP (shadow) with log-dirty while they migrate, and back after.", 12, 8)
            .mappings([modes]).show_value("auto"),
            [query(mode_code, "{{guest}}")]))
        .with_panel(ts(
            "Log-dirty pages", "Pages marked in each migrating guest's log-dirty bitmap "
            "since the last CLEAN.", "short",
            [query(f"max by (guest) (migbed_guest_dirty_pages{{{HG}}})", "{{guest}}")]))
        .with_panel(ts(
            "Migration progress: bytes still to send", "Each running migration's remaining "
            "bytes: they fall each round while the migration converges.", "bytes",
            [query(f"max by (guest) (migbed_migration_remaining_bytes{{{HG}}})",
                   "{{guest}}")]))

        # -- post-copy --------------------------------------------------------------------
        .with_row(p.row("Post-copy"))
        .with_panel(single("Post-copy switches", "Migrations that switched to post-copy, "
                           "since the hosts started.",
                           f"sum(migbed_migration_postcopy_switches_total{{{H}}})"))
        .with_panel(single("Migrations paused in post-copy", "Running migrations paused on "
                           "a broken link after their switch (postcopy-paused): `migbed "
                           "migrate-recover` resumes them.",
                           f"sum(migbed_migration_postcopy_paused{{{H}}})"))
        .with_panel(ts(
            "Pages still missing on the destination", "Pages each guest running in post-copy "
            "still lacks: the push and its requests bring them, the last one ends the "
            "migration.", "short",
            [query(f"max by (guest) (migbed_migration_postcopy_missing_pages{{{HG}}})",
                   "{{guest}}")]))
        .with_panel(ts(
            "Page requests and pushed pages", "Pages per second a post-copy source received "
            "requests for (QEMU's postcopy-requests), and sent on request and by the "
            "background push.", "short",
            [query(f"sum by (host) (rate(migbed_migration_postcopy_requests_total{{{H}}}"
                   "[$__rate_interval]))", "{{host}} requests", "A"),
             query(f"sum by (host, reason) (rate(migbed_migration_postcopy_sent_pages_total"
                   f"{{{H}}}[$__rate_interval]))", "{{host}} {{reason}}", "B")]))
        .with_panel(ts(
            "vCPU time blocked on faults", "Share of the time the vCPUs of guests arriving "
            "by post-copy waited for missing pages (QEMU's postcopy-blocktime per second).",
            "percentunit",
            [query(f"sum by (host) (rate(migbed_migration_postcopy_blocktime_seconds_total"
                   f"{{{H}}}[$__rate_interval]))", "{{host}}")]))
        .with_panel(ts(
            "Fault latency quantiles (5m)", "Request to landed of the pages post-copy guests "
            "asked for in the last five minutes (QEMU 10.1's postcopy-latency).", "s",
            [query(f"histogram_quantile({q}, sum by (le) (rate("
                   f"migbed_migration_postcopy_fault_latency_seconds_bucket{{{H}}}[5m])))",
                   f"p{round(q * 100)}", ref)
             for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))]))
        .with_panel(ts(
            "Bytes by stage (5m)", "Bytes of the migrations that ended in the last five "
            "minutes, by when they went: the guest running on its source, paused, or on its "
            "destination after a post-copy switch.", "bytes",
            [query(f"sum by (stage) (increase(migbed_migration_stage_sent_bytes_total{{{H}}}"
                   "[5m]))", "{{stage}}")], stacked=True))
    )
    return d


def dashboard_json() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build_dashboard().build()) + "\n"


def compose_prometheus_yml() -> str:
    """The scrape config of compose.yml's Prometheus: the paths inside its container."""
    sys.path.insert(0, str(HERE.parent))
    from cluster.prometheus import render_config
    return render_config("/etc/prometheus/sd/targets.json", ["/etc/prometheus/rules.yml"])


def main() -> int:
    DASHBOARD_FILE.write_text(dashboard_json())
    COMPOSE_PROMETHEUS_FILE.write_text(compose_prometheus_yml())
    panels = json.loads(DASHBOARD_FILE.read_text())["panels"]
    print(f"wrote {DASHBOARD_FILE} ({sum(p['type'] != 'row' for p in panels)} panels) and "
          f"{COMPOSE_PROMETHEUS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
