"""Faults at every stage of a migration, and the promise kept under each.

Before the hand-over the guest runs on its source in its own mode (P2M) with its memory
intact, and the destination holds none of its frames; after the hand-over the guest runs on
the destination. A host that dies takes its own guests with it, and the report says so.
Every host's frame accounting stays exact, dead in-process hosts included.

The matrix runs on in-process hosts (real TCP, real vCPU threads); host kills are also run on
Ray, with throw-away host actors so the shared session cluster stays intact.
"""

import time

import pytest
import ray
from checks import wait_progress

from cluster.demo import sequential_edge_ok
from cluster.handles import RayHost
from cluster.launch.launcher import NAMESPACE
from nodes.errors import ConfigError, OutOfFramesError
from nodes.faults.spec import FaultKind, FaultSpec, faults_from_toml, parse_fault
from nodes.host.actor import start_host_actor
from nodes.host.specs import GuestSpec, HostConfig
from nodes.migration.decide.policy import (
    Decision,
    PrecopyPolicy,
    PrecopyStats,
    XenPolicy,
    register_policy,
)
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
FAST = 256 * MiB
TIMEOUT = 1.0          # every wait across hosts, in these tests
SHORT, LONG = "0.2s", "1.5s"   # a stall or delay inside, and beyond, the timeout

SRC, DST, LOST, REFUSED = "source", "destination", "lost", "refused"
PRE = ["setup", "round0", "round2", "stop-and-copy"]


def _matrix() -> list[tuple[str, str]]:
    rows = []
    for st in PRE:
        rows += [(f"kill-destination@{st}", SRC), (f"kill-source@{st}", LOST),
                 (f"stall-link@{st}:{SHORT}", DST), (f"stall-link@{st}:{LONG}", SRC),
                 (f"cut-link@{st}", SRC), (f"slow-link@{st}:32MiB", DST),
                 (f"corrupt-record@{st}", SRC), (f"truncate-stream@{st}", SRC),
                 (f"cut-channel@{st}:{1 if st == 'round0' else 0}", SRC)]
    rows += [("kill-destination@handover", LOST), ("kill-source@handover", DST),
             (f"stall-link@handover:{SHORT}", DST),
             (f"stall-link@handover:{LONG}", DST), ("cut-link@handover", DST),
             ("refuse-memory@setup", REFUSED),
             (f"delay-restore@stop-and-copy:{SHORT}", DST),
             (f"delay-restore@stop-and-copy:{LONG}", SRC),
             (f"delay-restore@handover:{SHORT}", DST),
             (f"delay-restore@handover:{LONG}", DST)]
    return rows


MATRIX = _matrix()


def all_services(tb) -> dict:
    return {n: h.service for n, h in {**tb.hosts, **tb.lost_hosts}.items()}


def frames_exact(tb) -> None:
    """Used frames are exactly those the domains own, on every host, dead ones included."""
    for name, svc in all_services(tb).items():
        c = svc.frame_counts()
        assert c["used"] == sum(svc.guest_frames().values()), f"{name}: frames leaked"
        assert c["free"] + c["used"] + c["reserved"] == c["total"]




def memory_intact(host, guest: str) -> None:
    """The sequential workload's counters: every write the vCPU made is in memory, once."""
    host.call("pause_guest", guest)
    try:
        counters = host.call("guest_counters", guest)
        written = host.call("guest_status", guest)["pages_written_total"]
    finally:
        host.call("unpause_guest", guest)
    assert sequential_edge_ok(counters), "guest memory damaged"
    assert int(counters.sum()) == written, "a write was lost or repeated"


def holds_none(svc, guest: str) -> None:
    frames = svc.guest_frames()
    assert guest not in frames and f"{guest}--migratedaway" not in frames, \
        f"{svc.name} still holds frames of {guest}: {frames}"


