"""dashboards/: the Grafana dashboard against Grafana's published model, the rules and configs
against promtool, Prometheus's bad input, and the proof that every panel shows data: a real
Prometheus scrapes the real Ray cluster while guests migrate, and each panel's query, its
variables filled in with the values Prometheus has, returns samples."""

import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_binary
from test_metrics import scrape_all

from cluster import prometheus as prom_mod
from cluster.prometheus import (
    Prometheus,
    PrometheusError,
    read_sd_file,
    refresh_sd_file,
    render_config,
    write_sd_file,
)
from nodes.host.service import HostService
from nodes.host.specs import GuestSpec, HostConfig
from nodes.host.userfault import kernel_support
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
DASHBOARD_FILE = DASHBOARDS / "migbed.json"
RULES_FILE = DASHBOARDS / "rules.yml"
SCRAPE_INTERVAL = "1s"
# What Grafana puts for its own variables with a 1 s scrape interval (the datasource's
# timeInterval): $__rate_interval is four scrape intervals.
RATE_INTERVAL = "4s"
# The panel only a process guest feeds (the uffd tier: the kernel's dirty log).
KERNEL_LOG_PANELS = ("Pages the kernel logged written",)


def load_build():
    spec = importlib.util.spec_from_file_location("dashboards_build", DASHBOARDS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out += p.get("panels", []) if p["type"] == "row" else [p]
    return out


def is_within(small, big) -> bool:
    """Every key and value of `small` is in `big` (which may add defaults)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and is_within(v, big[k])
                                             for k, v in small.items())
    if isinstance(small, list):
        return (isinstance(big, list) and len(small) == len(big)
                and all(is_within(a, b) for a, b in zip(small, big, strict=True)))
    return small == big


# -- the files ---------------------------------------------------------------------------------
def test_generated_files_are_what_build_py_makes():
    build = load_build()
    assert DASHBOARD_FILE.read_text() == build.dashboard_json(), \
        "run `python dashboards/build.py`"
    assert (DASHBOARDS / "prometheus.yml").read_text() == build.compose_prometheus_yml()


def test_dashboard_loads_into_grafanas_model():
    """Loaded back through grafana-foundation-sdk's Dashboard model, nothing is lost: a field
    the model does not know would be dropped, and a panel type it does not know would keep
    untyped options."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard
    from grafana_foundation_sdk.models.prometheus import Dataquery
    register_default_plugins()
    data = dashboard()
    model = Dashboard.from_json(data)
    again = json.loads(JSONEncoder(sort_keys=True).encode(model))
    assert is_within(data, again)
    assert data["schemaVersion"] >= 41
    loaded = [p for p in model.panels if getattr(p, "type_val", "row") != "row"]
    assert len(loaded) == len(panels(data)) >= 20
    for p in loaded:
        assert not isinstance(p.options, dict), f"{p.title}: options not typed ({p.type_val})"
        assert p.targets and all(isinstance(t, Dataquery) for t in p.targets), p.title
    bogus = json.loads(json.dumps(data))
    bogus["panels"][1]["notAGrafanaField"] = 1
    assert not is_within(bogus, json.loads(JSONEncoder().encode(Dashboard.from_json(bogus))))


def test_dashboard_variables_and_datasource():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("host", "guest"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"]
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    titles = [p["title"] for p in panels(d)]
    assert len(titles) == len(set(titles)), "panel titles are unique"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels(d):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["datasource"]["uid"] == "${datasource}", p["title"]


def test_rules_pass_promtool():
    promtool = require_binary("promtool")
    p = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_generated_config_passes_promtool(tmp_path):
    promtool = require_binary("promtool")
    sd = write_sd_file(tmp_path / "targets.json", {"host-0": "127.0.0.1:9100"})
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config(sd, [RULES_FILE]))
    p = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    parsed = yaml.safe_load(config.read_text())
    job = parsed["scrape_configs"][0]
    assert parsed["global"]["scrape_interval"] == SCRAPE_INTERVAL
    assert job["honor_labels"] is True
    assert job["file_sd_configs"][0]["files"] == [str(sd)]


def test_provisioning_and_compose_fit_together():
    ds = yaml.safe_load((DASHBOARDS / "provisioning/datasources/migbed.yml").read_text())
    source = ds["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    assert source["jsonData"]["timeInterval"] == SCRAPE_INTERVAL
    provider = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/migbed.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DASHBOARDS / "compose.yml").read_text())
    mounts = {}
    for service in compose["services"].values():
        for volume in service["volumes"]:
            src, dst = volume.removesuffix(":ro").rsplit(":", 1)
            mounts[dst] = src
            if src.startswith("./"):
                assert (DASHBOARDS / src).exists(), f"compose mounts missing {src}"
    assert mounts[f"{path}/migbed.json"] == "./migbed.json"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert mounts["/etc/prometheus/rules.yml"] == "./rules.yml"
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    sd_dir = config["scrape_configs"][0]["file_sd_configs"][0]["files"][0].rsplit("/", 1)[0]
    assert sd_dir in mounts, "the compose Prometheus sees migbed's discovery file"


