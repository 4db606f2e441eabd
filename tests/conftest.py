"""Shared fixtures: one real local Ray cluster per test session, and in-process testbeds.

Ray tests share `ray_testbed` (3 x86 hosts, 256 MiB each, host-0 and host-1 on one Ray node
and host-2 on another, so both cases are tested); each test creates and destroys
its own guests, with names unique to the test, and must leave every host's frames as it
found them. Tests of the pure model use `in_process` testbeds (real hosts, real TCP
streams between them, no Ray) because they start in milliseconds.
"""

import json
import os
import shutil
import uuid

import pytest

from cluster.launch.launcher import ClusterSpec
from cluster.testbed import Testbed

MiB = 1024 * 1024

# pytest-xdist's workers run with COLUMNS=80 and LINES=24 in their environment, which every
# command a test starts would inherit (a `migbed top` in a 220-column tmux pane drew 120
# columns); without them a child sizes itself by its own terminal, as in a serial run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

# A guest that names no vCPU kind runs, by default, as a process where the kernel allows
# (`nodes.host.vcpus.default_vcpu_kind`). The suite's tests were written against the Xen
# model's emulation and pin `thread` through the operator's default (issue 22's decision:
# "tests of the emulation pin thread"); the tests of process guests name `process`, and
# tests/test_vcpudefault.py takes the setting away to test the default itself. Every host and
# command a test starts inherits it.
os.environ.setdefault("MIGBED_VCPU", "thread")


@pytest.fixture(scope="session")
def ray_testbed():
    tb = Testbed.local(ClusterSpec(hosts=3, host_memory_bytes=256 * MiB, hosts_per_node=2))
    try:
        yield tb
    finally:
        tb.close()


@pytest.fixture
def ray_home(ray_testbed, tmp_path, monkeypatch):
    """`ray_testbed` as the cluster of `migbed up`: a MIGBED_HOME whose state file points at
    it, so commands (`main([...])` here, or `migbed` processes given this MIGBED_HOME)
    attach to it. Never `migbed down` it: the session owns it."""
    home = tmp_path / "migbed-home"
    home.mkdir()
    (home / "cluster.json").write_text(json.dumps(
        {"address": ray_testbed._owner.address, "hosts": list(ray_testbed.hosts), "pgid": None}))
    monkeypatch.setenv("MIGBED_HOME", str(home))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray_testbed


@pytest.fixture
def in_process():
    """A factory of in-process testbeds, closed after the test."""
    made = []

    def make(**kwargs) -> Testbed:
        kwargs.setdefault("host_memory_bytes", 128 * MiB)
        tb = Testbed.in_process(ClusterSpec(**kwargs))
        made.append(tb)
        return tb
    yield make
    for tb in made:
        tb.close()


@pytest.fixture
def unique_name():
    def make(prefix: str = "g") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"
    return make


@pytest.fixture
def uffd_kernel():
    """This kernel's userfaultfd dirty log (the `uffd` tier); under CI its absence fails."""
    from nodes.host.userfault import kernel_support
    support = kernel_support()
    if not support.dirty_log:
        if os.environ.get("CI"):
            pytest.fail(f"the uffd tier needs this kernel's dirty log: {support.reason}")
        pytest.skip(support.reason)
    return support


def require_binary(name: str) -> str | None:
    """The path of `name`; under CI a missing binary fails the test instead of skipping it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; the README's test command installs it")
        pytest.skip(f"{name} not installed")
    return path


# -- the suite's tiers ---------------------------------------------------------------------------
# Every test is in exactly one tier, a pytest marker (pyproject.toml names them):
#   unit       no sockets, no threads started: the Xen model, parsers, the analytic model;
#   inprocess  real hosts and real TCP streams in this process, no Ray;
#   ray        a real Ray cluster (the shared `ray_testbed`, or one a test starts itself);
#   uffd       needs this kernel's userfaultfd write-protect and PAGEMAP_SCAN.
# A test that names no tier gets one from its fixtures: Ray's make it `ray`, `in_process` makes
# it `inprocess`, anything else is `unit`, and a unit test that opens a socket or starts a
# thread fails, saying which tier to mark it with. `pytest -m "not ray"` is the quick loop.
TIERS = ("unit", "inprocess", "ray", "uffd")
RAY_FIXTURES = {"ray_testbed", "ray_home", "ray_cli_cluster"}


def tier_of(item: pytest.Item) -> str:
    marked = [t for t in TIERS if item.get_closest_marker(t) is not None]
    if marked:
        return "ray" if "ray" in marked else marked[0]
    names = set(getattr(item, "fixturenames", ()))
    if names & RAY_FIXTURES:
        return "ray"
    return "inprocess" if "in_process" in names else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): the tiers without Ray mostly wait on paced links and
    throttled vCPUs, so the quick loop (`-m "not ray"`) runs four workers even on two cores
    (71 s against 106 s here); with Ray in the run, one worker per core (xdist's own count),
    since Ray's start-ups need the CPUs and a starved vCPU thread once failed a test."""
    if "not ray" in (config.getoption("markexpr") or ""):
        return 4
    return None


class TierError(AssertionError):
    """A unit-tier test reached for a socket or a thread."""


@pytest.fixture(autouse=True)
def _unit_tier_guard(request, monkeypatch):
    """Holds the unit tier to its word: no socket opened, no thread started."""
    if tier_of(request.node) != "unit":
        yield
        return
    import socket
    import threading

    def refuse(what):
        def guard(*args, **kwargs):
            raise TierError(f"a unit test {what}: mark it @pytest.mark.inprocess "
                            "(or ray), as tests/conftest.py says")
        return guard
    monkeypatch.setattr(socket.socket, "connect", refuse("connected a socket"))
    monkeypatch.setattr(socket.socket, "bind", refuse("bound a socket"))
    monkeypatch.setattr(threading.Thread, "start", refuse("started a thread"))
    yield