class ThreeRounds(PrecopyPolicy):
    """Xen's policy, but never before three live rounds: round 2 is always reached, however
    little a loaded machine lets the guest write, so every round fault fires."""

    name = "three-rounds"

    def __init__(self, **_: object):
        self.xen = XenPolicy()

    def decide(self, stats: PrecopyStats) -> Decision:
        return Decision.go_on() if stats.iteration < 3 else self.xen.decide(stats)


register_policy(ThreeRounds.name, ThreeRounds)


def settings(fault: str) -> MigrationSettings:
    channels = 2 if fault.startswith("cut-channel") else None   # multifd: a channel to cut
    return MigrationSettings(policy=ThreeRounds.name, link_bytes_per_second=FAST,
                             timeout_seconds=TIMEOUT, faults=(fault,), multifd_channels=channels)


@pytest.mark.parametrize("fault,outcome", MATRIX, ids=[f for f, _ in MATRIX])
def test_fault_at_every_stage(in_process, fault, outcome):
    """A busy guest (the sequential workload at full speed), and a policy that runs three
    live rounds at least, so every stage is reached."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=WorkloadSpec("sequential", 0)))
    time.sleep(0.05)
    src_svc, dst_svc = tb.host("host-0").service, tb.host("host-1").service
    dst_before = dst_svc.frame_counts()
    t0 = time.monotonic()
    if outcome == REFUSED:
        with pytest.raises(OutOfFramesError, match="refuse-memory"):
            tb.migrate("g", "host-1", settings(fault))
        assert dst_svc.frame_counts() == dst_before
        memory_intact(tb.host("host-0"), "g")
        frames_exact(tb)
        return
    r = tb.migrate("g", "host-1", settings(fault))
    elapsed = time.monotonic() - t0
    assert elapsed < 8 * TIMEOUT, "a fault must never hang a migration"
    assert [f["fired"] for f in r.faults] == [True], r.faults
    if outcome == SRC:
        assert r.status == "failed" and r.error and not r.guest_lost
        assert r.guest_host == "host-0" and tb.where("g") == "host-0"
        src = tb.host("host-0")
        status = src.call("guest_status", "g")
        assert status["mode"] == "p2m" and status["state"] == "running"
        assert not status["migrating"] and not status["logdirty"]
        wait_progress(src, "g")
        memory_intact(src, "g")
        holds_none(dst_svc, "g")
        if "host-1" in tb.hosts:
            assert dst_svc.frame_counts() == dst_before
    elif outcome == DST:
        assert r.status == "completed" and not r.guest_lost, (r.error, r.notes)
        assert r.guest_host == "host-1" and tb.where("g") == "host-1"
        expect_verified = None if fault.startswith("kill-source") else True
        assert r.integrity.verified is expect_verified
        dst = tb.host("host-1")
        status = dst.call("guest_status", "g")
        assert status["mode"] == "p2m" and status["state"] == "running"
        assert dst.call("page_table_problem", "g") is None
        wait_progress(dst, "g")
        memory_intact(dst, "g")
        if fault.startswith("kill-source"):
            assert "host-0" in tb.lost_hosts    # what a dead host held died with it
        else:
            holds_none(src_svc, "g")
    else:  # LOST: the host that ran the guest died, and the guest with it
        assert r.guest_lost and r.guest_host is None and r.notes
        dead = "host-0" if fault.startswith("kill-source") else "host-1"
        alive = "host-1" if dead == "host-0" else "host-0"
        assert dead in tb.lost_hosts and dead not in tb.hosts
        holds_none(all_services(tb)[alive], "g")
        assert not [g for g in tb.guests() if g["name"] == "g"]
    frames_exact(tb)


@pytest.mark.parametrize("fault", ["cut-link@setup", "cut-link@round0",
                                   "corrupt-record@stop-and-copy", "kill-destination@round0",
                                   f"stall-link@round0:{LONG}", "truncate-stream@round0"])
def test_idle_guest_digest_unchanged(in_process, fault):
    """An idle guest's memory digest is the same before and after a failed migration."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("idle", 8 * MiB))
    src = tb.host("host-0")
    digest = src.call("guest_digest", "idle")
    r = tb.migrate("idle", "host-1", settings(fault))
    assert r.status == "failed" and r.guest_host == "host-0"
    assert src.call("guest_digest", "idle") == digest
    assert src.call("guest_status", "idle")["mode"] == "p2m"
    holds_none(all_services(tb)["host-1"], "idle")
    frames_exact(tb)


