"""A real federated run of FedDRL on digits with one of four clients sending Gaussian noise."""

from __future__ import annotations

import json

import pytest

from fedmerge.federation.results import RunDir
from fedmerge.federation.runner import run_experiment

from .conftest import digits_config

pytestmark = pytest.mark.slow

FEDDRL = [
    "aggregator.name=feddrl",
    "aggregator.a2c_hidden=16",
    "aggregator.a2c_candidates=4",
    "aggregator.a2c_warmup_iterations=2",
    "aggregator.td3_hidden=32",
    "aggregator.td3_steps=4",
    "aggregator.td3_updates=8",
    "aggregator.td3_batch_size=8",
]


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory, ray_address) -> RunDir:
    config = digits_config(
        tmp_path_factory.mktemp("feddrl"),
        "data.num_clients=4",
        "data.server_val_size=300",
        "federation.num_rounds=3",
        "federation.min_train_nodes=4",
        'attack.kind="noise"',
        "attack.fraction=0.25",
        "attack.seed=1",
        *FEDDRL,
    )
    return run_experiment(config, address=ray_address, progress=lambda _: None).run_dir


def _rows(run: RunDir, scope: str, metric: str) -> dict[tuple[int, int | None], float]:
    return {
        (r["round"], r["client_id"]): r["value"]
        for r in run.metrics().to_pylist()
        if r["scope"] == scope and r["metric"] == metric
    }


def test_feddrl_drops_the_malicious_client_every_round(attacked_run) -> None:
    attack = json.loads((attacked_run.path / "attack.json").read_text())
    assert attack["attack"]["kind"] == "noise" and len(attack["malicious_clients"]) == 1
    bad = attack["malicious_clients"][0]
    for metric in ("malicious_sampled", "malicious_dropped", "detection_recall"):
        assert _rows(attacked_run, "aggregator", metric) == {(r, None): 1.0 for r in (1, 2, 3)}, (
            metric
        )
    assert all(v >= 0 for v in _rows(attacked_run, "aggregator", "validation_reward").values())
    assert len(_rows(attacked_run, "aggregator", "weight_entropy")) == 3
    # The attack changed the malicious client's reply, and only its reply.
    norms = _rows(attacked_run, "client", "update_norm")
    for rnd in (1, 2, 3):
        honest = [v for (r, c), v in norms.items() if r == rnd and c != bad]
        assert len(honest) == 3 and norms[(rnd, bad)] > 5 * max(honest)
    assert attacked_run.server_curve("accuracy")[-1][1] > 0.6
