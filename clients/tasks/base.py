"""The Task contract: the data, model, loss and metrics of one learning problem.

A Task is what a client trains and what the server evaluates. Data come as plain NumPy arrays
(``ArrayData``) so they can be written to Arrow shards once and memory-mapped by every client;
``preprocess`` turns a batch of stored rows into the model's input tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

__all__ = ["ArrayData", "DataError", "Task"]


class DataError(RuntimeError):
    """A data set is missing, corrupt or inconsistent; the message says how to fix it."""


# Where `make data` puts the data sets in a checkout (the repository's data/).
REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def data_roots(data_dir: Path | None) -> list[Path]:
    """The folders a task looks in: only ``data_dir`` when one is configured, else
    $FEDMERGE_DATA_DIR (when set), then the checkout's data/ (so commands run from a new shell
    find what `make data` fetched)."""
    if data_dir:
        return [Path(data_dir)]
    env = os.environ.get("FEDMERGE_DATA_DIR")
    return [*([Path(env)] if env else []), REPO_DATA]


@dataclass(frozen=True)
class ArrayData:
    """Examples as stored: ``x`` rows (any fixed shape and dtype) and integer labels ``y``."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> ArrayData:
        return ArrayData(self.x[index], self.y[index])


class Task(ABC):
    """One learning problem. Subclasses are registered by name in ``fedmerge.clients.tasks``.

    What the server needs to know is declared, never guessed: ``num_classes`` (the model's
    output width), and for a multi-task problem ``task_names`` (one name per task, in task-index
    order), ``task_index`` (the task of each stored row) and a model that keeps task t's
    classification head under ``heads.<t>.`` (the merging aggregators merge everything else and
    keep each head per task). A task with settings declares them as a frozen ``Params``
    dataclass of ``fedmerge.aggregators.params.hyperparameter`` fields; the config's
    ``[data.task_params]`` table is checked against it and the checked values are
    ``self.params``. ``num_classes`` and ``task_names`` may be properties computed from them.
    """

    name: ClassVar[str] = ""
    num_classes: int = 0
    task_names: tuple[str, ...] | list[str] = ()
    Params: ClassVar[type | None] = None
    adapter: Any = None
    """The run's ``[train.peft]`` settings (a ``PeftConfig``) with its ``seed``, set by
    ``TaskSpec.build``; None for full fine-tuning."""
    adapter_seed: int = 0

    def __init__(self, **params: Any) -> None:
        from fedmerge.aggregators.params import check

        declaration = type(self).Params
        label = f"task {self.name or type(self).__qualname__!r}"
        if declaration is None:
            if params:
                raise TypeError(
                    f"{label} takes no parameters (it declares no Params); got "
                    f"{', '.join(sorted(map(str, params)))}"
                )
            self.params: Any = None
        else:
            self.params = check(label, declaration, params)

    @property
    def is_multi_task(self) -> bool:
        """Whether rows belong to several tasks (``task_names`` has more than one entry)."""
        return len(self.task_names) > 1

    def task_index(self, x: np.ndarray) -> np.ndarray | None:
        """The task (0..len(task_names)-1, int64) of each stored row; None for one task."""
        return None

    def client_task_id(self, data: ArrayData) -> int:
        """The one task a client's rows belong to, or -1 when they mix tasks (or are empty)."""
        index = self.task_index(data.x) if len(data) else None
        tasks = np.unique(index) if index is not None else np.array([])
        return int(tasks[0]) if len(tasks) == 1 else -1

    def check_model(self, keys: list[str] | tuple[str, ...]) -> None:
        """Check the model's parameter names (``keys``) against the declarations above: a
        multi-task model needs a ``heads.<t>.`` head for every task t, and a one-task model must
        not have ``heads.<t>.`` keys (merges would keep them apart per task id it never sends).
        A DataError names the task and the fix."""
        heads = {
            int(k.split(".")[1])
            for k in keys
            if k.startswith("heads.") and k.split(".")[1].isdigit()
        }
        label = f"task {self.name or type(self).__qualname__!r}"
        if self.is_multi_task:
            missing = [t for t in range(len(self.task_names)) if t not in heads]
            if missing:
                raise DataError(
                    f"{label} declares {len(self.task_names)} tasks ({', '.join(self.task_names)}) "
                    f"but its model has no parameters under heads.{missing[0]}.: a multi-task model "
                    "keeps task t's head as heads.<t> (an nn.ModuleList named heads), so merges "
                    "keep each head per task"
                )
        elif heads:
            raise DataError(
                f"{label} declares no task_names but its model has per-task heads "
                f"(heads.{min(heads)}.*): declare task_names and task_index, or rename the module"
            )

    def portable_params(self) -> dict[str, Any]:
        """The parameters as another process needs them (Ray workers, ``fedmerge resume`` from
        another folder): a task with file parameters makes relative paths absolute here. The
        driver calls it once and ships the result; the default is the checked values as given."""
        return {} if self.params is None else dataclasses.asdict(self.params)

    def fingerprint(self) -> str:
        """What, besides the examples themselves, makes this task's shards differ: its name and
        checked parameters (the shard cache hashes the examples too)."""
        values = {} if self.params is None else dataclasses.asdict(self.params)
        return json.dumps({"task": self.name, "params": values}, sort_keys=True, default=repr)

    @abstractmethod
    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        """Load and verify ``split`` ("train" or "test"); raise DataError naming the fix."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model; its initial weights follow torch's global RNG (the caller seeds it)."""

    def build_federated_model(self) -> nn.Module:
        """The model a run trains, merges and scores: ``build_model()``, and under
        ``[train.peft]`` with LoRA adapters injected, built from the run's seed so that the frozen
        base and the adapters' initial values are the same in every process."""
        if self.adapter is None:
            return self.build_model()
        from fedmerge.clients.adapters import inject

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.adapter_seed)
            model = self.build_model()
        return inject(model, self.adapter, seed=self.adapter_seed)

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a run's weights into ``build_federated_model()``'s model: every tensor strictly,
        or under ``[train.peft]`` the tensors that travel (the rest keeps its build)."""
        if self.adapter is None:
            from fedmerge.clients.training import set_state

            set_state(model, state)
        else:
            from fedmerge.clients.adapters import load_received

            load_received(model, state)

    def shared_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a client sends back: every tensor, or under ``[train.peft]`` the trainable ones."""
        if self.adapter is None:
            from fedmerge.clients.training import get_state

            return get_state(model)
        from fedmerge.clients.adapters import reply_state

        return reply_state(model)

    @abstractmethod
    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        """Stored rows -> a float input batch for the model."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)
