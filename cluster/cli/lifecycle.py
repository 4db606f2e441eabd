"""The cluster's life: `migbed up`, `migbed down`, and `migbed list` of what runs on it."""

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import IO

from cluster.cli.fleet import add_rack_options
from cluster.cli.options import (
    Commands,
    add_cluster_options,
    add_prometheus_options,
    arg,
    cluster_spec_from,
)
from nodes.units import parse_port_range


def _progress_printer(out: IO[str]):
    """One line on stderr each time the start-up gets further: Ray, then hosts up so far."""
    def show(p: dict) -> None:
        if p.get("stage") == "hosts":
            print(f"  hosts up: {p['hosts_up']}/{p['hosts']}", file=out, flush=True)
        else:
            print(f"  starting {p.get('stage')}...", file=out, flush=True)
    return show


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.launch import persistent
    spec = cluster_spec_from(args, args.address or os.environ.get("RAY_ADDRESS") or None)
    if args.prometheus:
        spec = dataclasses.replace(spec, prometheus_port=args.prometheus_port)
    t0 = time.monotonic()
    state = persistent.up(spec, on_progress=_progress_printer(sys.stderr))
    seconds = time.monotonic() - t0
    if args.json:
        print(json.dumps({**state, "startup_seconds": seconds}, indent=2))
        return 0
    print(f"migbed cluster up: {len(state['hosts'])} hosts ({', '.join(state['hosts'])}) on Ray "
          f"at {state['address']} in {seconds:.1f} s")
    if state.get("prometheus"):
        print(f"Prometheus: {state['prometheus']['url']} (every host scraped each second; "
              f"targets in {state['sd_file']}); Grafana: import dashboards/migbed.json")
    elif state.get("sd_file"):
        print(f"metrics: every host serves /metrics; Prometheus targets in {state['sd_file']}")
    print("next: `migbed create host-0 vm1 --memory 64MiB --workload uniform --dirty-rate "
          "20000`, `migbed list`, `migbed migrate vm1 host-1`, `migbed down`")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cluster.launch import persistent
    stopped = persistent.down()
    if args.json:
        print(json.dumps({"stopped": stopped}))
    else:
        print("migbed cluster stopped" if stopped else "no migbed cluster was running")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cluster.console import print_listing
    from cluster.testbed import Testbed
    listing = Testbed.attach().list()
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        print_listing(listing)
    return 0


def register(sub: Commands) -> None:
    s = sub.add_parser("up", help="start a persistent local cluster (or hosts on a Ray cluster)")
    add_cluster_options(s, memory="1GiB")
    s.add_argument("--address", default=None,
                   help="an existing Ray cluster to place hosts on (default: $RAY_ADDRESS, "
                        "else a new local cluster); each host's data plane listens on its "
                        "node's IP")
    s.add_argument("--placement", default=None, metavar="HOST=NODE,...",
                   help="with --address: pin hosts to nodes, e.g. host-0=NODE_ID,host-1=IP "
                        "(a node id, 6+ characters of one, or a node's IP; `ray list nodes` "
                        "shows them); the other hosts go round robin")
    s.add_argument("--data-ports", type=arg(parse_port_range, "--data-ports"), default=None,
                   metavar="LOW-HIGH",
                   help="ports the hosts' migration listeners take, e.g. 47000-47999: the "
                        "range to open between machines (default: any free port)")
    add_prometheus_options(s)
    add_rack_options(s)
    s.add_argument("--json", action="store_true", help="print the cluster's state as JSON")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("down", help="stop the cluster; leaves no Ray process behind")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("list", help="hosts with their frames, and every guest")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
