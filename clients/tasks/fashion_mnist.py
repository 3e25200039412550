"""Fashion-MNIST: 70,000 28x28 grey-scale clothing images in 10 classes, read from IDX files.

The files come from Debian's ``dataset-fashion-mnist`` package, so the task works offline. Parsed
arrays are cached per process (keyed on the file's resolved path, size and mtime) because
decompressing and checking them takes about a second.
"""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmerge.clients.tasks.base import ArrayData, DataError, Task, data_roots

__all__ = ["FashionMNIST"]

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28
HOW_TO_GET = (
    "To get Fashion-MNIST, run `make data` (downloads Debian's dataset-fashion-mnist and unpacks "
    "it into data/) or `apt-get install dataset-fashion-mnist`."
)
# Mean and standard deviation of the training pixels scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530


def _candidate_dirs(data_dir: Path | None) -> list[Path]:
    """Where to look: only the argument when one is given (the files' dir or a root holding
    fashion-mnist/), else fashion-mnist/ under each of ``data_roots``, then Debian's location."""
    if data_dir:
        return [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    return [root / "fashion-mnist" for root in data_roots(None)] + [SYSTEM_DIR]


def _existing(directory: Path, stem: str) -> Path | None:
    """The file ``stem`` in ``directory``: gzip-compressed as shipped, or already unpacked."""
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_files(split: str, data_dir: Path | None) -> tuple[Path, Path]:
    """The first candidate dir holding any Fashion-MNIST file must hold both files of ``split``;
    a partial copy is reported rather than skipped, so a broken download is noticed."""
    images, labels, _ = FILES[split]
    searched = _candidate_dirs(data_dir)
    for directory in searched:
        if not any(_existing(directory, stem) for pair in FILES.values() for stem in pair[:2]):
            continue
        found = {stem: _existing(directory, stem) for stem in (images, labels)}
        missing = [stem + ".gz" for stem, path in found.items() if path is None]
        if missing:
            raise DataError(f"{directory}: missing {', '.join(missing)}. {HOW_TO_GET}")
        return found[images], found[labels]
    places = ", ".join(str(d) for d in searched)
    raise DataError(f"Fashion-MNIST files ({images}.gz, ...) not found in: {places}. {HOW_TO_GET}")


def _read_idx(path: Path, magic: int, dims: tuple[int, ...]) -> np.ndarray:
    """Parse one IDX file into a read-only uint8 array of shape (count, *dims[1:])."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read or decompressed ({e}). {HOW_TO_GET}") from e
    header_len = 4 + 4 * len(dims)
    if len(raw) < header_len:
        raise DataError(
            f"{path}: truncated ({len(raw)} bytes, no complete IDX header). {HOW_TO_GET}"
        )
    found_magic, *found_dims = struct.unpack(f">{1 + len(dims)}I", raw[:header_len])
    if found_magic != magic:
        raise DataError(
            f"{path}: bad IDX magic number {found_magic}, expected {magic}. {HOW_TO_GET}"
        )
    if tuple(found_dims) != dims:
        raise DataError(f"{path}: dimensions {tuple(found_dims)}, expected {dims}. {HOW_TO_GET}")
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise DataError(
            f"{path}: {len(raw) - header_len} data bytes, expected {expected} "
            f"({'truncated' if len(raw) - header_len < expected else 'trailing data'}). {HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_cached(images: Path, labels: Path, count: int, _stamp: tuple[int, ...]) -> ArrayData:
    """Parse and verify one split; ``_stamp`` (sizes, mtimes) invalidates the cache on change."""
    x = _read_idx(images, IMAGE_MAGIC, (count, SIDE, SIDE))
    y = _read_idx(labels, LABEL_MAGIC, (count,))
    if y.max() > 9:
        raise DataError(f"{labels}: label {int(y.max())} outside 0..9. {HOW_TO_GET}")
    y = y.astype(np.int64)
    y.setflags(write=False)
    return ArrayData(x, y)


class FashionMNIST(Task):
    """Fashion-MNIST with a small two-layer CNN (215k parameters; 88% test accuracy after one
    central epoch of SGD at lr 0.01, batch 32)."""

    name = "fashion_mnist"
    num_classes = 10

    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        """x: uint8 (N, 28, 28), y: int64 (N,); read-only arrays shared through the cache."""
        if split not in FILES:
            raise ValueError(
                f"unknown split {split!r} for {self.name}; choose from {sorted(FILES)}"
            )
        images, labels = (p.resolve() for p in _find_files(split, data_dir))
        stamp = tuple(v for p in (images, labels) for v in (p.stat().st_size, p.stat().st_mtime_ns))
        return _load_cached(images, labels, FILES[split][2], stamp)

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, self.num_classes),
        )

    def preprocess(self, x: np.ndarray) -> torch.Tensor:
        """uint8 (B, 28, 28) -> normalised float32 (B, 1, 28, 28)."""
        batch = torch.from_numpy(np.asarray(x, dtype=np.float32))
        return ((batch / 255.0 - MEAN) / STD).unsqueeze(1)
