"""`drain --simulate`: the same scheduler on a virtual clock with the model's migrations,
deterministic for a seed, under the limits, fast at a thousand hosts."""

import json

import pytest

from cluster.cli import main
from cluster.fleetsim import SimFleet, simulate_drain
from cluster.fleetstats import peak_parallel
from cluster.scheduler import Limits
from nodes.errors import ConfigError
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024


def _fleet(seed: int) -> SimFleet:
    return SimFleet(hosts=12, racks=3, guests_per_host=3, guest_memory_bytes=64 * MiB,
                    workload=WorkloadSpec("uniform", 3000, fill="random"),
                    host_link_bytes_per_second=64 * MiB, uplink_bytes_per_second=96 * MiB,
                    seed=seed)


def test_simulation_is_deterministic_for_a_seed():
    limits = Limits(max_parallel=3, max_outbound_per_host=1)
    a = simulate_drain(_fleet(5), ["rack-0"], limits)
    b = simulate_drain(_fleet(5), ["rack-0"], limits)
    c = simulate_drain(_fleet(6), ["rack-0"], limits)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True), "seed matters"
    assert a["stats"]["migrations"] == 12 and a["stats"]["by_status"] == {"completed": 12}
    entries = [m["schedule"] for m in a["moves"]]
    assert peak_parallel(entries) <= 3
    for host in a["hosts"]:
        mine = [e for e in entries if e["source"] == host]
        assert peak_parallel(mine) <= 1, "one out of each host at a time"
    assert all(m["destination"] not in a["hosts"] for m in a["moves"])


def test_more_parallel_shares_the_uplink_longer():
    """Under one shared uplink, five at a time each get a fifth of it: each migration takes
    longer than one alone, though the drain as a whole does not."""
    one = simulate_drain(_fleet(1), ["rack-0"], Limits(max_parallel=1))
    five = simulate_drain(_fleet(1), ["rack-0"], Limits(max_parallel=5))
    assert five["stats"]["total_time_seconds"]["p50"] > one["stats"]["total_time_seconds"]["p50"]


def test_bad_simulations_are_refused():
    with pytest.raises(ConfigError, match="no host"):
        simulate_drain(_fleet(0), ["host-99"], Limits())
    with pytest.raises(ConfigError, match="no rack"):
        simulate_drain(_fleet(0), ["rack-7"], Limits())
    with pytest.raises(ConfigError, match="dirty rate"):
        SimFleet(hosts=3, workload=WorkloadSpec("uniform"))


def test_a_thousand_hosts_from_the_command_line(capsys):
    rc = main(["drain", "--simulate", "--hosts", "1000", "--racks", "50",
               "--guests-per-host", "20", "--max-parallel", "5", "--uplink", "10Gbit",
               "--host-link", "10Gbit", "--guest-memory", "256MiB", "--json", "rack-0"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["migrations"] == 400 and out["stats"]["peak_parallel"] == 5
    assert main(["drain", "--simulate", "--max-parallel", "0", "rack-0"]) == 2
    assert "--max-parallel must be" in capsys.readouterr().err


def test_calibration_recovers_what_the_model_leaves_out(tmp_path, capsys):
    from cluster.fleetsim import Calibration, calibrate
    limits = Limits(max_parallel=1)
    fleet = _fleet(2)
    truth = Calibration(resume_seconds=0.004, overhead_seconds=0.25)
    real = simulate_drain(fleet, ["rack-0"], limits, calibration=truth)["stats"]
    cal = calibrate(fleet, ["rack-0"], limits, real)
    assert cal.resume_seconds == pytest.approx(0.004, rel=0.05)
    assert cal.overhead_seconds == pytest.approx(0.25, rel=0.05)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["drain", "--simulate", "--calibrate", str(bad), "rack-0"]) == 2
    assert "no stats" in capsys.readouterr().err


def test_simulated_guests_from_a_file(tmp_path):
    from cluster.guestfile import read_guest_file
    p = tmp_path / "g.toml"
    p.write_text('[[template]]\ncount = 9\nname = "w{i}"\nmemory = "32MiB"\n'
                 'workload = "uniform"\ndirty_rate = 1000\nfill = "random"\n'
                 '[[guest]]\nname = "big"\nhost = "host-0"\nmemory = "128MiB"\n'
                 'workload = "hotset"\ndirty_rate = 500\n')
    names = [f"host-{i}" for i in range(6)]
    guests = tuple(read_guest_file(p, names))
    fleet = SimFleet(hosts=6, racks=2, guests=guests, host_link_bytes_per_second=64 * MiB,
                     workload=WorkloadSpec("uniform", 1000))
    r = simulate_drain(fleet, ["host-0", "host-1"], Limits(max_parallel=2))
    assert sorted(m["guest"] for m in r["moves"]) == ["big", "w0", "w1", "w6", "w7"]
    assert r["fleet"]["guests_from_file"] == 10
    by = {m["guest"]: m for m in r["moves"]}
    assert by["big"]["bytes_sent"] != by["w0"]["bytes_sent"], "each guest as its table says"
