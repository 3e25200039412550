"""Flower's deployment mode on loopback, set up as deploy/README.md says: a SuperLink on 127.0.0.1,
the Fleet-only gateway (deploy/flower/fleet_gateway.py) on 127.0.0.2 standing in for the public
interface, two SuperNodes as separate processes, TLS with certificates made here
(deploy/flower/credentials.py), SuperNode authentication, a short run through `flwr run
deploy/flower` whose ServerApp aggregates in a Ray actor, and an outsider who is refused."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedmerge.federation.results import RunDir

from .conftest import DEFAULT_EXPERIMENT, ROOT
from .ray_cluster import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
_spec = importlib.util.spec_from_file_location(
    "fedmerge_flower_credentials", ROOT / "deploy" / "flower" / "credentials.py"
)
credentials = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(credentials)
make_credentials = credentials.make_credentials
PUBLIC = (
    "127.0.0.2"  # stands in for the SuperLink host's public interface (all of 127/8 is loopback)
)


class Processes:
    """Processes this test starts, each in its own session; stop() ends them and what they spawned."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.procs = logs, env, {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:  # a SuperNode's SuperExec and ClientApp processes, the SuperLink's ServerApp
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)


def _gateway_command(creds: dict[str, Path], listen: str, upstream: str) -> list[str]:
    """deploy/flower/fleet_gateway.py relaying the Fleet API from ``listen`` to the SuperLink."""
    return [
        sys.executable,
        str(ROOT / "deploy" / "flower" / "fleet_gateway.py"),
        "--listen",
        listen,
        "--upstream",
        upstream,
        "--certfile",
        str(creds["server_cert"]),
        "--keyfile",
        str(creds["server_key"]),
        "--cafile",
        str(creds["ca"]),
    ]


def _start_superlink_behind_gateway(procs, creds: dict, port: int, gateway_port: int) -> None:
    """The documented setup: the SuperLink (TLS, SuperNode auth) on loopback only, and the Fleet
    gateway on the stand-in public address; returns once both listen."""
    procs.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-ca-certfile",
            str(creds["ca"]),
            "--ssl-certfile",
            str(creds["server_cert"]),
            "--ssl-keyfile",
            str(creds["server_key"]),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ],
    )
    procs.start("gateway", _gateway_command(creds, f"{PUBLIC}:{gateway_port}", f"127.0.0.1:{port}"))
    procs.wait_for("superlink", "Uvicorn running on https://", timeout=120)
    procs.wait_for("gateway", "Fleet gateway listening", timeout=60)


def _start_supernode(procs, creds: dict, i: int, gateway_port: int) -> None:
    """SuperNode ``i`` with its own authentication key, dialling the Fleet gateway over TLS."""
    procs.start(
        f"supernode-{i}",
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"{PUBLIC}:{gateway_port}",
            "--root-certificates",
            str(creds["ca"]),
            "--auth-supernode-private-key",
            str(creds[f"supernode_{i}"]),
            "--port",
            str(free_port()),
            "--max-retries",
            "2",
            "--max-wait-time",
            "60",
        ],
    )


def _tls_handshake(port: int, cafile: str | None) -> dict:
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert()


