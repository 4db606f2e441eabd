"""The default vCPU kind (issue 22's decision): `auto` runs a process where the host's kernel
passes the probe whole, a thread elsewhere; `$MIGBED_VCPU` is the operator's default; a
program or several vCPUs are a process whatever the default. The suite pins `thread`
(tests/conftest.py); these tests take that away."""

import pytest

from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from nodes.host.userfault import SIMULATE_ENV, kernel_support
from nodes.host.vcpus import DEFAULT_VCPU_ENV, default_vcpu_kind, resolved_spec
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024


def whole_support() -> bool:
    s = kernel_support()
    return s.dirty_log and s.missing_shmem and s.minor_shmem


@pytest.fixture
def no_default(monkeypatch):
    monkeypatch.delenv(DEFAULT_VCPU_ENV, raising=False)
    monkeypatch.delenv(SIMULATE_ENV, raising=False)


def test_a_spec_names_no_kind_until_its_host_resolves_it():
    spec = GuestSpec("g", 4 * MiB)
    assert spec.vcpu == "auto"
    assert GuestSpec.from_dict(spec.to_dict()).vcpu == "auto"


def test_auto_is_a_process_where_the_kernel_passes_the_probe(no_default):
    spec = GuestSpec("g", 4 * MiB)
    assert default_vcpu_kind(spec) == ("process" if whole_support() else "thread")


def test_auto_is_a_thread_where_the_kernel_lacks_userfaultfd(no_default, monkeypatch):
    monkeypatch.setenv(SIMULATE_ENV, "no userfaultfd here")
    assert resolved_spec(GuestSpec("g", 4 * MiB)).vcpu == "thread"


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_operators_default_is_taken(no_default, monkeypatch, kind):
    monkeypatch.setenv(DEFAULT_VCPU_ENV, kind)
    assert resolved_spec(GuestSpec("g", 4 * MiB)).vcpu == kind
    # a kind the spec names is never overridden
    other = "process" if kind == "thread" else "thread"
    assert resolved_spec(GuestSpec("g", 4 * MiB, vcpu=other)).vcpu == other


def test_a_program_or_several_vcpus_are_a_process_whatever_the_default(no_default,
                                                                        monkeypatch):
    monkeypatch.setenv(DEFAULT_VCPU_ENV, "thread")
    assert resolved_spec(GuestSpec("g", 8 * MiB, vcpus=2)).vcpu == "process"
    kv = GuestSpec("g", 8 * MiB, workload=WorkloadSpec(pattern="kvstore"))
    assert resolved_spec(kv).vcpu == "process"


def test_a_bad_operator_default_is_one_line(no_default, monkeypatch):
    monkeypatch.setenv(DEFAULT_VCPU_ENV, "vm")
    with pytest.raises(ConfigError, match="MIGBED_VCPU='vm' is no vCPU kind"):
        default_vcpu_kind(GuestSpec("g", 4 * MiB))


def test_a_guest_created_without_a_kind_runs_and_migrates_as_its_host_chose(no_default,
                                                                            in_process):
    tb = in_process(hosts=2)
    created = tb.create("host-0", GuestSpec("auto-g", 8 * MiB,
                                            workload=WorkloadSpec(pattern="uniform",
                                                                  rate_pages_per_second=500)))
    try:
        want = "process" if whole_support() else "thread"
        assert created["vcpu"] == want
        assert (created["pid"] is not None) == (want == "process")
        listed = {g["name"]: g for g in tb.list()["guests"]}
        assert listed["auto-g"]["vcpu"] == want
        report = tb.migrate("auto-g", "host-1")
        assert report.status == "completed" and report.integrity.verified
        assert report.vcpu == want
        assert report.dirty_log == ("kernel" if want == "process" else "emulated")
    finally:
        tb.destroy("auto-g")
