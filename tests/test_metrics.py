"""Every host's Prometheus exporter (nodes/metrics.py): live state, promtool's lint, cost, bad
input, and scraped values that agree with the migration reports on the Ray cluster."""

import socket
import statistics
import subprocess
import time
import urllib.request

import pytest
from conftest import require_binary
from prometheus_client.parser import text_string_to_metric_families

from cluster.prometheus import read_sd_file
from nodes.errors import ConfigError
from nodes.host.service import HostService
from nodes.host.specs import GuestSpec, HostConfig
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024


def scrape(endpoint: str) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as resp:
        return resp.read().decode()


class Samples:
    """A scrape, parsed: `get(name, **labels)` sums the samples whose labels include those."""

    def __init__(self, text: str):
        self.text = text
        self.rows = [(s.name, s.labels, s.value)
                     for fam in text_string_to_metric_families(text) for s in fam.samples]

    def get(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.rows
                   if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and all(lab.get(k) == x for k, x in labels.items())
                   for n, lab, _ in self.rows)


def promtool_lint(text: str) -> None:
    promtool = require_binary("promtool")
    p = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                       capture_output=True, timeout=30)
    assert p.returncode == 0, (p.stdout + p.stderr).decode()


# -- one host, in this process ----------------------------------------------------------------
def test_host_exports_its_live_state(in_process):
    tb = in_process(hosts=2, host_memory_bytes=128 * MiB)
    tb.create("host-0", GuestSpec("busy", 16 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 20000, seed=1)))
    tb.create("host-0", GuestSpec("shadow", 8 * MiB, "vp"))
    tb.create("host-0", GuestSpec("nic", 4 * MiB, "p==m", dma=True))
    time.sleep(0.2)
    service = tb.hosts["host-0"].service
    s = Samples(scrape(service.metrics_endpoint()))
    frames = service.frame_counts()
    for state in ("free", "used", "reserved"):
        assert s.get("migbed_host_frames", host="host-0", state=state) == frames[state]
    assert s.get("migbed_host_frames", host="host-0") == frames["total"]
    assert s.get("migbed_host_memory_bytes", host="host-0") == 128 * MiB
    assert s.get("migbed_host_info", host="host-0", profile="x86", arch="x86") == 1
    assert [s.get("migbed_host_guests", host="host-0", mode=m) for m in ("p2m", "vp", "p==m")] \
        == [1, 1, 1]
    assert s.get("migbed_guest_mode", guest="busy", mode="p2m") == 1
    assert s.get("migbed_guest_mode", guest="busy", mode="vp") == 0
    assert s.get("migbed_guest_state", guest="shadow", state="running") == 1
    assert s.get("migbed_guest_memory_bytes", guest="nic") == 4 * MiB
    assert s.get("migbed_guest_page_writes_total", guest="busy") > 0
    assert s.get("migbed_guest_info", guest="busy", workload="uniform") == 1
    assert not s.has("migbed_guest_info", guest="Domain-0"), "dom0 is not a guest"
    for status in ("completed", "failed", "cancelled"):    # present at zero from the start
        assert s.has("migbed_migrations_finished_total", host="host-0", status=status)
    promtool_lint(s.text)


def test_hosts_without_a_port_serve_nothing():
    service = HostService(HostConfig(memory_bytes=32 * MiB))
    try:
        assert service.metrics_endpoint() is None
        assert b"migbed_host_frames" in service.metrics.render()
    finally:
        service.shutdown()


@pytest.mark.inprocess
def test_metrics_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics port {port} on 127.0.0.1 is in use"):
            HostService(HostConfig(memory_bytes=32 * MiB, metrics_port=port))


@pytest.mark.inprocess
def test_metrics_address_that_is_not_ours():
    with pytest.raises(ConfigError, match="cannot serve metrics of host-0 on 192.0.2.77"):
        HostService(HostConfig(memory_bytes=32 * MiB, metrics_port=0,
                               metrics_address="192.0.2.77"))


@pytest.mark.inprocess
def test_wildcard_bind_is_advertised_at_the_host_address():
    service = HostService(HostConfig(memory_bytes=32 * MiB, metrics_port=0,
                                     metrics_address="0.0.0.0"))
    try:
        endpoint = service.metrics_endpoint()
        assert endpoint.startswith("127.0.0.1:")
        assert "migbed_host_info" in scrape(endpoint)
    finally:
        service.shutdown()
    assert service.metrics_endpoint() is None


