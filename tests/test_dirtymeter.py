"""Measuring a running guest without migrating it (`nodes.host.dirtymeter`): each mode against
a guest whose true rate its own counters give, the WWS of a hotset guest, the refusals."""

import time

import pytest

from nodes.errors import ConfigError, MigrationError
from nodes.host.specs import GuestSpec
from workloads.patterns import hot_pages
from workloads.spec import WorkloadSpec
from workloads.writableset import WssCurve

MiB = 1 << 20


def _guest(in_process, pattern: str, rate: float, memory: int = 32 * MiB, vcpu: str = "thread"):
    tb = in_process(hosts=1, host_memory_bytes=128 * MiB)
    tb.create("host-0", GuestSpec("g", memory, "p2m", workload=WorkloadSpec(pattern, rate),
                                  vcpu=vcpu))
    time.sleep(0.1)
    return tb.host("host-0")


def _hot_pages(host, memory: int) -> int:
    status = host.call("guest_status", "g")
    data_pages = memory // 4096 - -(-memory // 4096 // 512)
    return hot_pages(WorkloadSpec.from_dict(status["workload"]), data_pages)


def _wss_recovers_the_hot_set(host, memory: int, within: float) -> WssCurve:
    curve = WssCurve.from_dict(host.call("measure_wss", "g", 1.0, 0.01))
    hot = _hot_pages(host, memory)
    assert abs(curve.wws_pages - hot) / hot < within, (curve.wws_pages, hot)
    status = host.call("guest_status", "g")
    assert status["mode"] == "p2m" and not status["logdirty"]     # back as it was
    return curve


def test_wss_of_a_hotset_thread_guest_is_its_hot_set(in_process):
    host = _guest(in_process, "hotset", 10000, 16 * MiB)
    # A thread guest writes from the host's own process: on a loaded machine (the whole
    # suite on two cores) its writes come in bursts between the other threads' turns and the
    # fit reads a hot set up to half its size; found, not the whole memory, is what holds.
    curve = _wss_recovers_the_hot_set(host, 16 * MiB, within=0.6)
    assert curve.vcpu == "thread" and curve.dirty_log == "emulated"


@pytest.mark.uffd
def test_wss_of_a_hotset_process_guest_is_its_hot_set(in_process, uffd_kernel):
    host = _guest(in_process, "hotset", 10000, 16 * MiB, vcpu="process")
    curve = _wss_recovers_the_hot_set(host, 16 * MiB, within=0.25)
    assert curve.vcpu == "process" and curve.dirty_log == "kernel"


def test_dirty_bitmap_and_dirty_ring_match_the_guests_own_counters(in_process):
    host = _guest(in_process, "uniform", 3000)
    bitmap = host.call("measure_dirty_rate", "g", "dirty-bitmap", 0.5, 512)
    assert bitmap["true_pages_per_second"] > 0
    assert abs(bitmap["pages_per_second"] / bitmap["true_pages_per_second"] - 1) < 0.05
    assert bitmap["bytes_per_second"] == bitmap["pages_per_second"] * 4096
    ring = host.call("measure_dirty_rate", "g", "dirty-ring", 0.5, 512)
    assert len(ring["vcpu_pages_per_second"]) == 1
    assert abs(sum(ring["vcpu_pages_per_second"]) / ring["true_writes_per_second"] - 1) < 0.05
    sampled = host.call("measure_dirty_rate", "g", "page-sampling", 0.5, 4096)
    assert sampled["sample_pages"] == 128           # 4096 per GiB of a 32 MiB guest
    assert 0 <= sampled["sample_changed"] <= sampled["sample_pages"]


def test_page_sampling_of_an_idle_guest_sees_nothing(in_process):
    host = _guest(in_process, "idle", 0)
    out = host.call("measure_dirty_rate", "g", "page-sampling", 0.2, 512)
    assert out["pages_per_second"] == 0 and out["true_pages_per_second"] == 0


def test_a_measured_guest_is_not_migrated_and_a_migrating_one_not_measured(in_process):
    host = _guest(in_process, "uniform", 1000)
    service = host.service
    service._measurable("g")                    # a measurement holds the guest
    with pytest.raises(MigrationError, match="being measured"):
        host.call("check_migratable", "g")
    with pytest.raises(MigrationError, match="being measured"):
        host.call("measure_wss", "g", 0.1, 0.01)
    service._measuring.discard("g")
    service.hv.guest("g").migrating = True      # what a migration's sender sets
    try:
        with pytest.raises(MigrationError, match="is migrating"):
            host.call("measure_dirty_rate", "g", "dirty-bitmap", 0.1, 512)
    finally:
        service.hv.guest("g").migrating = False