def test_a_stall_longer_than_the_timeout_ends_with_the_timeout(in_process):
    """No wait across hosts is unbounded: a 60 s stall fails after about the timeout."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("s", 4 * MiB, workload=WorkloadSpec("uniform", 2000)))
    t0 = time.monotonic()
    r = tb.migrate("s", "host-1", settings("stall-link@round0:60s"))
    assert r.status == "failed" and "gave up" in r.error
    assert time.monotonic() - t0 < 4 * TIMEOUT
    wait_progress(tb.host("host-0"), "s")


def test_operator_cancel_ends_a_stall(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("c", 4 * MiB))
    t0 = time.monotonic()
    r = tb.migrate("c", "host-1", MigrationSettings(timeout_seconds=30, faults=(
        "stall-link@round0:20s",)), should_cancel=lambda: time.monotonic() - t0 > 0.2)
    assert r.status == "cancelled" and time.monotonic() - t0 < 5
    assert tb.where("c") == "host-0"
    frames_exact(tb)


def test_slow_link_slows_the_rounds_after_it(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    # Memory with content: round 0 sends every page whole, so later rounds have pages.
    tb.create("host-0", GuestSpec("b", 4 * MiB, workload=WorkloadSpec("uniform", 0,
                                                                      fill="random")))
    time.sleep(0.05)
    r = tb.migrate("b", "host-1", MigrationSettings(link_bytes_per_second=FAST, faults=(
        "slow-link@round1:32MiB",)))
    assert r.status == "completed" and r.integrity.verified
    later = [x for x in r.rounds if x["index"] >= 2 and x["pages_sent"] > 256]
    # The slowed link's pacer bounds every later round from above (no timing luck needed).
    assert later and all(x["throughput_bytes_per_second"] < 32 * MiB * 1.25 for x in later)


def test_faults_show_in_metrics(in_process):
    """The surviving host counts the injected fault and the connection it lost."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("m", 4 * MiB))
    r = tb.migrate("m", "host-1", settings("cut-link@round0"))
    assert r.status == "failed"
    src_text = tb.host("host-0").service.metrics.render().decode()
    dst_text = tb.host("host-1").service.metrics.render().decode()
    assert 'migbed_faults_injected_total{host="host-0",kind="cut-link",stage="precopy"} 1.0' \
        in src_text
    assert 'migbed_migration_connection_lost_total{host="host-1",role="destination"} 1.0' \
        in dst_text


def test_kill_in_process_host_by_api(in_process):
    tb = in_process(hosts=3, host_memory_bytes=64 * MiB)
    tb.create("host-2", GuestSpec("doomed", 4 * MiB))
    tb.create("host-0", GuestSpec("safe", 4 * MiB))
    tb.kill("host-2")
    assert "host-2" not in tb.hosts and [g["name"] for g in tb.guests()] == ["safe"]
    with pytest.raises(Exception, match="gone"):
        tb.lost_hosts["host-2"].call("ping")
    assert tb.migrate("safe", "host-1").status == "completed"


