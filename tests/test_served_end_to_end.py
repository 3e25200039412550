"""A real Flower + Ray run of SMILE on digits for three rounds: the evaluator keeps the served
model it built in round 1 and loads each round's weights into it, and what it scored in the last
round is exactly the score of the saved served model rebuilt from scratch."""

from __future__ import annotations

import json

import pytest

from fedmerge.clients.tasks import get_task
from fedmerge.federation.evaluation import evaluate_per_task
from fedmerge.federation.runner import run_experiment
from fedmerge.federation.served import load_served

from .conftest import digits_config

pytestmark = pytest.mark.slow


def test_the_last_score_of_the_reused_served_model_is_a_fresh_builds(tmp_path, ray_address) -> None:
    config = digits_config(
        tmp_path,
        "federation.num_rounds=3",
        "aggregator.name=smile",
        "aggregator.k_gate=4",
        "aggregator.k=8",
        "aggregator.top_k=2",
        'aggregator.base="round"',
    )
    run = run_experiment(config, address=ray_address, progress=lambda _: None).run_dir
    rows = run.metrics().to_pylist()
    server = {(r["round"], r["metric"]): r["value"] for r in rows if r["scope"] == "server"}
    assert len({server[(r, "loss")] for r in (1, 2, 3)}) == 3  # each round served other weights

    spec = json.loads((run.path / "served_model.json").read_text())
    assert [e["type"] for e in spec["structure"]] == ["smile_linear", "smile_linear"]
    task = get_task("digits")
    fresh = evaluate_per_task(
        load_served(run.path / "served_model.safetensors"),
        task,
        task.load("test"),
        batch_size=config.evaluation.batch_size,
    )
    assert (fresh["accuracy"], fresh["loss"]) == (server[(3, "accuracy")], server[(3, "loss")])
