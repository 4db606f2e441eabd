"""A real multi-node Ray cluster started with Ray's own CLI (`ray start --head`, then
`ray start --address ...` for each more node), all on this machine, as an operator starts one
on several machines.

Each `ray start` runs in a session of its own, and the daemons it leaves keep that session
(workers included), so `stop()` kills exactly this cluster's processes by their sessions
(`cluster.launch.reaper`), never with a bare `ray stop`, which would also stop the test session's
shared cluster. Every port is a free one and the head has a temp dir of its own.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from cluster.launch.reaper import kill_session

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_SECONDS = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCliCluster:
    """Nodes started by `ray start`; `env` marks every process they start (`MIGBED_TEST_RAY`)."""

    def __init__(self, temp_dir: Path, marker: str):
        self.temp_dir = temp_dir
        self.marker = marker
        self.port = free_port()
        self.sessions: list[int] = []
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(MIGBED_TEST_RAY=marker, RAY_USAGE_STATS_ENABLED="0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, *args: str) -> None:
        cmd = [RAY, "start", *args, "--num-cpus=1", "--object-store-memory=100000000",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"]
        p = subprocess.Popen(cmd, env=self.env, start_new_session=True, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.sessions.append(p.pid)
        out, _ = p.communicate(timeout=START_TIMEOUT_SECONDS)
        if p.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed: {out[-2000:]}")

    def start_head(self) -> None:
        self._start("--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                    "--include-dashboard=false", f"--dashboard-port={free_port()}",
                    f"--ray-client-server-port={free_port()}")

    def add_node(self) -> None:
        self._start(f"--address={self.address}")

    def nodes(self) -> list[dict]:
        """The alive nodes as Ray lists them (NodeID, NodeManagerAddress), from a driver in
        a child process (this one may be connected to the shared cluster)."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR', "
                "log_to_driver=False); print(json.dumps([n for n in ray.nodes() "
                "if n['Alive']], default=str))")
        p = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                           text=True, timeout=120, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        for sid in reversed(self.sessions):
            kill_session(sid)
