"""``tabular``: classification of the rows of your own CSV / Parquet (or JSON, Arrow) file with an
MLP, configured in ``[data.task_params]`` without code.

Stored rows are float32 feature vectors (z-scored with the train split's mean and standard
deviation when ``standardize`` is on); several files make a multi-task data set over the same
feature columns, one head per file (``heads.<t>``), rows ``[task index, features...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fedmerge.aggregators.params import hyperparameter
from fedmerge.clients.tasks.base import DataError
from fedmerge.clients.tasks.files import FileParams, FileTask, LabeledSource, column_names
from fedmerge.clients.tasks.text import NEG

__all__ = ["MultiTaskMLP", "Tabular", "TabularMLP", "TabularParams"]


@dataclass(frozen=True)
class TabularParams(FileParams):
    feature_columns: tuple[str, ...] = hyperparameter(
        (), "the numeric input columns; empty = every column but the label"
    )
    hidden_sizes: tuple[int, ...] = hyperparameter(
        (64, 64), "widths of the MLP's hidden layers; empty = a linear model", ge=1
    )
    dropout: float = hyperparameter(0.0, "dropout after each hidden layer", ge=0, lt=1)
    standardize: bool = hyperparameter(
        True, "z-score every feature with the train split's mean and standard deviation"
    )


def mlp_trunk(inputs: int, hidden_sizes: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) per hidden width; empty for no hidden layer."""
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        inputs = width
    return nn.Sequential(*layers)


class TabularMLP(nn.Module):
    """``trunk`` (the MLP) -> ``head`` (linear, one task). Input: float features (B, F)."""

    def __init__(
        self, inputs: int, num_classes: int, hidden_sizes: tuple[int, ...], dropout: float
    ) -> None:
        super().__init__()
        self.trunk = mlp_trunk(inputs, hidden_sizes, dropout)
        self.head = nn.Linear(hidden_sizes[-1] if hidden_sizes else inputs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class MultiTaskMLP(nn.Module):
    """A shared ``trunk`` and one linear head per task (``heads.<t>``). Input rows are
    ``[task index, features...]``; the output is (B, max classes), a row's task's logits then
    ``NEG`` for the classes its task lacks (as the multi-task text model)."""

    def __init__(
        self, inputs: int, num_classes: list[int], hidden_sizes: tuple[int, ...], dropout: float
    ) -> None:
        super().__init__()
        self.num_classes = list(num_classes)
        self.trunk = mlp_trunk(inputs, hidden_sizes, dropout)
        width = hidden_sizes[-1] if hidden_sizes else inputs
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = x[:, 0].long()
        if bool(((task < 0) | (task >= len(self.heads))).any()):
            raise ValueError(
                f"task index outside 0..{len(self.heads) - 1} in column 0 of the input"
            )
        features = self.trunk(x[:, 1:])
        out = features.new_full((len(x), max(self.num_classes)), NEG)
        for t, head in enumerate(self.heads):
            rows = (task == t).nonzero().squeeze(1)
            if len(rows):
                out[rows, : self.num_classes[t]] = head(features[rows])
        return out


def _numeric(source: LabeledSource, split: str, name: str) -> np.ndarray:
    column = source.column(split, name)
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        example = next((v for v in column.to_pylist() if v is not None), None)
        kind = "string" if pa.types.is_large_string(kind) else kind
        raise DataError(
            f"{source.path}: feature column {name!r} has type {kind} (e.g. {example!r}); tabular "
            "takes numbers only: encode it as numbers, or leave it out of feature_columns"
        )
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    missing = np.flatnonzero(~np.isfinite(values))
    if len(missing):
        raise DataError(
            f"{source.path}: feature column {name!r} has {len(missing)} empty or non-finite "
            f"values in the {split} split (first at its row {int(missing[0])}); fill or drop them"
        )
    return values


class Tabular(FileTask):
    """Rows of a table -> class, with an MLP; see the module docstring."""

    name = "tabular"
    Params: Any = TabularParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params.label_column in self.params.feature_columns:
            raise ValueError(
                f"data.task_params: task 'tabular': the label column "
                f"{self.params.label_column!r} is also in feature_columns; take it out"
            )

    def columns(self) -> tuple[str, ...]:
        return self.params.feature_columns

    def feature_names(self, data_dir: Path | None = None) -> list[str]:
        """The input columns: feature_columns, or every column but the label (which must be the
        same in every file of a multi-task data set)."""
        if self.params.feature_columns:
            return list(self.params.feature_columns)
        sources = self.labeled(data_dir)
        names = [
            [c for c in column_names(s.train) if c != self.params.label_column] for s in sources
        ]
        for source, other in zip(sources[1:], names[1:]):
            if set(other) != set(names[0]):
                differ = sorted(set(other) ^ set(names[0]))
                raise DataError(
                    f"{source.path}: its columns differ from {sources[0].path}'s (in one only: "
                    f"{', '.join(differ)}); a multi-task tabular data set needs the same feature "
                    "columns in every file: set feature_columns"
                )
        if not names[0]:
            raise DataError(f"{sources[0].path}: no column besides the label")
        return names[0]

    def rows(self, source: LabeledSource, split: str) -> np.ndarray:
        names = self.feature_names()
        x = np.stack([_numeric(source, split, n) for n in names], axis=1)
        if self.params.standardize:
            train = (
                x
                if split == "train"
                else np.stack([_numeric(source, "train", n) for n in names], 1)
            )
            mean, std = train.mean(axis=0), train.std(axis=0)
            x = (x - mean) / np.where(std > 0, std, 1.0)
        return x.astype(np.float32)

    def build_model(self) -> nn.Module:
        p = self.params
        inputs = len(self.feature_names())
        if self.is_multi_task:
            return MultiTaskMLP(inputs, self.task_num_classes, p.hidden_sizes, p.dropout)
        return TabularMLP(inputs, self.num_classes, p.hidden_sizes, p.dropout)

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: rows may be read-only
