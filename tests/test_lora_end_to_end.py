"""LoRA runs through real Ray and Flower: what travels, what is saved, exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from flwr.app import Array

from fedmerge.federation.runner import resume_experiment, run_experiment
from fedmerge.federation.server import check_needs, federated_model, merges_products

from .conftest import digits_config

pytestmark = pytest.mark.slow

# The digits MLP is Sequential(Linear 64->64, ReLU, Linear 64->10): adapters on the first layer,
# the last one (the head) trains in full.
LORA = [
    "train.peft.method='lora'",
    "train.peft.r=4",
    "train.peft.target_modules=['0']",
    "train.peft.trainable='^2\\.'",
    "train.optimizer='adam'",
    "train.lr=0.01",
    "checkpoint.every=1",
]


def _wire_bytes(state) -> int:
    """The bytes Flower carries for ``state``'s arrays (np.save format)."""
    return sum(len(Array(v.numpy()).data) for v in state.values())


def _series(run, metric: str, scope: str = "system") -> list[float]:
    rows = [r for r in run.metrics().to_pylist() if r["scope"] == scope and r["metric"] == metric]
    return [r["value"] for r in sorted(rows, key=lambda r: r["round"])]


@pytest.mark.parametrize("adapters", ["factors", "products"])
def test_a_lora_run_sends_adapters_only_and_resumes_exactly(tmp_path, adapters):
    config = digits_config(tmp_path, *LORA, f"aggregator.adapters='{adapters}'")
    outcome = run_experiment(config, progress=lambda _: None)
    run = outcome.run_dir
    accuracy = run.server_curve("accuracy")
    assert accuracy[-1][1] > 0.5, accuracy  # ten classes: chance is 0.1
    assert not [e for e in run.events() if e["kind"] in ("failed", "rejected")], run.events()

    task = config.task_spec.build()
    shared = federated_model(
        task, seed=config.seed, products=merges_products(config, check_needs(config))
    )
    reply = {k: shared.initial_state[k] for k in shared.reply_keys}
    assert set(reply) == {
        "0.lora_A.default.weight",
        "0.lora_B.default.weight",
        "2.weight",
        "2.bias",
    }
    clients = 3
    # Every client sent back exactly the adapters and the head; the server sent the global
    # model's shared tensors (under products also the adapted layer's base weight) to each.
    assert _series(run, "bytes_received") == [clients * _wire_bytes(reply)] * 2
    assert _series(run, "bytes_sent") == [clients * _wire_bytes(shared.initial_state)] * 2
    saved = run.load_model()
    assert set(saved) == set(shared.initial_state)
    if adapters == "products":
        assert "0.base_layer.weight" in saved and not saved["0.lora_B.default.weight"].any()
        assert not torch.equal(
            saved["0.base_layer.weight"], shared.initial_state["0.base_layer.weight"]
        )
    else:
        assert "0.base_layer.weight" not in saved

    # Stopped after round 1, resumed from its checkpoint: round 2 comes out the same.
    shutil.rmtree(run.checkpoint_dir / "round_00002")
    resumed = resume_experiment(run.path, progress=lambda _: None).run_dir
    assert resumed.server_curve("accuracy") == accuracy
    again = resumed.load_model()
    assert all(torch.equal(again[k], saved[k]) for k in saved)
