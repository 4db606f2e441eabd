"""The cluster on real Ray: one node per host, guests in every mode, migrations between
nodes, and a destination that dies mid-stream."""

import threading
import time

import pytest
import ray
from checks import frames_exact

from cluster.handles import RayHost
from cluster.launch.launcher import NAMESPACE
from nodes.errors import DomainExistsError, NoSuchDomainError, NoSuchHostError
from nodes.host.actor import start_host_actor
from nodes.host.specs import GuestSpec, HostConfig
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024




def test_hosts_are_packed_two_to_a_node_each_its_own_process(ray_testbed):
    names = list(ray_testbed.hosts)
    assert names == ["host-0", "host-1", "host-2"]
    nodes = {n: ray_testbed.host(n).call("node_id") for n in names}
    assert nodes["host-0"] == nodes["host-1"] != nodes["host-2"]
    described = {h["name"]: h["ray_node"] for h in ray_testbed.list()["hosts"]}
    assert {n: d["node_id"] for n, d in described.items()} == nodes
    assert len({d["pid"] for d in described.values()}) == 3


@pytest.mark.parametrize("mode", ["p2m", "vp", "p==m"])
def test_create_and_destroy_in_every_mode(ray_testbed, unique_name, mode):
    tb = ray_testbed
    name = unique_name(mode.replace("==", "eq"))
    before = {n: h.call("frame_counts") for n, h in tb.hosts.items()}
    d = tb.create("host-1", GuestSpec(name, 8 * MiB, mode))
    assert d["mode"] == mode and d["pages"] == 2048
    listing = tb.list()
    row = next(g for g in listing["guests"] if g["name"] == name)
    assert row["host"] == "host-1" and row["state"] == "running"
    host1 = next(h for h in listing["hosts"] if h["name"] == "host-1")
    assert host1["frames"]["free"] == before["host-1"]["free"] - 2048
    frames_exact(tb)
    with pytest.raises(DomainExistsError):
        tb.create("host-2", GuestSpec(name, 8 * MiB, mode))
    tb.destroy(name)
    assert {n: h.call("frame_counts") for n, h in tb.hosts.items()} == before


def test_unknown_host_and_guest(ray_testbed):
    with pytest.raises(NoSuchHostError):
        ray_testbed.create("host-9", GuestSpec("x", 4 * MiB))
    with pytest.raises(NoSuchDomainError):
        ray_testbed.destroy("no-such-guest")


def test_migration_between_ray_nodes(ray_testbed, unique_name):
    tb = ray_testbed
    name = unique_name("mig")
    tb.create("host-0", GuestSpec(name, 16 * MiB, workload=WorkloadSpec("hotset", 10000)))
    time.sleep(0.1)
    seen = []
    r = tb.migrate(name, "host-2", MigrationSettings(link_bytes_per_second=128 * MiB),
                   on_progress=seen.append)
    assert r.status == "completed" and r.integrity.verified is True
    assert r.source == "host-0" and r.destination == "host-2" and tb.where(name) == "host-2"
    assert seen, "progress was reported while the migration ran"
    assert r.guest_observed_downtime_seconds is not None
    assert r.guest_observed_downtime_seconds >= r.downtime_seconds * 0.5
    frames_exact(tb)
    tb.destroy(name)


def test_destination_killed_mid_stream(ray_testbed, unique_name):
    """A destination that dies while pages flow: the guest keeps running on its source."""
    tb = ray_testbed
    name = unique_name("victim")
    # A throw-away destination actor on host-2's node, so the shared hosts stay intact.
    cfg = HostConfig(name=f"doomed-{name}", memory_bytes=64 * MiB)
    actor = start_host_actor(cfg, detached=False, namespace=NAMESPACE,
                             node_id=tb.host("host-2").call("node_id"))
    doomed = RayHost(cfg.name, actor)
    tb.hosts[cfg.name] = doomed
    try:
        # Memory with content: its 16 MiB go whole over 4 MiB/s, pages flow for seconds.
        tb.create("host-0", GuestSpec(name, 16 * MiB, workload=WorkloadSpec("uniform", 0,
                                                                            fill="random")))
        src = tb.host("host-0")
        killed = threading.Event()

        def kill_once_pages_flow(progress) -> None:
            # Killed once pages flow (not at a set time: on a loaded machine the set-up may
            # outlast any fixed delay, and the kill would land before the stream opened).
            if progress.pages_sent_total > 0 and not killed.is_set():
                killed.set()
                ray.kill(actor, no_restart=True)
        r = tb.migrate(name, cfg.name, MigrationSettings(
            link_bytes_per_second=4 * MiB, timeout_seconds=10),
            on_progress=kill_once_pages_flow)
        assert killed.is_set(), "the destination was killed while pages flowed"
        assert r.status == "failed" and r.error
        status = src.call("guest_status", name)
        assert status["state"] == "running" and status["mode"] == "p2m"
        assert not status["migrating"]
        start = status["pages_written_total"]
        deadline = time.monotonic() + 10
        while src.call("guest_status", name)["pages_written_total"] <= start:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        del tb.hosts[cfg.name]
    tb.destroy(name)
    frames_exact(tb)