@pytest.mark.parametrize("call, match", [
    (("measure_dirty_rate", "g", "sideways", 1.0, 512), "mode must be one of"),
    (("measure_dirty_rate", "g", "page-sampling", 0.0, 512), "duration"),
    (("measure_dirty_rate", "g", "page-sampling", 0.1, 0), "sample pages"),
    (("measure_wss", "g", 0.01, 0.01), "tick"),
    (("sample_content", "g", 0), "content sample"),
])
def test_bad_measurements_are_one_clear_error(in_process, call, match):
    host = _guest(in_process, "idle", 0, 4 * MiB)
    with pytest.raises(ConfigError, match=match):
        host.call(*call)


def test_advise_check_runs_every_candidate_of_a_small_point(in_process):
    """One point, every candidate migrated for real: both rankings name a winner, and the
    winner's predicted total time is set against its measured one."""
    from cluster.advisecheck import run_check
    from cluster.advisor import candidates
    from cluster.sweep.scenario import Scenario
    from nodes.migration.settings import MigrationSettings
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    scenario = Scenario("tiny", guest_memory_bytes=4 * MiB, warmup_seconds=0.1,
                        workload=WorkloadSpec("hotset", 1000),
                        migration=MigrationSettings(link_bytes_per_second=200e6))
    said = []
    result = run_check(scenario, tb, said.append)
    (point,) = result["points"]
    assert len(point["measured"]) == len(candidates(scenario.migration))
    assert point["predicted_winner"] and point["measured_winner"]
    assert point["winner_measured_total_seconds"] > 0 and len(said) == 1
    assert result["point_count"] == 1


def test_a_dirty_rate_measurement_sets_its_gauges(in_process):
    host = _guest(in_process, "uniform", 2000, 8 * MiB)
    out = host.call("measure_dirty_rate", "g", "dirty-bitmap", 0.1, 512)
    registry = host.service.metrics.registry
    labels = {"host": "host-0", "guest": "g", "mode": "dirty-bitmap"}
    assert registry.get_sample_value("migbed_guest_dirty_rate_measured_pages_per_second",
                                     labels) == out["pages_per_second"] > 0
    assert registry.get_sample_value("migbed_guest_dirty_rate_true_pages_per_second",
                                     labels) == out["true_pages_per_second"]
    assert registry.get_sample_value("migbed_guest_dirty_rate_window_seconds",
                                     labels) == out["window_seconds"]


@pytest.mark.uffd
def test_wss_and_dirtyrate_of_a_program_guest(in_process, uffd_kernel):
    """A program keeps its own data in word 0, so it has no write counters: no truth, its
    operations per second instead; its pages' zero share comes with the curve."""
    tb = in_process(hosts=1, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("g", 8 * MiB, "p2m", vcpu="process",
                                  workload=WorkloadSpec("kvstore")))
    host = tb.host("host-0")
    curve = WssCurve.from_dict(host.call("measure_wss", "g", 0.3, 0.01))
    assert curve.writes_per_second is None and curve.ops_per_second > 0
    assert 0.0 <= curve.zero_fraction <= 1.0 and curve.pages[-1] > 0
    assert curve.vcpu == "process" and curve.dirty_log == "kernel"
    out = host.call("measure_dirty_rate", "g", "dirty-bitmap", 0.1, 512)
    assert out["true_pages_per_second"] is None and out["pages_per_second"] > 0
    registry = host.service.metrics.registry
    labels = {"host": "host-0", "guest": "g", "mode": "dirty-bitmap"}
    assert registry.get_sample_value("migbed_guest_dirty_rate_measured_pages_per_second",
                                     labels) == out["pages_per_second"]
    assert registry.get_sample_value("migbed_guest_dirty_rate_true_pages_per_second",
                                     labels) is None
    # page-sampling's truth for a program: the kernel's log over the same window
    sampled = host.call("measure_dirty_rate", "g", "page-sampling", 0.2, 4096)
    assert sampled["true_pages_per_second"] > 0
    assert registry.get_sample_value("migbed_guest_dirty_rate_true_pages_per_second", {
        **labels, "mode": "page-sampling"}) == sampled["true_pages_per_second"]
    status = host.call("guest_status", "g")
    assert status["mode"] == "p2m" and not status["logdirty"]     # back as it was


@pytest.mark.uffd
def test_wss_check_measures_predicts_and_migrates_a_program(in_process, uffd_kernel):
    from cluster.sweep.scenario import Scenario
    from cluster.wsscheck import run_check
    from nodes.migration.settings import MigrationSettings
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    scenario = Scenario("tiny", guest_memory_bytes=8 * MiB, warmup_seconds=0.1,
                        vcpu="process", workload=WorkloadSpec("stream"),
                        migration=MigrationSettings(link_bytes_per_second=200e6))
    said = []
    result = run_check(scenario, tb, said.append, measure_seconds=0.2)
    (point,) = result["points"]
    assert point["status"] == "completed" and point["measured"]["total_time_seconds"] > 0
    assert point["nominal"]["total_time_seconds"] > 0 and point["nominal"]["error"] is not None
    assert point["curve"]["format"] == "migbed-wss/1" and len(said) == 1
    assert result["point_count"] == 1
