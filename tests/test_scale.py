"""Scale out: several hosts per Ray node, hosts spread over a cluster's nodes, a start-up that
cleans up after itself, 16 hosts in a quick test and four of them evacuated at once.

The clusters here are started by `migbed up` (a process of their own) and driven through
the CLI, as a user does: this test process is already a driver of the session's shared
cluster, and a Ray process drives one cluster at a time."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checks import processes_with_env
from conftest import require_binary

from cluster.launch import persistent
from cluster.launch.launcher import ClusterSpec, startup_timeout_seconds
from cluster.launch.placement import RayNode, local_groups, parse_placement, spread
from cluster.prometheus import api_get
from nodes.errors import ClusterError, ConfigError

MIGBED = [sys.executable, "-m", "cluster.cli"]
TESTS = Path(__file__).parent
MiB = 1024 * 1024


def migbed(home, *args: str, rc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MIGBED_HOME=str(home))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([*MIGBED, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == rc, (args, p.returncode, p.stdout, p.stderr[-3000:])
    return p


def drive(home, code: str) -> None:
    """Run `code` in a driver of the cluster of `home`, with `tb` attached to it and the
    tests' `checks` importable (one process for many calls: each CLI call is a new driver)."""
    prelude = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
               "from checks import frames_exact\n"
               "from cluster.testbed import Testbed\n"
               "from nodes.host.specs import GuestSpec\n"
               "from workloads.spec import WorkloadSpec\n"
               "tb = Testbed.attach()\n")
    env = dict(os.environ, MIGBED_HOME=str(home))
    p = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def frames_exact_on(home) -> None:
    """`checks.frames_exact` on every host of the cluster of `home`."""
    drive(home, "frames_exact(tb)")


# -- placement, as plans ------------------------------------------------------------------
NODES = [RayNode("bbbbbbbb01", "10.0.0.2"), RayNode("aaaaaaaa02", "10.0.0.1"),
         RayNode("cccccccc03", "10.0.0.3")]
NAMES = [f"host-{i}" for i in range(5)]


def test_a_local_cluster_packs_hosts_onto_nodes():
    assert local_groups(NAMES, None) == [NAMES]
    assert local_groups(NAMES, 2) == [NAMES[:2], NAMES[2:4], NAMES[4:]]
    assert local_groups(NAMES, 64) == [NAMES]


def test_hosts_spread_round_robin_over_a_clusters_nodes():
    plan = spread(NAMES, NODES)
    assert [plan[h].ip for h in NAMES] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1",
                                           "10.0.0.2"]
    packed = spread(NAMES, NODES, hosts_per_node=2)
    assert [packed[h].ip for h in NAMES] == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2",
                                             "10.0.0.3"]
    with pytest.raises(ConfigError, match="need 3 Ray nodes"):
        spread(NAMES, NODES[:2], hosts_per_node=2)


def test_placement_pins_hosts_by_node_id_prefix_or_ip():
    placement = parse_placement("host-0=cccccccc03, host-1=10.0.0.2,host-2=aaaaaa", NAMES)
    plan = spread(NAMES, NODES, placement=placement)
    assert plan["host-0"].node_id == "cccccccc03"
    assert plan["host-1"].ip == "10.0.0.2" and plan["host-2"].node_id == "aaaaaaaa02"
    assert [plan[h].ip for h in ("host-3", "host-4")] == ["10.0.0.1", "10.0.0.2"]


@pytest.mark.parametrize("text, message", [
    ("host-0", "cannot read placement"),
    ("host-9=aaaaaaaa02", "not a host of this cluster"),
    ("host-0=aaaaaaaa02,host-0=10.0.0.1", "twice"),
])
def test_a_placement_that_cannot_be_read_is_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_placement(text, NAMES)


def test_a_placement_naming_no_node_or_several_is_refused():
    twins = [RayNode("abcdef01", "10.0.0.9"), RayNode("abcdef02", "10.0.0.9")]
    with pytest.raises(ConfigError, match="no alive Ray node"):
        spread(NAMES, NODES, placement={"host-0": "10.9.9.9"})
    with pytest.raises(ConfigError, match="no alive Ray node"):
        spread(NAMES, NODES, placement={"host-0": "aaa"})       # too short a prefix
    with pytest.raises(ConfigError, match="several Ray nodes"):
        spread(NAMES, twins, placement={"host-0": "abcdef"})
    with pytest.raises(ConfigError, match="--address"):
        ClusterSpec(hosts=2, placement={"host-0": "abcdef"})
    with pytest.raises(ConfigError, match="--hosts-per-node"):
        ClusterSpec(hosts=2, hosts_per_node=0)


def test_the_startup_limit_grows_with_the_hosts():
    assert startup_timeout_seconds(32) > startup_timeout_seconds(8) > startup_timeout_seconds(1)


