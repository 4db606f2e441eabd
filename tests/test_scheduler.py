"""The migration scheduler: limits never exceeded, cancelling a queued migration, the max-min
fair rates over racks and uplinks, bad limits refused; and, in process, an evacuation under
limits whose every migration went through the queue (its report says when it waited)."""

import random

import pytest
from checks import frames_exact

from cluster.fairshare import Topology, max_min_rates
from cluster.scheduler import PRESETS, Limits, MigrationScheduler
from nodes.errors import ConfigError, MigrationError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings

MiB = 1024 * 1024
HOSTS = [f"host-{i}" for i in range(6)]


def _counts(sched: MigrationScheduler) -> tuple[int, dict, dict]:
    running = [e for e in sched.entries() if e["state"] == "running"]
    out: dict = {}
    inc: dict = {}
    for e in running:
        out[e["source"]] = out.get(e["source"], 0) + 1
        inc[e["destination"]] = inc.get(e["destination"], 0) + 1
    return len(running), out, inc


@pytest.mark.parametrize("limits", [Limits(2, 1, 1), Limits(3, 2, None),
                                    PRESETS["kubevirt"], Limits(None, None, 1)])
def test_limits_are_never_exceeded(limits):
    """Random submissions and finishes: after every step, what runs is within every limit,
    and a migration waits only when some limit (or its guest's other move) holds it."""
    rng = random.Random(7)
    sched = MigrationScheduler(limits=limits)
    ids = []
    for i in range(40):
        src, dst = rng.sample(HOSTS, 2)
        ids.append(sched.submit(f"g{i}", src, dst))
    steps = 0
    while True:
        n, out, inc = _counts(sched)
        assert limits.max_parallel is None or n <= limits.max_parallel
        assert limits.max_outbound_per_host is None or max(out.values(), default=0) \
            <= limits.max_outbound_per_host
        assert limits.max_inbound_per_host is None or max(inc.values(), default=0) \
            <= limits.max_inbound_per_host
        running = [e["id"] for e in sched.entries() if e["state"] == "running"]
        if not running:
            break
        sched.finish(rng.choice(running), "completed")
        steps += 1
    assert steps == 40, "every migration ran once the others made room"
    assert not [e for e in sched.entries() if e["state"] == "queued"]
    if limits.max_parallel:
        waited = [e for e in sched.entries() if e["started_at"] > e["queued_at"]]
        assert waited, "with 40 submitted and a limit, some waited"


def test_no_head_of_line_blocking_and_group_limits():
    sched = MigrationScheduler(limits=Limits(max_outbound_per_host=1))
    a = sched.submit("a", "host-0", "host-1")
    b = sched.submit("b", "host-0", "host-2")          # host-0 busy: b waits
    c = sched.submit("c", "host-3", "host-4")          # but c, behind it, starts
    assert [sched.entry(m)["state"] for m in (a, b, c)] == ["running", "queued", "running"]
    g = sched.open_group(Limits(max_parallel=1))
    d = sched.submit("d", "host-5", "host-1", group=g)
    e = sched.submit("e", "host-2", "host-1", group=g)
    assert sched.entry(d)["state"] == "running" and sched.entry(e)["state"] == "queued"
    sched.finish(d, "completed")
    assert sched.entry(e)["state"] == "running"
    with pytest.raises(MigrationError, match="already"):
        sched.submit("e", "host-1", "host-3")          # one guest, one move at a time


def test_cancel_a_queued_migration():
    sched = MigrationScheduler(limits=Limits(max_parallel=1))
    first = sched.submit("a", "host-0", "host-1")
    second = sched.submit("b", "host-0", "host-2")
    assert sched.cancel(second)["state"] == "cancelled"
    assert sched.wait_turn(second, 0.0)["state"] == "cancelled"
    assert sched.cancel(first)["state"] == "running", "a running one is not cancelled here"
    sched.finish(first, "completed")
    assert sched.entry(second)["state"] == "cancelled", "a cancelled one never starts"
    with pytest.raises(MigrationError, match="no migration"):
        sched.cancel("nope")


def test_bad_limits_are_refused_with_one_line():
    for bad in (dict(max_parallel=0), dict(max_outbound_per_host=-1),
                dict(max_inbound_per_host=2.5), dict(max_parallel=True),
                dict(rate_limit_bytes_per_second=0)):
        with pytest.raises(ConfigError) as exc:
            Limits(**bad)
        assert "\n" not in str(exc.value) and "--" in str(exc.value)
    with pytest.raises(ConfigError, match="racks"):
        Topology.striped(HOSTS, 0)
    with pytest.raises(ConfigError, match="rack needs a host"):
        Topology.striped(HOSTS[:2], 3)


