"""The analytic pre-copy model (cluster/model/): hand-worked cases, pure and fast."""

import json
import math
import sys
from pathlib import Path

import pytest

# the project is not installed in the venv: make the tree importable under plain `pytest`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.model import (  # noqa: E402
    ModelPrediction,
    closed_form,
    compare,
    expected_distinct_pages,
    predict,
)
from nodes.migration.decide import policy as policy_mod  # noqa: E402
from nodes.migration.decide.policy import Action, Decision, PrecopyPolicy  # noqa: E402
from workloads.patterns import hot_pages  # noqa: E402
from workloads.spec import WorkloadSpec  # noqa: E402

MiB = 1 << 20
PAGE = 4096
GUEST = 64 * MiB
GUEST_PAGES = GUEST // PAGE                                  # 16384
TABLE_PAGES = math.ceil(GUEST_PAGES / (PAGE // 8))           # 32
DATA_PAGES = GUEST_PAGES - TABLE_PAGES                       # 16352
WIRE = PAGE + 8 + 32 / 1024                                  # bytes per page on the wire
LINK = 128 * MiB


ZERO_WIRE = 8 + 32 / 1024                                    # a zero page: its pfn word


def run(workload: WorkloadSpec, **kw) -> ModelPrediction:
    """The hand-worked cases count every page whole (no zero-page detection), as the plain
    model does; the tests of pages by type turn it on."""
    kw.setdefault("link_bytes_per_second", LINK)
    kw.setdefault("zero_page_detection", "none")
    return predict(guest_memory_bytes=GUEST, page_size=PAGE, workload=workload, **kw)


def live(p: ModelPrediction):
    return [r for r in p.rounds if not r.final]


def check_shape(p: ModelPrediction) -> None:
    assert p.rounds[-1].final
    assert all(not r.final for r in p.rounds[:-1])
    assert [r.index for r in p.rounds] == list(range(len(p.rounds)))
    assert p.final_pages == p.rounds[-1].pages_sent
    assert p.pages_sent_total == pytest.approx(sum(r.pages_sent for r in p.rounds))
    assert p.zero_pages == pytest.approx(sum(r.zero_pages for r in p.rounds))
    assert p.bytes_sent_total == pytest.approx(
        (p.pages_sent_total - p.zero_pages) * WIRE + p.zero_pages * ZERO_WIRE)
    assert p.total_time_seconds == pytest.approx(
        sum(r.duration_seconds for r in live(p)) + p.downtime_seconds)
    json.dumps(p.to_dict())


# -- expected_distinct_pages -------------------------------------------------------------

def test_idle_dirties_nothing():
    spec = WorkloadSpec("idle")
    assert expected_distinct_pages(spec, DATA_PAGES, 10.0) == 0
    assert expected_distinct_pages(spec, DATA_PAGES, 10.0, rate_pages_per_second=5000) == 0


@pytest.mark.parametrize("spec", [
    WorkloadSpec("uniform", 1000), WorkloadSpec("hotset", 1000),
    WorkloadSpec("sequential", 1000), WorkloadSpec("phased", 1000, quiet_rate_fraction=0.5)])
def test_zero_seconds_and_huge_time(spec):
    assert expected_distinct_pages(spec, DATA_PAGES, 0.0) == 0
    assert expected_distinct_pages(spec, DATA_PAGES, 1e9) == pytest.approx(DATA_PAGES)
    assert expected_distinct_pages(spec, DATA_PAGES, math.inf) == pytest.approx(DATA_PAGES)
    assert expected_distinct_pages(spec, 0, 5.0) == 0


def test_uniform_formula():
    w, t, h = 3000.0, 2.5, DATA_PAGES
    got = expected_distinct_pages(WorkloadSpec("uniform", w), h, t)
    assert got == pytest.approx(h * (1 - math.exp(-w * t / h)))
    assert got < w * t            # re-writes of a page count once


def test_hotset_formula_per_region():
    spec = WorkloadSpec("hotset", 5000, hot_fraction=0.1, hot_share=0.9)
    t, h = 0.8, DATA_PAGES
    hot = math.ceil(0.1 * h)      # 1636, as the workload itself sizes it (round() gave 1635)
    assert hot == hot_pages(spec, h)
    cold = h - hot
    want = (hot * (1 - math.exp(-5000 * 0.9 * t / hot))
            + cold * (1 - math.exp(-5000 * 0.1 * t / cold)))
    assert expected_distinct_pages(spec, h, t) == pytest.approx(want)
    # all writes on the hot set: it never grows past it
    only_hot = WorkloadSpec("hotset", 5000, hot_fraction=0.1, hot_share=1.0)
    assert expected_distinct_pages(only_hot, h, 1e9) == pytest.approx(hot)


def test_sequential_formula():
    spec = WorkloadSpec("sequential", 2000)
    assert expected_distinct_pages(spec, DATA_PAGES, 3.0) == pytest.approx(6000)
    assert expected_distinct_pages(spec, DATA_PAGES, 30.0) == pytest.approx(DATA_PAGES)


def test_phased_uses_cycle_mean_rate():
    spec = WorkloadSpec("phased", 4000, busy_seconds=1.0, quiet_seconds=3.0,
                        quiet_rate_fraction=0.2)
    mean = 4000 * (1.0 + 3.0 * 0.2) / 4.0
    t, h = 1.7, DATA_PAGES
    assert expected_distinct_pages(spec, h, t) == pytest.approx(h * (1 - math.exp(-mean * t / h)))


def test_unlimited_rate_needs_a_measured_rate():
    spec = WorkloadSpec("uniform", 0)
    with pytest.raises(ValueError, match="measured"):
        expected_distinct_pages(spec, DATA_PAGES, 1.0)
    h = DATA_PAGES
    got = expected_distinct_pages(spec, h, 1.0, rate_pages_per_second=7000)
    assert got == pytest.approx(h * (1 - math.exp(-7000 / h)))
    with pytest.raises(ValueError):
        expected_distinct_pages(WorkloadSpec("uniform", 10), h, -1.0)


# -- predict: hand-worked cases ----------------------------------------------------------

def test_idle_xen_one_round_then_empty_stop_and_copy():
    p = run(WorkloadSpec("idle"), resume_seconds=0.02)
    check_shape(p)
    assert len(p.rounds) == 2
    r0, final = p.rounds
    assert r0.pages_sent == GUEST_PAGES and r0.pages_dirtied == 0
    assert r0.duration_seconds == pytest.approx(GUEST_PAGES * WIRE / LINK)
    assert final.pages_sent == 0
    assert p.downtime_seconds == pytest.approx(0.02)
    assert "fewer than 50" in p.stop_reason
    assert p.converged
    assert p.lambda_ratio == 0


def test_qemu_switches_mid_pass_when_memory_fits():
    """QEMU's threshold is 0 until its first 100 ms window closes, so even a guest that fits
    bandwidth x downtime limit is sent live first; the switch then comes in the middle of
    the first pass, at the first check after the window closed."""
    link = 256 * MiB                      # 256 MiB/s x 300 ms = 76.8 MiB >= 64 MiB
    assert link * 0.3 >= GUEST
    p = run(WorkloadSpec("uniform", 20000), link_bytes_per_second=link, policy="qemu")
    check_shape(p)
    assert p.live_rounds == 1 and p.stop_code == "fits-downtime" and p.converged
    first = p.rounds[0]
    assert 0 < first.pages_sent < GUEST_PAGES, "cut short by the switch"
    assert first.duration_seconds == pytest.approx(0.1, abs=1e-9), "at the first window"
    # What was not sent yet goes in the stop-and-copy, with what was dirtied meanwhile.
    assert p.final_pages > GUEST_PAGES - first.pages_sent
    assert p.dirty_sync_count == 3, "setup, the sync that found it fits, stop-and-copy"


def test_qemu_idle_switches_in_its_one_pass_when_the_rest_fits():
    """An idle guest that does not fit at once: the first pass runs until what it has left
    fits bandwidth x limit, and the stop-and-copy sends just that rest."""
    p = run(WorkloadSpec("idle"), policy="qemu", downtime_limit_seconds=0.1)
    check_shape(p)
    assert p.live_rounds == 1 and p.rounds[0].pages_sent < GUEST_PAGES
    assert p.final_pages == pytest.approx(GUEST_PAGES - p.rounds[0].pages_sent)
    assert p.final_pages * PAGE < 0.1 * LINK


def test_uniform_converges_with_xen():
    w = 2000.0
    p = run(WorkloadSpec("uniform", w))
    check_shape(p)
    assert p.lambda_ratio == pytest.approx(w * PAGE / LINK)
    assert p.lambda_ratio < 1
    t0 = GUEST_PAGES * WIRE / LINK
    r1_pages = DATA_PAGES * (1 - math.exp(-w * t0 / DATA_PAGES))
    rounds = live(p)
    assert rounds[0].duration_seconds == pytest.approx(t0)
    assert rounds[1].pages_sent == pytest.approx(r1_pages)
    assert rounds[1].duration_seconds == pytest.approx(r1_pages * WIRE / LINK)
    t1 = r1_pages * WIRE / LINK
    assert rounds[2].pages_sent == pytest.approx(DATA_PAGES * (1 - math.exp(-w * t1 / DATA_PAGES)))
    assert p.converged
    assert p.live_rounds < 5
    assert p.final_pages < 50
    assert "fewer than 50" in p.stop_reason
    assert p.downtime_seconds == pytest.approx(p.final_pages * WIRE / LINK)


def fast_writer() -> WorkloadSpec:
    """Uniform writes at twice the link's page rate: lambda = 2."""
    return WorkloadSpec("uniform", 2 * LINK / PAGE)


# Uniform writes over a small guest saturate: at lambda = 2 QEMU's syncs after every chunk
# find the pending set settle near 45 % of the guest, which fits 300 ms at this link; with
# a 50 ms limit it never does.
@pytest.mark.parametrize(("policy", "cap", "limit"), [("xen", 5, 0.3), ("qemu", 30, 0.05)])
def test_no_convergence_stops_on_the_round_cap(policy, cap, limit):
    p = run(fast_writer(), policy=policy, downtime_limit_seconds=limit)
    check_shape(p)
    assert p.lambda_ratio == pytest.approx(2.0)
    assert p.live_rounds == cap
    assert f"cap ({cap})" in p.stop_reason
    assert not p.converged
    # the final copy is most of the guest: far above the 50-page / downtime targets
    assert p.final_pages > 0.4 * DATA_PAGES
    assert p.downtime_seconds > limit


def test_no_convergence_xen_legacy_stops_on_the_3x_factor():
    p = run(fast_writer(), policy="xen-legacy")
    check_shape(p)
    assert "3x" in p.stop_reason
    assert not p.converged
    sent = [r.pages_sent for r in live(p)]
    assert sum(sent) > 3 * GUEST_PAGES
    assert sum(sent[:-1]) <= 3 * GUEST_PAGES
    assert p.live_rounds < 29


def test_xen_legacy_skips_the_expected_overlap():
    w = 20000.0
    p = run(WorkloadSpec("uniform", w), policy="xen-legacy")
    check_shape(p)
    r0 = p.rounds[0]
    assert r0.pages_skipped > 0
    assert r0.pages_sent + r0.pages_skipped == pytest.approx(GUEST_PAGES)
    # round length and skips solved together: the round sends what it did not skip, and a
    # data page in batch b (of nb batches of 1024) is skipped when written before the
    # batch's start b t / nb: probability 1 - exp(-w (b t / nb) / H), averaged over batches.
    t = r0.duration_seconds
    assert t == pytest.approx(r0.pages_sent * WIRE / LINK)
    a = w * t / DATA_PAGES
    nb = math.ceil(GUEST_PAGES / 1024)
    expected = DATA_PAGES * sum(-math.expm1(-a * b / nb) for b in range(nb)) / nb
    assert r0.pages_skipped == pytest.approx(expected)
    # skipped pages stay dirty: the next round's set is everything written during round 0
    assert p.rounds[1].pages_sent + p.rounds[1].pages_skipped == pytest.approx(r0.pages_dirtied)
    assert r0.pages_dirtied == pytest.approx(DATA_PAGES * -math.expm1(-a))


def test_xen_legacy_one_batch_round_skips_nothing():
    """The bitmap is read at a batch's start: a round of one batch (< 1024 pages) skips
    nothing, as in xc_domain_save."""
    p = run(WorkloadSpec("hotset", 20000.0, hot_fraction=0.02, hot_share=1.0),
            policy="xen-legacy")
    small = [r for r in p.rounds[1:] if not r.final and r.pages_sent + r.pages_skipped <= 1024]
    assert small and all(r.pages_skipped == 0 for r in small)


def test_rate_limit_is_lifted_for_stop_and_copy():
    link, limit = 1024 * MiB, 32 * MiB
    w = 0.9 * limit / PAGE                # lambda 0.9 against the limit: 5 rounds, big final copy
    p = run(WorkloadSpec("uniform", w), link_bytes_per_second=link,
            rate_limit_bytes_per_second=limit, resume_seconds=0.005)
    check_shape(p)
    assert p.bandwidth_bytes_per_second == limit
    assert p.lambda_ratio == pytest.approx(0.9)
    assert p.rounds[0].duration_seconds == pytest.approx(GUEST_PAGES * WIRE / limit)
    assert p.final_pages > 1000
    assert p.downtime_seconds == pytest.approx(p.final_pages * WIRE / link + 0.005)
    assert p.downtime_seconds - 0.005 < p.final_pages * WIRE / limit / 10


def test_latency_is_added_to_every_round():
    p = run(WorkloadSpec("idle"), latency_seconds=0.01)
    assert p.rounds[0].duration_seconds == pytest.approx(GUEST_PAGES * WIRE / LINK + 0.01)
    assert p.downtime_seconds == pytest.approx(0.01)


def test_closed_form_matches_the_naive_iterative_model():
    # a sequential sweep that never wraps dirties exactly w t pages: Liu et al.'s assumption
    lam, n = 0.5, 4
    w = lam * LINK / PAGE
    p = run(WorkloadSpec("sequential", w), bytes_per_page_overhead=0, record_overhead_bytes=0,
            policy="xen", policy_settings={"max_iterations": n, "target_dirty_pages": 0})
    cf = closed_form(GUEST, w * PAGE, LINK, n)
    assert p.live_rounds == n
    assert p.lambda_ratio == pytest.approx(cf["lambda_ratio"])
    assert [r.pages_sent * PAGE for r in p.rounds] == pytest.approx(cf["round_bytes"])
    assert p.bytes_sent_total == pytest.approx(cf["bytes_sent_total"])
    assert p.bytes_sent_total == pytest.approx(GUEST * (1 - lam ** (n + 1)) / (1 - lam))
    assert p.total_time_seconds == pytest.approx(cf["total_time_seconds"])
    assert p.downtime_seconds == pytest.approx(cf["downtime_seconds"])
    assert p.downtime_seconds == pytest.approx(GUEST * lam**n / LINK)


def test_closed_form_at_lambda_one():
    cf = closed_form(GUEST, LINK, LINK, 3)
    assert cf["bytes_sent_total"] == pytest.approx(4 * GUEST)
    assert cf["downtime_seconds"] == pytest.approx(GUEST / LINK)


def test_model_drives_the_registered_policy_object(monkeypatch):
    class TwoRounds(PrecopyPolicy):
        name = "two-rounds"

        def __init__(self, **_):
            self.seen = []

        def decide(self, stats):
            self.seen.append(stats)
            if stats.iteration >= 2:
                return Decision(Action.STOP_AND_COPY, "two rounds done")
            return Decision.go_on()

    made = []

    def factory(**settings):
        made.append(TwoRounds(**settings))
        return made[-1]

    monkeypatch.setitem(policy_mod.POLICIES, "two-rounds", factory)
    p = run(WorkloadSpec("uniform", 20000), policy="two-rounds", latency_seconds=0.001)
    assert p.live_rounds == 2 and p.stop_reason == "two rounds done"
    seen = made[0].seen
    assert seen[0].iteration == 0 and seen[0].dirty_count == GUEST_PAGES
    assert seen[0].measured_bytes_per_second is None
    assert seen[0].nominal_bytes_per_second == LINK
    r0 = p.rounds[0]
    assert seen[1].dirty_count == round(r0.pages_dirtied)
    assert seen[1].total_written == GUEST_PAGES
    assert seen[1].last_round_seconds == pytest.approx(r0.duration_seconds)
    assert seen[1].measured_bytes_per_second == pytest.approx(
        GUEST_PAGES * WIRE / r0.duration_seconds)
    assert seen[2].elapsed_seconds == pytest.approx(
        r0.duration_seconds + p.rounds[1].duration_seconds)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bandwidth"):
        run(WorkloadSpec("idle"), link_bytes_per_second=None)
    with pytest.raises(ValueError, match="measured"):
        run(WorkloadSpec("uniform", 0))
    p = run(WorkloadSpec("uniform", 0), dirty_rate_pages_per_second=2000)
    assert p.lambda_ratio == pytest.approx(2000 * PAGE / LINK)
    with pytest.raises(ValueError):
        predict(guest_memory_bytes=GUEST + 1, workload=WorkloadSpec("idle"),
                link_bytes_per_second=LINK)


def test_compare_ratios():
    p = run(WorkloadSpec("idle"))
    assert p.downtime_seconds == 0
    measured = {
        "rounds": [{"pages_sent": GUEST_PAGES * 1.1, "final": False},
                   {"pages_sent": 10, "final": True}],
        "pages_sent_total": GUEST_PAGES * 1.1 + 10,
        "downtime_seconds": 0.004,
        "total_time_seconds": p.total_time_seconds * 1.2,
    }
    c = compare(measured, p)
    assert c["pages_sent_ratio"] == pytest.approx((GUEST_PAGES * 1.1 + 10) / GUEST_PAGES)
    assert c["rounds_ratio"] == pytest.approx(1.0)
    assert c["downtime_ratio"] is None
    assert c["total_time_ratio"] == pytest.approx(1.2)
    assert c["round_pages_sent_ratios"] == pytest.approx([1.1])
    json.dumps(c)


# -- pages by type: zero pages cost their pfn word ----------------------------------------------
def test_a_fresh_idle_guest_sends_its_zero_pages_for_a_pfn_word_each():
    p = run(WorkloadSpec("idle"), zero_page_detection="multifd")
    check_shape(p)
    first = p.rounds[0]
    assert first.pages_sent == GUEST_PAGES and first.zero_pages == DATA_PAGES
    assert p.bytes_sent_total == pytest.approx(TABLE_PAGES * WIRE + DATA_PAGES * ZERO_WIRE)
    assert first.duration_seconds == pytest.approx(p.bytes_sent_total / LINK)
    full = run(WorkloadSpec("idle", fill="random"), zero_page_detection="multifd")
    assert full.zero_pages == 0 and full.bytes_sent_total == pytest.approx(GUEST_PAGES * WIRE)


def test_the_warmup_sets_the_non_zero_pages_and_round_0_finds_more():
    """A fresh guest that wrote for 0.5 s: its distinct pages are non-zero at the start; the
    first pass finds some more, written before the cursor reached them."""
    w, warmup = 8000.0, 0.5
    spec = WorkloadSpec("uniform", w)
    p = run(spec, zero_page_detection="legacy", warmup_seconds=warmup)
    check_shape(p)
    written = expected_distinct_pages(spec, DATA_PAGES, warmup)
    first = p.rounds[0]
    normal = first.pages_sent - first.zero_pages
    assert TABLE_PAGES + written < normal < TABLE_PAGES + written + w * first.duration_seconds
    later = run(spec, zero_page_detection="legacy", warmup_seconds=4 * warmup)
    assert later.rounds[0].zero_pages < first.zero_pages


def test_qemu_sends_a_fresh_guest_in_one_cheap_pass():
    p = run(WorkloadSpec("idle"), policy="qemu", zero_page_detection="multifd",
            link_bytes_per_second=32 * MiB)
    check_shape(p)
    assert p.live_rounds == 1 and p.rounds[0].pages_sent == GUEST_PAGES
    assert p.rounds[0].zero_pages == pytest.approx(DATA_PAGES)
    assert p.final_pages == pytest.approx(0, abs=1e-6)