@pytest.mark.parametrize("args, message", [
    (["up", "--hosts-per-node", "0"], "--hosts-per-node must be >= 1"),
    (["up", "--placement", "host-0=abcdef"], "--address"),
    (["up", "--hosts", "2", "--address", "127.0.0.1:1", "--placement", "host-7=x"],
     "not a host of this cluster"),
    (["evacuate"], "the following arguments are required"),
    (["up", "--data-ports", "70000-70010"], "--data-ports must be ports LOW-HIGH"),
])
def test_bad_scale_options_are_one_line(tmp_path, args, message):
    p = migbed(tmp_path, *args, rc=2)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], p.stderr


def test_dashboard_panels_of_a_line_per_host_or_guest_draw_the_top_k():
    """At 32 hosts and 128 guests a line per host or guest is unreadable: such panels
    draw the TOP_K largest series."""
    from dashboards.build import DASHBOARD_FILE, TOP_K
    d = json.loads(DASHBOARD_FILE.read_text())
    drawn = 0
    for p in d["panels"] + [q for r in d["panels"] for q in r.get("panels", [])]:
        if p.get("type") not in ("timeseries", "statetimeline"):
            continue
        for t in p.get("targets") or []:
            legend = t.get("legendFormat") or ""
            if "{{host}}" in legend or "{{guest}}" in legend:
                assert t["expr"].startswith(f"topk({TOP_K}, "), (p["title"], t["expr"])
                drawn += 1
    assert drawn >= 10


# -- start-ups that fail leave nothing behind ---------------------------------------------
class Stop(Exception):
    pass


