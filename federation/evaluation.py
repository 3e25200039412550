"""Scoring a model on a dataset: the one path from weights to metrics on the server side.

``ModelScorer`` turns the task's weights, or a served model's spec and weights
(``fedmerge.federation.served``), into a model and scores it on one dataset. The evaluator actor
scores the global model with it each round; the validation scorer and its workers
(``fedmerge.federation.scoring``) score FedDRL's candidates with it. It builds the task's model
once and keeps the last served model: new weights are loaded into the model already built, and
a served model is rebuilt only when its spec (module structure) changes.

Multi-task tasks (``task_index``, ``task_names``) can be scored per task: ``accuracy/<task>`` and
``loss/<task>`` next to the overall ``accuracy`` and ``loss`` (``evaluate_per_task``).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmerge.clients.tasks import TaskSpec, as_task
from fedmerge.clients.tasks.base import ArrayData, Task
from fedmerge.clients.training import evaluate
from fedmerge.federation.served import empty_served, load_served_state

__all__ = ["ModelScorer", "evaluate_per_task"]

Served = tuple[Mapping[str, Any], Mapping[str, np.ndarray]]
"""A served model as it travels: (spec, weights as NumPy), from ``served_spec``."""


def _per_task(model: nn.Module, task: Task, data: ArrayData, **options: Any) -> dict[str, float]:
    """``loss``/``accuracy`` over all of ``data`` and, for a multi-task task, per task
    (``options`` go to ``evaluate``)."""
    groups = task.task_index(data.x)
    if groups is None:
        metrics = evaluate(model, task, data, **options)
    else:
        names = list(task.task_names)
        metrics, total, loss_sum, correct = {}, 0, 0.0, 0.0
        for t in np.unique(groups):
            part = data.subset(np.flatnonzero(groups == t))
            m = evaluate(model, task, part, **options)
            name = names[t] if t < len(names) else str(int(t))
            metrics[f"accuracy/{name}"], metrics[f"loss/{name}"] = m["accuracy"], m["loss"]
            total += len(part)
            loss_sum += m["loss"] * len(part)
            correct += m["accuracy"] * len(part)
        metrics["accuracy"], metrics["loss"] = correct / total, loss_sum / total
    metrics.pop("num_examples", None)  # the data set's size, not a score
    return metrics


def evaluate_per_task(
    model: nn.Module,
    task: Task,
    data: ArrayData,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``loss``/``accuracy`` over all of ``data`` and, for a multi-task task, per task, plus the
    time it took (``evaluate_s``)."""
    start = time.perf_counter()
    metrics = _per_task(model, task, data, batch_size=batch_size, device=device)
    metrics["evaluate_s"] = time.perf_counter() - start
    return metrics


def _tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` with NumPy arrays (read-only object-store views included) as tensors over them."""
    with warnings.catch_warnings():  # never written: set_state copies them into the model
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {
            k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
            for k, v in state.items()
        }


class ModelScorer:
    """Scores weights of ``task``'s model, or served models, on ``data``.

    ``score(state=...)`` loads ``state`` (tensors or NumPy arrays, strictly: same keys and
    shapes) into the task's model, built on first use; ``score(served=(spec, weights))`` loads the
    weights into the served model of ``spec``, built on first use and again whenever ``spec``
    differs from the last one. ``builds`` counts the models built. ``batch_size``, ``device``
    and ``channels_last`` go to ``clients.training.evaluate``; ``per_task`` scores each task of a
    multi-task task as well (``accuracy/<task>``, ``loss/<task>``).
    """

    def __init__(
        self,
        task: str | TaskSpec | Mapping[str, Any] | Task,
        data: ArrayData,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        per_task: bool = False,
    ) -> None:
        self.task = as_task(task)
        self.data = data
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.per_task = per_task
        self.builds = 0
        self._model: nn.Module | None = None
        self._served: tuple[Mapping[str, Any], nn.Module] | None = None

    def model(
        self, state: Mapping[str, Any] | None = None, served: Served | None = None
    ) -> nn.Module:
        """The model holding ``state`` (the task's model) or ``served`` (a served model): exactly
        one of them. The same module object is returned while the structure stays the same."""
        if (state is None) == (served is None):
            raise ValueError(
                "ModelScorer.model: give either state (the task's weights) or served "
                "(a served model's spec and weights), not both or neither"
            )
        if served is not None:
            spec, weights = served
            if self._served is None or self._served[0] != spec:
                self._served = None  # the old structure's memory goes before the new one is built
                self._served = (copy.deepcopy(dict(spec)), empty_served(spec).to(self.device))
                self.builds += 1
            return load_served_state(self._served[1], weights).eval()
        if self._model is None:
            self._model = self.task.build_federated_model().to(self.device)
            self.builds += 1
        self.task.load_weights(self._model, _tensors(state))
        return self._model

    def score(
        self, state: Mapping[str, Any] | None = None, served: Served | None = None
    ) -> dict[str, float]:
        """``loss`` and ``accuracy`` (per task too, with ``per_task``) of ``state``/``served``."""
        model = self.model(state=state, served=served)
        options = {
            "batch_size": self.batch_size,
            "device": self.device,
            "channels_last": self.channels_last,
        }
        if self.per_task:
            return _per_task(model, self.task, self.data, **options)
        metrics = evaluate(model, self.task, self.data, **options)
        metrics.pop("num_examples", None)  # the data set's size, not a score
        return metrics
