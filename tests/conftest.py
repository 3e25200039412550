"""Shared fixtures: quiet, offline Flower and Ray; small configs for real end-to-end runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _flower_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.getbasetemp() / "flwr"))


def digits_config(tmp_path: Path, *overrides: str):
    """A real but tiny experiment: sklearn digits, 3 clients, 2 rounds, everyone trains."""
    from federation.config import load_config

    base = [
        "name=digits-e2e", "seed=7",
        "data.task=digits", "data.num_clients=3", "data.alpha=0.5", "data.min_partition_size=20",
        f"data.cache_dir={str(tmp_path / 'shards')!r}",
        "train.local_epochs=2", "train.batch_size=16", "train.lr=0.05",
        "federation.num_rounds=2", "federation.fraction_train=1.0", "federation.min_train_nodes=2",
        f"output.root={str(tmp_path / 'runs')!r}", "evaluation.batch_size=512",
    ]
    return load_config(ROOT / "experiments" / "fashion_mnist_fedavg.toml", [*base, *overrides])