def test_superlink_and_two_authenticated_supernodes_over_tls(tmp_path):
    creds = make_credentials(tmp_path / "creds", ["127.0.0.1", PUBLIC, "localhost"], supernodes=3)
    home = tmp_path / "flwr"
    home.mkdir()
    port, gateway_port = free_port(), free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedmerge-local"\n\n[superlink.fedmerge-local]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{creds["ca"]}"\n'
    )
    ray_tmp = Path(
        tempfile.mkdtemp(prefix="fmfl-")
    )  # the ServerApp's local Ray; short for its sockets
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "RAY_TMPDIR": str(ray_tmp),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    procs = Processes(tmp_path, env)

    def flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    try:
        _start_superlink_behind_gateway(procs, creds, port, gateway_port)

        # TLS: the SuperLink presents the certificate made for it, which only our CA vouches for.
        peer = _tls_handshake(port, str(creds["ca"]))
        assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        with pytest.raises(ssl.SSLCertVerificationError):
            _tls_handshake(port, None)

        node_ids = []
        for i in (0, 1):  # register two SuperNodes' public keys; the third key stays unknown
            out = flwr(
                "supernode",
                "register",
                str(creds[f"supernode_{i}_pub"]),
                "fedmerge-local",
                "--format",
                "json",
            )
            assert out.returncode == 0, out.stdout + out.stderr
            node_ids.append(int(json.loads(out.stdout[out.stdout.index("{") :])["node-id"]))
        # As deploy/README.md: SuperNodes reach the Fleet gateway, never the SuperLink port.
        for i in (0, 1, 2):
            _start_supernode(procs, creds, i, gateway_port)

        overrides = ";".join(
            [
                "name=flower-deploy",
                "seed=7",
                "data.task=digits",
                "data.num_clients=2",
                "data.alpha=0.5",
                "data.min_partition_size=20",
                f"data.cache_dir={tmp_path / 'shards'}",
                "train.local_epochs=1",
                "train.batch_size=16",
                "train.lr=0.05",
                "federation.num_rounds=2",
                "federation.fraction_train=1.0",
                "federation.min_train_nodes=2",
                "federation.num_supernodes=2",
                "federation.round_timeout_s=300",
                f"output.root={tmp_path / 'runs'}",
                "evaluation.batch_size=512",
            ]
        )
        out = flwr(
            "run",
            "deploy/flower",
            "fedmerge-local",
            "--stream",
            "--run-config",
            f'config="{DEFAULT_EXPERIMENT}" overrides="{overrides}"',
            timeout=500,
        )
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "rounds completed: 2" in out.stdout, (
            out.stdout[-4000:] + procs.log("superlink")[-3000:]
        )

        # SuperNode authentication: the unregistered key was turned away.
        rogue = procs.procs["supernode-2"]
        rogue.wait(timeout=120)
        assert rogue.returncode != 0 and "Failed to activate SuperNode" in procs.log("supernode-2")
    finally:
        procs.stop()

    (run_path,) = (tmp_path / "runs").glob("flower-deploy-*")
    run = RunDir(run_path)
    assert [r for r, _ in run.server_curve("accuracy")] == [1, 2]
    assert run.server_curve("accuracy")[-1][1] > 0.5  # learned (chance is 0.1)
    clients = [p for p in run.placements() if p["role"] == "client"]
    assert sorted((p["round"], p["client_id"]) for p in clients) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # Every reply came from one of the two registered SuperNodes, and both served.
    assert {int(p["flower_node_id"]) for p in clients} == set(node_ids)
    # The ServerApp aggregated in a Ray actor: placed on a Ray node, in another process.
    aggregators = [p for p in run.placements() if p["role"] == "aggregator"]
    assert len(aggregators) == 2 and all(p["node_id"] for p in aggregators)
    assert "aggregate_s" in {
        r["metric"] for r in run.metrics().to_pylist() if r["scope"] == "aggregator"
    }


# ---- item 8 of issue 19: an outsider who reaches the public address gets nothing ------------------

OUTSIDER_SERVERAPP = """\
from pathlib import Path
from flwr.serverapp import ServerApp
app = ServerApp()
@app.main()
def main(grid, context):
    Path({marker!r}).write_text("outsider code ran on the SuperLink host")
"""


def _outsider_app(root: Path, marker: Path) -> Path:
    """A Flower app whose ServerApp, if it ever ran, would leave ``marker`` behind."""
    root.mkdir()
    (root / "outsider_app.py").write_text(OUTSIDER_SERVERAPP.format(marker=str(marker)))
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "outsider"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n[tool.flwr.app.components]\n'
        'serverapp = "outsider_app:app"\nclientapp = "outsider_app:app"\n\n[tool.flwr.app.config]\n'
    )
    return root


def _write_connections(home: Path, ca: Path, connections: dict[str, str]) -> None:
    home.mkdir()
    text = f'[superlink]\ndefault = "{next(iter(connections))}"\n'
    for name, address in connections.items():
        text += f'\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    (home / "config.toml").write_text(text)


