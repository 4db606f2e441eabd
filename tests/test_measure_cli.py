"""`migbed wss`, `dirtyrate` and `advise` against a real Ray cluster: a running guest measured
and advised through the command line, never migrated (it stays where it was, as it was)."""

import json

from cluster.cli import main
from nodes.host.specs import GuestSpec
from tests.checks import frames_exact
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024


def test_wss_dirtyrate_and_advise_measure_a_guest_without_moving_it(ray_home, unique_name,
                                                                      capsys, tmp_path):
    tb = ray_home
    guest = unique_name("wss")
    tb.create("host-0", GuestSpec(guest, 16 * MiB, workload=WorkloadSpec("uniform", 2000)))
    try:
        plot = tmp_path / "wss.png"
        assert main(["wss", guest, "--duration", "500ms", "--json", "--plot", str(plot)]) == 0
        curve = json.loads(capsys.readouterr().out)
        assert curve["guest"] == guest and curve["pages"][-1] > 0 and plot.stat().st_size > 0
        assert main(["dirtyrate", guest, "--mode", "dirty-bitmap", "--duration", "200ms",
                     "--repeat", "2", "--json"]) == 0
        rate = json.loads(capsys.readouterr().out)
        assert len(rate["windows"]) == 2 and rate["pages_per_second"] > 0
        assert abs(rate["bias"]) < 0.05             # the log against the guest's counters
        assert main(["advise", guest, "host-1", "--bandwidth", "50MB", "--measure", "500ms",
                     "--json"]) == 0
        advice = json.loads(capsys.readouterr().out)
        assert advice["migrate"].startswith(f"migbed migrate {guest} host-1 --bandwidth 50MB")
        assert advice["advice"][0]["meets_limits"]
        assert main(["model", "--wss-guest", guest, "--bandwidth", "50MB", "--json"]) == 0
        model = json.loads(capsys.readouterr().out)
        assert model["dirtying"]["source"] == "measured-wss" and model["converged"]
        assert main(["advise", guest, "nowhere", "--bandwidth", "50MB"]) == 2
        assert "no host 'nowhere'" in capsys.readouterr().err
        status = tb.host("host-0").call("guest_status", guest)
        assert status["mode"] == "p2m" and not status["logdirty"] and not status["migrating"]
    finally:
        tb.destroy(guest)
    frames_exact(tb)