# -- Prometheus's bad input ------------------------------------------------------------------
def test_missing_binary_says_how_to_install(tmp_path):
    with pytest.raises(PrometheusError, match="apt-get install prometheus"):
        Prometheus(tmp_path, port=0, binary="migbed-no-such-prometheus").start()


@pytest.mark.inprocess
def test_port_in_use_is_named(tmp_path):
    require_binary("prometheus")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PrometheusError, match=f"port {port} on 127.0.0.1 is in use"):
            Prometheus(tmp_path, port=port).start()


def test_unwritable_discovery_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PrometheusError, match="cannot write the Prometheus service discovery "
                                              f"file {blocker}/targets.json"):
        write_sd_file(blocker / "targets.json", {"host-0": "127.0.0.1:1"})


def test_cli_reports_prometheus_problems_before_starting_anything(tmp_path, monkeypatch,
                                                                   capsys):
    from cluster.cli import main
    monkeypatch.setenv("MIGBED_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))          # no prometheus on PATH
    assert main(["up", "--prometheus"]) == 2
    assert "apt-get install prometheus" in capsys.readouterr().err
    assert not (tmp_path / "cluster.json").exists()


@pytest.mark.inprocess
def test_a_dead_host_leaves_the_discovery_file(tmp_path):
    hosts = [HostService(HostConfig(name=f"solo-{i}", memory_bytes=32 * MiB, metrics_port=0))
             for i in range(2)]
    known = {h.name: h.metrics_endpoint() for h in hosts}
    sd = tmp_path / "targets.json"
    assert refresh_sd_file(sd, known) == known
    hosts[0].shutdown()
    assert refresh_sd_file(sd, known) == {"solo-1": known["solo-1"]}
    assert read_sd_file(sd) == {"solo-1": known["solo-1"]}
    hosts[1].shutdown()


# -- the proof: every panel, on a real cluster and a real Prometheus ---------------------------
def promql_regex(values: list[str]) -> str:
    """Grafana's multi-value format for Prometheus: an alternation of escaped values."""
    special = set("\\^$*+?.()|{}[]")
    return "|".join("".join("\\\\" + c if c in special else c for c in v) for v in values)


def label_values(prom: Prometheus, query: str, start: float, end: float) -> list[str]:
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert m, f"unsupported variable query {query}"
    return prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)}, start=start,
                    end=end)


def has_data(result: list) -> bool:
    for series in result:
        points = series.get("values") or [series["value"]]
        if any(not math.isnan(float(v)) for _, v in points):
            return True
    return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:g} s")
        time.sleep(0.2)


