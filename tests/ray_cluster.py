"""A real multi-node Ray cluster on this machine, started with ``ray start`` as a user would.

Every node is one ``ray start --block`` process in its own session, with its own ports and the
cluster's own ``--temp-dir``, so it neither finds nor disturbs any other Ray on the machine (other
tests start local ones concurrently). ``ray stop`` is never used: it stops every Ray process of
the machine. Stopping sends SIGTERM to each ``ray start`` process (it then shuts its node down)
and, after a grace period, SIGKILL to the process groups this helper created.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(what: str, ok, timeout: float, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: `{' '.join(proc.args)}` exited with {proc.returncode}")
        time.sleep(0.25)
    raise TimeoutError(f"{what} did not happen within {timeout:g} s")


def _started(log: Path) -> bool:
    return log.exists() and b"Ray runtime started." in log.read_bytes()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    node_manager_port: int
    node_id: str = ""
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class LocalCluster:
    """A head and worker nodes; ``address`` is the GCS address, ``dashboard`` the Jobs API URL."""

    temp_dir: Path
    address: str
    dashboard: str
    env: dict[str, str]
    nodes: dict[str, Node] = field(default_factory=dict)

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def stop(self) -> None:
        procs = [n.proc for n in self.nodes.values() if n.proc.poll() is None]
        for proc in reversed(procs):  # workers first, the head last
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes.values():  # whatever a node left behind, in the group it started
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if node.proc.poll() is None:
                node.proc.wait(timeout=10)


def start_cluster(
    workers: dict[str, list[str]],
    head_args: list[str] = (),
    timeout: float = 180,
    attempts: int = 2,
    dashboard: bool = True,
    object_store_mb: int = 150,
) -> LocalCluster:
    """Start a head (with the dashboard, for Ray Jobs, unless ``dashboard`` is false) and the named
    workers, each node with an object store of ``object_store_mb``; wait until all joined.

    Ray gives a starting node a fixed 30 s to register, which a heavily loaded machine can miss:
    a failed start is stopped and tried again, up to ``attempts`` times in all.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start_cluster(workers, list(head_args), timeout, dashboard, object_store_mb)
        except (RuntimeError, TimeoutError):
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_cluster(
    workers: dict[str, list[str]],
    head_args: list[str],
    timeout: float,
    dashboard: bool,
    object_store_mb: int,
) -> LocalCluster:
    temp_dir = Path(
        tempfile.mkdtemp(prefix="fmray-")
    )  # short: Ray's socket paths must stay < 108 chars
    (temp_dir / "head").mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_TMPDIR": str(temp_dir / "head"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        # the dashboard gives each module 30 s to start, too little on a loaded 2-core machine
        "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180",
    }
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = LocalCluster(
        temp_dir=temp_dir,
        address=f"127.0.0.1:{gcs_port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        env=env,
    )

    def launch(name: str, args: list[str]) -> None:
        # Each node its own temp dir, as on separate machines: nodes sharing one would share the
        # session's sockets and runtime_resources/, and one node's runtime-env clean-up would
        # delete the working_dir another node's job driver runs in.
        nm_port = free_port()
        (temp_dir / name).mkdir(exist_ok=True)
        cmd = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(temp_dir / name),
            "--node-manager-port",
            str(nm_port),
            "--object-manager-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--object-store-memory",
            str(object_store_mb * 2**20),
            *args,
        ]
        log = open(temp_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        cluster.nodes[name] = Node(name, proc, nm_port)

    try:
        web = (
            [
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard_port),
            ]
            if dashboard
            else ["--include-dashboard", "false"]
        )
        launch(
            "head",
            [
                "--head",
                "--port",
                str(gcs_port),
                *web,
                "--ray-client-server-port",
                str(free_port()),
                *head_args,
            ],
        )
        _wait(
            "the head to start",
            lambda: _started(temp_dir / "head.log"),
            timeout,
            [cluster.nodes["head"].proc],
        )
        for name, args in workers.items():
            launch(name, ["--address", cluster.address, *args])
        for name in workers:
            _wait(
                f"worker {name} to start",
                lambda: _started(temp_dir / f"{name}.log"),
                timeout,
                [cluster.nodes[name].proc],
            )
        _wait_for_nodes(cluster, timeout)
        if dashboard:
            _wait(
                "the dashboard (Jobs API) to answer",
                lambda: _http_ok(f"{cluster.dashboard}/api/version"),
                timeout,
                [cluster.nodes["head"].proc],
            )
    except BaseException:
        cluster.stop()
        raise
    return cluster


_LIST_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[3]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{"id": n["NodeID"], "port": n["NodeManagerPort"], "resources": n["Resources"]} for n in alive]))
"""


def _wait_for_nodes(cluster: LocalCluster, timeout: float) -> None:
    """Ask the cluster (from a separate driver) for its nodes; map them to ours by raylet port."""
    out = subprocess.run(
        [sys.executable, "-c", _LIST_NODES, cluster.address, str(timeout), str(len(cluster.nodes))],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"listing the cluster's nodes failed:\n{out.stderr[-3000:]}")
    by_port = {n["port"]: n for n in json.loads(out.stdout.strip().splitlines()[-1])}
    for node in cluster.nodes.values():
        if node.node_manager_port not in by_port:
            raise RuntimeError(
                f"node {node.name} did not join the cluster; see {cluster.temp_dir}/{node.name}.log"
            )
        node.node_id = by_port[node.node_manager_port]["id"]
        node.resources = by_port[node.node_manager_port]["resources"]
