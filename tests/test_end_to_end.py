"""Real federated runs: Flower's simulation engine on a local Ray, aggregator and evaluator actors."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch
from flwr.app import Array

from fedmerge.clients.tasks import get_task
from fedmerge.clients.training import evaluate, set_state
from fedmerge.federation.results import RunDir
from fedmerge.federation.runner import run_experiment

from .conftest import digits_config

pytestmark = pytest.mark.slow

TIMING = {"round_time_s", "aggregate_s", "evaluate_s"}


def _rows(run: RunDir):
    table = run.metrics().to_pylist()
    return sorted(
        (
            r["round"],
            r["scope"],
            r["client_id"] if r["client_id"] is not None else -1,
            r["metric"],
            r["value"],
        )
        for r in table
        if r["metric"] not in TIMING
    )


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    lines: list[str] = []
    outcome = run_experiment(digits_config(tmp_path_factory.mktemp("base")), progress=lines.append)
    return outcome, lines


def test_digits_end_to_end(base_run):
    outcome, lines = base_run
    run = outcome.run_dir

    curve = run.server_curve("accuracy")
    assert [r for r, _ in curve] == [1, 2]
    assert curve[-1][1] > 0.6, f"final accuracy {curve[-1][1]} is not well above chance (0.1)"

    table = run.metrics()
    clients = table.filter(
        pc.and_(pc.equal(table["scope"], "client"), pc.equal(table["metric"], "train_loss"))
    )
    assert sorted(set(zip(clients["round"].to_pylist(), clients["client_id"].to_pylist()))) == [
        (r, c) for r in (1, 2) for c in (0, 1, 2)
    ]
    assert any("round   2/2" in line for line in lines)
    # Every run counts the bytes on the wire: the whole model to each of the three clients and
    # back from each (np.save bytes, as Flower carries them).
    wire = sum(len(Array(v.numpy()).data) for v in run.load_model().values())
    for metric in ("bytes_sent", "bytes_received"):
        rows = table.filter(pc.equal(table["metric"], metric))
        assert rows["value"].to_pylist() == [3.0 * wire] * 2, metric

    # The saved model is the final global model: it scores what the evaluator reported.
    task = get_task("digits")
    model = task.build_model()
    set_state(model, run.load_model())
    assert evaluate(model, task, task.load("test"))["accuracy"] == pytest.approx(curve[-1][1])
    assert run.plot_path.stat().st_size > 0
    assert (run.path / "config.toml").read_text().count("digits") >= 1
    assert outcome.placement["aggregator"]["device"] == "cpu"


def test_same_seed_same_metrics(base_run, tmp_path, ray_address):
    """The base run started a Ray of its own; this one attaches to a running Ray: same metrics."""
    first = base_run[0].run_dir
    second = run_experiment(
        digits_config(tmp_path), address=ray_address, progress=lambda _: None
    ).run_dir
    assert _rows(first) == _rows(second)
    a, b = first.load_model(), second.load_model()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_seed_other_metrics(base_run, tmp_path, ray_address):
    other = run_experiment(
        digits_config(tmp_path, "seed=8"), address=ray_address, progress=lambda _: None
    ).run_dir
    assert _rows(base_run[0].run_dir) != _rows(other)
