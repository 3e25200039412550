"""Partitioning schemes, Arrow shards (round trip, memory mapping, corruption) and the shard cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fedmerge.clients.partition import (
    available_partitioners,
    format_label_counts,
    label_counts,
    load_manifest,
    materialize_shards,
    open_shard,
    partition,
    partitioner_params,
    plot_label_heatmap,
    register_partitioner,
    shard_path,
    write_shards,
)
from fedmerge.clients.tasks import ArrayData, DataError, get_task

SCHEMES = {"iid": {}, "dirichlet": {"alpha": 0.5}, "pathological": {"classes_per_client": 2}}


@pytest.fixture(scope="module")
def digits() -> ArrayData:
    return get_task("digits").load("train")


def _mean_entropy(counts: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    p = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)))


def test_builtin_schemes_are_registered_with_their_params():
    assert set(SCHEMES) <= set(available_partitioners())
    assert partitioner_params("dirichlet") == ["alpha", "min_partition_size"]
    assert partitioner_params("pathological") == ["classes_per_client"]
    assert partitioner_params("iid") == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_disjoint_complete_sorted_and_seeded(digits, scheme):
    params = SCHEMES[scheme]
    parts = partition(digits.y, 10, scheme, 7, **params)
    assert len(parts) == 10
    for p in parts:
        assert p.dtype == np.int64 and len(p) > 0 and np.all(np.diff(p) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(digits)))
    again = partition(digits.y, 10, scheme, 7, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(digits.y, 10, scheme, 8, **params)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_balanced(digits):
    sizes = [len(p) for p in partition(digits.y, 10, "iid", 0)]
    assert max(sizes) - min(sizes) <= 1


def test_smaller_alpha_gives_more_label_skew(digits):
    def entropy(alpha: float) -> float:
        parts = partition(digits.y, 10, "dirichlet", 0, alpha=alpha, min_partition_size=5)
        return _mean_entropy(label_counts(parts, digits.y, 10))

    skewed, mild, near_iid = entropy(0.1), entropy(1.0), entropy(100.0)
    assert skewed < mild < near_iid
    assert near_iid > 0.95 * np.log(10)  # almost uniform over the 10 classes


def test_dirichlet_min_partition_size_holds(digits):
    parts = partition(digits.y, 20, "dirichlet", 3, alpha=0.3, min_partition_size=30)
    assert min(len(p) for p in parts) >= 30


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_k_classes_per_client(digits, k):
    counts = label_counts(
        partition(digits.y, 10, "pathological", 0, classes_per_client=k), digits.y, 10
    )
    assert np.all((counts > 0).sum(axis=1) == k)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_clients": 10, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_clients": 10, "scheme": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"num_clients": 10, "scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
        (
            {"num_clients": 10, "scheme": "dirichlet", "min_partition_size": 1000},
            "min_partition_size",
        ),
        ({"num_clients": 0, "scheme": "iid"}, "num_clients"),
        ({"num_clients": 1438, "scheme": "iid"}, "num_clients"),
        (
            {"num_clients": 10, "scheme": "pathological", "classes_per_client": 0},
            "classes_per_client",
        ),
        (
            {"num_clients": 10, "scheme": "pathological", "classes_per_client": 11},
            "classes_per_client",
        ),
        (
            {"num_clients": 2, "scheme": "pathological", "classes_per_client": 2},
            "classes_per_client",
        ),
        ({"num_clients": 10, "scheme": "dirichlet", "alhpa": 0.5}, "alhpa"),
        ({"num_clients": 10, "scheme": "iid", "alpha": 0.5}, "alpha"),
        ({"num_clients": 10, "scheme": "shuffled"}, "shuffled"),
    ],
)
def test_bad_params_are_named(digits, kwargs, name):
    kwargs = dict(kwargs)
    num_clients, scheme = kwargs.pop("num_clients"), kwargs.pop("scheme")
    with pytest.raises(ValueError, match=name):
        partition(digits.y, num_clients, scheme, 0, **kwargs)


def test_custom_partitioner_output_is_checked(digits, monkeypatch):
    import fedmerge.clients.partition as partition_module

    monkeypatch.setattr(
        partition_module.PARTITIONERS, "_entries", dict(partition_module.PARTITIONERS._entries)
    )

    @register_partitioner("test_overlapping")
    def overlapping(labels, num_clients, seed):
        return [np.arange(10)] * num_clients

    assert "test_overlapping" in available_partitioners()
    with pytest.raises(ValueError, match="more than one client"):
        partition(digits.y, 3, "test_overlapping", 0)


# --- shards -------------------------------------------------------------------------------------


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed memory mappings (Linux)."""
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            mappings.append((start, end, fields[5]))
    return mappings


def test_shards_round_trip_exactly_and_are_memory_mapped(digits, tmp_path):
    parts = partition(digits.y, 4, "dirichlet", 0, alpha=0.5)
    out = write_shards(digits, parts, tmp_path / "shards", num_classes=10)
    allocated = pa.total_allocated_bytes()
    shards = [open_shard(shard_path(out, i)) for i in range(4)]
    assert pa.total_allocated_bytes() == allocated  # Arrow copied nothing into its memory pool
    for part, shard in zip(parts, shards):
        expected = digits.subset(part)
        assert shard.x.dtype == np.uint8 and shard.x.shape == expected.x.shape
        assert np.array_equal(shard.x, expected.x) and np.array_equal(shard.y, expected.y)
        assert not shard.x.flags.writeable and not shard.x.flags.owndata
    if Path("/proc/self/maps").exists():
        address, path = shards[2].x.ctypes.data, str(shard_path(out, 2).resolve())
        assert any(s <= address < e and p == path for s, e, p in _mapped_files())


