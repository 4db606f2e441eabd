"""A real Prometheus for a migbed cluster: the discovery file, its config, the server.

Every host serves its own /metrics (`nodes.host.metrics`). The cluster lists them in a Prometheus
file-based service discovery file (`targets.json`: one target per host, labelled `host`); the
generated `prometheus.yml` scrapes that file's targets every second and loads migbed's
recording and alert rules (`dashboards/rules.yml`). `Prometheus` runs the `prometheus` binary
(Debian's package) as a child process, as a context manager, for tests and `migbed demo`.
`migbed up --prometheus` runs it under `python -m cluster.prometheus`, a small supervisor that
also rewrites the discovery file as hosts come and go (a host whose endpoint stops answering
leaves the file, and comes back when it answers again); `migbed down` stops it.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from nodes.errors import ClusterError

DEFAULT_PORT = 9090
DEFAULT_ADDRESS = "127.0.0.1"
JOB_NAME = "migbed"
SCRAPE_INTERVAL_SECONDS = 1
RULES_FILE = Path(__file__).resolve().parents[1] / "dashboards" / "rules.yml"
SD_FILE_NAME = "targets.json"
CONFIG_FILE_NAME = "prometheus.yml"
LOG_FILE_NAME = "prometheus.log"
SUPERVISOR_LOG_NAME = "supervisor.log"
INSTALL_HINT = ("install it with `apt-get install prometheus` (Debian, Ubuntu), or put a "
                "`prometheus` binary on PATH")
PROBE_TIMEOUT_SECONDS = 0.5
REFRESH_SECONDS = 1.0


class PrometheusError(ClusterError):
    """Prometheus cannot be set up or started; the message says what to change."""


# -- the pieces: binary, port, discovery file, config ------------------------------------
def find_binary(binary: str = "prometheus") -> str:
    """The path of the Prometheus server binary, or an error saying how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise PrometheusError(f"the Prometheus server binary `{binary}` is not installed; "
                              f"{INSTALL_HINT}")
    return path