# -- the fault model as data -------------------------------------------------------------------
def test_fault_text_dict_and_settings_round_trip():
    for text in ("kill-destination@stop-and-copy", "stall-link@round3:2s",
                 "slow-link@round0:1MiB", "delay-restore@handover:500ms",
                 "refuse-memory@setup", "cut-link@handover"):
        f = parse_fault(text)
        assert parse_fault(f.to_text()) == f
        assert FaultSpec.from_dict(f.to_dict()) == f
    s = MigrationSettings(faults=("stall-link@round1:2s", {"kind": "kill-source",
                                                           "stage": "handover"}))
    assert all(isinstance(f, FaultSpec) for f in s.faults)
    import json
    assert MigrationSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert parse_fault("slow-link@round0:1MiB").bandwidth_bytes_per_second == MiB
    assert parse_fault("stall-link@round3:2s") == FaultSpec("stall-link", "precopy", 3, 2.0)


def test_faults_from_toml_for_scenarios():
    import tomllib
    doc = tomllib.loads('''
        faults = [
            "cut-link@round1",
            {kind = "slow-link", stage = "precopy", round = 2, bandwidth = "1MiB"},
            {kind = "stall-link", stage = "stop-and-copy", duration = "300ms"},
        ]
    ''')
    got = faults_from_toml(doc["faults"])
    assert got == (FaultSpec("cut-link", "precopy", 1),
                   FaultSpec("slow-link", "precopy", 2, bandwidth_bytes_per_second=MiB),
                   FaultSpec("stall-link", "stop-and-copy", duration_seconds=0.3))
    assert faults_from_toml(None) == ()


def test_every_kind_and_stage_is_in_the_matrix():
    from nodes.faults.spec import ALL_STAGES, KINDS
    tried = {(parse_fault(f).kind, parse_fault(f).stage) for f, _ in MATRIX + POSTCOPY_MATRIX}
    for kind, (stages, _, _) in KINDS.items():
        for stage in stages:
            assert (kind.value, stage.value) in tried, (kind, stage)
    assert len(FaultKind) == 10 and len(ALL_STAGES) == 5


BAD_FAULTS = [
    "explode@setup", "stall-link", "stall-link@", "@setup", "stall-link@round0",
    "stall-link@round0:0s", "stall-link@round0:-1s", "stall-link@round0:soon",
    "stall-link@round0:2h", "slow-link@round0", "slow-link@round0:0", "slow-link@round0:fast",
    "slow-link@handover:1MiB", "corrupt-record@handover",
    "truncate-stream@handover", "refuse-memory@round0", "delay-restore@setup:1s",
    "delay-restore@round1:1s", "cut-link@roundx", "cut-link@round-1", "cut-link@later",
    "cut-link@setup:2s", "kill-source@setup:", "x" * 300,
    "cut-channel@round0", "cut-channel@round0:one", "cut-channel@handover:0",
]


@pytest.mark.parametrize("text", BAD_FAULTS)
def test_bad_faults_are_refused(text):
    with pytest.raises(ConfigError):
        parse_fault(text)


BAD_TOML_FAULTS = [
    "cut-link@setup",                                  # not a list
    [5], [{"stage": "setup"}], [{"kind": "cut-link", "stage": 3}],
    [{"kind": "cut-link", "stage": "round"}],          # round without a number
    [{"kind": "cut-link", "stage": "round1", "round": 1}],
    [{"kind": "cut-link", "when": "now"}],
    [{"kind": "stall-link", "stage": "setup", "duration": "forever"}],
    [{"kind": "slow-link", "stage": "setup", "bandwidth": "-1MiB"}],
    [{"kind": "cut-link", "stage": "precopy", "round": -2}],
]


@pytest.mark.parametrize("items", BAD_TOML_FAULTS)
def test_bad_scenario_faults_are_refused(items):
    with pytest.raises(ConfigError):
        faults_from_toml(items)


# -- after a post-copy switch ----------------------------------------------------------------
PAUSED = "paused"          # postcopy-paused, then `recover` brings it home on the destination
POSTCOPY_MATRIX = [
    (f"stall-link@postcopy:{SHORT}", DST), (f"stall-link@postcopy:{LONG}", DST),
    ("cut-link@postcopy", PAUSED), ("slow-link@postcopy:32MiB", DST),
    ("corrupt-record@postcopy", DST), ("truncate-stream@postcopy", DST),
    ("kill-destination@postcopy", LOST), ("kill-source@postcopy", LOST),
    # before the switch a migration that allows post-copy is pre-copy
    ("cut-link@round0", SRC), ("kill-destination@round0", SRC), ("kill-source@round0", LOST),
    ("stall-link@setup:1.5s", SRC),
]


