"""The model's yardsticks: Liu et al.'s closed form for reference, and measured over
predicted for a migbed report."""

from cluster.model.iterative import ModelPrediction
from nodes.errors import ConfigError


def closed_form(v_mem_bytes: float, dirty_bytes_per_second: float,
                link_bytes_per_second: float, rounds: int) -> dict:
    """Liu et al.'s closed form: rounds 0..n-1 live, round n = `rounds` the stop-and-copy.

    lambda = D / R; V_i = V_mem lambda^i; V_mig = V_mem (1 - lambda^(n+1)) / (1 - lambda)
    (V_mem (n + 1) when lambda = 1); time = V_mig / R; downtime = V_n / R (no T_resume).
    """
    if not link_bytes_per_second > 0:
        raise ConfigError("closed form needs a link speed > 0")
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds!r}")
    lam = dirty_bytes_per_second / link_bytes_per_second
    volumes = [v_mem_bytes * lam**i for i in range(rounds + 1)]
    if lam == 1:
        v_mig = v_mem_bytes * (rounds + 1)
    else:
        v_mig = v_mem_bytes * (1 - lam ** (rounds + 1)) / (1 - lam)
    return {
        "lambda_ratio": lam,
        "rounds": rounds,
        "round_bytes": volumes,
        "bytes_sent_total": v_mig,
        "total_time_seconds": v_mig / link_bytes_per_second,
        "downtime_seconds": volumes[-1] / link_bytes_per_second,
    }


def _ratio(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or predicted == 0:
        return None
    return measured / predicted


def compare(measured_report: dict, prediction: ModelPrediction) -> dict:
    """Measured over predicted, for pages sent, live rounds, downtime and total time.

    `measured_report` has `rounds` (dicts with `pages_sent` and `final`), `pages_sent_total`,
    `downtime_seconds` and `total_time_seconds`. A ratio is None where the prediction is 0.
    `round_pages_sent_ratios` pairs the live rounds by index.
    """
    m_rounds = measured_report.get("rounds", [])
    m_live = [r for r in m_rounds if not r.get("final", False)]
    p_live = [r for r in prediction.rounds if not r.final]
    measured = {
        "pages_sent_total": measured_report.get("pages_sent_total"),
        "live_rounds": len(m_live),
        "downtime_seconds": measured_report.get("downtime_seconds"),
        "total_time_seconds": measured_report.get("total_time_seconds"),
    }
    predicted = {
        "pages_sent_total": prediction.pages_sent_total,
        "live_rounds": len(p_live),
        "downtime_seconds": prediction.downtime_seconds,
        "total_time_seconds": prediction.total_time_seconds,
    }
    if prediction.postcopy is not None:      # post-copy: the guest's faults
        measured["postcopy_requests"] = measured_report.get("postcopy_requests")
        predicted["postcopy_requests"] = prediction.postcopy.expected_faults
    return {
        "policy": prediction.policy,
        "measured": measured,
        "predicted": predicted,
        "faults_ratio": (_ratio(measured.get("postcopy_requests"),
                                predicted.get("postcopy_requests"))
                         if prediction.postcopy is not None else None),
        "pages_sent_ratio": _ratio(measured["pages_sent_total"], predicted["pages_sent_total"]),
        "rounds_ratio": _ratio(measured["live_rounds"], predicted["live_rounds"]),
        "downtime_ratio": _ratio(measured["downtime_seconds"], predicted["downtime_seconds"]),
        "total_time_ratio": _ratio(measured["total_time_seconds"],
                                   predicted["total_time_seconds"]),
        "round_pages_sent_ratios": [
            _ratio(m.get("pages_sent"), p.pages_sent) for m, p in zip(m_live, p_live, strict=False)],
    }
