"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): a tiny task for fast tests.

The data ship inside scikit-learn, so nothing is downloaded. There is no official split: "train"
is a stratified 80% drawn with a fixed seed and "test" the remaining 20%, the same everywhere.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmerge.clients.tasks.base import ArrayData, Task

__all__ = ["Digits"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2
MAX_PIXEL = 16.0


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, ArrayData]:
    """Both splits, computed once: read-only uint8 images (N, 8, 8) and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    splits = {}
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        part = ArrayData(x[idx], y[idx])
        part.x.setflags(write=False)
        part.y.setflags(write=False)
        splits[split] = part
    return splits


class Digits(Task):
    """8x8 digits with a 64-64-10 MLP: trains to >90% test accuracy in a few CPU epochs."""

    name = "digits"
    num_classes = 10

    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        """``data_dir`` is ignored: the data are bundled with scikit-learn."""
        splits = _splits()
        if split not in splits:
            raise ValueError(
                f"unknown split {split!r} for {self.name}; choose from {sorted(splits)}"
            )
        return splits[split]

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, self.num_classes))

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        """uint8 (B, 8, 8) in 0..16 -> float32 (B, 64) in [0, 1]."""
        batch = np.asarray(x, dtype=np.float32).reshape(len(x), -1) / MAX_PIXEL
        return torch.from_numpy(batch)