def postcopy_settings(fault: str) -> MigrationSettings:
    """Hybrid: one live round, then post-copy with its push slowed, so the guest faults."""
    return MigrationSettings(link_bytes_per_second=FAST, timeout_seconds=TIMEOUT,
                             postcopy_after_rounds=1,
                             postcopy_bandwidth_bytes_per_second=16 * MiB, faults=(fault,))


@pytest.mark.parametrize("fault,outcome", POSTCOPY_MATRIX, ids=[f for f, _ in POSTCOPY_MATRIX])
def test_fault_around_the_postcopy_switch(in_process, fault, outcome):
    """After the switch the guest runs on the destination: a link fault pauses the
    migration until the link is back (by itself within the timeout, else migrate-recover)
    and it completes with memory verified; a host that dies loses the guest, and the other
    host frees its frames. Before the switch, as pre-copy."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=WorkloadSpec("sequential", 20000)))
    time.sleep(0.05)
    src_svc, dst_svc = tb.host("host-0").service, tb.host("host-1").service
    t0 = time.monotonic()
    r = tb.migrate("g", "host-1", postcopy_settings(fault))
    assert time.monotonic() - t0 < 8 * TIMEOUT, "a fault must never hang a migration"
    assert [f["fired"] for f in r.faults] == [True], r.faults
    if outcome == PAUSED:
        assert r.status == "postcopy-paused" and not r.guest_lost and r.guest_host == "host-1"
        assert "migrate-recover g" in r.error and r.modes["after"] == "vp"
        status = tb.host("host-1").call("guest_status", "g")
        assert status["state"] == "running" and status["mode"] == "vp"   # a fault waits
        r = tb.recover("g")
        assert r.postcopy["recoveries"] >= 1
        outcome = DST
    if outcome == DST:
        assert r.status == "completed" and r.integrity.verified is True, (r.error, r.notes)
        assert r.guest_host == "host-1" and tb.where("g") == "host-1"
        assert r.stop_code == "postcopy" and r.postcopy["pages_applied_more_than_once"] == 0
        status = tb.host("host-1").call("guest_status", "g")
        assert status["mode"] == "p2m" and status["state"] == "running"
        wait_progress(tb.host("host-1"), "g")
        memory_intact(tb.host("host-1"), "g")
        holds_none(src_svc, "g")
        if fault.startswith(("stall-link@postcopy:1.5", "corrupt", "truncate")):
            assert r.postcopy["recoveries"] >= 1, "the link broke, and came back by itself"
    elif outcome == SRC:
        assert r.status == "failed" and r.guest_host == "host-0" and r.postcopy is None
        wait_progress(tb.host("host-0"), "g")
        memory_intact(tb.host("host-0"), "g")
        holds_none(dst_svc, "g")
    else:
        assert r.status == "failed" and r.guest_lost and r.guest_host is None and r.notes
        dead = "host-0" if fault.startswith("kill-source") else "host-1"
        alive = "host-1" if dead == "host-0" else "host-0"
        assert dead in tb.lost_hosts
        holds_none(all_services(tb)[alive], "g")
        if fault.endswith("@postcopy"):
            assert "neither host has all of it" in " ".join(r.notes)
    frames_exact(tb)


def test_recovery_resends_what_the_destination_lacks(in_process):
    """A cut link, paused past the timeout, then migrate-recover: the destination's received
    set crosses on the new connection, the rest goes again, and nothing lands twice."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("r", 8 * MiB, workload=WorkloadSpec("uniform", 20000)))
    time.sleep(0.05)
    r = tb.migrate("r", "host-1", MigrationSettings(
        link_bytes_per_second=FAST, timeout_seconds=TIMEOUT, postcopy_after_rounds=0,
        postcopy_bandwidth_bytes_per_second=8 * MiB, faults=("cut-link@postcopy",)))
    assert r.status == "postcopy-paused"
    with pytest.raises(Exception, match="no post-copy migration of nope is paused"):
        tb.recover("nope")
    r = tb.recover("r")
    b = r.postcopy
    assert r.status == "completed" and r.integrity.verified and b["recoveries"] == 1
    assert b["pages_applied"] == b["discard_pages"] == 2048
    assert b["pages_applied_more_than_once"] == 0 and b["paused_seconds"] >= TIMEOUT
    assert r.precopy_bytes + r.downtime_bytes + r.postcopy_bytes == r.bytes_sent_total
    memory_intact_uniform(tb.host("host-1"), "r")
    frames_exact(tb)


