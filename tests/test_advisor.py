"""`migbed advise`'s ranking on cases whose answer is known, `model --wss`, and the measuring
commands' bad input (one line, exit 2)."""

import json

import numpy as np
import pytest

from cluster.advisor import advise, migrate_line, rank
from cluster.cli import main
from nodes.errors import ConfigError
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec
from workloads.writableset import WssCurve, curve_from_ticks

MiB = 1 << 20
CONTENT = {"zero_fraction": 0.0, "compression_ratio": 1.0, "xbzrle_ratio": 1.0,
           "sample_pages": 64, "xbzrle_changed_pages": 0}


def _curve(rate: float, hot: int, data_pages: int = 4080, guest_pages: int = 4096) -> WssCurve:
    """A measured-like curve of `rate` writes/s, 90 % of them on `hot` pages."""
    rng = np.random.default_rng(7)
    ticks = []
    for _ in range(100):
        n = rng.poisson(rate * 0.01)
        on_hot = rng.binomial(n, 0.9)
        ticks.append(np.concatenate([rng.integers(0, hot, on_hot),
                                     rng.integers(hot, data_pages, n - on_hot)]))
    return curve_from_ticks(ticks, 0.01, data_pages=data_pages, guest_pages=guest_pages,
                            page_size=4096, guest="g")


def test_a_guest_that_outruns_the_link_is_advised_post_copy():
    curve = _curve(50000, 4000)                  # 200 MB/s of page writes over a 10 MB/s link
    ranked = advise(curve, CONTENT, MigrationSettings(link_bytes_per_second=10e6), 16 * MiB,
                    WorkloadSpec())
    by_name = {a.name: a for a in ranked}
    assert not by_name["pre-copy (qemu)"].meets_limits
    assert not by_name["pre-copy (xen)"].converges
    assert ranked[0].name == "post-copy" and ranked[0].meets_limits
    assert ranked[0].bytes_sent == min(a.bytes_sent for a in ranked if a.meets_limits)


def test_an_idle_guest_needs_no_aid():
    curve = _curve(1, 1)
    ranked = advise(curve, CONTENT, MigrationSettings(link_bytes_per_second=100e6), 16 * MiB,
                    WorkloadSpec())
    assert all(a.meets_limits for a in ranked[:3])
    assert ranked[0].name == "pre-copy (xen)"    # as cheap as any: the simplest wins the tie


def test_compressible_pages_are_advised_compression():
    content = dict(CONTENT, compression_ratio=0.1)
    ranked = advise(_curve(2000, 400), content, MigrationSettings(link_bytes_per_second=20e6),
                    16 * MiB, WorkloadSpec())
    assert ranked[0].name == "multifd+zstd"
    line = migrate_line("g", "host-1", ["--bandwidth", "20MB", "--policy", "xen",
                                        "--auto-converge", "--postcopy-after=1"], ranked[0])
    assert line == ("migbed migrate g host-1 --bandwidth 20MB --policy qemu "
                    "--multifd-channels 2 --multifd-compression zstd")


def test_ranking_puts_the_limits_first_then_bytes_then_time():
    rows = [{"n": "a", "ok": False, "b": 1, "t": 1}, {"n": "b", "ok": True, "b": 10, "t": 9},
            {"n": "c", "ok": True, "b": 10.1, "t": 5}, {"n": "d", "ok": True, "b": 20, "t": 1}]
    out = rank(rows, meets=lambda r: r["ok"], sent=lambda r: r["b"], took=lambda r: r["t"])
    assert [r["n"] for r in out] == ["c", "b", "d", "a"]


def test_advise_needs_a_bandwidth():
    with pytest.raises(ConfigError, match="bandwidth"):
        advise(_curve(100, 10), CONTENT, MigrationSettings(), 16 * MiB, WorkloadSpec())


def test_model_takes_a_measured_curve_and_says_so(tmp_path, capsys):
    path = tmp_path / "wss.json"
    path.write_text(_curve(3000, 400).to_json())
    args = ["model", "--guest-memory", "16MiB", "--bandwidth", "20MB", "--json"]
    assert main([*args, "--wss", str(path)]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["dirtying"]["source"] == "measured-wss"
    assert main([*args, "--workload", "uniform", "--dirty-rate", "3000"]) == 0
    assert json.loads(capsys.readouterr().out)["dirtying"]["source"] == "workload"


@pytest.mark.parametrize("argv, match", [
    (["model", "--bandwidth", "20MB", "--wss", "/nonexistent/wss.json"], "cannot read --wss"),
    (["wss", "g", "--plot", "curve.txt"], "--plot"),
    (["wss", "g", "--duration", "soon"], "duration"),
    (["dirtyrate", "g", "--repeat", "0"], "--repeat"),
    (["dirtyrate", "g", "--mode", "sideways"], "invalid choice"),
    (["dirtyrate", "g", "--sample-pages-per-gib", "0"], "sample-pages-per-gib"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_the_tables_show_the_curve_the_windows_and_the_advice():
    from cluster.console import render_text
    from cluster.measureview import advice_table, dirtyrate_table, wss_table
    curve = _curve(3000, 400)
    text = render_text(wss_table(curve))
    assert "10 ms" in text and f"{curve.pages[0]:.0f}" in text
    run = {"mode": "dirty-ring", "guest": "g", "vcpu": "process", "window_seconds": 1.0,
           "pages_per_second": 990.0, "bytes_per_second": 990.0 * 4096, "page_size": 4096,
           "true_writes_per_second": 1000.0, "true_pages_per_second": 900.0,
           "vcpu_pages_per_second": [500.0, 490.0]}
    text = render_text(dirtyrate_table([run, run]))
    assert "500 + 490" in text and "-1.0 %" in text
    ranked = advise(curve, CONTENT, MigrationSettings(link_bytes_per_second=20e6), 16 * MiB,
                    WorkloadSpec())
    assert ranked[0].name in render_text(advice_table(ranked))
