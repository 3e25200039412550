"""Ray actors of the server side: one runs the aggregator, one scores the global model.

Both compute on CUDA when Ray assigned them a GPU (``num_gpus`` in the config), otherwise on the
CPU. Arrays travel as NumPy through Ray's object store, which hands actors zero-copy read-only
views; tensors are built over those views and never written.

Ray restarts a dead actor (``max_restarts``) by running ``__init__`` again; the driver then puts
its state back (``AggregatorActor.restore``) and replays the open round (``federation.recovery``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

from fedmerge.aggregators import Aggregator, ClientUpdate, RoundContext
from fedmerge.clients.tasks import TaskSpec, as_task
from fedmerge.clients.tasks.base import ArrayData
from fedmerge.federation.arrays import to_numpy_state, to_torch_state
from fedmerge.federation.config import ActorConfig
from fedmerge.federation.evaluation import ModelScorer
from fedmerge.federation.scoring import ValidationScorer
from fedmerge.federation.served import served_spec

__all__ = ["ActorStateLost", "AggregatorActor", "EvaluatorActor", "actor_options", "placement"]


def _device() -> torch.device:
    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def placement() -> dict[str, str]:
    """Where the calling actor runs: node, host, device (and GPU name when there is one)."""
    device = _device()
    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": str(os.getpid()),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        # What Ray assigned, even where CUDA is not usable (a node that declares GPUs it lacks).
        "ray_gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids()),
    }


def actor_options(placement: ActorConfig) -> dict[str, Any]:
    """Ray ``.options()`` for an actor placed by a ``[ray.aggregator]``-style config section."""
    options: dict[str, Any] = {
        "num_cpus": placement.num_cpus,
        "num_gpus": placement.num_gpus,
        "max_restarts": placement.max_restarts,
    }
    if placement.resources:
        options["resources"] = dict(placement.resources)
    if placement.label_selector:
        options["label_selector"] = dict(placement.label_selector)
    if placement.scheduling_strategy != "DEFAULT":
        options["scheduling_strategy"] = placement.scheduling_strategy
    return options


class ActorStateLost(RuntimeError):
    """The actor does not hold the state the driver's call assumes: Ray restarted it (``__init__``
    ran again) since the driver last gave it state, or the call belongs to an earlier attempt."""


@ray.remote
class AggregatorActor:
    """Owns the aggregator and the global model; replies stream in through ``accumulate``.

    The aggregator instance is built on the driver and shipped here by pickling: Ray sends its
    class by reference, so a class from a registered name, a ``module:Class`` path or an entry
    point is imported in the worker the same way it was found on the driver.

    A round is ``begin_round(round, token, state_round)``, ``accumulate(token, ...)`` per reply,
    then ``finalize(token)``. ``state_round`` is the round whose result the driver believes the
    actor holds (0: the initial model), ``token`` names one attempt at a round. A mismatch raises
    ``ActorStateLost``: a restart that the driver did not see fail a call (Ray restarts actors
    between calls too) is caught here, never merged on top of the wrong state.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        base_state: Mapping[str, np.ndarray],
        seed: int,
        *,
        validation: Mapping[str, Any] | None = None,
        malicious: Sequence[int] = (),
        task_name: str | Mapping[str, Any] | None = None,
        proxy: Mapping[int, np.ndarray] | None = None,
        num_clients: int = 0,
        num_rounds: int = 0,
    ) -> None:
        """``validation`` (task name, x, y, batch size) is the server's validation set, scored through
        the RoundContext (``federation.scoring``); ``malicious`` the attack's ground truth.
        ``task_name`` (a name, or a ``TaskSpec.to_dict()`` for a task with parameters or
        plug-in modules) lets upscaling aggregators build the run's model (``RoundContext.build_model``);
        ``proxy`` holds the server's unlabelled inputs per task (``RoundContext.proxy_inputs``);
        ``num_clients`` and ``num_rounds`` the federation's population and configured rounds
        (``RoundContext``)."""
        self.task_name = task_name
        self.num_clients, self.num_rounds = int(num_clients), int(num_rounds)
        self.device = _device()
        self.aggregator = aggregator
        self.seed = seed
        self.scorer = (
            None
            if validation is None
            else ValidationScorer(
                validation["task"],
                validation["x"],
                validation["y"],
                batch_size=int(validation["batch_size"]),
                device=self.device,
            )
        )
        self.malicious = frozenset(int(i) for i in malicious)
        self.proxy = None
        if proxy is not None and task_name is not None:
            task = as_task(task_name)
            self.proxy = {int(t): task.preprocess(np.asarray(x)) for t, x in proxy.items()}
        self.base_state = self._to_device(base_state)
        self.global_state = dict(self.base_state)
        self._accumulate_s = 0.0
        self._token: int | None = None
        self._round = 0
        self.state_round = 0

    def _to_device(self, state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # Copy off the read-only object-store view so that no aggregator can write into it.
        return {k: v.to(self.device, copy=True) for k, v in to_torch_state(state).items()}

    def placement(self) -> dict[str, str]:
        return placement()

    def client_config(self, server_round: int, state_round: int) -> dict[str, Any]:
        self._check_state(state_round)
        return self.aggregator.client_config(server_round)

    def client_arrays(
        self, server_round: int, client_id: int, state_round: int
    ) -> dict[str, np.ndarray] | None:
        """``Aggregator.client_arrays`` for one client, as CPU NumPy arrays (None: nothing)."""
        self._check_state(state_round)
        arrays = self.aggregator.client_arrays(server_round, client_id)
        return None if arrays is None else _tensors_to_numpy(dict(arrays))

    def begin_round(
        self, server_round: int, token: int, state_round: int, sampled: Sequence[int] = ()
    ) -> None:
        self._check_state(state_round)
        self._token, self._round = token, server_round
        self._accumulate_s = 0.0
        self.aggregator.begin_round(
            RoundContext(
                round=server_round,
                global_state=self.global_state,
                base_state=self.base_state,
                seed=self.seed,
                device=self.device,
                evaluate=None if self.scorer is None else self.scorer.evaluate,
                evaluate_many=None if self.scorer is None else self.scorer.evaluate_many,
                malicious=self.malicious,
                build_model=None
                if self.task_name is None
                else TaskSpec.from_dict(self.task_name).build().build_federated_model,
                proxy_inputs=self.proxy,
                num_clients=self.num_clients,
                num_rounds=self.num_rounds,
                sampled=tuple(int(c) for c in sampled),
            )
        )

    def accumulate(
        self,
        token: int,
        client_id: int,
        arrays: Mapping[str, np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> None:
        self._check_token(token)
        start = time.perf_counter()
        self.aggregator.accumulate(
            ClientUpdate(
                client_id=client_id,
                state=to_torch_state(arrays),
                num_examples=num_examples,
                metrics=dict(metrics),
            )
        )
        self._accumulate_s += time.perf_counter() - start

    @ray.method(num_returns=5)
    def finalize(
        self, token: int
    ) -> tuple[
        dict[str, np.ndarray],
        dict[str, float],
        dict[str, Any],
        tuple[dict[str, Any], dict[str, np.ndarray]] | None,
        dict[str, str],
    ]:
        """The next global weights, the round's metrics, the aggregator's state after the round
        (which the driver keeps, to restore a restarted actor and to checkpoint), the served
        model (``fedmerge.federation.served`` spec, weights) or None when the broadcast weights are served,
        and where this actor runs (``placement()``: the run records it without asking again). The
        driver holds the served model's ref, so it outlives this actor: a restart loses nothing."""
        self._check_token(token)
        self._token = None
        start = time.perf_counter()
        result = self.aggregator.finalize()
        self.global_state = {k: v.detach() for k, v in result.state.items()}
        self.state_round = self._round
        metrics = dict(result.metrics)
        served = None
        if result.served_model is not None:
            if self.task_name is None:
                raise ValueError(
                    f"{type(self.aggregator).__name__} serves its own model, but the actor was "
                    "not told the run's task (task_name)"
                )
            served = served_spec(result.served_model, self.task_name)
        metrics["aggregate_s"] = self._accumulate_s + time.perf_counter() - start
        return (
            to_numpy_state({k: v.cpu() for k, v in self.global_state.items()}),
            metrics,
            self.state_dict(),
            served,
            placement(),
        )

    def round_state(self, token: int) -> dict[str, Any] | None:
        """A snapshot of the open round so far (``Aggregator.round_state``, tensors as NumPy arrays
        on the CPU), or None when the aggregator gives none. Ray copies it into the object store
        as this call returns, before the next reply is merged, so live tensors may be returned."""
        self._check_token(token)
        state = self.aggregator.round_state()
        return None if state is None else _tensors_to_numpy(state)

    def load_round_state(self, token: int, state: Mapping[str, Any]) -> None:
        """Continue the round (just begun under ``token``) from a ``round_state`` snapshot."""
        self._check_token(token)
        self.aggregator.load_round_state(_numpy_to_tensors(state))

    def restore(
        self,
        global_state: Mapping[str, np.ndarray],
        aggregator_state: Mapping[str, Any],
        state_round: int,
    ) -> None:
        """Put back the state after round ``state_round`` (after a restart, or to resume a run)."""
        self._token = None
        self.global_state = self._to_device(global_state)
        self.aggregator.load_state_dict(aggregator_state)
        self.state_round = state_round

    def _check_state(self, state_round: int) -> None:
        if state_round != self.state_round:
            raise ActorStateLost(
                f"the driver expects the state after round {state_round}, the actor holds "
                f"that after round {self.state_round} (it was restarted)"
            )

    def _check_token(self, token: int) -> None:
        if token != self._token:
            raise ActorStateLost(
                f"call for round attempt {token}, but the open one is {self._token}"
            )

    def get_global(self) -> dict[str, np.ndarray]:
        return to_numpy_state({k: v.cpu() for k, v in self.global_state.items()})

    def state_dict(self) -> dict[str, Any]:
        """The aggregator's state with every tensor on the CPU, so a driver without GPUs can hold it."""
        return _on_cpu(self.aggregator.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.aggregator.load_state_dict(state)


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied to everything inside its nested dicts, lists and tuples."""
    if isinstance(value, Mapping):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_map_leaves(v, leaf) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return leaf(value)


def _tensors_to_numpy(value: Any) -> Any:
    """``value`` with every tensor inside (nested dicts, lists, tuples) as a CPU NumPy array, which
    Ray serialises without pickling its buffer; dtypes NumPy lacks (bfloat16) stay tensors."""

    def leaf(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        x = x.detach().cpu()
        return x if x.dtype == torch.bfloat16 else x.numpy()

    return _map_leaves(value, leaf)


def _numpy_to_tensors(value: Any) -> Any:
    """The inverse of ``_tensors_to_numpy``: NumPy arrays (read-only views included) as tensors."""
    return _map_leaves(
        value, lambda x: to_torch_state({"x": x})["x"] if isinstance(x, np.ndarray) else x
    )


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor inside (nested dicts, lists, tuples) detached and on the CPU."""
    return _map_leaves(value, lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x)


@ray.remote
class EvaluatorActor:
    """Scores the global model on the server's held-out split of the task (``ModelScorer``): the
    task's model and the last served model stay built between rounds, each round loads weights."""

    def __init__(
        self,
        task_name: str | Mapping[str, Any],
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        num_threads: int = 0,
    ) -> None:
        # Evaluation runs between rounds, when the clients are idle: 0 means every core of the node.
        torch.set_num_threads(num_threads if num_threads > 0 else (os.cpu_count() or 1))
        self.device = _device()
        self.scorer = ModelScorer(
            task_name, ArrayData(x, y), batch_size=batch_size, device=self.device, per_task=True
        )

    def placement(self) -> dict[str, str]:
        return placement()

    def evaluate(
        self,
        state: Mapping[str, np.ndarray],
        served: tuple[Mapping[str, Any], Mapping[str, np.ndarray]] | None = None,
        with_placement: bool = False,
    ) -> dict[str, float] | tuple[dict[str, float], dict[str, str]]:
        """Score the global weights or, when the aggregator served its own model (``served``: a
        ``fedmerge.federation.served`` spec and weights), that model; multi-task data are scored
        per task. ``with_placement``: (metrics, ``placement()``), so the round learns where the
        actor ran."""
        start = time.perf_counter()
        metrics = self.scorer.score(state=None if served is not None else state, served=served)
        metrics["evaluate_s"] = time.perf_counter() - start
        return (metrics, placement()) if with_placement else metrics