def test_max_min_fair_rates_over_uplinks():
    topo = Topology.striped([f"h{i}" for i in range(12)], 2, host_link=100.0, uplink=100.0)
    assert topo.links("h0", "h1") == ["h0/out", "h1/in"]
    assert topo.links("h0", "h6") == ["h0/out", "rack-0/up", "rack-1/down", "h6/in"]
    # Four cross-rack flows through one uplink share it; an in-rack one is untouched;
    # a capped flow leaves its unused share to the others.
    flows = {f"x{i}": (topo.links(f"h{i}", f"h{6 + i}"), float("inf")) for i in range(4)}
    flows["local"] = (topo.links("h10", "h11"), float("inf"))
    rates = max_min_rates(flows, topo.capacity)
    assert [rates[f"x{i}"] for i in range(4)] == pytest.approx([25.0] * 4)
    assert rates["local"] == pytest.approx(100.0)
    flows["x0"] = (flows["x0"][0], 10.0)
    rates = max_min_rates(flows, topo.capacity)
    assert rates["x0"] == pytest.approx(10.0)
    assert [rates[f"x{i}"] for i in (1, 2, 3)] == pytest.approx([30.0] * 3)
    assert max_min_rates({"free": (["a/out"], float("inf"))},
                         Topology().capacity)["free"] == float("inf")


def test_the_scheduler_pushes_each_senders_share():
    pushed: list = []
    topo = Topology.striped(HOSTS[:4], 2, host_link=None, uplink=64.0)
    sched = MigrationScheduler(topo, push=lambda s, m, r: pushed.append((s, m, r)))
    a = sched.submit("a", "host-0", "host-2")
    assert pushed[-1] == ("host-0", a, 64.0)
    b = sched.submit("b", "host-1", "host-3")
    assert sorted(p[2] for p in pushed[-2:]) == [32.0, 32.0]
    sched.finish(a, "completed")
    assert pushed[-1] == ("host-1", b, 64.0)
    share = sched.finish(b, "completed")["link_share"]
    assert set(share) == {"host-1/out", "rack-0/up", "rack-1/down", "host-3/in"}
    assert share["host-1/out"] is None and 0.5 <= share["rack-0/up"] <= 1.0


@pytest.mark.inprocess
def test_evacuation_under_limits_goes_through_the_queue(in_process):
    tb = in_process(hosts=4, host_memory_bytes=64 * MiB)
    for i in range(4):
        tb.create("host-0", GuestSpec(f"q{i}", 2 * MiB))
    tb.create("host-1", GuestSpec("other", 2 * MiB))
    rep = tb.evacuate("host-0", None, MigrationSettings(link_bytes_per_second=64 * MiB),
                      limits=Limits(max_parallel=3, max_outbound_per_host=1))
    assert rep.ok and len(rep.moves) == 4
    spans = sorted((m.schedule["started_at"], m.schedule["ended_at"]) for m in rep.moves)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, "one at a time out of host-0 (max-outbound-per-host 1)"
    assert all(r["schedule"]["links"] for r in rep.reports)
    r = tb.migrate("other", "host-2")
    assert r.schedule["state"] == "completed" and r.schedule["wait_seconds"] >= 0
    frames_exact(tb)


@pytest.mark.inprocess
def test_migrations_between_racks_share_the_uplink(in_process):
    """Two migrations from rack 0 to rack 1 through a 16 MiB/s uplink: each is told half
    of it and paces itself there, so together they never beat it (bounded from above only:
    a loaded machine may make them slower, never faster)."""
    import threading

    from workloads.spec import WorkloadSpec
    uplink = 16 * MiB
    tb = in_process(hosts=4, host_memory_bytes=64 * MiB, racks=2,
                    uplink_bytes_per_second=uplink)
    full = WorkloadSpec("idle", fill="random")
    for i in range(2):
        tb.create(f"host-{i}", GuestSpec(f"r{i}", 4 * MiB, workload=full))
    reports = {}
    threads = [threading.Thread(target=lambda i=i: reports.__setitem__(
        i, tb.migrate(f"r{i}", f"host-{2 + i}"))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in reports.values():
        assert r.status == "completed" and r.integrity.verified
        assert "rack-0/up" in r.schedule["links"] and "rack-1/down" in r.schedule["links"]
        assert r.schedule["rates"][0][1] <= uplink
    assert sum(r.throughput_bytes_per_second for r in reports.values()) < uplink * 1.15
    frames_exact(tb)
