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

from grafana_foundation_sdk.builders import bargauge, statetimeline, table
from grafana_foundation_sdk.builders.common import ReduceDataOptions
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    TimePicker,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BarGaugeDisplayMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
# The rows' modules sit beside this script (which runs as a script, and loads in the tests
# from its file): this folder is where they are found.
sys.path.insert(0, str(HERE))
from measure_row import measurements_row  # noqa: E402
from panelkit import HG, PROMETHEUS, TOP_K, H, Panels, query, top, with_queries  # noqa: E402
from vcpu_row import process_vcpus_row  # noqa: E402

DASHBOARD_FILE = HERE / "migbed.json"
COMPOSE_PROMETHEUS_FILE = HERE / "prometheus.yml"
UID = "migbed-overview"


def build_dashboard() -> Dashboard:
    p = Panels()
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
    )
    d = cluster_row(d, p)
    d = outcomes(migrations_row(d, p), p)
    d = wire_row(d, p)
    d = guests_row(d, p)
    d = postcopy_row(d, p)
    d = process_vcpus_row(d, p)
    d = measurements_row(d, p)
    return d


def cluster_row(d: Dashboard, p: Panels) -> Dashboard:
    """The cluster row."""
    return (
        d
        .with_row(p.row("Cluster"))
        .with_panel(p.single("Hosts", "Hosts whose /metrics Prometheus scrapes.",
                           f"count(migbed_host_info{{{H}}})"))
        .with_panel(p.single("Hosts not answering", "Listed targets whose last scrape failed.",
                           f"sum(1 - up{{{H}}})"))
        .with_panel(p.single("Guests", "Guests on the hosts (arriving ones included).",
                           f"sum(migbed_host_guests{{{H}}})"))
        .with_panel(p.single("Migrations running", "Outgoing migrations in progress.",
                           f'sum(migbed_migrations_in_progress{{{H}, direction="outgoing"}})'))
        .with_panel(p.single("Migrations completed", "Since the hosts started.",
                           f'sum(migbed_migrations_finished_total{{{H}, status="completed"}})'))
        .with_panel(p.single("Migrations failed or cancelled", "Since the hosts started.",
                           f'sum(migbed_migrations_finished_total{{{H}, status!="completed"}})'))
        .with_panel(p.ts(
            "Cluster memory by frame state", "Machine frames of all the hosts free, used (dom0 "
            "and guests) and reserved by the hypervisor, in bytes.", "bytes",
            [query(f"sum by (state) (migbed_host_frames{{{H}}} * on (host) group_left () "
                   f"migbed_host_page_size_bytes{{{H}}})", "{{state}}")],
            stacked=True))
        .with_panel(p.ts(
            "Fullest hosts", f"Bytes used on the {TOP_K} hosts using the most (dom0 and "
            "guests): where an evacuation must not send more.", "bytes",
            [query(top(f'sum by (host) (migbed_host_frames{{{H}, state="used"}} * on (host) '
                       f"group_left () migbed_host_page_size_bytes{{{H}}})"), "{{host}}")]))
        .with_panel(p.ts(
            "Guests by memory mode", "P==M, P2M and VP (shadow) guests; a migrating guest "
            "is VP on both ends.", "short",
            [query(f"sum by (mode) (migbed_host_guests{{{H}}})", "{{mode}}")], stacked=True))
        .with_panel(with_queries(
            p._common(table.Panel(), "Guest list", "Every guest, its host and memory now.", 24, 6)
            .unit("bytes"),
            [query(f"migbed_guest_memory_bytes{{{HG}}}", instant=True,
                   fmt=PromQueryFormat.TABLE)]))
    )


