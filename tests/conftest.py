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

from cluster.launcher import ClusterSpec
from cluster.testbed import Testbed

MiB = 1024 * 1024


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


def require_binary(name: str) -> str | None:
    """The path of `name`; under CI a missing binary fails the test instead of skipping it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; the README's test command installs it")
        pytest.skip(f"{name} not installed")
    return path