def check_port_free(port: int, address: str = DEFAULT_ADDRESS) -> None:
    """Raise a PrometheusError naming `port` if something already listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PrometheusError(
                    f"port {port} on {address} is in use, so Prometheus cannot listen there; "
                    "stop what uses it or pick another port (--prometheus-port)") from None
            raise PrometheusError(f"Prometheus cannot listen on {address}:{port}: "
                                  f"{exc.strerror or exc}") from None


def preflight(port: int, address: str = DEFAULT_ADDRESS, binary: str = "prometheus") -> None:
    """The checks `migbed up --prometheus` makes before it starts anything."""
    find_binary(binary)
    if port:
        check_port_free(port, address)


def free_port(address: str = DEFAULT_ADDRESS) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def write_sd_file(path: str | Path, endpoints: Mapping[str, str]) -> Path:
    """Write Prometheus's file-based discovery file: one target per host, labelled `host`.

    Written to a temporary name and renamed, so Prometheus never reads half a file.
    """
    path = Path(path)
    groups = [{"targets": [endpoint], "labels": {"host": host}}
              for host, endpoint in sorted(endpoints.items())]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(groups, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise PrometheusError(
            f"cannot write the Prometheus service discovery file {path}: "
            f"{exc.strerror or exc}; use a writable folder (set MIGBED_HOME)") from None
    return path


def read_sd_file(path: str | Path) -> dict[str, str]:
    """host -> "address:port", as `write_sd_file` wrote them."""
    groups = json.loads(Path(path).read_text())
    return {g["labels"]["host"]: t for g in groups for t in g["targets"]}


def answering(endpoints: Mapping[str, str],
              timeout_seconds: float = PROBE_TIMEOUT_SECONDS) -> dict[str, str]:
    """The endpoints that accept a TCP connection (a dead host's port refuses it)."""
    alive = {}
    for host, endpoint in endpoints.items():
        address, _, port = endpoint.rpartition(":")
        try:
            with socket.create_connection((address, int(port)), timeout=timeout_seconds):
                alive[host] = endpoint
        except (OSError, ValueError):
            pass
    return alive


def refresh_sd_file(path: str | Path, known: Mapping[str, str],
                    timeout_seconds: float = PROBE_TIMEOUT_SECONDS) -> dict[str, str]:
    """Rewrite the discovery file with the `known` hosts that answer; returns those."""
    alive = answering(known, timeout_seconds)
    try:
        current = read_sd_file(path)
    except (OSError, ValueError, KeyError, TypeError):
        current = None
    if current != alive:
        write_sd_file(path, alive)
    return alive


def render_config(sd_file: str | Path, rule_files: list[str | Path] | tuple = (),
                  scrape_interval_seconds: int = SCRAPE_INTERVAL_SECONDS,
                  job: str = JOB_NAME) -> str:
    """prometheus.yml: scrape the discovery file's targets, evaluate migbed's rules.

    `honor_labels` keeps the `host` label each host exports (the discovery file's `host`
    label then only names the target, for `up` and scrape metadata).
    """
    interval = f"{scrape_interval_seconds}s"
    rules = "".join(f"  - {json.dumps(str(r))}\n" for r in rule_files)
    return (
        "# Generated by migbed (cluster/prometheus.py): scrape every migbed host through the\n"
        "# file-based service discovery file that the cluster keeps current.\n"
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  scrape_timeout: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        + (f"rule_files:\n{rules}" if rules else "")
        + "scrape_configs:\n"
        f"  - job_name: {job}\n"
        "    honor_labels: true\n"
        "    file_sd_configs:\n"
        f"      - files: [{json.dumps(str(sd_file))}]\n"
        "        refresh_interval: 5s\n")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "no output"


# -- the server -----------------------------------------------------------------------------
class Prometheus:
    """A `prometheus` server on `address:port` (0: a free port), its files in `workdir`."""

    def __init__(self, workdir: str | Path, port: int = DEFAULT_PORT,
                 address: str = DEFAULT_ADDRESS, *, sd_file: str | Path | None = None,
                 rule_files: list[str | Path] | None = None, binary: str = "prometheus",
                 scrape_interval_seconds: int = SCRAPE_INTERVAL_SECONDS):
        self.workdir = Path(workdir)
        self.port = port
        self.address = address
        self.sd_file = Path(sd_file) if sd_file else self.workdir / SD_FILE_NAME
        if rule_files is None:
            rule_files = [RULES_FILE] if RULES_FILE.exists() else []
        self.rule_files = [Path(r) for r in rule_files]
        self.binary = binary
        self.scrape_interval_seconds = scrape_interval_seconds
        self.config_file = self.workdir / CONFIG_FILE_NAME
        self.log_file = self.workdir / LOG_FILE_NAME
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def prepare(self) -> None:
        """Every check that can fail before the server starts, each with its own message."""
        self.binary_path = find_binary(self.binary)
        if self.port == 0:
            self.port = free_port(self.address)
        check_port_free(self.port, self.address)
        if not self.sd_file.exists():
            write_sd_file(self.sd_file, {})
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            rules = []
            for r in self.rule_files:   # a copy beside the config: the folder is self-contained
                rules.append(self.workdir / r.name)
                shutil.copyfile(r, rules[-1])
            self.config_file.write_text(render_config(self.sd_file.resolve(), rules,
                                                      self.scrape_interval_seconds))
        except OSError as exc:
            raise PrometheusError(f"cannot write Prometheus's files in {self.workdir}: "
                                  f"{exc.strerror or exc}; use a writable folder (set "
                                  "MIGBED_HOME)") from None

    def start(self, timeout_seconds: float = 30.0) -> "Prometheus":
        self.prepare()
        log = open(self.log_file, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [self.binary_path, f"--config.file={self.config_file}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address={self.address}:{self.port}",
                 "--storage.tsdb.retention.time=2d"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        try:
            wait_ready(self.url, timeout_seconds, self.proc, self.log_file, self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> "Prometheus":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the HTTP API ----------------------------------------------------------------------
    def api(self, path: str, **params: object) -> dict | list:
        return api_get(self.url, path, **params)

    def query(self, expr: str, at: float | None = None) -> list:
        params: dict = {"query": expr}
        if at is not None:
            params["time"] = at
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def active_targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]


def api_get(url: str, path: str, timeout_seconds: float = 10.0, **params: object):
    """GET `url`/api/v1/`path`; returns its `data`, or raises PrometheusError with the error."""
    query = urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}",
                                    timeout=timeout_seconds) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            raise PrometheusError(f"Prometheus at {url} answered {exc.code} to {path}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PrometheusError(f"Prometheus at {url} does not answer: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus rejected {params}: {body.get('error')}")
    return body["data"]


def wait_ready(url: str, timeout_seconds: float, proc: subprocess.Popen, log: Path,
               port: int) -> None:
    """Until `url`/-/ready answers; a server that exits first is explained from its log."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        if proc.poll() is not None:
            tail = _tail(log)
            if "address already in use" in tail:
                raise PrometheusError(f"port {port} is in use, so Prometheus cannot listen "
                                      "there; pick another port (--prometheus-port)")
            raise PrometheusError(f"Prometheus exited with code {proc.returncode}: {tail} "
                                  f"(log: {log})")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus at {url} not ready after {timeout_seconds:g} s; "
                               f"see {log}")
        time.sleep(0.05)


# -- a local testbed's targets, for `migbed demo --prometheus` ---------------------------------
class LocalTargets:
    """Keeps a discovery file listing the hosts of every `Testbed.local` while it runs."""

    def __init__(self, sd_file: str | Path):
        self.sd_file = Path(sd_file)

    def started(self, testbed) -> None:
        write_sd_file(self.sd_file, testbed.metrics_endpoints())

    def closing(self, testbed) -> None:
        write_sd_file(self.sd_file, {})


# -- the supervisor of `migbed up --prometheus` ---------------------------------------------
def start_supervised(workdir: str | Path, endpoints: Mapping[str, str],
                     port: int = DEFAULT_PORT, address: str = DEFAULT_ADDRESS,
                     timeout_seconds: float = 30.0) -> dict:
    """Run Prometheus under a supervisor process of its own session; returns what `down`
    needs: {"pid", "url", "sd_file", "config", "log"} (pid is also the process group)."""
    workdir = Path(workdir)
    prom = Prometheus(workdir, port, address)
    prom.prepare()          # fail here, in the caller, with the precise message
    write_sd_file(prom.sd_file, endpoints)
    args = {"workdir": str(workdir), "port": prom.port, "address": address,
            "endpoints": dict(endpoints)}
    log_path = workdir / SUPERVISOR_LOG_NAME
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.prometheus", json.dumps(args)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_ready(prom.url, timeout_seconds, proc, log_path, prom.port)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    return {"pid": proc.pid, "url": prom.url, "sd_file": str(prom.sd_file),
            "config": str(prom.config_file), "log": str(prom.log_file)}


def supervise(args: dict) -> int:
    """Run Prometheus; every second, rewrite the discovery file with the hosts that answer."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    known = args["endpoints"]
    prom = Prometheus(args["workdir"], args["port"], args["address"])
    prom.start()
    print(f"prometheus at {prom.url}, pid {prom.proc.pid}", flush=True)
    try:
        while not stop.is_set() and prom.running:
            try:
                refresh_sd_file(prom.sd_file, known)
            except PrometheusError as exc:
                print(f"discovery file: {exc}", flush=True)
            stop.wait(REFRESH_SECONDS)
    finally:
        prom.stop()
    return 0


if __name__ == "__main__":
    sys.exit(supervise(json.loads(sys.argv[1])))
