"""A short run submitted as a Ray Job (`ray job submit --working-dir`) with the documented
deploy/runtime_env.yaml, to the multi-node cluster of tests/ray_cluster.py; the result is read
back from the job's status and logs and from the run folder it wrote through a file:// URI."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fedmerge.federation.results import RunDir

from .conftest import ROOT, digits_overrides

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def test_a_submitted_job_runs_the_experiment_on_the_cluster(ray_cluster, tmp_path):
    submission = f"fedmerge-test-{uuid.uuid4().hex[:8]}"
    overrides = digits_overrides(
        tmp_path, "name=ray-job", f"output.root='file://{tmp_path}/jobruns'"
    )
    ray = [str(BIN / "ray"), "job"]
    where = ["--address", ray_cluster.dashboard]
    cmd = [
        *ray,
        "submit",
        *where,
        "--submission-id",
        submission,
        "--runtime-env",
        str(ROOT / "deploy" / "runtime_env.yaml"),
        "--working-dir",
        str(ROOT),
        "--",
        "fedmerge",
        "run",
        "experiments/fashion_mnist_fedavg.toml",
        *(arg for item in overrides for arg in ("--set", item)),
    ]
    # `ray job submit` joins the entrypoint Windows-style (subprocess.list2cmdline) and a POSIX
    # shell runs it: arguments must hold no double quotes or blanks (single quotes are fine).
    assert not [
        arg for arg in cmd[cmd.index("--") :] if '"' in arg or any(c.isspace() for c in arg)
    ]
    out = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"

    status = subprocess.run(
        [*ray, "status", *where, submission],
        env=ray_cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr, (
        status.stdout + status.stderr
    )
    logs = subprocess.run(
        [*ray, "logs", *where, submission],
        env=ray_cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "rounds completed: 2" in logs, logs[-3000:]

    (run_path,) = [p for p in (tmp_path / "jobruns").iterdir() if p.name.startswith("ray-job-")]
    run = RunDir(run_path)
    assert [r for r, _ in run.server_curve("accuracy")] == [1, 2]
    assert run.read_summary()["rounds_completed"] == 2
    # The job joined the cluster (RAY_ADDRESS, set by Ray Jobs) rather than starting a Ray of its
    # own: its clients ran on the one node with CPUs.
    client_nodes = {p["node_id"] for p in run.placements() if p["role"] == "client"}
    assert client_nodes == {ray_cluster.node_id("clients")}
