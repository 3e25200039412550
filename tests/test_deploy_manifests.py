"""Every file under deploy/ is parsed and checked against the package it deploys: required fields,
the image tags, the Python / torch / Ray versions the project pins, the console script, and the
experiment overrides the manifests pass (they must load as a valid config)."""

from __future__ import annotations

import json
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from fedmerge.federation.config import load_config

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_VERSION = PYPROJECT["project"]["version"]
IMAGE = re.compile(rf"fedmerge:{re.escape(PACKAGE_VERSION)}-(cpu|cu\d+)")


def _pin(name: str) -> str:
    """The exact version pyproject.toml pins for ``name`` (``name==x`` or ``name[extra]==x``)."""
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[\w,]+\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml does not pin {name} exactly")


def _makefile_torch_pin() -> str:
    (pin,) = re.findall(r"pip install -q torch==([\w.]+)", (ROOT / "Makefile").read_text())
    return pin


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, pending = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _yaml(path: Path) -> dict:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path} must hold one YAML mapping"
    return docs[0]


def _overrides(words: list[str]) -> list[str]:
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert words.count("--set") == len(sets)
    return sets


def _check_fedmerge_command(words: list[str], experiment_root: str) -> None:
    """``fedmerge run <experiment> --set ...``: a console script of the package, an experiment
    shipped in the image, and overrides that load as a valid config."""
    assert words[:2] == ["fedmerge", "run"], words
    assert "fedmerge" in PYPROJECT["project"]["scripts"]
    experiment = words[2]
    assert experiment.startswith(experiment_root), experiment
    local = ROOT / experiment.removeprefix(experiment_root)
    assert local.is_file(), f"{experiment} is not an experiment of this repository"
    load_config(local, _overrides(words))


# ---- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_builds_the_package_with_the_pinned_python_and_torch():
    steps = _dockerfile()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    (base,) = [a for i, a in steps if i == "FROM"]
    assert base == "python:${PYTHON_VERSION}-slim-bookworm"
    makefile_python = re.search(
        r"^PY\s*\?=\s*python([\d.]+)", (ROOT / "Makefile").read_text(), re.M
    ).group(1)
    assert args["PYTHON_VERSION"] == makefile_python
    assert PYPROJECT["project"]["requires-python"] == ">=3.11" and tuple(
        map(int, makefile_python.split("."))
    ) >= (3, 11)
    assert args["TORCH_VERSION"] == _makefile_torch_pin() == version("torch").split("+")[0]
    runs = [a for i, a in steps if i == "RUN"]
    torch_step = next(i for i, a in enumerate(runs) if "torch==${TORCH_VERSION}" in a)
    package_step = next(i for i, a in enumerate(runs) if re.search(r'pip install "\.\[text\]"$', a))
    assert torch_step < package_step, (
        "torch must be installed from its index before the package pulls one"
    )
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs[torch_step]
    assert any("dataset-fashion-mnist" in a for a in runs), (
        "the default experiment's data must be in the image"
    )
    copied = {a.split()[0] for i, a in steps if i == "COPY"}
    source_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert source_dirs | {"pyproject.toml", "experiments", "deploy"} <= copied
    assert ("WORKDIR", "/opt/fedmerge") in steps
    assert not [a for i, a in steps if i == "ENTRYPOINT"], (
        "Ray and Flower give the command; no ENTRYPOINT"
    )
    (cmd,) = [json.loads(a) for i, a in steps if i == "CMD"]
    assert cmd[0] in PYPROJECT["project"]["scripts"]


def test_the_installed_stack_is_the_one_the_manifests_name():
    assert ray.__version__ == _pin("ray") and version("flwr") == _pin("flwr")


# ---- ray up ------------------------------------------------------------------------------------


