"""The three ways to plug in an aggregator, each in a full Flower + Ray simulation."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

import tests.plugins.registered_aggregator  # noqa: F401  (registers "mean_of_two_best")
from fedmerge.federation.runner import compare, run_experiment

from .conftest import digits_config

pytestmark = pytest.mark.slow


def _aggregator_metric(run, metric):
    table = run.metrics()
    rows = table.filter(
        pc.and_(pc.equal(table["scope"], "aggregator"), pc.equal(table["metric"], metric))
    )
    return rows["value"].to_pylist()


def test_registered_class_with_federated_evaluation(tmp_path, ray_address):
    config = digits_config(
        tmp_path,
        "aggregator.name=mean_of_two_best",
        "data.local_test_fraction=0.25",
        "federation.fraction_evaluate=1.0",
    )
    run = run_experiment(config, address=ray_address, progress=lambda _: None).run_dir
    assert _aggregator_metric(run, "dropped_clients") == [1.0, 1.0]  # 3 clients, the two best kept
    assert run.server_curve()[-1][1] > 0.5

    # Every client also scored the global model on its own held-out quarter each round.
    table = run.metrics()
    federated = table.filter(pc.equal(table["metric"], "federated_accuracy"))
    assert federated["round"].to_pylist() == [1, 2]
    assert all(0.3 < acc <= 1.0 for acc in federated["value"].to_pylist())
    examples = table.filter(pc.equal(table["metric"], "federated_num_examples"))[
        "value"
    ].to_pylist()
    assert 0.2 * 1437 < examples[0] < 0.3 * 1437  # about a quarter of digits' 1,437 training rows


def test_import_path_and_entry_point_through_compare(tmp_path, ray_address):
    path_route = "tests.plugins.custom_aggregators:KeepBestByMetric"
    outcome = compare(
        digits_config(tmp_path),
        [path_route, "example_plugin"],
        address=ray_address,
        progress=lambda _: None,
    )
    assert path_route in outcome.table and "example_plugin" in outcome.table
    assert (outcome.path / "compare.png").stat().st_size > 0
    best = _aggregator_metric(outcome.runs[path_route], "best_client")
    assert len(best) == 2 and all(c in (0.0, 1.0, 2.0) for c in best)
    assert len(_aggregator_metric(outcome.runs["example_plugin"], "trimmed_each_side")) == 2


def test_a_registered_attack_of_ones_own_runs_in_every_malicious_client(tmp_path, ray_address):
    """A user's Attack, named by the name it registers and found by the clients through
    run.plugins: the malicious clients' updates are ten times an honest one's (their
    update_norm says so in round 1) and their labels all 0 (so they fit their data perfectly)."""
    config = digits_config(
        tmp_path,
        "run.plugins=['tests.plugins.user_attack']",
        "attack.kind=one_class_boost",
        "attack.fraction=0.34",
        "attack.params={label = 0, scale = 10.0}",
        "federation.max_update_norm_ratio=0",
    )
    run = run_experiment(config, address=ray_address, progress=lambda _: None).run_dir
    (bad,) = _malicious(run)
    table = run.metrics().to_pylist()
    norms = {
        (r["round"], r["client_id"]): r["value"] for r in table if r["metric"] == "update_norm"
    }
    accuracy = {
        (r["round"], r["client_id"]): r["value"] for r in table if r["metric"] == "train_accuracy"
    }
    # Round 1 starts from the same model for everyone: the boosted update stands out.
    honest = [v for (r, c), v in norms.items() if r == 1 and c != bad]
    assert norms[(1, bad)] > 3 * max(honest), norms
    assert accuracy[(1, bad)] == accuracy[(2, bad)] == 1.0  # one label: trivially fit


def _malicious(run):
    import json

    return json.loads((run.path / "attack.json").read_text())["malicious_clients"]