def test_every_panel_shows_data_from_a_real_cluster(ray_testbed, tmp_path, unique_name):
    require_binary("prometheus")
    tb = ray_testbed
    t_start = time.monotonic()
    guests = {"a": unique_name("dash-a"), "b": unique_name("dash-b"),
              "c": unique_name("dash-c")}
    tb.create("host-0", GuestSpec(guests["a"], 48 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 3000, seed=1)))
    tb.create("host-1", GuestSpec(guests["b"], 32 * MiB, "p2m", workload=WorkloadSpec(
        "hotset", 8000, seed=2, hot_fraction=0.1, hot_share=0.9)))
    # Content in every page, so the post-copy push (2 MiB/s) has 4 s of pages to send: a zero
    # page costs it nothing, and a push over before the next scrape leaves no missing pages.
    tb.create("host-2", GuestSpec(guests["c"], 8 * MiB, "vp", workload=WorkloadSpec(
        "uniform", 500, seed=3, fill="random")))
    # A process guest where this kernel runs one (the uffd tier), migrated by pre-copy so
    # its kernel-logged pages count: the process vCPUs row's panels.
    process = kernel_support().dirty_log
    if process:
        guests["p"] = unique_name("dash-p")
        tb.create("host-0", GuestSpec(guests["p"], 8 * MiB, "p2m", vcpu="process", vcpus=2,
                                      workload=WorkloadSpec("uniform", 4000, seed=4)))
    elif os.environ.get("CI"):
        pytest.fail(f"the uffd tier needs this kernel's dirty log: {kernel_support().reason}")
    # A fourth host, in this process, that dies at the end.
    doomed = HostService(HostConfig(name="doomed", memory_bytes=32 * MiB, metrics_port=0))
    cluster = tb.metrics_endpoints()
    sd = write_sd_file(tmp_path / "targets.json",
                       {**cluster, "doomed": doomed.metrics_endpoint()})
    phases = {"guests created": time.monotonic() - t_start}
    try:
        with Prometheus(tmp_path / "prometheus", port=0, sd_file=sd) as prom:
            t0 = time.time()
            wait_for(lambda: sum(t["health"] == "up" for t in prom.active_targets()) == 4, 15,
                     "the four hosts are not all scraped")
            t_up = time.time()        # every host scraped once
            baseline = scrape_all(tb)  # what the shared hosts counted before this test
            phases["prometheus up"] = time.monotonic() - t_start - sum(phases.values())
            # One short dirty-rate measurement (0.2 s), for the measurements row's panel.
            measured = tb.host("host-0").call("measure_dirty_rate", guests["a"],
                                              "dirty-bitmap", 0.2, 512)
            # Slow links, so each migration is running for several scrapes.
            reports = {}

            def move(key, dest, settings):
                reports[key] = tb.migrate(guests[key], dest, settings)
            # One over multifd channels with zstd, one with XBZRLE: the wire's panels too.
            movers = [threading.Thread(target=move, args=("a", "host-1", MigrationSettings(
                          link_bytes_per_second=20 * MiB, multifd_channels=2,
                          multifd_compression="zstd"))),
                      threading.Thread(target=move, args=("b", "host-2", MigrationSettings(
                          policy="qemu", link_bytes_per_second=16 * MiB,
                          xbzrle_cache_bytes=4 * MiB, downtime_steps="300ms..600ms/2"))),
                      # post-copy, its push slow, so its guest faults for several scrapes
                      # (its requests on the preempt channel)
                      threading.Thread(target=move, args=("c", "host-0", MigrationSettings(
                          link_bytes_per_second=64 * MiB, postcopy_after_rounds=0,
                          postcopy_bandwidth_bytes_per_second=2 * MiB,
                          postcopy_preempt=True)))]
            if process:
                movers.append(threading.Thread(target=move, args=("p", "host-1",
                              MigrationSettings(link_bytes_per_second=8 * MiB))))
            for t in movers:
                t.start()
            for t in movers:
                t.join(60)
            assert reports["a"].status == reports["b"].status == "completed"
            assert reports["c"].status == "completed" and reports["c"].postcopy_requests > 0
            if process:
                assert reports["p"].status == "completed" and reports["p"].shadow_faults > 0
            cancelled = tb.migrate(guests["a"], "host-0", MigrationSettings(
                link_bytes_per_second=32 * MiB, cancel_after_round=0))
            assert cancelled.status == "cancelled"
            time.sleep(2.5)       # the last scrapes, and a rule evaluation after them
            t1 = time.time()
            phases["migrations"] = time.monotonic() - t_start - sum(phases.values())
            evaluate_every_panel(prom, t0, t1, skip=() if process else KERNEL_LOG_PANELS)
            wire_counters_counted(prom, t_up, t1, reports, baseline)
            dirty_rate_gauges_hold_the_measurement(prom, t1, guests["a"], measured)
            evaluate_every_recording_rule(prom, t0, t1)
            phases["queries"] = time.monotonic() - t_start - sum(phases.values())
            dead_host_leaves_prometheus(prom, sd, doomed, cluster)
            phases["dead host"] = time.monotonic() - t_start - sum(phases.values())
    finally:
        doomed.shutdown()
        for g in guests.values():
            tb.destroy(g)
    elapsed = time.monotonic() - t_start
    print(f"dashboard proof took {elapsed:.1f} s: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in phases.items()))
    # A bound against a hang, not a speed figure (it took 21-60 s here, by the machine's load)
    assert elapsed < 180


def evaluate_every_panel(prom: Prometheus, t0: float, t1: float,
                         skip: tuple[str, ...] = ()) -> None:
    """Every panel's query returns data, but those in `skip` (a kernel-dependent panel where
    this kernel cannot run a process guest)."""
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    hosts = label_values(prom, variables["host"]["query"], t0, t1)
    assert set(hosts) >= {"host-0", "host-1", "host-2"}
    values = {"host": promql_regex(hosts)}
    guest_query = variables["guest"]["query"].replace("$host", values["host"])
    values["guest"] = promql_regex(label_values(prom, guest_query, t0, t1))
    window = f"{math.ceil(t1 - t0)}s"
    empty = []
    checked = 0
    for p in panels(d):
        if p["title"] in skip:
            print(f"not evaluated here (no process guest on this kernel): {p['title']}")
            continue
        for target in p["targets"]:
            expr = target["expr"]
            for name, value in (("$__rate_interval", RATE_INTERVAL), ("$__range", window),
                                ("$host", values["host"]), ("$guest", values["guest"])):
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{p['title']}: unknown variable in {expr}"
            if target.get("instant"):
                result = prom.query(expr, at=t1)
            else:
                result = prom.query_range(expr, t0, t1, 1.0)
            checked += 1
            if not has_data(result):
                empty.append(f"{p['title']} [{target['refId']}]: {expr}")
    assert not empty, "panels whose query returns no data:\n" + "\n".join(empty)
    assert checked >= 25


def wire_counters_counted(prom: Prometheus, t0: float, t1: float, reports: dict,
                          baseline: dict) -> None:
    """The wire's counters, as Prometheus scraped them over the migrations, are what the
    reports say: their last values over [t0, t1] (a range query: a scrape that fails on a
    loaded machine leaves a gap) less what the hosts counted before (earlier tests)."""
    def moved(name: str, host: str, by: str = "") -> dict:
        out = {}
        for series in prom.query_range(f'{name}{{host="{host}"}}', t0, t1, 1.0):
            values = [float(v) for _, v in series["values"] if not math.isnan(float(v))]
            key = series["metric"].get(by, "")
            labels = {"host": host, **({by: key} if by else {})}
            if values:
                out[key] = values[-1] - baseline[host].get(name, **labels)
        assert out, f"no data for {name} of {host}"
        return out
    a, b = reports["a"], reports["b"]
    assert sum(moved("migbed_migration_zero_pages_total", "host-0").values()) == a.zero_pages
    assert a.zero_pages > 0
    per = moved("migbed_migration_multifd_sent_bytes_total", "host-0", "channel")
    assert sorted(v for v in per.values() if v) == sorted(a.multifd["bytes_per_channel"])
    raw = moved("migbed_migration_multifd_compression_input_bytes_total", "host-0")
    out = moved("migbed_migration_multifd_compression_output_bytes_total", "host-0")
    assert sum(raw.values()) / sum(out.values()) == pytest.approx(
        a.multifd["compression_ratio"])
    miss = moved("migbed_migration_xbzrle_cache_miss_total", "host-1")
    assert sum(miss.values()) == b.xbzrle["cache_miss"] > 0


def dirty_rate_gauges_hold_the_measurement(prom: Prometheus, t1: float, guest: str,
                                           measured: dict) -> None:
    """The last measurement's estimate and true rate, as the host measured them."""
    def last(name: str) -> float:
        result = prom.query(f'{name}{{host="host-0", guest="{guest}", mode="dirty-bitmap"}}',
                            at=t1)
        assert len(result) == 1, f"{name}: {result}"
        return float(result[0]["value"][1])
    assert last("migbed_guest_dirty_rate_measured_pages_per_second") == pytest.approx(
        measured["pages_per_second"])
    assert last("migbed_guest_dirty_rate_true_pages_per_second") == pytest.approx(
        measured["true_pages_per_second"])


def evaluate_every_recording_rule(prom: Prometheus, t0: float, t1: float) -> None:
    rules = yaml.safe_load(RULES_FILE.read_text())
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    assert len(records) >= 6
    empty = [r for r in sorted(records) if not has_data(prom.query_range(r, t0, t1, 1.0))]
    assert not empty, f"recording rules without data: {empty}"
    loaded = prom.api("rules")["groups"]
    assert {g["name"] for g in loaded} == {g["name"] for g in rules["groups"]}


def dead_host_leaves_prometheus(prom: Prometheus, sd: Path, doomed: HostService,
                                cluster: dict) -> None:
    """A host that dies leaves the discovery file and Prometheus's targets; the rest stay up."""
    everyone = {**cluster, "doomed": doomed.metrics_endpoint()}
    assert refresh_sd_file(sd, everyone) == everyone, "a live host stays in the file"
    doomed.shutdown()
    assert refresh_sd_file(sd, everyone) == cluster
    assert read_sd_file(sd) == cluster
    # Prometheus's discovery hands changes to its scrapers every 5 s at most.
    wait_for(lambda: all(t["labels"].get("host") != "doomed" for t in prom.active_targets()),
             15, "the dead host is still a target")
    targets = prom.active_targets()
    assert {t["labels"]["host"] for t in targets} == set(cluster)
    # Up as of their last scrape: on a loaded machine one scrape of a live host may time out,
    # which the next one (a second later) mends.
    wait_for(lambda: all(t["health"] == "up" for t in prom.active_targets()), 15,
             "a live host is not scraped")
    assert has_data(prom.query('up{host="host-0"} == 1'))


def test_default_rules_file_is_the_one_checked():
    assert prom_mod.RULES_FILE == RULES_FILE


@pytest.mark.ray
def test_up_with_prometheus_and_down(tmp_path):
    """`migbed up --prometheus` scrapes every host; `migbed down` stops Prometheus too."""
    require_binary("prometheus")
    env = dict(os.environ, MIGBED_HOME=str(tmp_path))
    env.pop("RAY_ADDRESS", None)

    def migbed(*args):
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env,
                              capture_output=True, text=True, timeout=180)
    p = migbed("up", "--hosts", "2", "--host-memory", "64MiB", "--prometheus",
               "--prometheus-port", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    try:
        state = json.loads((tmp_path / "cluster.json").read_text())
        prom = state["prometheus"]
        assert f"Prometheus: {prom['url']}" in p.stdout
        assert set(read_sd_file(state["sd_file"])) == {"host-0", "host-1"}
        os.kill(prom["pid"], 0)           # the supervisor runs

        def hosts_up():
            data = prom_mod.api_get(prom["url"], "query", query="up == 1")["result"]
            return {r["metric"]["host"] for r in data} == {"host-0", "host-1"}
        wait_for(hosts_up, 20, "Prometheus does not scrape both hosts")
    finally:
        d = migbed("down")
    assert d.returncode == 0, d.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(prom["pid"], 0)
    with pytest.raises(PrometheusError):
        prom_mod.api_get(prom["url"], "query", timeout_seconds=2, query="up")
    assert read_sd_file(state["sd_file"]) == {}