def memory_intact_uniform(host, guest: str) -> None:
    host.call("pause_guest", guest)
    try:
        assert int(host.call("guest_counters", guest).sum()) == \
            host.call("guest_status", guest)["pages_written_total"]
    finally:
        host.call("unpause_guest", guest)


def test_postcopy_faults_in_scenario_files():
    assert faults_from_toml(["cut-link@postcopy", {"kind": "stall-link", "stage": "postcopy",
                                                   "duration": "2s"}]) == (
        FaultSpec("cut-link", "postcopy"), FaultSpec("stall-link", "postcopy",
                                                     duration_seconds=2.0))
    with pytest.raises(ConfigError, match="delay-restore cannot happen at postcopy"):
        parse_fault("delay-restore@postcopy:1s")


# -- host kills on Ray --------------------------------------------------------------------
@pytest.fixture
def doomed(ray_testbed, unique_name):
    """A throw-away host actor on host-2's node, removed after the test."""
    tb = ray_testbed
    cfg = HostConfig(name=unique_name("doomed"), memory_bytes=64 * MiB)
    actor = start_host_actor(cfg, detached=False, namespace=NAMESPACE,
                             node_id=tb.host("host-2").call("node_id"))
    tb.hosts[cfg.name] = RayHost(cfg.name, actor)
    tb.host(cfg.name).call("ping")
    try:
        yield cfg.name
    finally:
        tb.hosts.pop(cfg.name, None)
        tb.lost_hosts.pop(cfg.name, None)
        ray.kill(actor, no_restart=True)


def ray_frames_exact(tb) -> None:
    for name, h in tb.hosts.items():
        c = h.call("frame_counts")
        assert c["used"] == sum(h.call("guest_frames").values()), f"{name}: frames leaked"


@pytest.mark.parametrize("fault,outcome", [
    ("kill-destination@round1", SRC), ("kill-destination@stop-and-copy", SRC),
    ("kill-source@round0", LOST),
    ("kill-source@handover", DST), ("kill-destination@handover", LOST)])
def test_host_kills_on_ray(ray_testbed, doomed, unique_name, fault, outcome):
    tb = ray_testbed
    name = unique_name("k")
    kill_source = fault.startswith("kill-source")
    src, dst = (doomed, "host-0") if kill_source else ("host-0", doomed)
    before = tb.host("host-0").call("frame_counts")
    tb.create(src, GuestSpec(name, 8 * MiB, workload=WorkloadSpec("sequential", 0)))
    time.sleep(0.05)
    r = tb.migrate(name, dst, MigrationSettings(link_bytes_per_second=64 * MiB,
                                                timeout_seconds=5, faults=(fault,)))
    assert doomed in tb.lost_hosts and doomed not in tb.hosts
    assert r.faults[0]["killed_host"] == doomed
    if outcome == SRC:
        assert r.status == "failed" and r.guest_host == "host-0"
        wait_progress(tb.host("host-0"), name)
        memory_intact(tb.host("host-0"), name)
        tb.destroy(name)
    elif outcome == DST:
        assert r.status == "completed" and r.guest_host == "host-0" and not r.guest_lost
        wait_progress(tb.host("host-0"), name)
        memory_intact(tb.host("host-0"), name)
        tb.destroy(name)
    else:
        assert r.guest_lost and r.notes
        with pytest.raises(Exception):  # noqa: B017 - gone from every live host
            tb.where(name)
    assert tb.host("host-0").call("frame_counts") == before
    ray_frames_exact(tb)