def migrations_row(d: Dashboard, p: Panels) -> Dashboard:
    """The migrations row: the running migrations, round by round."""
    return (
        d
        .with_row(p.row("Migrations"))
        .with_panel(p.ts(
            "Migrations per minute", "Migrations that ended in the last minute, by how they "
            "ended.", "short",
            [query(f"sum by (status) (increase(migbed_migrations_finished_total{{{H}}}[1m]))",
                   "{{status}}")]))
        .with_panel(p.ts(
            "Round of each running migration", "0 is the first full copy; the last round is "
            "the stop-and-copy.", "short",
            [query(top(f"max by (guest) (migbed_migration_round{{{HG}}})"), "{{guest}}")]))
        .with_panel(p.ts(
            "Pages sent vs dirtied per round", "The last finished round of each running "
            "migration: a migration converges while it sends more than the guest dirties.",
            "short",
            [query(top(f"max by (guest) (migbed_migration_last_round_pages_sent{{{HG}}})"),
                   "{{guest}} sent", "A"),
             query(top(f"max by (guest) (migbed_migration_last_round_pages_dirtied{{{HG}}})"),
                   "{{guest}} dirtied", "B")], bars=True))
        .with_panel(p.ts(
            "Link throughput against its limit", "Bytes on the wire per second, each running "
            "migration's last-round throughput, and the link's speed.", "Bps",
            [query(top(f"sum by (host) (rate(migbed_migration_sent_bytes_total{{{H}}}"
                       "[$__rate_interval]))"), "{{host}} on the wire", "A"),
             query(top(f"max by (guest) (migbed_migration_throughput_bytes_per_second{{{HG}}})"),
                   "{{guest}} last round", "B"),
             query(top(f"max by (guest) (migbed_migration_link_limit_bytes_per_second"
                       f"{{{HG}}})"), "{{guest}} link limit", "C")]))
        .with_panel(p.ts(
            "Expected downtime of running migrations", "What the downtime would be if the "
            "migration stopped now: bytes still to send over the measured throughput "
            "(QEMU's expected-downtime), against the qemu policy's downtime limit in force "
            "(it steps up with --downtime-steps).", "s",
            [query(top(f"max by (guest) (migbed_migration_expected_downtime_seconds{{{HG}}})"),
                   "{{guest}}", "A"),
             query(top(f"max by (guest) (migbed_migration_downtime_limit_seconds{{{HG}}})"),
                   "{{guest}} limit in force", "B")]))
        .with_panel(p.ts(
            "Dirty pages in the last round", "Pages the guest dirtied during the last round, "
            "which the next round must send.", "short",
            [query(top(f"max by (guest) (migbed_migration_dirty_pages{{{HG}}})"),
                   "{{guest}}")]))
    )


