"""Real federated runs of WSA and FedProx: Flower's simulation engine on a local Ray."""

from __future__ import annotations

import pytest

from fedmerge.federation.results import RunDir
from fedmerge.federation.runner import run_experiment

from .conftest import digits_config

pytestmark = pytest.mark.slow


def _run(tmp_path_factory, address: str, label: str, *overrides: str) -> RunDir:
    config = digits_config(tmp_path_factory.mktemp(label), *overrides)
    return run_experiment(config, address=address, progress=lambda _: None).run_dir


@pytest.fixture(scope="module")
def wsa_run(tmp_path_factory, ray_address) -> RunDir:
    return _run(tmp_path_factory, ray_address, "wsa", "aggregator.name=wsa")


@pytest.fixture(scope="module")
def fedprox_run(tmp_path_factory, ray_address) -> RunDir:
    return _run(tmp_path_factory, ray_address, "fedprox", "aggregator.name=fedprox")


def _series(run: RunDir, scope: str, metric: str) -> dict[tuple[int, int | None], float]:
    return {
        (r["round"], r["client_id"]): r["value"]
        for r in run.metrics().to_pylist()
        if r["scope"] == scope and r["metric"] == metric
    }


@pytest.mark.parametrize(
    ("fixture", "metrics"),
    [
        ("wsa_run", ["scope_sigma_spread", "scope_mu_spread", "scope_kl_to_target"]),
        ("fedprox_run", ["scope_sigma_spread", "scope_mu_spread"]),
    ],
)
def test_learns_and_reports_scope_metrics_every_round(fixture, metrics, request) -> None:
    run: RunDir = request.getfixturevalue(fixture)
    curve = run.server_curve("accuracy")
    assert [r for r, _ in curve] == [1, 2]
    assert curve[-1][1] > 0.6, f"final accuracy {curve[-1][1]} is not well above chance (0.1)"
    for metric in [*metrics, "num_clients", "num_examples"]:
        assert sorted(_series(run, "aggregator", metric)) == [(1, None), (2, None)], metric


def test_the_scope_term_reaches_the_clients(wsa_run, tmp_path_factory, ray_address) -> None:
    """Same seed, partitions and initial model; only λ differs, and λ acts on the clients alone.

    Were the term ignored, round 1's client models would be identical in both runs, and so
    would their task losses and their KL to the round-1 target (the initial model's scopes).
    """
    strong = _run(
        tmp_path_factory, ray_address, "wsa-lam100", "aggregator.name=wsa", "aggregator.lam=100"
    )
    kl_weak = _series(wsa_run, "aggregator", "scope_kl_to_target")[(1, None)]
    kl_strong = _series(strong, "aggregator", "scope_kl_to_target")[(1, None)]
    assert kl_strong < 0.2 * kl_weak, (kl_strong, kl_weak)
    loss_weak = _series(wsa_run, "client", "train_loss")
    loss_strong = _series(strong, "client", "train_loss")
    round_one = sorted(k for k in loss_weak if k[0] == 1)
    assert round_one == sorted(k for k in loss_strong if k[0] == 1) and round_one
    assert all(loss_weak[k] != loss_strong[k] for k in round_one)