@pytest.mark.parametrize("fault", ["kill-source@postcopy", "kill-destination@postcopy"])
def test_a_host_dying_after_the_postcopy_switch_loses_the_guest_on_ray(
        ray_testbed, doomed, unique_name, fault):
    """Neither host has all of the guest after the switch: the report says it is lost, exit
    1 on the CLI, and the surviving host's frames are all accounted for (its copy freed)."""
    tb = ray_testbed
    name = unique_name("pk")
    kill_source = fault.startswith("kill-source")
    src, dst = (doomed, "host-0") if kill_source else ("host-0", doomed)
    before = tb.host("host-0").call("frame_counts")
    tb.create(src, GuestSpec(name, 8 * MiB, workload=WorkloadSpec("uniform", 20000)))
    time.sleep(0.05)
    r = tb.migrate(name, dst, MigrationSettings(
        link_bytes_per_second=64 * MiB, timeout_seconds=2, postcopy_after_rounds=0,
        postcopy_bandwidth_bytes_per_second=4 * MiB, faults=(fault,)))
    assert doomed in tb.lost_hosts and r.faults[0]["killed_host"] == doomed
    assert r.status == "failed" and r.guest_lost and r.guest_host is None
    assert "neither host has all of it" in " ".join(r.notes)
    with pytest.raises(Exception):  # noqa: B017 - gone from every live host
        tb.where(name)
    assert tb.host("host-0").call("frame_counts") == before
    ray_frames_exact(tb)


# -- the CLI on a running cluster (an in-process one stands in for `migbed up`'s) -----------
@pytest.fixture
def attached(in_process, monkeypatch):
    from cluster.testbed import Testbed
    tb = in_process(hosts=3, host_memory_bytes=64 * MiB)
    monkeypatch.setattr(Testbed, "attach", classmethod(lambda cls: tb))
    return tb


def test_cli_migrate_with_a_fault(attached, capsys):
    import json

    from cluster import cli
    attached.create("host-0", GuestSpec("vm1", 4 * MiB, workload=WorkloadSpec("uniform", 2000)))
    rc = cli.main(["migrate", "vm1", "host-1", "--fault", "cut-link@round0", "--json",
                   "--timeout", "2s"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["status"] == "failed" and report["guest_host"] == "host-0"
    assert report["faults"] == [{"fault": "cut-link@round0", "fired": True}]
    rc = cli.main(["migrate", "vm1", "host-2", "--fault", "kill-source@handover"])
    out = capsys.readouterr().out
    assert rc == 0 and "fault kill-source@handover: fired, killed host-0" in out
    assert "guest: on host-2" in out and attached.where("vm1") == "host-2"


def test_cli_fault_kill_and_list(attached, capsys):
    from cluster import cli
    attached.create("host-1", GuestSpec("gone", 4 * MiB))
    assert cli.main(["fault", "kill", "host-1"]) == 0
    assert "its guests died with it: gone" in capsys.readouterr().out
    assert "host-1" not in attached.hosts
    assert cli.main(["fault", "list"]) == 0
    out = capsys.readouterr().out
    assert all(k.value in out for k in FaultKind)


def test_cli_evacuate(attached, capsys):
    import json

    from cluster import cli
    for i in range(2):
        attached.create("host-0", GuestSpec(f"v{i}", 4 * MiB))
    rc = cli.main(["evacuate", "host-0", "--concurrency", "2", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["ok"] and len(rep["moves"]) == 2
