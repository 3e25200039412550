"""A task of your own, in your own file: scikit-learn's bundled wine data (178 examples, 13
measurements, 3 cultivars) and an MLP whose width is the task's one setting. README and
docs/plugins.md run it with `--set 'run.plugins=["experiments/wine_task.py"]' --set data.task=wine`."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import fedmerge
from fedmerge.aggregators.params import hyperparameter
from fedmerge.clients.tasks import ArrayData, Task


@fedmerge.register_task
class Wine(Task):
    name = "wine"
    num_classes = 3

    @dataclass(frozen=True)
    class Params:  # [data.task_params] hidden = 32
        hidden: int = hyperparameter(16, "width of the hidden layer", ge=1)

    def load(self, split, data_dir=None):
        from sklearn.datasets import load_wine

        x, y = load_wine(return_X_y=True)
        x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(y))
        index = order[:40] if split == "test" else order[40:]
        return ArrayData(x[index], y[index])

    def build_model(self):
        return nn.Sequential(
            nn.Linear(13, self.params.hidden), nn.ReLU(), nn.Linear(self.params.hidden, 3)
        )

    def preprocess(self, x):
        return torch.from_numpy(np.asarray(x, dtype=np.float32))