def test_shards_keep_any_fixed_row_dtype(tmp_path):
    rng = np.random.default_rng(0)
    data = ArrayData(rng.normal(size=(50, 3, 5)).astype(np.float32), rng.integers(0, 3, 50))
    parts = [np.arange(0, 20), np.arange(20, 50)]
    out = write_shards(data, parts, tmp_path)
    shard = open_shard(shard_path(out, 1))
    assert shard.x.dtype == np.float32 and np.array_equal(shard.x, data.x[20:])
    assert np.array_equal(shard.y, data.y[20:])


def test_manifest_records_the_partition(digits, tmp_path):
    parts = partition(digits.y, 5, "pathological", 0, classes_per_client=6)
    out = write_shards(digits, parts, tmp_path, key="k1", num_classes=10, info={"note": "x"})
    manifest = load_manifest(out)
    assert manifest["key"] == "k1" and manifest["note"] == "x"
    assert manifest["num_clients"] == 5 and manifest["num_examples"] == len(digits)
    assert manifest["counts"] == [len(p) for p in parts]
    assert manifest["shape"] == [8, 8] and manifest["dtype"] == "|u1"
    assert np.array_equal(label_counts(manifest), label_counts(parts, digits.y, 10))
    assert np.array_equal(label_counts(out), label_counts(out / "manifest.json"))
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"client_{i:05d}.arrow" for i in range(5)),
        "manifest.json",
    ]  # no temporary files left


def test_corrupt_or_missing_shard_names_the_file(digits, tmp_path):
    out = write_shards(digits, partition(digits.y, 2, "iid", 0), tmp_path)
    path = shard_path(out, 0)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{path}.*corrupt"):
        open_shard(path)
    path.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=f"{path}.*corrupt"):
        open_shard(path)
    with pytest.raises(DataError, match="client_00007.arrow does not exist"):
        open_shard(shard_path(out, 7))
    with pytest.raises(DataError, match="manifest.json does not exist"):
        load_manifest(tmp_path / "nowhere")


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_materialize_reuses_the_cache(digits, tmp_path):
    task = get_task("digits")
    args = dict(
        task=task, data=digits, num_clients=5, scheme="dirichlet", seed=1, cache_dir=tmp_path
    )
    first = materialize_shards(params={"alpha": 0.5}, **args)
    before = _mtimes(first)
    again = materialize_shards(params={"alpha": np.float64(0.5)}, **args)
    assert again == first and _mtimes(again) == before  # nothing rewritten
    assert materialize_shards(params={"alpha": 0.4}, **args) != first
    assert materialize_shards(**{**args, "seed": 2}, params={"alpha": 0.5}) != first
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["task"] == "digits" and manifest["params"] == {"alpha": 0.5}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_the_cache_keys_on_the_examples_not_only_their_labels(digits, tmp_path):
    """Two data sets with the same labels, size and shape but other features get their own
    shards: the second never trains on the first's (the key hashes every byte of x)."""
    task = get_task("digits")
    args = dict(
        task=task,
        num_clients=4,
        scheme="dirichlet",
        seed=3,
        params={"alpha": 0.5},
        cache_dir=tmp_path,
    )
    first = materialize_shards(data=digits, **args)
    other = ArrayData(
        np.ascontiguousarray(digits.x[:, ::-1]), digits.y
    )  # same labels, new features
    second = materialize_shards(data=other, **args)
    assert second != first
    nudged = digits.x.copy()
    nudged.reshape(-1)[-1] += 1  # one byte of the last example
    assert materialize_shards(data=ArrayData(nudged, digits.y), **args) not in (first, second)
    parts = partition(digits.y, 4, "dirichlet", 3, alpha=0.5)
    for i, rows in enumerate(parts):
        assert np.array_equal(open_shard(shard_path(second, i)).x, other.x[rows])
        assert np.array_equal(open_shard(shard_path(first, i)).x, digits.x[rows])


def test_task_parameters_are_part_of_the_cache_key(digits, tmp_path):
    from fedmerge.clients.partition import _shards_key

    base = dict(scheme="iid", params={}, num_clients=3, seed=0, data=digits)
    a = _shards_key(
        "example_iris", fingerprint=get_task("example_iris", {"hidden": 4}).fingerprint(), **base
    )
    b = _shards_key(
        "example_iris", fingerprint=get_task("example_iris", {"hidden": 5}).fingerprint(), **base
    )
    assert a != b and a.startswith("example_iris-iid-3c-s0-")


def test_materialize_rewrites_an_incomplete_set(digits, tmp_path):
    task = get_task("digits")
    args = dict(
        task=task, data=digits, num_clients=3, scheme="iid", seed=0, params={}, cache_dir=tmp_path
    )
    first = materialize_shards(**args)
    shard_path(first, 1).unlink()
    again = materialize_shards(**args)
    assert again == first and shard_path(again, 1).is_file()
    assert np.array_equal(
        open_shard(shard_path(again, 1)).y, digits.y[partition(digits.y, 3, "iid", 0)[1]]
    )


def test_label_count_table_and_heatmap(digits, tmp_path):
    counts = label_counts(
        partition(digits.y, 5, "pathological", 0, classes_per_client=6), digits.y, 10
    )
    table = format_label_counts(counts).splitlines()
    assert table[0].split() == ["client", *map(str, range(10)), "total"]
    assert len(table) == 1 + 5 + 1  # header, clients, all
    assert table[-1].split()[-1] == str(len(digits))
    png = plot_label_heatmap(counts, tmp_path / "plots" / "heat.png", title="pathological k=6")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