@pytest.mark.ray
def test_a_startup_stopped_midway_stops_everything_it_started(tmp_path, monkeypatch):
    """Stopped once Ray is up and the hosts are starting (as by Ctrl-C): every process of
    the start-up (Ray's, the workers) is gone when `up` returns."""
    monkeypatch.setenv("MIGBED_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = []

    def stop_at_hosts(p: dict) -> None:
        seen.append(p)
        if p["stage"] == "hosts":
            assert processes_with_env("MIGBED_HOME", str(tmp_path)), "Ray is running"
            raise Stop
    with pytest.raises(Stop):
        persistent.up(ClusterSpec(hosts=4, host_memory_bytes=32 * MiB), on_progress=stop_at_hosts)
    assert seen[0]["stage"] == "ray" and seen[-1]["hosts"] == 4
    assert not processes_with_env("MIGBED_HOME", str(tmp_path))
    assert persistent.read_state() is None


@pytest.mark.ray
def test_a_startup_that_fails_or_times_out_stops_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGBED_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # dom0 larger than the host: every host fails in its constructor, after Ray is up
    bad = ClusterSpec(hosts=2, host_memory_bytes=32 * MiB, dom0_memory_bytes=64 * MiB)
    with pytest.raises(ClusterError, match="failed to start"):
        persistent.up(bad)
    assert not processes_with_env("MIGBED_HOME", str(tmp_path))
    with pytest.raises(ClusterError, match="did not start within 2 s"):
        persistent.up(ClusterSpec(hosts=2, host_memory_bytes=32 * MiB), timeout_seconds=2)
    assert not processes_with_env("MIGBED_HOME", str(tmp_path))
    assert persistent.read_state() is None


# -- real clusters ------------------------------------------------------------------------
@pytest.mark.ray
def test_hosts_packed_two_per_node_each_its_own_process(tmp_path):
    """Four hosts on two Ray nodes: one process and one data plane each; migrations
    between two hosts of one node and across nodes are both verified."""
    migbed(tmp_path, "up", "--hosts", "4", "--host-memory", "48MiB", "--hosts-per-node", "2")
    try:
        hosts = json.loads(migbed(tmp_path, "list", "--json").stdout)["hosts"]
        nodes = [h["ray_node"]["node_id"] for h in hosts]
        assert nodes[0] == nodes[1] != nodes[2] == nodes[3]
        assert len({h["ray_node"]["pid"] for h in hosts}) == 4
        migbed(tmp_path, "create", "host-0", "p1", "--memory", "4MiB", "--workload", "uniform",
               "--dirty-rate", "2000")
        for dest in ("host-1", "host-2"):            # same node, then across nodes
            r = json.loads(migbed(tmp_path, "migrate", "p1", dest, "--json").stdout)
            assert r["status"] == "completed" and r["integrity"]["verified"] is True, r
        frames_exact_on(tmp_path)
    finally:
        migbed(tmp_path, "down")
    assert not processes_with_env("MIGBED_HOME", str(tmp_path))


def all_targets_up(url: str, count: int, timeout: float = 60.0) -> list[dict]:
    """Prometheus's active targets once `count` of them are up (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        targets = api_get(url, "targets", state="active")["activeTargets"]
        if sum(t["health"] == "up" for t in targets) >= count or time.monotonic() > deadline:
            return targets
        time.sleep(0.5)


@pytest.mark.ray
def test_sixteen_hosts_and_four_evacuated_at_once(tmp_path):
    """16 hosts on one node, each a Prometheus target; 4 of them, 4 busy guests each,
    evacuated in one command with 16 migrations at a time: every guest verified and on a
    host not evacuated, frames exact on every host."""
    require_binary("prometheus")
    up = migbed(tmp_path, "up", "--hosts", "16", "--host-memory", "48MiB", "--prometheus",
                "--prometheus-port", "0", "--json")
    assert "hosts up: 16/16" in up.stderr
    try:
        targets = all_targets_up(json.loads(up.stdout)["prometheus"]["url"], 16)
        assert len(targets) == 16 and all(t["health"] == "up" for t in targets)
        assert {t["labels"]["host"] for t in targets} == {f"host-{i}" for i in range(16)}
        listing = json.loads(migbed(tmp_path, "list", "--json").stdout)
        assert len(listing["hosts"]) == 16
        assert len({h["ray_node"]["node_id"] for h in listing["hosts"]}) == 1
        assert len({h["ray_node"]["pid"] for h in listing["hosts"]}) == 16
        rack = [f"host-{i}" for i in range(4)]
        guests = [f"{h}-g{j}" for h in rack for j in range(4)]
        drive(tmp_path, f"for k, g in enumerate({guests!r}):\n"
                        "    tb.create(g.rsplit('-', 1)[0], GuestSpec(g, 4 * 2**20, "
                        "workload=WorkloadSpec('uniform', 1000, seed=k)))\n")
        rep = json.loads(migbed(tmp_path, "evacuate", *rack, "--concurrency", "16",
                                "--json").stdout)
        assert rep["ok"] and rep["hosts"] == rack and not rep["stayed"]
        assert sorted(m["guest"] for m in rep["moves"]) == sorted(guests)
        for m in rep["moves"]:
            assert m["status"] == "completed" and m["verified"] is True, m
            assert m["guest_host"] == m["destination"] and m["destination"] not in rack
        where = {g["name"]: g["host"] for g in json.loads(
            migbed(tmp_path, "list", "--json").stdout)["guests"] if not g["dom0"]}
        assert sorted(where) == sorted(guests)
        assert not set(where.values()) & set(rack)
        frames_exact_on(tmp_path)
    finally:
        migbed(tmp_path, "down")
    assert not processes_with_env("MIGBED_HOME", str(tmp_path))


# -- the data-plane ports a firewall between machines must let through ----------------------
def free_port_range(count: int) -> tuple[int, int]:
    """`count` consecutive ports free on 127.0.0.1 now."""
    import random
    import socket
    for _ in range(200):
        low = random.randrange(20000, 60000)
        try:
            socks = [socket.create_server(("127.0.0.1", p)) for p in range(low, low + count)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return low, low + count - 1
    raise RuntimeError("no free port range")


def test_migrations_listen_in_the_data_port_range(in_process):
    from nodes.host.specs import GuestSpec
    from nodes.migration.settings import MigrationSettings
    from nodes.migration.wire.channel import Listener
    low, high = free_port_range(3)
    listeners = [Listener("127.0.0.1", f"m{i}", (low, high)) for i in range(3)]
    try:
        assert sorted(ln.ticket.port for ln in listeners) == [low, low + 1, high]
        with pytest.raises(OSError, match=f"{low}-{high} is in use"):
            Listener("127.0.0.1", "m3", (low, high))
    finally:
        for ln in listeners:
            ln.close()
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB, data_ports=(low, high))
    tb.create("host-0", GuestSpec("dp1", 4 * MiB))
    r = tb.migrate("dp1", "host-1", MigrationSettings())
    assert r.status == "completed" and r.integrity.verified is True
    from nodes.units import parse_port_range
    assert parse_port_range("47000-47999", "--data-ports") == (47000, 47999)
    with pytest.raises(ConfigError, match="LOW <= HIGH"):
        parse_port_range("47999-47000", "--data-ports")


def test_a_sweep_scenario_names_its_hosts_per_node():
    from cluster.sweep.scenario import Scenario
    text = (Path(__file__).parents[1] / "scenarios" / "non-convergence.toml").read_text()
    packed = Scenario.from_toml(text.replace("hosts = 2\n", "hosts = 2\nhosts_per_node = 1\n"))
    assert packed.hosts_per_node == 1
    assert Scenario.from_toml(packed.to_toml()).hosts_per_node == 1
    assert Scenario.from_toml(text).hosts_per_node is None
    with pytest.raises(ConfigError, match="hosts_per_node"):
        Scenario.from_toml(text.replace("hosts = 2\n", "hosts = 2\nhosts_per_node = 0\n"))
