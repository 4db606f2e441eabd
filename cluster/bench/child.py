"""A bench section's cluster in a child process (`python -m cluster.bench SECTION JSON`):
this process may already drive a Ray cluster, and a Ray driver drives one at a time."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_child(args: list[str], timeout: float) -> dict:
    """Run `python -m cluster.bench *args`; its last stdout line is its JSON answer."""
    cmd = [sys.executable, "-m", "cluster.bench", *args]
    root = Path(__file__).resolve().parents[2]      # the tree with cluster/ in it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench {args[0]} child failed: {tail}")
    return json.loads(lines[-1])
