"""The clock offset between two hosts, measured over the data channel as NTP does, and the
downtime taken across two clocks with it."""

import math
import time
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.errors import StreamError
from nodes.host.specs import GuestSpec
from nodes.migration import clock
from nodes.migration.clock import ClockEstimate, ClockSample, to_source_clock
from nodes.migration.postcopy import postcopy_destination
from nodes.migration.receive import receiver as destination
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
seconds = st.floats(min_value=0.0, max_value=0.5, allow_nan=False)


@given(offset=st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), out=seconds,
       back=seconds, busy=seconds)
def test_the_true_offset_lies_within_half_the_round_trip(offset, out, back, busy):
    """Whatever the asymmetry of the two ways, |estimate - truth| <= delay / 2 (RFC 5905)."""
    t1 = 1_700_000_000.0
    t2 = t1 + out + offset                 # on the destination's clock
    t3 = t2 + busy
    t4 = t3 - offset + back                # back on the source's
    s = ClockSample(t1, t2, t3, t4)
    assert s.delay_seconds == pytest.approx(out + back, abs=1e-6)
    assert abs(s.offset_seconds - offset) <= s.delay_seconds / 2 + 1e-6


def test_the_least_delayed_sample_is_kept():
    queued = ClockSample(0.0, 10.5, 10.5, 1.0)           # 0.5 s stuck in a queue one way
    clean = ClockSample(2.0, 12.01, 12.01, 2.02)
    est = ClockEstimate.best_of([queued, clean])
    assert est.offset_seconds == pytest.approx(10.0) and est.rtt_seconds == pytest.approx(0.02)
    assert est.samples == 2
    with pytest.raises(ValueError):
        ClockEstimate.best_of([])


def test_a_reply_that_does_not_answer_the_probe_is_refused():
    sent = []

    with pytest.raises(StreamError):        # echoes another t1
        clock.measure(sent.append, lambda: {"t1": sent[-1]["t1"] + 1.0, "t2": 5.0, "t3": 5.0})
    with pytest.raises(StreamError):
        clock.measure(sent.append, lambda: {"t1": sent[-1]["t1"], "t2": math.inf, "t3": 1.0})
    with pytest.raises(StreamError):        # answered before it was received
        clock.measure(sent.append, lambda: {"t1": sent[-1]["t1"], "t2": 2.0, "t3": 1.0})


def test_walls_without_a_finite_offset_stay_as_they_are():
    assert to_source_clock(None, 3.0) is None
    assert to_source_clock(10.0, None) == 10.0
    assert to_source_clock(10.0, math.nan) == 10.0
    assert to_source_clock(10.0, 3.0) == 7.0


def test_same_machine_offset_is_zero_within_the_bound(in_process):
    """Both hosts read this machine's clock: the truth is 0, so |offset| <= rtt / 2; the
    emulated latency is in the round trip, each way."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("c1", 4 * MiB))
    r = tb.migrate("c1", "host-1", MigrationSettings(latency_seconds=0.005))
    assert r.status == "completed" and r.integrity.verified
    assert r.clock_rtt_seconds >= 2 * 0.005
    assert abs(r.clock_offset_seconds) <= r.clock_rtt_seconds / 2


@pytest.mark.parametrize("settings", [MigrationSettings(),
                                      MigrationSettings(postcopy_after_rounds=0)],
                         ids=["precopy", "postcopy"])
def test_downtime_stays_right_when_the_destination_clock_is_an_hour_ahead(in_process,
                                                                         monkeypatch, settings):
    """The destination's wall clock runs 3600 s ahead (its modules' time, as another
    machine's): the offset is found, and the downtime is taken on one clock, not 3600 s,
    after a post-copy switch too (its resume comes back on the return path)."""
    skew = 3600.0
    skewed = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                      if not k.startswith("_")})
    skewed.time = lambda: time.time() + skew
    monkeypatch.setattr(destination, "time", skewed)
    monkeypatch.setattr(postcopy_destination, "time", skewed)
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("c2", 4 * MiB, workload=WorkloadSpec("uniform", 2000)))
    r = tb.migrate("c2", "host-1", settings)
    assert r.status == "completed" and r.integrity.verified
    assert (r.postcopy is not None) == settings.postcopy_allowed
    assert abs(r.clock_offset_seconds - skew) <= r.clock_rtt_seconds / 2 + 1e-3
    assert 0 < r.downtime_seconds <= r.total_time_seconds
