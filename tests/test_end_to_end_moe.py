"""Upscaled served models in real runs, and saving/reloading them.

The slow test is a real Flower + Ray run of experiments/smile_text.toml on all-MiniLM-L6-v2 with
tiny data caps: three clients (one per text task) fine-tune for a few steps, the aggregator
actor builds the SMILE MoE, the evaluator scores it per task, and the saved model reloads to the
same per-task accuracies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.smile import SmileLinear
from fedmerge.clients.tasks import get_task
from fedmerge.federation.served import (
    ServedModelError,
    build_served,
    load_served,
    save_served,
    served_spec,
)

ROOT = Path(__file__).resolve().parents[1]


def _digits_moe():
    task = get_task("digits")
    torch.manual_seed(0)
    base = task.build_model()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    updates = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        updates.append(
            ClientUpdate(
                i,
                {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base_state.items()},
                10,
            )
        )
    ctx = RoundContext(
        round=1, global_state=base_state, base_state=base_state, build_model=task.build_model
    )
    return task, create_aggregator("smile", {"k_gate": 4, "k": 8, "top_k": 2}).aggregate(
        ctx, updates
    ).served_model


def test_saved_moe_model_reloads_with_identical_outputs(tmp_path) -> None:
    task, served = _digits_moe()
    assert isinstance(served[0], SmileLinear) and isinstance(served[2], SmileLinear)
    weights, spec_path = save_served(
        tmp_path / "served.safetensors", served, "digits", {"aggregator": "smile"}
    )
    assert weights.is_file() and spec_path.is_file()
    again = load_served(spec_path)
    x = task.preprocess(task.load("test").x[:50])
    torch.testing.assert_close(again(x), served(x), rtol=0, atol=0)
    spec, state = served_spec(served, "digits")
    torch.testing.assert_close(build_served(spec, state)(x), served(x), rtol=0, atol=0)


def test_a_served_model_that_does_not_fit_is_named(tmp_path) -> None:
    _, served = _digits_moe()
    weights, spec_path = save_served(tmp_path / "served.safetensors", served, "digits")
    spec_path.write_text(spec_path.read_text().replace('"k": 8', '"k": 5'))
    with pytest.raises(ServedModelError, match="does not fit"):
        load_served(weights)


@pytest.mark.slow
def test_smile_on_minilm_text_tasks_end_to_end(tmp_path, ray_address) -> None:
    from fedmerge.federation.config import load_config
    from fedmerge.federation.results import RunDir
    from fedmerge.federation.runner import run_experiment

    config = load_config(
        ROOT / "experiments" / "smile_text.toml",
        [
            "data.max_train_examples=16",
            "data.max_test_examples=12",
            "train.batch_size=8",
            "train.lr=1e-4",
            "aggregator.k_gate=4",
            "aggregator.k=8",
            f"output.root={str(tmp_path / 'runs')!r}",
            f"data.cache_dir={str(tmp_path / 'shards')!r}",
            "output.plot=false",
            'data.proxy_inputs="held_out"',
            "data.proxy_size=4",  # SMILE needs none; the clients lose them
        ],
    )
    run: RunDir = run_experiment(config, address=ray_address, progress=lambda _: None).run_dir
    rows = run.metrics().to_pylist()
    server = {r["metric"]: r["value"] for r in rows if r["scope"] == "server"}
    names = get_task("text_multitask").task_names
    for name in names:
        assert 0.0 <= server[f"accuracy/{name}"] <= 1.0
    assert server["accuracy"] == pytest.approx(np.mean([server[f"accuracy/{n}"] for n in names]))
    aggregator = {r["metric"]: r["value"] for r in rows if r["scope"] == "aggregator"}
    assert aggregator["num_experts"] == 3
    assert aggregator["num_examples"] == 3 * (
        16 - 4
    )  # 4 of each task's 16 held out before partitioning
    assert (
        aggregator["layers_upscaled"] == 36
    )  # 6 blocks x (q, k, v, attention out, intermediate, out)
    assert 1.0 < aggregator["params_ratio"] < 1.2
    tasks = {
        r["client_id"]: r["value"]
        for r in rows
        if r["scope"] == "client" and r["metric"] == "task_id"
    }
    assert sorted(tasks.values()) == [0.0, 1.0, 2.0]

    # The saved served model reloads and scores exactly what the evaluator logged.
    model = load_served(run.path / "served_model.safetensors")
    assert sum(isinstance(m, SmileLinear) for m in model.modules()) == 36
    from fedmerge.federation.evaluation import evaluate_per_task
    from fedmerge.federation.server import Experiment

    task = get_task("text_multitask")
    test = task.load("test")
    from fedmerge.clients.partition import limit_examples

    test = limit_examples(test, 12, config.seed, task.task_index(test.x))
    again = evaluate_per_task(model, task, test, batch_size=64)
    for name in names:
        assert again[f"accuracy/{name}"] == server[f"accuracy/{name}"]
    assert Experiment  # the server module imports with the served-model plumbing