def test_cluster_yaml_is_a_valid_ray_up_config_with_a_gpu_aggregator_node():
    config = _yaml(DEPLOY / "cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must run no clients"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["resources"].get("aggregator") == 1
    assert IMAGE.fullmatch(gpu[0]["docker"]["worker_image"]).group(1).startswith("cu")
    assert IMAGE.fullmatch(config["docker"]["image"]).group(1) == "cpu"
    assert any(t["labels"] == {"fedmerge-role": "clients"} for t in types.values() if "labels" in t)
    assert (
        sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"])
        >= config["max_workers"]
    )
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-cpus=0" in start
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert any("/shared" in o for o in config["docker"]["run_options"])


# ---- KubeRay -----------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_raycluster_manifest_places_clients_and_the_aggregator():
    doc = _yaml(DEPLOY / "kuberay" / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster") and doc["metadata"][
        "name"
    ]
    spec = doc["spec"]
    assert spec["rayVersion"] == _pin("ray")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"clients", "gpu"}
    for group in [head, *groups.values()]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (
            "rayStartParams are strings"
        )
        for container in _containers(group):
            assert IMAGE.fullmatch(container["image"]), container["image"]
            assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
        ]
        assert claims == [_yaml(DEPLOY / "kuberay" / "shared-pvc.yaml")["metadata"]["name"]]
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (gpu,) = _containers(groups["gpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert IMAGE.fullmatch(gpu["image"]).group(1).startswith("cu")
    assert json.loads(json.loads(groups["gpu"]["rayStartParams"]["resources"])) == {"aggregator": 1}
    assert groups["gpu"]["rayStartParams"]["num-cpus"] == "0"
    assert groups["clients"]["rayStartParams"]["labels"] == "fedmerge-role=clients"
    assert all(
        IMAGE.fullmatch(c["image"]).group(1) == "cpu" for c in _containers(groups["clients"])
    )


def test_rayjob_runs_a_valid_experiment_on_the_raycluster_spec():
    doc = _yaml(DEPLOY / "kuberay" / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob") and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["rayClusterSpec"] == _yaml(DEPLOY / "kuberay" / "raycluster.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    words = spec["entrypoint"].split()
    assert not [w for w in words if '"' in w], "ray job submit would mangle double quotes"
    _check_fedmerge_command(words, "/opt/fedmerge/")
    config = load_config(ROOT / words[2].removeprefix("/opt/fedmerge/"), _overrides(words))
    assert config.output.root.startswith("/shared/") and config.data.cache_dir.startswith(
        "/shared/"
    )
    assert (
        config.ray.aggregator.resources == {"aggregator": 1} and config.ray.aggregator.num_gpus == 1
    )


def test_shared_volume_claim_is_read_write_many():
    doc = _yaml(DEPLOY / "kuberay" / "shared-pvc.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert (
        doc["spec"]["accessModes"] == ["ReadWriteMany"]
        and doc["spec"]["resources"]["requests"]["storage"]
    )


# ---- Ray Jobs and Flower deployment ------------------------------------------------------------


def test_job_runtime_env_uploads_code_but_not_data_or_environments():
    env = _yaml(DEPLOY / "runtime_env.yaml")
    assert set(env) <= {"excludes", "env_vars", "working_dir"}
    assert {".venv", "data", "runs", ".git"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), (
        "Ray wants env var values as strings"
    )
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_readme_gives_the_commands_of_every_route():
    readme = (DEPLOY / "README.md").read_text()
    for needle in [
        "docker build -f deploy/Dockerfile",
        "ray up deploy/cluster.yaml",
        "kubectl apply -f deploy/kuberay/raycluster.yaml",
        "deploy/kuberay/rayjob.yaml",
        "ray job submit",
        "--runtime-env deploy/runtime_env.yaml",
        "--address",
        "flower-superlink",
        "flower-supernode",
        "flwr run",
    ]:
        assert needle in readme, f"deploy/README.md does not show `{needle}`"
    shown = {m for m in re.findall(r"deploy/[\w./-]+", readme)}
    missing = [p for p in shown if not (ROOT / p.rstrip(".")).exists()]
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"


@pytest.mark.parametrize(
    "path",
    sorted(
        p.relative_to(ROOT).as_posix()
        for p in DEPLOY.rglob("*")
        if p.suffix in {".yaml", ".yml", ".toml"}
    ),
)
def test_every_manifest_parses(path):
    text = (ROOT / path).read_text()
    if path.endswith(".toml"):
        assert tomllib.loads(text)
    else:
        assert all(doc is not None for doc in yaml.safe_load_all(text))


# ---- who can reach the control ports (issue 19, item 8) ----------------------------------------

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
CONTROL_PORTS = {"6379", "8265", "10001", "9093"}  # GCS, dashboard/Jobs API, Ray client, SuperLink


def _commands(text: str, program: str) -> list[str]:
    """Every line of ``text`` that runs ``program`` (shell continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        m.group(1) for m in re.finditer(rf"^\s*({re.escape(program)}(?:\s[^\n]*)?)$", joined, re.M)
    ]


def _flag(command: str, name: str) -> str | None:
    match = re.search(rf"{re.escape(name)}[= ]+['\"]?([^\s'\"]+)", command)
    return match.group(1) if match else None


def _host(value: str) -> str:
    return value.rsplit(":", 1)[0] if value.count(":") == 1 or value.startswith("[") else value


def public_exposures(
    cluster: dict, kuberay: dict[str, dict], readme: str, dockerfile: list[tuple[str, str]]
) -> list[str]:
    """Every place where a setup shipped here makes a control port (Ray's dashboard / Jobs API,
    client or GCS; the SuperLink's one port, which carries the Control API) reachable by more than
    the operator: a non-loopback bind without the containment that keeps it private."""
    found = []
    ray_heads = [c for c in cluster["head_start_ray_commands"] if "ray start --head" in c]
    ray_heads += [c for c in _commands(readme, "ray start") if "--head" in c]
    for command in ray_heads:
        if (_flag(command, "--dashboard-host") or "127.0.0.1") not in LOOPBACK:
            found.append(f"Ray dashboard / Jobs API bound publicly: {command}")
    for command in _commands(readme, "flower-superlink"):
        for flag in ("--host", "--control-api-address", "--fleet-api-address"):
            value = _flag(command, flag)
            if value is not None and _host(value) not in LOOPBACK:
                found.append(f"SuperLink {flag} {value} exposes the Control API: {command}")
    for command in _commands(readme, "python deploy/flower/fleet_gateway.py"):
        upstream = _flag(command, "--upstream")
        if upstream is not None and _host(upstream) not in LOOPBACK:
            found.append(f"the Fleet gateway relays to a non-loopback SuperLink: {command}")
    policy = kuberay.get("networkpolicy.yaml")
    contained = (
        bool(policy)
        and policy.get("kind") == "NetworkPolicy"
        and any(
            e.get("key") == "ray.io/node-type"
            for e in policy["spec"]["podSelector"].get("matchExpressions", [])
        )
    )
    for name, doc in kuberay.items():
        if doc.get("kind") in {"Service", "Ingress"} and (
            doc["kind"] == "Ingress" or doc["spec"].get("type") in {"NodePort", "LoadBalancer"}
        ):
            found.append(f"{name}: a {doc['kind']} publishes Ray ports")
        spec = doc.get("spec", {})
        spec = spec.get("rayClusterSpec", spec)
        if "headGroupSpec" not in spec:
            continue
        head = spec["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            found.append(f"{name}: head service type {head['serviceType']} publishes the dashboard")
        if (
            head["rayStartParams"].get("dashboard-host", "127.0.0.1") not in LOOPBACK
            and not contained
        ):
            found.append(
                f"{name}: dashboard on the pod network and no NetworkPolicy limits who reaches it"
            )
        for group in [head, *spec.get("workerGroupSpecs", [])]:
            pod = group["template"]["spec"]
            if pod.get("hostNetwork"):
                found.append(f"{name}: {group.get('groupName', 'head')} runs on the host network")
            for container in pod["containers"]:
                found += [
                    f"{name}: hostPort {p['hostPort']}"
                    for p in container.get("ports", [])
                    if "hostPort" in p
                ]
    found += [
        f"Dockerfile EXPOSE {a}"
        for i, a in dockerfile
        if i == "EXPOSE" and CONTROL_PORTS & {p.split("/")[0] for p in a.split()}
    ]
    return found


def _shipped() -> tuple[dict, dict[str, dict], str, list[tuple[str, str]]]:
    kuberay = {p.name: _yaml(p) for p in sorted((DEPLOY / "kuberay").glob("*.yaml"))}
    return (
        _yaml(DEPLOY / "cluster.yaml"),
        kuberay,
        (DEPLOY / "README.md").read_text(),
        _dockerfile(),
    )


def test_no_shipped_setup_exposes_a_control_port():
    assert public_exposures(*_shipped()) == []


def test_readme_starts_the_superlink_on_loopback_behind_the_fleet_gateway():
    readme = (DEPLOY / "README.md").read_text()
    (superlink,) = _commands(readme, "flower-superlink")
    assert _flag(superlink, "--host") == "127.0.0.1" and "--enable-supernode-auth" in superlink
    (gateway,) = _commands(readme, "python deploy/flower/fleet_gateway.py")
    assert _host(_flag(gateway, "--upstream")) == "127.0.0.1"
    assert "ssh -L" in readme, "the operator reaches the Control API over an SSH tunnel"
    assert "kubectl apply -f deploy/kuberay/networkpolicy.yaml" in readme


@pytest.mark.parametrize(
    "mutation",
    [
        "ray-up-dashboard",
        "readme-ray-head",
        "superlink-host",
        "control-address",
        "gateway-upstream",
        "head-service",
        "no-policy",
        "load-balancer",
        "host-port",
        "host-network",
        "expose",
    ],
)
def test_a_setup_exposing_a_control_port_is_caught(mutation):
    """Each way of publishing a control port, applied to the shipped files, is reported."""
    cluster, kuberay, readme, dockerfile = _shipped()
    cluster, kuberay = json.loads(json.dumps(cluster)), json.loads(json.dumps(kuberay))
    head = kuberay["raycluster.yaml"]["spec"]["headGroupSpec"]
    if mutation == "ray-up-dashboard":
        cluster["head_start_ray_commands"] = [
            c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
            for c in cluster["head_start_ray_commands"]
        ]
    elif mutation == "readme-ray-head":
        readme += "\nray start --head --port 6379 --dashboard-host 0.0.0.0\n"
    elif mutation == "superlink-host":
        readme = readme.replace(
            "flower-superlink --host 127.0.0.1", "flower-superlink --host 0.0.0.0"
        )
    elif mutation == "control-address":
        readme = readme.replace(
            "flower-superlink --host 127.0.0.1",
            "flower-superlink --control-api-address 0.0.0.0:9093 --host 127.0.0.1",
        )
    elif mutation == "gateway-upstream":
        readme = re.sub(r"--upstream \S+", "--upstream 10.0.0.5:9093", readme)
    elif mutation == "head-service":
        head["serviceType"] = "LoadBalancer"
    elif mutation == "no-policy":
        del kuberay["networkpolicy.yaml"]
    elif mutation == "load-balancer":
        kuberay["svc.yaml"] = {
            "kind": "Service",
            "spec": {"type": "NodePort", "ports": [{"port": 8265}]},
        }
    elif mutation == "host-port":
        head["template"]["spec"]["containers"][0]["ports"].append(
            {"containerPort": 8265, "hostPort": 8265}
        )
    elif mutation == "host-network":
        head["template"]["spec"]["hostNetwork"] = True
    elif mutation == "expose":
        dockerfile = [*dockerfile, ("EXPOSE", "8265 9093/tcp")]
    assert public_exposures(cluster, kuberay, readme, dockerfile), mutation
