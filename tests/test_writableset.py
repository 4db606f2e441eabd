"""The writable working set's curve: folding ticks into windows, the fit, the file."""

import json

import numpy as np
import pytest

from nodes.errors import ConfigError
from workloads.writableset import FORMAT, WssCurve, curve_from_ticks, window_counts


def test_window_counts_are_the_distinct_pages_of_every_run_of_ticks():
    ticks = [np.array([0, 1]), np.array([1]), np.array([2, 3]), np.array([], dtype=np.int64)]
    mean, maxes = window_counts(ticks, npages=8, max_ticks=3)
    # k=1: {0,1},{1},{2,3},{} -> 2,1,2,0; k=2: {0,1},{1,2,3},{2,3} -> 2,3,2;
    # k=3: {0,1,2,3},{1,2,3} -> 4,3
    assert mean.tolist() == [5 / 4, 7 / 3, 3.5]
    assert maxes.tolist() == [2, 3, 4]


def _hotset_ticks(data_pages: int, hot: int, rate: float, share: float, n: int, tick: float,
                  seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        writes = rng.poisson(rate * tick)
        on_hot = rng.binomial(writes, share)
        out.append(np.concatenate([rng.integers(0, hot, on_hot),
                                   rng.integers(hot, data_pages, writes - on_hot)]))
    return out


def test_the_fit_recovers_a_hot_set_within_ten_percent():
    ticks = _hotset_ticks(16000, 1600, 10000, 0.9, 300, 0.01)
    curve = curve_from_ticks(ticks, 0.01, data_pages=16000, guest_pages=16384, page_size=4096)
    assert abs(curve.wws_pages - 1600) / 1600 < 0.10
    assert curve.windows_seconds[0] == pytest.approx(0.01)
    assert list(curve.pages) == sorted(curve.pages)          # longer windows, more pages
    assert abs(curve.rate_pages_per_second - 10000) / 10000 < 0.10


def test_a_curve_round_trips_through_its_json():
    ticks = _hotset_ticks(4000, 400, 4000, 0.9, 50, 0.01)
    curve = curve_from_ticks(ticks, 0.01, data_pages=4000, guest_pages=4096, page_size=4096,
                             guest="g", vcpu="thread", dirty_log="emulated")
    again = WssCurve.from_json(curve.to_json())
    assert again == curve
    assert json.loads(curve.to_json())["format"] == FORMAT


@pytest.mark.parametrize("text, match", [
    ("not json", "must be JSON"),
    ('{"format": "other"}', "not a WSS curve"),
    (json.dumps({"format": FORMAT, "windows_seconds": [0.1], "pages": [1.0],
                 "pages_max": [1.0], "data_pages": 10, "guest_pages": 5,
                 "page_size": 4096}), "data_pages"),
    (json.dumps({"format": FORMAT, "windows_seconds": [0.2, 0.1], "pages": [1.0, 2.0],
                 "pages_max": [1.0, 2.0], "data_pages": 4, "guest_pages": 5,
                 "page_size": 4096}), "increasing"),
    (json.dumps({"format": FORMAT, "windows_seconds": list(range(1, 100)),
                 "pages": [1.0], "pages_max": [1.0], "data_pages": 4, "guest_pages": 5,
                 "page_size": 4096}), "at most"),
])
def test_a_bad_curve_file_is_one_clear_error(text, match):
    with pytest.raises(ConfigError, match=match):
        WssCurve.from_json(text)


def _sweep_ticks(data_pages: int, swept: int, rate: float, n: int, tick: float) -> list:
    """A cursor writing `swept` pages in order at `rate` pages/s, over and over (STREAM's
    output array, a merge's output)."""
    out, at = [], 0.0
    for _ in range(n):
        ahead = at + rate * tick
        out.append(np.arange(int(at), int(ahead)) % swept)
        at = ahead
    return out


def test_a_sweep_is_fitted_as_a_sweep_and_a_hot_set_as_random_writes():
    swept = curve_from_ticks(_sweep_ticks(16000, 6000, 20000, 300, 0.01), 0.01,
                             data_pages=16000, guest_pages=16384, page_size=4096)
    sweep = max(swept.regions, key=lambda r: r.rate_pages_per_second)
    assert sweep.sequential
    assert abs(sweep.pages - 6000) / 6000 < 0.10
    assert abs(sweep.rate_pages_per_second - 20000) / 20000 < 0.10
    # at a window of a third of a sweep the fit says what was measured (random writes
    # would have said a fifth less)
    assert swept.distinct(0.1) == pytest.approx(2000, rel=0.05)
    hot = curve_from_ticks(_hotset_ticks(16000, 1600, 10000, 0.9, 300, 0.01), 0.01,
                           data_pages=16000, guest_pages=16384, page_size=4096)
    assert not any(r.sequential for r in hot.regions)
    again = WssCurve.from_json(swept.to_json())
    assert again == swept


def test_the_model_takes_the_curves_zero_share_in_the_least_written_pages():
    """A program's loaded data is not in its steady writes: the measured zero share decides
    what the first pass sends whole, and the zeros lie where the guest writes least."""
    from dataclasses import replace

    from cluster import model
    from cluster.model.continuous import layout
    from cluster.model.pagetypes import zero_measured
    from cluster.model.workload import Region
    from workloads.spec import WorkloadSpec
    spans = layout([Region(1000, 50000.0), Region(7000, 10.0)], 8000, 8192)
    assert zero_measured(spans, 8000, 0.5, "multifd") == [0.0, 4000.0, 0.0]
    assert zero_measured(spans, 8000, 0.5, "none") == [0.0, 0.0, 0.0]
    curve = curve_from_ticks(_hotset_ticks(8000, 800, 5000, 0.9, 100, 0.01), 0.01,
                             data_pages=8000, guest_pages=8192, page_size=4096)

    def predict(zero_fraction):
        return model.predict(guest_memory_bytes=8192 * 4096, workload=WorkloadSpec("kvstore"),
                             link_bytes_per_second=64e6, policy="xen",
                             wss=replace(curve, zero_fraction=zero_fraction))
    full, half = predict(0.0), predict(0.5)
    assert full.rounds[0].zero_pages == 0
    # the model's guest has 8176 data pages (16 page-table pages): the first pass finds half
    # of them zero but those the cold writes reach before it does
    assert 0.95 * 4088 < half.rounds[0].zero_pages <= 4088
    assert half.bytes_sent_total < full.bytes_sent_total - 0.95 * 4088 * 4096
