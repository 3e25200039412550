"""Tasks' data loading: Fashion-MNIST IDX parsing and its errors, the digits split, the registry."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fedmerge.clients.tasks import DataError, Task, available_tasks, get_task, register_task
from fedmerge.clients.tasks.fashion_mnist import FILES

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


def _fashion_dir() -> Path | None:
    """The dir holding the Fashion-MNIST files, if this machine has them (`make data`)."""
    roots = [Path(os.environ["FEDMERGE_DATA_DIR"])] if os.environ.get("FEDMERGE_DATA_DIR") else []
    for directory in [
        *(r / "fashion-mnist" for r in roots),
        REPO_DATA / "fashion-mnist",
        Path("/usr/share/datasets/fashion-mnist"),
    ]:
        if (directory / "t10k-labels-idx1-ubyte.gz").is_file():
            return directory
    return None


needs_fashion = pytest.mark.skipif(
    _fashion_dir() is None, reason="Fashion-MNIST not present; run `make data`"
)


@pytest.fixture
def isolated_env(monkeypatch):
    """No $FEDMERGE_DATA_DIR, so only the explicit data_dir (and the system dir) are searched."""
    monkeypatch.delenv("FEDMERGE_DATA_DIR", raising=False)
    monkeypatch.setattr(
        "fedmerge.clients.tasks.fashion_mnist.SYSTEM_DIR", Path("/nonexistent/fashion-mnist")
    )


def _copy_test_split(tmp_path: Path) -> Path:
    """A dir with the (small) test split's two files copied from the real data."""
    target = tmp_path / "fm"
    target.mkdir()
    for stem in FILES["test"][:2]:
        shutil.copy(_fashion_dir() / f"{stem}.gz", target / f"{stem}.gz")
    return target


def test_registry_lists_and_rejects():
    assert {"digits", "fashion_mnist"} <= set(available_tasks())
    assert get_task("digits").name == "digits"
    with pytest.raises(ValueError, match="unknown task 'nope'.*digits.*fashion_mnist"):
        get_task("nope")


def test_registry_rejects_a_taken_name():
    class Impostor(Task):
        name = "digits"

    with pytest.raises(ValueError, match="already registered by"):
        register_task(Impostor)


@needs_fashion
@pytest.mark.parametrize("split,count", [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist_loads(split, count):
    data = get_task("fashion_mnist").load(split, data_dir=_fashion_dir())
    assert data.x.shape == (count, 28, 28) and data.x.dtype == np.uint8
    assert data.y.shape == (count,) and data.y.dtype == np.int64
    assert np.array_equal(np.bincount(data.y), np.full(10, count // 10))  # balanced classes
    assert not data.x.flags.writeable  # shared through the cache: must not be mutated


@needs_fashion
def test_fashion_mnist_data_dir_may_be_the_root(isolated_env):
    data = get_task("fashion_mnist").load("test", data_dir=_fashion_dir().parent)
    assert len(data) == 10_000


@needs_fashion
def test_fashion_mnist_preprocess_and_model():
    task = get_task("fashion_mnist")
    data = task.load("test", data_dir=_fashion_dir())
    batch = task.preprocess(data.x[:256])
    assert batch.shape == (256, 1, 28, 28) and str(batch.dtype) == "torch.float32"
    assert abs(batch.mean().item()) < 0.2 and abs(batch.std().item() - 1) < 0.2
    assert task.build_model()(batch).shape == (256, 10)


def test_missing_dir_says_how_to_get_the_data(isolated_env, tmp_path):
    with pytest.raises(
        DataError, match="not found in:.*make data.*apt-get install dataset-fashion-mnist"
    ):
        get_task("fashion_mnist").load("test", data_dir=tmp_path / "empty")


@needs_fashion
def test_missing_label_file_is_named(isolated_env, tmp_path):
    directory = _copy_test_split(tmp_path)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz.*make data"):
        get_task("fashion_mnist").load("test", data_dir=directory)


@needs_fashion
def test_truncated_gzip_is_named(isolated_env, tmp_path):
    directory = _copy_test_split(tmp_path)
    images = directory / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: cannot be read.*make data"):
        get_task("fashion_mnist").load("test", data_dir=directory)


@needs_fashion
def test_truncated_payload_is_named(isolated_env, tmp_path):
    directory = _copy_test_split(tmp_path)
    images = directory / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-100], compresslevel=1))
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte\.gz: .*expected 7840000 \(truncated\)"
    ):
        get_task("fashion_mnist").load("test", data_dir=directory)


@needs_fashion
def test_bad_magic_is_named(isolated_env, tmp_path):
    directory = _copy_test_split(tmp_path)
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(struct.pack(">I", 1234) + raw[4:], compresslevel=1))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte\.gz: bad IDX magic number 1234, expected 2049"
    ):
        get_task("fashion_mnist").load("test", data_dir=directory)


@needs_fashion
def test_out_of_range_label_is_named(isolated_env, tmp_path):
    directory = _copy_test_split(tmp_path)
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = 42
    labels.write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    with pytest.raises(DataError, match="label 42 outside 0..9"):
        get_task("fashion_mnist").load("test", data_dir=directory)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        get_task("digits").load("val")


def test_digits_split_is_deterministic_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    from fedmerge.clients.tasks.digits import _splits

    task = get_task("digits")
    train, test = task.load("train"), task.load("test")
    assert train.x.shape == (1437, 8, 8) and test.x.shape == (360, 8, 8)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    # The 1,797 digits images are all distinct, so each stored row names its original example.
    original = load_digits().images.astype(np.uint8).reshape(1797, -1)
    lookup = {row.tobytes(): i for i, row in enumerate(original)}
    train_ids = {lookup[r.tobytes()] for r in train.x.reshape(len(train), -1)}
    test_ids = {lookup[r.tobytes()] for r in test.x.reshape(len(test), -1)}
    assert not train_ids & test_ids and len(train_ids | test_ids) == 1797
    assert np.array_equal(np.bincount(test.y), [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])
    # Fixed seed: recomputing gives the same split, here and on any machine.
    _splits.cache_clear()
    again = task.load("test")
    assert again is not test and np.array_equal(again.x, test.x) and np.array_equal(again.y, test.y)
    assert test.y[:12].tolist() == [1, 4, 8, 6, 5, 9, 9, 1, 3, 2, 2, 2]


def test_without_the_variable_the_checkout_data_folder_is_searched(monkeypatch, tmp_path):
    # A README command run from a new shell has no FEDMERGE_DATA_DIR: `make data`'s folder counts.
    from fedmerge.clients.tasks.base import data_roots

    monkeypatch.delenv("FEDMERGE_DATA_DIR", raising=False)
    assert data_roots(None) == [REPO_DATA]
    monkeypatch.setenv("FEDMERGE_DATA_DIR", str(tmp_path))
    assert data_roots(None) == [tmp_path, REPO_DATA]
    assert data_roots(tmp_path / "mine") == [tmp_path / "mine"]
