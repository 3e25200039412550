"""A task shipped by another package: fedmerge finds it through the ``fedmerge.tasks`` entry point.

``example_iris``: the iris flowers bundled with scikit-learn (150 examples, 4 measurements, 3
species), standardised, a fixed 30-example test split, and a small MLP whose width is the task's
one parameter (``[data.task_params] hidden = 16``). Nothing in fedmerge imports or registers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmerge.aggregators.params import hyperparameter
from fedmerge.clients.tasks import ArrayData, Task

__all__ = ["Iris"]


class Iris(Task):
    name = "example_iris"
    num_classes = 3

    @dataclass(frozen=True)
    class Params:
        hidden: int = hyperparameter(16, "width of the MLP's hidden layer", ge=1)

    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        from sklearn.datasets import load_iris

        x, y = load_iris(return_X_y=True)
        x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(y))
        index = order[:30] if split == "test" else order[30:]
        return ArrayData(x[index], y[index].astype(np.int64))

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(4, self.params.hidden), nn.ReLU(), nn.Linear(self.params.hidden, 3)
        )

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.float32))
