"""A real multi-node Ray cluster: `fedmerge run --address` places the aggregator on the node that
declares the GPU and the `aggregator` resource (the head), the evaluator by node label, and the
clients on the only node with CPUs; each round's placement is read back from the run directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmerge.federation.results import RunDir

from .conftest import DEFAULT_EXPERIMENT, digits_overrides

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def only_run(root: Path) -> RunDir:
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert len(runs) == 1, runs
    return RunDir(runs[0])


def test_actors_and_clients_land_where_the_config_places_them(ray_cluster, tmp_path):
    overrides = digits_overrides(
        tmp_path,
        "ray.aggregator.resources={aggregator = 1}",
        "ray.aggregator.num_gpus=1",
        'ray.evaluator.label_selector={"fedmerge-role" = "clients"}',
        f"output.upload_uri='file://{tmp_path}/mirror'",
    )
    cmd = [str(BIN / "fedmerge"), "run", str(DEFAULT_EXPERIMENT), "--address", ray_cluster.address]
    cmd += [arg for item in overrides for arg in ("--set", item)]
    out = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"

    run = only_run(tmp_path / "runs")
    gpu, clients = (
        ray_cluster.node_id("head"),
        ray_cluster.node_id("clients"),
    )  # the head declares the GPU
    placements = run.placements()
    for rnd in (1, 2):
        this = [p for p in placements if p["round"] == rnd]
        (aggregator,) = [p for p in this if p["role"] == "aggregator"]
        (evaluator,) = [p for p in this if p["role"] == "evaluator"]
        assert aggregator["node_id"] == gpu, (aggregator, ray_cluster.nodes)
        assert aggregator["ray_gpu_ids"] == "0"  # Ray gave it the declared GPU ...
        # ... and it computes on CUDA only where CUDA really is there (not on this machine).
        assert aggregator["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
        assert evaluator["node_id"] == clients
        client_nodes = {p["client_id"]: p["node_id"] for p in this if p["role"] == "client"}
        assert sorted(client_nodes) == [0, 1, 2]
        assert set(client_nodes.values()) == {clients}
        assert gpu not in set(client_nodes.values())

    rows = run.metrics().to_pylist()
    on_gpu = {r["round"]: r["value"] for r in rows if r["metric"] == "aggregator_on_gpu"}
    assert on_gpu == {1: float(torch.cuda.is_available()), 2: float(torch.cuda.is_available())}
    assert run.server_curve("accuracy")[-1][1] > 0.5  # learned (chance is 0.1)

    mirror = tmp_path / "mirror" / run.path.name  # output.upload_uri: a complete copy
    local = {
        p.relative_to(run.path): p.read_bytes()
        for p in run.path.rglob("*")
        if p.is_file() and p.name != ".fedmerge.lock"
    }  # the writer's lock is local, never uploaded
    copied = {p.relative_to(mirror): p.read_bytes() for p in mirror.rglob("*") if p.is_file()}
    assert (
        local == copied and Path("metrics.parquet") in copied and Path("placement.jsonl") in copied
    )
