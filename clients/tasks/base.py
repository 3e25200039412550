"""The Task contract: the data, model, loss and metrics of one learning problem.

A Task is what a client trains and what the server evaluates. Data come as plain NumPy arrays
(``ArrayData``) so they can be written to Arrow shards once and memory-mapped by every client;
``preprocess`` turns a batch of stored rows into the model's input tensor.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
    """One learning problem. Subclasses are registered by name in ``fedmerge.clients.tasks``."""

    name: ClassVar[str] = ""
    num_classes: ClassVar[int] = 0

    @abstractmethod
    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        """Load and verify ``split`` ("train" or "test"); raise DataError naming the fix."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model; its initial weights follow torch's global RNG (the caller seeds it)."""

    @abstractmethod
    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        """Stored rows -> a float input batch for the model."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)
