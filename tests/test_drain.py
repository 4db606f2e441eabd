"""Draining hosts: destinations by room and load (and across racks with spread), under the
limits, a host that dies mid-drain stopping only its own migrations; the fleet statistics,
their Prometheus text and plot."""

import pytest
from checks import frames_exact

from cluster.drain import drain, plan_drain
from cluster.fleetstats import distribution, fleet_stats, peak_parallel, prometheus_text
from cluster.scheduler import Limits
from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings

MiB = 1024 * 1024


def test_distribution_and_peak():
    d = distribution([0.001 * i for i in range(1, 101)] + [None])
    assert d["count"] == 100 and d["max"] == pytest.approx(0.1)
    assert d["p50"] == pytest.approx(0.0505) and d["p99"] == pytest.approx(0.09901)
    assert distribution([None]) is None
    entries = [{"started_at": 0, "ended_at": 2}, {"started_at": 1, "ended_at": 3},
               {"started_at": 2, "ended_at": 4}, {"started_at": 5, "ended_at": None}]
    assert peak_parallel(entries) == 2, "one ending as another starts is not an overlap"
    stats = fleet_stats([{"status": "completed", "downtime_seconds": 0.002,
                          "total_time_seconds": 1.0, "bytes_sent": 10, "schedule": None},
                         {"status": "failed"}])
    assert stats["by_status"] == {"completed": 1, "failed": 1}
    text = prometheus_text(stats, "t")
    assert 'migbed_fleet_downtime_seconds{quantile="0.99",run="t"} 0.002' in text
    assert 'migbed_fleet_migrations{run="t",status="failed"} 1.0' in text


@pytest.mark.inprocess
def test_drain_by_room_and_load_under_limits(in_process, tmp_path):
    tb = in_process(hosts=5, host_memory_bytes=64 * MiB, racks=2)   # racks: 0-2, 3-4
    for i in range(4):
        tb.create("host-0", GuestSpec(f"d{i}", 2 * MiB))
    tb.create("host-1", GuestSpec("busy", 2 * MiB))
    moves, stayed = plan_drain(tb, ["host-0"])
    assert not stayed and "host-1" not in [m.destination for m in moves[:3]], "by load"
    spread, _ = plan_drain(tb, ["host-0"], spread=True)
    racks = [tb.topology.rack_of(m.destination) for m in spread]
    assert racks.count(1) == 2 and racks.count(0) == 2, "spread over both racks"
    with pytest.raises(ConfigError, match="drained and a destination"):
        plan_drain(tb, ["host-0"], to=["host-0"])
    rep = drain(tb, ["host-0"], to=["host-3", "host-4"],
                limits=Limits(max_parallel=2, max_inbound_per_host=1),
                settings=MigrationSettings(link_bytes_per_second=64 * MiB))
    assert rep.ok and {m.destination for m in rep.moves} == {"host-3", "host-4"}
    assert rep.stats["by_status"] == {"completed": 4}
    assert rep.stats["peak_parallel"] <= 2 and rep.stats["downtime_seconds"]["count"] == 4
    for dst in ("host-3", "host-4"):
        assert peak_parallel([m.schedule for m in rep.moves if m.destination == dst]) <= 1, \
            "one arriving at a host at a time (max-inbound-per-host 1)"
    assert "downtime   p50" in rep.table()
    from cluster.drain import move_dict
    from cluster.fleetstats import draw_fleet
    png = draw_fleet([move_dict(m, rep.reports) for m in rep.moves], tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frames_exact(tb)


@pytest.mark.inprocess
def test_a_host_dying_mid_drain_stops_only_its_migrations(in_process):
    tb = in_process(hosts=4, host_memory_bytes=64 * MiB)
    for i in range(3):
        tb.create("host-0", GuestSpec(f"a{i}", 2 * MiB))
        tb.create("host-1", GuestSpec(f"b{i}", 2 * MiB))
    killed = []

    def on_event(what, move):
        if what == "ended" and not killed:
            killed.append(True)
            tb.kill("host-1")          # mid-drain: one move has ended, the rest wait
    rep = drain(tb, ["host-0", "host-1"], limits=Limits(max_parallel=1),
                on_event=on_event)
    by_src = {h: [m for m in rep.moves if m.source == h] for h in ("host-0", "host-1")}
    for m in by_src["host-0"]:
        assert m.status == "completed" and m.verified, m
    lost = [m for m in by_src["host-1"] if m.status != "completed"]
    assert lost and all(m.error for m in lost), "host-1's moves after its death failed"
    assert not rep.ok


@pytest.mark.inprocess
def test_ctrl_c_cancels_what_has_not_started(in_process):
    """Ctrl-C (SIGINT to the main thread) mid-drain: the running migration ends, the queued
    ones never start and their guests stay where they were."""
    import signal
    import threading
    tb = in_process(hosts=3, host_memory_bytes=64 * MiB)
    for i in range(4):
        tb.create("host-0", GuestSpec(f"c{i}", 2 * MiB))
    sent = []

    def on_event(what, move):
        if what == "started" and not sent:
            sent.append(move.guest)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        drain(tb, ["host-0"], limits=Limits(max_parallel=1), on_event=on_event)
    states = {e["guest"]: e["state"] for e in tb.scheduler.call("entries")}
    assert states[sent[0]] == "completed"
    assert sorted(s for g, s in states.items() if g != sent[0]) == ["cancelled"] * 3
    assert {g["name"] for g in tb.guests() if g["host"] == "host-0"} == \
        {f"c{i}" for i in range(4)} - {sent[0]}
