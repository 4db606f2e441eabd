"""The scheduler as the cluster's actor (one per cluster, found by every command) and a host
restarted as a fresh actor, on the session's Ray cluster."""

import threading
import time

import pytest

from cluster.cli import main
from cluster.maintenance import restart_host
from cluster.schedclient import QueuedMigrationCancelled
from cluster.testbed import Testbed as Cluster
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024


@pytest.mark.ray
def test_a_queued_migration_cancelled_by_id_leaves_its_guest(ray_home, unique_name, capsys):
    tb = Cluster.attach()
    slow, queued = unique_name("slow"), unique_name("q")
    tb.create("host-0", GuestSpec(slow, 8 * MiB, workload=WorkloadSpec("idle", fill="random")))
    tb.create("host-0", GuestSpec(queued, 4 * MiB))
    assert main(["limits", "--max-parallel", "1"]) == 0
    try:
        ids: list = []
        errors: list = []
        first = threading.Thread(target=lambda: tb.migrate(
            slow, "host-1", MigrationSettings(link_bytes_per_second=4 * MiB)))
        first.start()
        while not tb.scheduler.call("status")["running"]:
            time.sleep(0.01)

        def second():
            try:
                tb.migrate(queued, "host-2", on_queued=ids.append)
            except QueuedMigrationCancelled as exc:
                errors.append(exc)
        t = threading.Thread(target=second)
        t.start()
        while not ids:
            time.sleep(0.01)
        assert tb.scheduler.call("entry", ids[0])["state"] == "queued", "the limit holds it"
        capsys.readouterr()
        assert main(["cancel", ids[0]]) == 0
        assert "stays on host-0" in capsys.readouterr().out
        t.join(30)
        first.join(60)
        assert errors and tb.where(queued) == "host-0"
        assert tb.where(slow) == "host-1"
        assert Cluster.attach().scheduler.call("entry", ids[0])["state"] == "cancelled", \
            "a second attach finds the same scheduler"
    finally:
        assert main(["limits", "--limits", "none"]) == 0
        for g in (slow, queued):
            tb.destroy(g)


@pytest.mark.ray
def test_a_host_restarts_as_a_fresh_actor(ray_testbed):
    old = ray_testbed.host("host-2")
    pid = old.call("describe")["ray_node"]["pid"]
    restart_host(ray_testbed, "host-2")
    new = ray_testbed.host("host-2")
    assert new is not old and new.call("describe")["ray_node"]["pid"] != pid
    assert new.call("describe")["frames"]["total"] == old_total(ray_testbed)


def old_total(tb) -> int:
    return tb.host("host-1").call("describe")["frames"]["total"]
