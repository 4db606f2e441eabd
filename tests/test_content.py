"""Guests whose pages have content: the fill before the workload starts, the bytes each write
rewrites beside its counter, and the lost-write check still holding."""

import time
import zlib

import numpy as np
import pytest

from nodes.errors import ConfigError
from nodes.host.service import HostService
from nodes.host.specs import GuestSpec, HostConfig
from workloads.content import text_bytes
from workloads.patterns import make_workload
from workloads.spec import WorkloadSpec

pytestmark = pytest.mark.inprocess

MiB = 1024 * 1024
PAGE = 4096


@pytest.fixture
def host():
    h = HostService(HostConfig(memory_bytes=32 * MiB))
    yield h
    h.shutdown()


def pages_of(h: HostService, name: str) -> np.ndarray:
    dom = h.hv.domain(name)
    return dom.memory.frames[dom.p2m[:dom.data_pages]]


@pytest.mark.parametrize("fill", ["random", "text"])
def test_fill_writes_every_data_page_but_keeps_the_counters_zero(host, fill):
    host.create_guest(GuestSpec("f", 2 * MiB, workload=WorkloadSpec("idle", fill=fill)))
    pages = pages_of(host, "f")
    assert not pages[:, :8].any(), "word 0 is the counter, left at 0"
    assert pages[:, 8:].any(axis=1).all(), "every data page has content"
    if fill == "text":
        assert set(np.unique(pages[:, 8:]).tolist()) <= set(b" abcdefghijklmnopqrstuvwxyz")


def test_zero_fill_leaves_a_fresh_guest_zero(host):
    host.create_guest(GuestSpec("z", 2 * MiB, workload=WorkloadSpec("idle")))
    assert not pages_of(host, "z").any()


@pytest.mark.parametrize("write_bytes", [8, 100, PAGE])
def test_writes_rewrite_write_bytes_and_no_write_is_lost(host, write_bytes):
    spec = WorkloadSpec("uniform", 0, seed=4, write_bytes=write_bytes)
    host.create_guest(GuestSpec("w", 2 * MiB, workload=spec))
    vcpu = host.vcpus["w"]
    deadline = time.monotonic() + 20
    while vcpu.pages_written_total < 2000:
        assert time.monotonic() < deadline, "the vCPU made no progress"
        time.sleep(0.01)
    host.pause_guest("w")
    pages = pages_of(host, "w")
    counters = pages.view("<u8")[:, 0]
    assert int(counters.sum()) == host.guest_status("w")["pages_written_total"]
    written = counters > 0
    assert pages[written, 8:write_bytes].any(axis=1).all() if write_bytes > 8 else True
    assert not pages[:, write_bytes:].any(), "nothing beyond write_bytes is touched"


def test_content_is_deterministic_and_travels_with_the_state():
    spec = WorkloadSpec("uniform", 1000, seed=9, write_bytes=64, fill="text")
    a = make_workload(spec, 100)
    a.take_batch(1.0)
    a.take_batch(2.0)
    b = make_workload(spec, 100, a.get_state())
    assert np.array_equal(a.content_rng.bytes(64), b.content_rng.bytes(64))


def test_text_compresses_like_real_data_and_random_does_not():
    rng = np.random.default_rng(1)
    text = text_bytes(rng, 128, PAGE).tobytes()
    noise = rng.bytes(128 * PAGE)
    assert 1.8 < len(text) / len(zlib.compress(text, 1)) < 5
    assert len(noise) / len(zlib.compress(noise, 1)) < 1.01


def test_bad_content_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown fill"):
        WorkloadSpec(fill="lorem")
    with pytest.raises(ConfigError, match="write bytes"):
        WorkloadSpec(write_bytes=4)
    with pytest.raises(ConfigError, match="exceed the page size"):
        make_workload(WorkloadSpec("uniform", write_bytes=8192), 10, page_size=4096)