def test_scrape_is_cheap_and_does_not_walk_memory(in_process):
    """A 512 MiB host with 384 MiB of busy guests: a scrape reads counters only, so it takes
    a few milliseconds whatever the guests' size."""
    tb = in_process(hosts=1, host_memory_bytes=512 * MiB)
    for i in range(3):
        tb.create("host-0", GuestSpec(f"big{i}", 128 * MiB, "p2m",
                                      workload=WorkloadSpec("uniform", 0, seed=i)))
    endpoint = tb.hosts["host-0"].service.metrics_endpoint()
    scrape(endpoint)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        scrape(endpoint)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(f"scrape of one host endpoint: median {median * 1000:.2f} ms, "
          f"max {max(times) * 1000:.2f} ms")
    assert median < 0.05, f"a scrape took {median * 1000:.1f} ms"


# -- the Ray cluster: scraped values against the reports ---------------------------------------
def scrape_all(tb) -> dict[str, Samples]:
    return {name: Samples(scrape(ep)) for name, ep in tb.metrics_endpoints().items()}


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def test_scraped_values_agree_with_the_reports(ray_testbed, unique_name):
    tb = ray_testbed
    name = unique_name("prom")
    assert set(tb.metrics_endpoints()) == {"host-0", "host-1", "host-2"}
    tb.create("host-0", GuestSpec(name, 32 * MiB, "p2m",
                                  workload=WorkloadSpec("uniform", 4000, seed=7)))
    time.sleep(0.3)
    before = scrape_all(tb)
    settings = MigrationSettings(link_bytes_per_second=96 * MiB)
    r = tb.migrate(name, "host-1", settings)
    assert r.status == "completed"
    after = scrape_all(tb)
    src, dst = after["host-0"], after["host-1"]
    b_src, b_dst = before["host-0"], before["host-1"]
    g = {"guest": name, "policy": "xen", "profile": "x86"}

    assert delta(src, b_src, "migbed_migrations_started_total") == 1
    assert delta(src, b_src, "migbed_migrations_finished_total", status="completed") == 1
    assert delta(src, b_src, "migbed_migration_sent_pages_total") == r.pages_sent_total
    assert delta(src, b_src, "migbed_migration_sent_bytes_total") == r.bytes_sent_total
    assert delta(src, b_src, "migbed_migration_rounds_total") == len(r.rounds)
    assert delta(src, b_src, "migbed_migration_dirtied_pages_total") == sum(
        x["pages_dirtied"] for x in r.rounds)
    assert src.get("migbed_migration_downtime_seconds_count", host="host-0", **g) == 1
    assert src.get("migbed_migration_downtime_seconds_sum", host="host-0", **g) == \
        pytest.approx(r.downtime_seconds, abs=1e-9)
    assert src.get("migbed_migration_total_time_seconds_count", host="host-0", **g) == 1
    assert src.get("migbed_migration_total_time_seconds_sum", host="host-0", **g) == \
        pytest.approx(r.total_time_seconds, abs=1e-9)
    # The downtime lands in the bucket the report's number belongs to (1 ms .. 10 s).
    le = next(b for b in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                          5.0, 10.0, float("inf")) if r.downtime_seconds <= b)
    assert src.get("migbed_migration_downtime_seconds_bucket", host="host-0",
                   le=str(le) if le != float("inf") else "+Inf", **g) == 1

    assert delta(dst, b_dst, "migbed_migration_received_pages_total") == r.pages_sent_total
    received = delta(dst, b_dst, "migbed_migration_received_bytes_total")
    assert 0 < received <= r.bytes_sent_total
    # The destination measures the stall across the hand-over; the report takes the larger
    # of that and the longest stall on the source before the pause.
    assert dst.get("migbed_migration_guest_observed_downtime_seconds_count", host="host-1",
                   **g) == 1
    observed = dst.get("migbed_migration_guest_observed_downtime_seconds_sum", host="host-1",
                       **g)
    assert 0 < observed <= r.guest_observed_downtime_seconds + 1e-9
    # The guest moved: its series are on host-1 now, and its writes carried over.
    assert dst.get("migbed_guest_info", guest=name) == 1 and not src.has("migbed_guest_info",
                                                                         guest=name)
    assert dst.get("migbed_guest_page_writes_total", guest=name) >= before[
        "host-0"].get("migbed_guest_page_writes_total", guest=name)
    assert src.get("migbed_migrations_in_progress", direction="outgoing") == 0

    # A cancelled migration back: counted as such, no downtime observed.
    r2 = tb.migrate(name, "host-0", MigrationSettings(link_bytes_per_second=96 * MiB,
                                                      cancel_after_round=0))
    assert r2.status == "cancelled"
    last = scrape_all(tb)
    assert delta(last["host-1"], dst, "migbed_migrations_finished_total",
                 status="cancelled") == 1
    assert delta(last["host-1"], dst, "migbed_migrations_started_total") == 1
    assert not last["host-1"].get("migbed_migration_downtime_seconds_count", guest=name)
    # Pages of the cut-short round count too: they crossed the wire before the cancel.
    sent = delta(last["host-1"], dst, "migbed_migration_sent_pages_total")
    assert sent >= r2.pages_sent_total
    assert 0 < delta(last["host-0"], after["host-0"],
                     "migbed_migration_received_pages_total") <= sent
    for text in last.values():
        promtool_lint(text.text)
    tb.destroy(name)