def outcomes(d: Dashboard, p: Panels) -> Dashboard:
    """The migrations row, continued: how the ended migrations went (downtime, total time,
    where the time went, failures) and the pages each host moved."""
    return (
        d
        .with_panel(p.distribution(
            "Downtime distribution", "Completed migrations over the time range, by downtime "
            "bucket (pause on the source to resume on the destination).",
            "migbed_migration_downtime_seconds"))
        .with_panel(p.distribution(
            "Total time distribution", "Completed migrations over the time range, by total "
            "time bucket.", "migbed_migration_total_time_seconds"))
        .with_panel(p.ts(
            "Where the time goes (5m)", "Mean seconds per phase of the migrations completed "
            "in the last five minutes: setup, precopy, stop_and_copy and handover make up "
            "the total time; verify and cleanup are the source's work after it.", "s",
            [query("sum by (phase) (rate(migbed_migration_phase_duration_seconds_sum"
                   f"{{{HG}}}[5m])) / sum by (phase) (rate("
                   f"migbed_migration_phase_duration_seconds_count{{{HG}}}[5m]))",
                   "{{phase}}")], bars=True))
        .with_panel(p.quantiles(
            "Downtime quantiles (5m)", "Quantiles of the downtime of migrations completed in "
            "the last five minutes.", "migbed_migration_downtime_seconds"))
        .with_panel(p.quantiles(
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
        .with_panel(p.ts(
            "Pages sent and received per host", "Guest pages per second leaving sources "
            "and arriving at destinations.", "short",
            [query(top(f"sum by (host) (rate(migbed_migration_sent_pages_total{{{H}}}"
                       "[$__rate_interval]))"), "{{host}} sent", "A"),
             query(top(f"sum by (host) (rate(migbed_migration_received_pages_total{{{H}}}"
                       "[$__rate_interval]))"), "{{host}} received", "B")]))
    )


def wire_row(d: Dashboard, p: Panels) -> Dashboard:
    """The what crosses the wire row."""
    return (
        d
        .with_panel(p.ts(
            "Pages sent by type", "Pages per second sent whole and as zero pages (a pfn word "
            "each): QEMU's normal and duplicate.", "short",
            [query(top(f"sum by (host) (rate(migbed_migration_normal_pages_total{{{H}}}"
                       "[$__rate_interval]))"), "{{host}} normal", "A"),
             query(top(f"sum by (host) (rate(migbed_migration_zero_pages_total{{{H}}}"
                       "[$__rate_interval]))"), "{{host}} zero", "B")], stacked=True))
        .with_panel(p.ts(
            "XBZRLE over the time range", "Pages XBZRLE found in its cache, its cache misses "
            "and overflows, of the migrations that ended in the range.", "short",
            [query(f"sum(increase(migbed_migration_xbzrle_pages_total{{{H}}}[$__range]))",
                   "pages encoded", "A"),
             query(f"sum(increase(migbed_migration_xbzrle_cache_miss_total{{{H}}}"
                   "[$__range]))", "cache misses", "B"),
             query(f"sum(increase(migbed_migration_xbzrle_overflow_total{{{H}}}"
                   "[$__range]))", "overflows", "C")], bars=True))
        .with_panel(p.ts(
            "multifd bytes per channel", "Bytes each multifd channel carried per second, of "
            "the migrations that ended (a balanced spread means the channels share the "
            "link).", "Bps",
            [query(f"sum by (channel) (rate(migbed_migration_multifd_sent_bytes_total{{{H}}}"
                   "[$__rate_interval]))", "channel {{channel}}")], stacked=True))
        .with_panel(p.single(
            "multifd compression ratio", "Page bytes the channels compressed over the bytes "
            "they made of them, over the time range.",
            f"sum(increase(migbed_migration_multifd_compression_input_bytes_total{{{H}}}"
            f"[$__range])) / sum(increase("
            f"migbed_migration_multifd_compression_output_bytes_total{{{H}}}[$__range]))",
            width=6))
    )


def guests_row(d: Dashboard, p: Panels) -> Dashboard:
    """The guests row."""
    mode_code = (f'max by (guest) (migbed_guest_mode{{{HG}, mode="p2m"}}) + '
                 f'2 * max by (guest) (migbed_guest_mode{{{HG}, mode="vp"}})')
    modes = ValueMap({"0": ValueMappingResult(text="p==m", color="purple", index=0),
                      "1": ValueMappingResult(text="p2m", color="green", index=1),
                      "2": ValueMappingResult(text="vp (shadow)", color="orange", index=2)})
    return (
        d
        .with_row(p.row("Guests"))
        .with_panel(p.ts(
            "Dirty rate", "Page writes per second of each guest's vCPU (its dirty rate), "
            "wherever it runs.", "short",
            [query(top(f"sum by (guest) (rate(migbed_guest_page_writes_total{{{HG}}}"
                       "[$__rate_interval]))"), "{{guest}}")]))
        .with_panel(p.ts(
            "Throttle beside the dirty rate", "What the convergence aids take of each "
            "migrating guest's vCPU: auto-converge's throttle (QEMU's cpu-throttle-percentage "
            "as a ratio) and dirty-limit's sleep per full dirty ring. The dirty rate on the "
            "left falls as they rise.", "percentunit",
            [query(top(f"max by (guest) (migbed_migration_cpu_throttle_ratio{{{HG}}})"),
                   "{{guest}} cpu throttle", "A"),
             query(top(f"max by (guest) (migbed_migration_dirty_limit_throttle_time_per_"
                       f"round_seconds{{{HG}}})"), "{{guest}} dirty-limit sleep per ring (s)",
                   "B")]))
        .with_panel(with_queries(
            p._common(statetimeline.Panel(), "Memory mode over time", "P2M guests switch to "
                      "VP (shadow) with log-dirty while they migrate, and back after.", 12, 8)
            .mappings([modes]).show_value("auto"),
            [query(top(mode_code), "{{guest}}")]))
        .with_panel(p.ts(
            "Log-dirty pages", "Pages marked in each migrating guest's log-dirty bitmap "
            "since the last CLEAN.", "short",
            [query(top(f"max by (guest) (migbed_guest_dirty_pages{{{HG}}})"), "{{guest}}")]))
        .with_panel(p.ts(
            "Migration progress: bytes still to send", "Each running migration's remaining "
            "bytes: they fall each round while the migration converges.", "bytes",
            [query(top(f"max by (guest) (migbed_migration_remaining_bytes{{{HG}}})"),
                   "{{guest}}")]))
    )


def postcopy_row(d: Dashboard, p: Panels) -> Dashboard:
    """The post-copy row."""
    return (
        d
        .with_row(p.row("Post-copy"))
        .with_panel(p.single("Post-copy switches", "Migrations that switched to post-copy, "
                           "since the hosts started.",
                           f"sum(migbed_migration_postcopy_switches_total{{{H}}})"))
        .with_panel(p.single("Migrations paused in post-copy", "Running migrations paused on "
                           "a broken link after their switch (postcopy-paused): `migbed "
                           "migrate-recover` resumes them.",
                           f"sum(migbed_migration_postcopy_paused{{{H}}})"))
        .with_panel(p.ts(
            "Pages still missing on the destination", "Pages each guest running in post-copy "
            "still lacks: the push and its requests bring them, the last one ends the "
            "migration.", "short",
            [query(top(f"max by (guest) (migbed_migration_postcopy_missing_pages{{{HG}}})"),
                   "{{guest}}")]))
        .with_panel(p.ts(
            "Page requests and pushed pages", "Pages per second a post-copy source received "
            "requests for (QEMU's postcopy-requests), and sent on request and by the "
            "background push.", "short",
            [query(top(f"sum by (host) (rate(migbed_migration_postcopy_requests_total{{{H}}}"
                       "[$__rate_interval]))"), "{{host}} requests", "A"),
             query(top(f"sum by (host, reason) (rate(migbed_migration_postcopy_sent_pages_total"
                       f"{{{H}}}[$__rate_interval]))"), "{{host}} {{reason}}", "B")]))
        .with_panel(p.ts(
            "vCPU time blocked on faults", "Share of the time the vCPUs of guests arriving "
            "by post-copy waited for missing pages (QEMU's postcopy-blocktime per second).",
            "percentunit",
            [query(top(f"sum by (host) (rate(migbed_migration_postcopy_blocktime_seconds_total"
                       f"{{{H}}}[$__rate_interval]))"), "{{host}}")]))
        .with_panel(p.quantiles(   # a host's histogram: no guest label
            "Fault latency quantiles (5m)", "Request to landed of the pages post-copy guests "
            "asked for in the last five minutes (QEMU 10.1's postcopy-latency).",
            "migbed_migration_postcopy_fault_latency_seconds", selector=H))
        .with_panel(p.ts(
            "Fault latency by channel (5m)", "Mean request to landed of the pages post-copy "
            "guests asked for in the last five minutes, by the channel each landed from: the "
            "data channel behind the push (main) or post-copy preempt's own (preempt).", "s",
            [query(f"sum by (channel) (rate(migbed_migration_postcopy_channel_fault_latency_"
                   f"seconds_sum{{{H}}}[5m])) / sum by (channel) (rate(migbed_migration_"
                   f"postcopy_channel_fault_latency_seconds_count{{{H}}}[5m]))", "{{channel}}")]))
        .with_panel(p.ts(
            "Post-copy bytes by channel (5m)", "Bytes the migrations that ended in the last "
            "five minutes sent after their post-copy switch, by channel: the push on the data "
            "channel (main), requested pages on post-copy preempt's own (preempt).", "bytes",
            [query(f"sum by (channel) (increase(migbed_migration_postcopy_channel_sent_bytes_"
                   f"total{{{H}}}[5m]))", "{{channel}}")], stacked=True))
        .with_panel(p.ts(
            "Bytes by stage (5m)", "Bytes of the migrations that ended in the last five "
            "minutes, by when they went: the guest running on its source, paused, or on its "
            "destination after a post-copy switch.", "bytes",
            [query(f"sum by (stage) (increase(migbed_migration_stage_sent_bytes_total{{{H}}}"
                   "[5m]))", "{{stage}}")], stacked=True))
    )


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
