"""Scoring candidate models on the server's validation set, one at a time or many in parallel.

The server's validation set (``data.server_val_size`` examples held out of the training data
before partitioning, never in any client's shard) lets an aggregator judge the models it merges:
FedDRL scores every client model and every candidate selection or weighting with it. The
``AggregatorActor`` builds a ``ValidationScorer`` and hands its ``evaluate`` / ``evaluate_many``
to the aggregator through the ``RoundContext``.

``evaluate_many`` spreads the states over ``parallel`` scoring actors, one state in flight per
actor, and returns the results in the order of the states whatever order they finish in, so a
run stays reproducible. The actors live as long as the scorer (they die with the aggregator
actor that owns them) and each holds the validation set and a model, so a state costs one
``set_state`` and one pass. One Ray task per state was twice as slow on 2 cores: tasks asking
for no CPU are not throttled by Ray, so it started a dozen worker processes that each imported
torch and unpickled the data. The actors ask for no CPU either: Flower's client pool holds every
CPU of the cluster for the whole run, and an actor that asked for one would never be scheduled,
while aggregation runs when the clients of the round are done, so the cores are free. Without
Ray (unit tests) or on a GPU actor the states are scored one after the other in the calling
process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

from fedmerge.clients.tasks.base import ArrayData
from fedmerge.federation.arrays import to_numpy_state
from fedmerge.federation.evaluation import ModelScorer

__all__ = ["ValidationScorer", "hold_out"]

MAX_PARALLEL = 8


def hold_out(
    data: ArrayData,
    size: int,
    seed: int,
    *,
    groups: np.ndarray | None = None,
    key: str = "data.server_val_size",
    salt: int = 0x5E7,
) -> tuple[ArrayData, ArrayData]:
    """(rest, held): ``size`` examples drawn at random (seeded) from ``data``, and the others.

    With ``groups`` (the task of each example in a multi-task data set) ``size`` examples are
    drawn from each group. Both parts keep the original order of their examples. ``key`` names
    the config field in errors; ``salt`` separates the draws of different hold-outs (the server's
    validation set, WEMoE's proxy inputs) made with one seed. A ValueError names the problem
    when ``size`` leaves no training data (in some group).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"{key}={size!r} is invalid: must be an integer >= 0")
    rng = np.random.default_rng([seed, salt])
    if groups is None:
        if size >= len(data):
            raise ValueError(
                f"{key}={size} leaves no training data: the training split "
                f"has only {len(data)} examples"
            )
        order = rng.permutation(len(data))
        held = np.sort(order[:size])
    else:
        groups = np.asarray(groups)
        if len(groups) != len(data):
            raise ValueError(f"{key}: {len(groups)} group labels for {len(data)} examples")
        picked = []
        for g in np.unique(groups):
            index = np.flatnonzero(groups == g)
            if size >= len(index):
                raise ValueError(
                    f"{key}={size} leaves no training data of task {g}: it has only "
                    f"{len(index)} training examples"
                )
            picked.append(index[rng.permutation(len(index))[:size]])
        held = np.sort(np.concatenate(picked)) if picked else np.arange(0)
    rest = np.setdiff1d(np.arange(len(data)), held, assume_unique=True)
    return data.subset(rest), data.subset(held)


# On one CPU thread a batch whose activations fit in cache scores fastest: 1,000 validation images
# of the Fashion-MNIST CNN take 0.43 s in one batch of 1,000, 0.16 s in batches of 128 with
# channels-last layout (docs/results/feddrl.md, "Cost").
CPU_BATCH = 128


def _cpu_scorer(task_name: str, data: ArrayData, batch_size: int) -> ModelScorer:
    """The scorer of a CPU process: batches of at most ``CPU_BATCH``, channels-last layout."""
    return ModelScorer(task_name, data, batch_size=min(batch_size, CPU_BATCH), channels_last=True)


@ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)
class _ScoringWorker:
    """One scoring process: the validation set and a model of the task, kept between states."""

    def __init__(self, task_name: str, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        torch.set_num_threads(1)
        self.scorer = _cpu_scorer(task_name, ArrayData(x, y), batch_size)

    def score(self, state: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self.scorer.score(state=state)


class ValidationScorer:
    """Scores state dicts of the task's model on a fixed validation set (loss and accuracy)."""

    def __init__(
        self,
        task_name: str,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int = 1000,
        device: torch.device | str = "cpu",
        parallel: int | None = None,
    ) -> None:
        if len(y) == 0:
            raise ValueError("the server validation set is empty")
        self.task_name = task_name
        self.data = ArrayData(x, y)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.parallel = parallel
        self._pool: list[Any] = []
        self._data_refs: tuple[Any, Any] | None = None
        self._local: ModelScorer | None = None

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Loss and accuracy of one state, in this process (one model, built on the first call)."""
        if self._local is None and self.device.type == "cpu":
            self._local = _cpu_scorer(self.task_name, self.data, self.batch_size)
        elif self._local is None:
            self._local = ModelScorer(
                self.task_name, self.data, batch_size=self.batch_size, device=self.device
            )
        with _threads(1):
            return self._local.score(state=state)

    def _workers(self) -> int:
        if self.parallel is not None:
            return max(1, self.parallel)
        if not ray.is_initialized():
            return 1
        return max(1, min(MAX_PARALLEL, int(ray.cluster_resources().get("CPU", 1))))

    def evaluate_many(self, states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, float]]:
        """Loss and accuracy of each state, in the order given: on the scoring actors when Ray is
        running and the scorer is on the CPU, else one after the other here."""
        workers = self._workers()
        if (
            not ray.is_initialized()
            or self.device.type != "cpu"
            or workers == 1
            or len(states) <= 1
        ):
            return [self.evaluate(state) for state in states]
        if not self._pool:
            # Held while the pool lives: a restarted actor reads its constructor arguments again.
            self._data_refs = (ray.put(self.data.x), ray.put(self.data.y))
            self._pool = [
                _ScoringWorker.remote(self.task_name, *self._data_refs, self.batch_size)
                for _ in range(workers)
            ]
        results: list[dict[str, float] | None] = [None] * len(states)
        idle = list(self._pool)
        pending: dict[Any, tuple[int, Any]] = {}
        for index, state in enumerate(states):
            if not idle:
                idle.append(self._collect(pending, results))
            worker = idle.pop()
            numpy_state = to_numpy_state({k: v.detach().cpu() for k, v in state.items()})
            pending[worker.score.remote(numpy_state)] = (index, worker)
        while pending:
            self._collect(pending, results)
        return [r for r in results if r is not None]

    @staticmethod
    def _collect(
        pending: dict[Any, tuple[int, Any]], results: list[dict[str, float] | None]
    ) -> Any:
        """Wait for one state's score, store it; returns the actor that is free again."""
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        index, worker = pending.pop(ref)
        results[index] = ray.get(ref)
        return worker


class _threads:
    """Run a block with torch's intra-op threads set to ``n``, restoring the count after."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.before = 0

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)