def _https_status(host: str, port: int, cafile: Path, request: bytes) -> int:
    """The status code an HTTPS server at host:port answers a raw request with."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((host, port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.sendall(request)
            head = b""
            while b"\r\n" not in head:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
    return int(head.split(b" ", 2)[1])


def test_an_outsider_at_the_public_address_cannot_register_a_key_or_run_code(tmp_path):
    """The SuperLink as deploy/README.md starts it: its one HTTP port (Fleet, Control and Runtime
    APIs) on 127.0.0.1, and deploy/flower/fleet_gateway.py on the public address relaying the Fleet
    API only. The outsider holds the CA certificate and its own SuperNode key pair, and reaches
    only the public address: it cannot open the control port there, the gateway forwards none of
    its Control API calls, so it registers no key and starts no run, and its SuperNode is turned
    away; the operator on 127.0.0.1 registers a key and that SuperNode comes online through the
    gateway."""
    creds = make_credentials(tmp_path / "creds", ["127.0.0.1", PUBLIC, "localhost"], supernodes=2)
    port, gateway_port = free_port(), free_port()
    operator_home, outsider_home = tmp_path / "operator", tmp_path / "outsider"
    _write_connections(operator_home, creds["ca"], {"operator": f"127.0.0.1:{port}"})
    _write_connections(
        outsider_home,
        creds["ca"],
        {"public-control": f"{PUBLIC}:{port}", "public-fleet": f"{PUBLIC}:{gateway_port}"},
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(operator_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    procs = Processes(tmp_path, env)
    marker = tmp_path / "outsider-was-here"
    app = _outsider_app(tmp_path / "outsider-app", marker)

    def flwr(home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env={**env, "FLWR_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
        )

    def nodes() -> list[dict]:
        out = flwr(operator_home, "supernode", "ls", "operator", "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout[out.stdout.index("{") :])["nodes"]

    try:
        _start_superlink_behind_gateway(procs, creds, port, gateway_port)

        # The port flwr would use is closed on the public address.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((PUBLIC, port), timeout=10).close()
        # The gateway answers the Control and Runtime APIs with 403, however the path is dressed up.
        for target in [
            "/v1/control/register-node",
            "/v1/control/start-run",
            "/v1/runtime/acquire-task",
            "/v1/fleet/../control/register-node",
            "/v1/fleet/%2e%2e/control/start-run",
            "/v1/fleet/register-node?x=/v1/control/start-run",
            "/docs",
        ]:
            request = (
                f"POST {target} HTTP/1.1\r\nhost: {PUBLIC}\r\ncontent-type: application/protobuf\r\n"
                "content-length: 0\r\n\r\n"
            ).encode()
            assert _https_status(PUBLIC, gateway_port, creds["ca"], request) == 403, target

        # The outsider's app is a valid FAB: what stops it below is the network, not its packaging.
        built = flwr(outsider_home, "build", "--app", str(app))
        assert built.returncode == 0 and list(tmp_path.glob("*.fab")), built.stdout + built.stderr
        for connection in ("public-control", "public-fleet"):
            out = flwr(
                outsider_home, "supernode", "register", str(creds["supernode_1_pub"]), connection
            )
            assert out.returncode != 0, out.stdout + out.stderr
            out = flwr(outsider_home, "run", str(app), connection)
            assert out.returncode != 0, out.stdout + out.stderr
        assert nodes() == [], "the outsider registered a SuperNode key"
        runs = flwr(operator_home, "ls", "operator", "--format", "json")
        assert (
            runs.returncode == 0 and json.loads(runs.stdout[runs.stdout.index("{") :])["runs"] == []
        )

        # The operator, on 127.0.0.1, admits site 0; both SuperNodes dial the public Fleet gateway.
        out = flwr(
            operator_home,
            "supernode",
            "register",
            str(creds["supernode_0_pub"]),
            "operator",
            "--format",
            "json",
        )
        assert out.returncode == 0, out.stdout + out.stderr
        node_id = json.loads(out.stdout[out.stdout.index("{") :])["node-id"]
        for i in (0, 1):
            _start_supernode(procs, creds, i, gateway_port)
        rogue = procs.procs["supernode-1"]
        rogue.wait(timeout=120)
        assert rogue.returncode != 0 and "Failed to activate SuperNode" in procs.log("supernode-1")
        deadline = time.monotonic() + 120
        while [(n["node-id"], n["status"]) for n in nodes()] != [(str(node_id), "online")]:
            assert time.monotonic() < deadline and procs.procs["supernode-0"].poll() is None, (
                f"{nodes()}\n{procs.log('supernode-0')[-3000:]}"
            )
            time.sleep(0.5)
    finally:
        procs.stop()
    assert not marker.exists(), "the outsider's ServerApp ran on the SuperLink host"