def test_discovery_file_lists_every_host(ray_testbed, tmp_path):
    path = ray_testbed.write_sd_file(tmp_path / "sd" / "targets.json")
    targets = read_sd_file(path)
    assert targets == ray_testbed.metrics_endpoints()
    assert set(targets) == {"host-0", "host-1", "host-2"}
    for host, endpoint in targets.items():
        assert f'migbed_host_info{{arch="x86",host="{host}"' in scrape(endpoint)


# -- process vCPUs (issue 22): what runs each guest, the kernel's log, the fault path ----------
@pytest.mark.uffd
def test_process_guests_export_their_vcpus_and_the_kernels_log(in_process, uffd_kernel):
    """A process guest's vCPUs (kind and count), its pid, and the pages the kernel's dirty log
    reported written over the CLEANs of a migration (cancelled, so the guest stays): the
    report's shadow_faults, read from a real endpoint."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("proc", 8 * MiB, "p2m", vcpu="process", vcpus=2,
                                  workload=WorkloadSpec("uniform", 20000, seed=3)))
    tb.create("host-0", GuestSpec("thr", 4 * MiB, "p2m"))
    service = tb.hosts["host-0"].service
    endpoint = service.metrics_endpoint()
    before = Samples(scrape(endpoint))
    assert before.get("migbed_guest_vcpus", host="host-0", guest="proc", kind="process") == 2
    assert before.get("migbed_guest_vcpus", host="host-0", guest="thr", kind="thread") == 1
    assert not before.has("migbed_guest_vcpus", guest="proc", kind="thread")
    assert before.get("migbed_guest_process_pid", guest="proc") == service.vcpus["proc"].pid
    assert not before.has("migbed_guest_process_pid", guest="thr"), "a thread guest has none"
    assert not before.has("migbed_guest_kernel_written_pages_total", guest="thr")
    r = tb.migrate("proc", "host-1", MigrationSettings(link_bytes_per_second=64 * MiB,
                                                       cancel_after_round=1))
    assert r.status == "cancelled" and r.dirty_log == "kernel" and r.shadow_faults > 0
    after = Samples(scrape(endpoint))
    assert delta(after, before, "migbed_guest_kernel_written_pages_total", guest="proc") == \
        r.shadow_faults
    promtool_lint(after.text)


def test_fault_latency_is_split_by_fault_path():
    """The post-copy fault latency histogram carries `fault_path`: the emulated series is
    always there (the existing queries sum over it), a process guest's FaultReader adds the
    uffd one, and each path's counts are its own."""
    from types import SimpleNamespace

    from nodes.host.faultreader import FaultReader
    from nodes.host.postcopy_metrics import PostcopyCollector, PostcopyTotals
    from nodes.migration.postcopy.pagefault import FaultLatency, PageFaults
    assert (PageFaults.fault_path, FaultReader.fault_path) == ("emulated", "uffd")
    totals = PostcopyTotals()

    def fams() -> dict:
        return {(s.name, s.labels.get("fault_path")): s.value
                for f in PostcopyCollector("h", {}, {}, totals).collect() for s in f.samples}
    first = fams()
    assert ("migbed_migration_postcopy_fault_latency_seconds_count", "emulated") in first
    assert ("migbed_migration_postcopy_fault_latency_seconds_count", "uffd") not in first
    latency = FaultLatency()
    for seconds in (2e-6, 3e-5, 4e-4):
        latency.observe_one(seconds)
    faults = SimpleNamespace(fault_path=FaultReader.fault_path, latency=latency,
                             blocked_seconds=0.01, faults=3)
    totals.destination_ended(SimpleNamespace(postcopy=SimpleNamespace(faults=faults, by_channel={})))
    after = fams()
    count = "migbed_migration_postcopy_fault_latency_seconds_count"
    assert after[(count, "uffd")] == 3 and after[(count, "emulated")] == 0
    assert after[("migbed_migration_postcopy_fault_latency_seconds_sum", "uffd")] == \
        pytest.approx(4.32e-4)
