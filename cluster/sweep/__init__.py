"""`migbed sweep`: a grid of migrations described by a scenario file, with the model beside
every measurement (like QEMU guestperf's batch mode).

A scenario (`scenario`: TOML, parsed into the frozen `Scenario`) names the fixed settings and
the axes to sweep; `runner` migrates every point of the grid `repeats` times on one cluster,
after measuring the downtime floor the model takes as its T_resume. `agreement` sets
measured against predicted per point and explains the differences; `outputs` writes one JSON
per run, `sweep.csv` and the summary; `curves` and `plots` draw the PNGs.
"""

from cluster.sweep.agreement import agreement_table
from cluster.sweep.knobs import KNOBS, Knob
from cluster.sweep.outputs import SweepResult
from cluster.sweep.scenario import Scenario, load_scenario
from cluster.sweep.sweep_runner import run_sweep

__all__ = ["KNOBS", "Knob", "Scenario", "SweepResult", "agreement_table", "load_scenario",
           "run_sweep"]
