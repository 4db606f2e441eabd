"""migbed on a real multi-node Ray cluster started with Ray's own CLI: hosts placed on
different nodes by `migbed up --address`, a verified migration between two of them, the
clock offset reported, and none of the cluster's processes left behind."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from checks import processes_with_env
from raynodes import RayCliCluster

pytestmark = pytest.mark.ray

MIGBED = [sys.executable, "-m", "cluster.cli"]


@pytest.fixture(scope="module")
def ray_cli_cluster(tmp_path_factory):
    """Three Ray nodes on this machine (a head and two more), stopped by their sessions."""
    marker = f"multinode-{uuid.uuid4().hex[:8]}"
    # A short temp dir of its own: Ray's socket paths under it must stay within AF_UNIX's
    # 107 bytes, which pytest's per-worker tmp paths (.../popen-gw1/...) outgrow.
    temp_dir = Path(tempfile.mkdtemp(prefix="mb-ray-"))
    cluster = RayCliCluster(temp_dir, marker)
    try:
        cluster.start_head()
        cluster.add_node()
        cluster.add_node()
        assert processes_with_env("MIGBED_TEST_RAY", marker), "the marker finds the nodes"
        yield cluster
    finally:
        cluster.stop()
    assert not processes_with_env("MIGBED_TEST_RAY", marker), "a Ray process is left behind"
    shutil.rmtree(temp_dir, ignore_errors=True)


def migbed(cluster: RayCliCluster, home, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(cluster.env, MIGBED_HOME=str(home))
    p = subprocess.run([*MIGBED, *args], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == rc, (args, p.returncode, p.stdout, p.stderr[-3000:])
    return p


def test_hosts_on_different_nodes_migrate_verified(ray_cli_cluster, tmp_path):
    cluster = ray_cli_cluster
    nodes = sorted(cluster.nodes(), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    assert len(nodes) == 3
    pinned = nodes[2]["NodeID"][:10]           # host-0 there; the others round robin
    up = migbed(cluster, tmp_path, "up", "--address", cluster.address, "--hosts", "3",
                "--host-memory", "64MiB", "--placement", f"host-0={pinned}", "--data-ports",
                "47100-47199", "--json")
    assert json.loads(up.stdout)["address"] == cluster.address
    try:
        hosts = {h["name"]: h for h in json.loads(
            migbed(cluster, tmp_path, "list", "--json").stdout)["hosts"]}
        on = {name: h["ray_node"]["node_id"] for name, h in hosts.items()}
        assert on == {"host-0": nodes[2]["NodeID"], "host-1": nodes[0]["NodeID"],
                      "host-2": nodes[1]["NodeID"]}
        for h in hosts.values():        # each data plane listens on its own node's IP
            assert h["address"] == h["ray_node"]["ip"]
        migbed(cluster, tmp_path, "create", "host-0", "vm1", "--memory", "8MiB",
               "--workload", "uniform", "--dirty-rate", "2000")
        report = json.loads(migbed(cluster, tmp_path, "migrate", "vm1", "host-1",
                                   "--json").stdout)
        assert report["status"] == "completed" and report["integrity"]["verified"] is True
        assert report["guest_host"] == "host-1"
        # one machine, one clock: the truth is 0, within the NTP bound of the estimate
        assert abs(report["clock_offset_seconds"]) <= report["clock_rtt_seconds"] / 2
        assert 0 < report["downtime_seconds"] <= report["total_time_seconds"]
        migbed(cluster, tmp_path, "destroy", "vm1")
    finally:
        migbed(cluster, tmp_path, "down")
    assert not processes_with_env("MIGBED_HOME", str(tmp_path)), "a migbed process is left"
    assert len(cluster.nodes()) == 3, "down stops migbed's hosts, not the user's Ray cluster"


def test_a_placement_on_no_such_node_is_refused(ray_cli_cluster, tmp_path):
    p = migbed(ray_cli_cluster, tmp_path, "up", "--address", ray_cli_cluster.address,
               "--hosts", "2", "--placement", "host-0=ffffffffffff", rc=2)
    assert "no alive Ray node" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "cluster.json")
