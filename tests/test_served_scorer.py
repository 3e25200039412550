"""The one scorer (``federation.evaluation.ModelScorer``) behind the evaluator actor and the
validation scorer: models are built once and reloaded, served models are rebuilt only when their
spec changes, and every score equals that of a freshly built model, bit for bit."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.clients.tasks import get_task
from fedmerge.clients.tasks.base import ArrayData
from fedmerge.clients.tasks.digits import Digits
from fedmerge.clients.training import evaluate, get_state, set_state
from fedmerge.federation.actors import EvaluatorActor
from fedmerge.federation.evaluation import ModelScorer, evaluate_per_task
from fedmerge.federation.scoring import CPU_BATCH, ValidationScorer
from fedmerge.federation.served import build_served, served_spec


def plain_class(actor_class):
    """The class a ``@ray.remote`` decorated, to run an actor's code in this process."""
    return actor_class.__ray_metadata__.modified_class.__ray_actor_class__


def _served(seed: int, **smile) -> tuple[dict, dict[str, np.ndarray]]:
    """(spec, weights) of a SMILE model over three noisy copies of a digits MLP."""
    task = get_task("digits")
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    updates = []
    for i in range(3):
        g = torch.Generator().manual_seed(100 * seed + i)
        updates.append(
            ClientUpdate(
                i, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, 10
            )
        )
    ctx = RoundContext(round=1, global_state=base, base_state=base, build_model=task.build_model)
    params = {"k_gate": 4, "k": 8, "top_k": 2, **smile}
    model = create_aggregator("smile", params).aggregate(ctx, updates).served_model
    return served_spec(model, "digits")


def _fresh(model: torch.nn.Module, task, data: ArrayData, **options) -> dict[str, float]:
    metrics = evaluate(model, task, data, **options)
    metrics.pop("num_examples")
    return metrics


@pytest.fixture
def one_thread():
    """The evaluator actor sets torch's thread count for its process: put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_evaluator_rebuilds_a_served_model_only_when_its_spec_changes(one_thread) -> None:
    task = get_task("digits")
    test = task.load("test")
    evaluator = plain_class(EvaluatorActor)("digits", test.x, test.y, 512, 1)
    scorer = evaluator.scorer
    spec, first = _served(1)
    _, second = _served(2)  # the next round: same structure, other weights
    assert any(not np.array_equal(first[k], second[k]) for k in first)
    state = {k: v.numpy() for k, v in get_state(task.build_model()).items()}  # ignored when served

    got = [evaluator.evaluate(state, (spec, first))]
    model = scorer.model(served=(spec, first))
    assert scorer.builds == 1
    got.append(evaluator.evaluate(state, (copy.deepcopy(spec), second)))  # a new dict, as from Ray
    assert scorer.builds == 1 and scorer.model(served=(spec, second)) is model
    for metrics, weights in zip(got, (first, second)):
        assert metrics.pop("evaluate_s") >= 0
        assert metrics == _fresh(build_served(spec, weights), task, test, batch_size=512)
    assert got[0] != got[1]

    other_spec, other = _served(3, k=5)  # another structure: rebuilt
    assert other_spec != spec
    metrics = evaluator.evaluate(state, (other_spec, other))
    assert scorer.builds == 2 and scorer.model(served=(other_spec, other)) is not model
    metrics.pop("evaluate_s")
    assert metrics == _fresh(build_served(other_spec, other), task, test, batch_size=512)

    # The broadcast weights: the task's own model, built once, whatever the served models did.
    for scale in (0.0, 0.1):
        weights = {k: v + scale for k, v in state.items()}
        metrics = evaluator.evaluate(weights, None)
        metrics.pop("evaluate_s")
        fresh = task.build_model()
        set_state(fresh, {k: torch.from_numpy(v) for k, v in weights.items()})
        assert metrics == _fresh(fresh, task, test, batch_size=512)
    assert scorer.builds == 3


def test_a_served_model_that_does_not_fit_its_spec_is_refused() -> None:
    task = get_task("digits")
    test = task.load("test")
    scorer = ModelScorer(task, test, batch_size=256)
    spec, weights = _served(1)
    scorer.score(served=(spec, weights))
    _, other = _served(2, k=5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        scorer.score(served=(spec, other))  # weights of another structure under the same spec
    with pytest.raises(ValueError, match="either state .* or served"):
        scorer.score()
    assert scorer.score(served=(spec, weights)) == _fresh(
        build_served(spec, weights), task, test, batch_size=256
    )


class _TwoDigitTasks(Digits):
    """Digits split into two "tasks" by the image's total ink, to score a multi-task task."""

    name = "digits_two_tasks_test"
    task_names: ClassVar[list[str]] = ["light", "dark"]

    @staticmethod
    def task_index(x: np.ndarray) -> np.ndarray:
        ink = np.asarray(x, dtype=np.float64).reshape(len(x), -1).sum(axis=1)
        return (ink > np.median(ink)).astype(np.int64)


def test_multi_task_data_are_scored_per_task() -> None:
    task = _TwoDigitTasks()
    test = task.load("test")
    torch.manual_seed(0)
    state = get_state(task.build_model())
    metrics = ModelScorer(task, test, batch_size=100, per_task=True).score(state=state)
    groups = task.task_index(test.x)
    assert set(np.unique(groups)) == {0, 1}
    model = task.build_model()
    set_state(model, state)
    for t, name in enumerate(task.task_names):
        part = _fresh(model, task, test.subset(np.flatnonzero(groups == t)), batch_size=100)
        assert metrics[f"accuracy/{name}"] == part["accuracy"]
        assert metrics[f"loss/{name}"] == part["loss"]
    whole = _fresh(model, task, test, batch_size=100)
    assert metrics["accuracy"] == pytest.approx(whole["accuracy"], abs=1e-12)
    assert metrics["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # float32 batch means
    again = evaluate_per_task(model, task, test, batch_size=100)
    assert again.pop("evaluate_s") >= 0 and again == metrics
    # Without per_task: the plain scores, as the validation scorer reports them.
    plain = ModelScorer(task, test, batch_size=100).score(state=state)
    assert plain == whole


def test_the_validation_scorer_builds_one_model_and_scores_like_a_fresh_one() -> None:
    task = get_task("digits")
    val = task.load("test").subset(np.arange(300))
    scorer = ValidationScorer("digits", val.x, val.y)
    torch.manual_seed(0)
    base = get_state(task.build_model())
    for i in range(3):
        state = {k: v + 0.05 * i for k, v in base.items()}
        fresh = task.build_model()
        set_state(fresh, state)
        expected = _fresh(fresh, task, val, batch_size=CPU_BATCH, channels_last=True)
        assert scorer.evaluate(state) == expected
    assert scorer._local is not None and scorer._local.builds == 1


def test_moe_still_offers_its_names_and_serving_needs_neither_ray_nor_flower() -> None:
    from fedmerge.federation import evaluation, moe, proxy, served

    for name in (
        "FORMAT",
        "ServedModelError",
        "build_served",
        "load_served",
        "save_served",
        "served_spec",
    ):
        assert getattr(moe, name) is getattr(served, name)
    for name in ("PROXY_SALT", "proxy_inputs", "proxy_split"):
        assert getattr(moe, name) is getattr(proxy, name)
    assert moe.evaluate_per_task is evaluation.evaluate_per_task
    code = (
        "import sys, fedmerge.federation.served, fedmerge.federation.evaluation, "
        "fedmerge.federation.proxy; print(sorted(m for m in sys.modules "
        "if m in ('ray', 'flwr') or m.startswith(('ray.', 'flwr.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
