"""A rolling maintenance: hosts drained a batch at a time, restarted as fresh hosts, the
guests back home (or rebalanced)."""

import pytest
from checks import frames_exact

from cluster.maintenance import maintenance, restart_host
from cluster.scheduler import Limits
from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec

MiB = 1024 * 1024


@pytest.mark.inprocess
def test_rolling_maintenance_returns_every_guest(in_process):
    tb = in_process(hosts=3, host_memory_bytes=48 * MiB)
    home = {}
    for i in range(4):
        h = f"host-{i % 2}"
        tb.create(h, GuestSpec(f"m{i}", 2 * MiB))
        home[f"m{i}"] = h
    before = {h: tb.host(h) for h in tb.hosts}
    rep = maintenance(tb, batch=1, limits=Limits(max_parallel=2))
    assert rep.ok, rep.table()
    assert rep.restarted == ["host-0", "host-1", "host-2"]
    assert all(tb.host(h) is not before[h] for h in tb.hosts), "every host is a fresh one"
    assert {g["name"]: g["host"] for g in tb.guests()} == home, "each guest back home"
    assert len(rep.moves) == 8 and rep.stats["by_status"] == {"completed": 8}
    frames_exact(tb)


@pytest.mark.inprocess
def test_rebalance_and_refusals(in_process):
    tb = in_process(hosts=3, host_memory_bytes=48 * MiB)
    for i in range(6):
        tb.create("host-0", GuestSpec(f"r{i}", 2 * MiB))
    with pytest.raises(ConfigError, match="drain it first"):
        restart_host(tb, "host-0")
    with pytest.raises(ConfigError, match="no host of the 3"):
        maintenance(tb, batch=3)
    rep = maintenance(tb, batch=2, rebalance=True, hosts=["host-0", "host-1"])
    assert rep.ok and rep.batches == [["host-0", "host-1"]]
    counts = [sum(g["host"] == h for g in tb.guests()) for h in tb.hosts]
    assert sorted(counts) == [2, 2, 2], counts
