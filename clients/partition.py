"""Non-IID partitioning of a labelled data set across clients, and the shards written from it.

Partitioning needs only the labels: the flwr-datasets partitioners run over a tiny
``datasets.Dataset`` of (label, original index) and hand back index arrays. Each client's rows are
then written once as an Arrow IPC file; clients memory-map their file, so N simulated clients on
one machine share the page cache instead of holding N copies. ``materialize_shards`` caches the
result under a key derived from everything that determines it, so reruns reuse it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fedmerge.clients.tasks.base import ArrayData, DataError, Task
from fedmerge.plugins import PluginError, Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PARTITIONERS",
    "available_partitioners",
    "format_label_counts",
    "get_partitioner",
    "label_counts",
    "load_manifest",
    "materialize_shards",
    "open_shard",
    "partition",
    "partitioner_params",
    "plot_label_heatmap",
    "register_partitioner",
    "shard_path",
    "write_atomic",
    "write_shards",
    "by_task",
    "content_digest",
    "limit_examples",
    "uses_groups",
]

GROUPS = "groups"
"""The keyword through which a scheme receives the task index of every example."""

# A partitioner maps (labels, num_clients, seed, **params) to one index array per client.
Partitioner = Callable[..., list[np.ndarray]]

SHARD_FORMAT = 1  # bump when the shard layout or a built-in scheme's output changes
MANIFEST = "manifest.json"
_META_SHAPE, _META_DTYPE = b"fedmerge.x_shape", b"fedmerge.x_dtype"


def _checked_partitioner(obj: Any, where: str) -> Partitioner:
    if not callable(obj) or isinstance(obj, type):
        raise PluginError(
            f"{where} is {obj!r}, not a function fn(labels, num_clients, seed, *, param=...)"
        )
    params = list(inspect.signature(obj).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 3 or any(p.kind is p.VAR_KEYWORD for p in params):
        raise PluginError(
            f"{where}: a partitioner takes (labels, num_clients, seed) positionally and its "
            "parameters as keyword-only arguments (no **kwargs)"
        )
    return obj


ENTRY_POINT_GROUP = "fedmerge.partitioners"

PARTITIONERS: Registry[Partitioner] = Registry(
    "partitioner",
    ENTRY_POINT_GROUP,
    accept=_checked_partitioner,
    how_to=(
        "To plug one in: decorate fn(labels, num_clients, seed, *, param=default) with "
        '@register_partitioner("name") in a module listed in [run] plugins, give its import path '
        f'"package.module:function", or expose it under the entry-point group "{ENTRY_POINT_GROUP}"; '
        "its keyword-only parameters are set in [data.partitioner_params]."
    ),
)


# ---------------------------------------------------------------------------------------------
# Registry and the built-in schemes
# ---------------------------------------------------------------------------------------------


def register_partitioner(name: str) -> Callable[[Partitioner], Partitioner]:
    """Decorator: register ``fn(labels, num_clients, seed, *, param=default, ...)`` as ``name``.

    Its keyword-only parameters are the scheme's params; ``partition`` rejects any other name.
    """

    def decorate(fn: Partitioner) -> Partitioner:
        PARTITIONERS.add(name, fn)
        return fn

    return decorate


def get_partitioner(name: str) -> Partitioner:
    """The partitioner ``name`` names: registered, ``module:function`` or an entry point."""
    return PARTITIONERS.resolve(name)


def available_partitioners() -> list[str]:
    return PARTITIONERS.available()


def partitioner_params(name: str) -> list[str]:
    """The params scheme ``name`` accepts (its keyword-only arguments), e.g. to pick them out of
    a config that holds every scheme's settings."""
    return [
        p.name
        for p in inspect.signature(get_partitioner(name)).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != GROUPS
    ]


def uses_groups(name: str) -> bool:
    """Whether scheme ``name`` splits by example groups (the task of each example) as well."""
    return GROUPS in inspect.signature(get_partitioner(name)).parameters


def limit_examples(
    data: ArrayData, cap: int, seed: int, groups: np.ndarray | None = None
) -> ArrayData:
    """At most ``cap`` examples of ``data`` (of each group, when ``groups`` is given): a seeded
    random subset in the original order; ``cap`` = 0 keeps everything."""
    _check_int(cap, "cap", 0)
    if cap == 0:
        return data
    keys = np.zeros(len(data), dtype=np.int64) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    keep = []
    for g in np.unique(keys):
        index = np.flatnonzero(keys == g)
        keep.append(
            index if cap == 0 or len(index) <= cap else rng.choice(index, size=cap, replace=False)
        )
    if not keep:
        return data
    return data.subset(np.sort(np.concatenate(keep)))


def _label_dataset(labels: np.ndarray, seed: int):
    """A shuffled ``datasets.Dataset`` of (label, idx): flwr-datasets partitions its rows and the
    ``idx`` column maps them back. Shuffling the rows up front (as flwr-datasets'
    FederatedDataset does) makes the seed decide which examples of a class go where."""
    import datasets

    order = np.random.default_rng(seed).permutation(len(labels))
    return datasets.Dataset.from_dict({"label": labels[order], "idx": order})


def _run_flwr_partitioner(partitioner, dataset, num_clients: int) -> list[np.ndarray]:
    """Each client's ``idx`` values, as ``partitioner.load_partition(i)`` holds them.

    One ``load_partition`` costs a datasets ``select`` (~10 ms), minutes for 10,000 clients. So
    the partitions are cut from the ``idx`` column in one pass where the partitioner's rule is
    known: the iid one takes contiguous shards of the (shuffled) rows, cut as ``Dataset.shard``
    cuts them; those that assign every row up front (Dirichlet, pathological) keep the
    assignment in ``_partition_id_to_indices``, which ``load_partition`` merely selects.
    """
    from flwr_datasets.partitioner import IidPartitioner

    partitioner.dataset = dataset
    idx = np.asarray(dataset.with_format("numpy")[:]["idx"])
    if type(partitioner) is IidPartitioner:
        div, mod = divmod(len(idx), num_clients)
        starts = [div * i + min(i, mod) for i in range(num_clients + 1)]
        return [idx[starts[i] : starts[i + 1]] for i in range(num_clients)]
    partitioner.load_partition(
        0
    )  # the partitioner assigns every row (and checks) on its first call
    assignment = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(assignment, dict) and sorted(assignment) == list(range(num_clients)):
        return [idx[np.asarray(assignment[i], dtype=np.int64)] for i in range(num_clients)]
    return [  # a partitioner of unknown inner workings: one load_partition per client
        np.asarray(partitioner.load_partition(i).with_format("numpy")[:]["idx"])
        for i in range(num_clients)
    ]


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name}={value!r} is invalid: must be an integer {bound}")


@register_partitioner("iid")
def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random, equal-sized (within one example) shards."""
    from flwr_datasets.partitioner import IidPartitioner

    return _run_flwr_partitioner(
        IidPartitioner(num_partitions=num_clients), _label_dataset(labels, seed), num_clients
    )


@register_partitioner("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Each class is split across clients by proportions drawn from Dirichlet(alpha): smaller
    alpha, stronger label skew. Self-balancing keeps client sizes comparable; draws are repeated
    (up to 10 times) until every client has at least max(1, min_partition_size) examples."""
    from flwr_datasets.partitioner import DirichletPartitioner

    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.number))
        or not (alpha > 0 and math.isfinite(alpha))
    ):
        raise ValueError(f"alpha={alpha!r} is invalid: must be a positive finite number")
    _check_int(min_partition_size, "min_partition_size", 0, len(labels) // num_clients)
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=max(1, int(min_partition_size)),
        self_balancing=True,
        seed=seed,
    )
    try:
        with warnings.catch_warnings():
            # One warning per redraw; the outcome is reported below if all draws fail.
            warnings.simplefilter("ignore", UserWarning)
            return _run_flwr_partitioner(partitioner, _label_dataset(labels, seed), num_clients)
    except ValueError as e:
        raise ValueError(
            f"dirichlet partitioning failed for alpha={alpha}, min_partition_size="
            f"{min_partition_size}, num_clients={num_clients}: {e} Raise alpha or lower "
            f"min_partition_size or num_clients."
        ) from e


@register_partitioner("pathological")
def pathological(
    labels: np.ndarray, num_clients: int, seed: int, *, classes_per_client: int = 2
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes. Client i gets classes
    perm[i], ..., perm[i + k - 1] (mod C) of a seeded permutation of the classes — flwr-datasets'
    "deterministic" assignment, which (unlike "random") uses every class whenever
    num_clients + k - 1 >= C; each class is split evenly among the clients holding it."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    classes = np.unique(labels)
    _check_int(classes_per_client, "classes_per_client", 1, len(classes))
    if num_clients + classes_per_client - 1 < len(classes):
        raise ValueError(
            f"classes_per_client={classes_per_client} with num_clients={num_clients} covers only "
            f"{num_clients + classes_per_client - 1} of {len(classes)} classes and would drop the "
            f"rest; need num_clients + classes_per_client - 1 >= {len(classes)}"
        )
    rank = np.empty(len(classes), dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(len(classes))] = np.arange(len(classes))
    relabelled = rank[np.searchsorted(classes, labels)]
    partitioner = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode="deterministic",
        seed=seed,
    )
    try:
        return _run_flwr_partitioner(partitioner, _label_dataset(relabelled, seed), num_clients)
    except ValueError as e:
        raise ValueError(
            f"pathological partitioning failed for classes_per_client="
            f"{classes_per_client}, num_clients={num_clients}: {e}"
        ) from e


@register_partitioner("by_task")
def by_task(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    groups: np.ndarray,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Each client holds one task of a multi-task data set: client c gets task c mod T (tasks in
    sorted order), so tasks differ by at most one client. A task with several clients is split
    among them as ``dirichlet`` splits a data set (Dirichlet(alpha) label skew within the task)."""
    tasks = np.unique(groups)
    if num_clients < len(tasks):
        raise ValueError(
            f"by_task needs at least one client per task: {len(tasks)} tasks, "
            f"num_clients={num_clients}"
        )
    parts: list[np.ndarray] = [np.arange(0)] * num_clients
    for j, t in enumerate(tasks):
        clients = list(range(j, num_clients, len(tasks)))
        index = np.flatnonzero(groups == t)
        if len(clients) == 1:
            parts[clients[0]] = index
            continue
        sub = dirichlet(
            labels[index],
            len(clients),
            seed + j,
            alpha=alpha,
            min_partition_size=min(min_partition_size, len(index) // len(clients)),
        )
        for c, rows in zip(clients, sub):
            parts[c] = index[rows]
    return parts


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    groups: np.ndarray | None = None,
    **params: Any,
) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` across ``num_clients`` clients with ``scheme``.

    Returns one sorted int64 index array per client: disjoint, never empty. Seeded: the same
    inputs always give the same output. Bad params raise ValueError naming the param.
    ``groups`` (the task of each example in a multi-task data set) goes to schemes that take it
    (``by_task``), which need it; the others ignore it.
    """
    fn = get_partitioner(scheme)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    if len(labels) == 0:
        raise ValueError("labels is empty: nothing to partition")
    _check_int(num_clients, "num_clients", 1, len(labels))
    _check_int(seed, "seed", 0)
    accepted = partitioner_params(scheme)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for scheme {scheme!r}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )
    if uses_groups(scheme):
        if groups is None:
            raise ValueError(
                f"scheme {scheme!r} needs a multi-task data set (a task index for every "
                f"example); this task has none"
            )
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups has shape {groups.shape}, labels {labels.shape}")
        params = {**params, GROUPS: groups}
    raw = fn(labels, int(num_clients), int(seed), **params)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in raw]
    _check_parts(parts, num_clients, len(labels), scheme)
    return parts


def _check_parts(parts: Sequence[np.ndarray], num_clients: int, n: int, scheme: str) -> None:
    """A scheme's output must be num_clients non-empty, disjoint sets of valid indices."""
    if len(parts) != num_clients:
        raise ValueError(f"scheme {scheme!r} returned {len(parts)} parts for {num_clients} clients")
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(
                f"scheme {scheme!r} left client {i} without examples; "
                f"use fewer clients or a milder skew"
            )
        if p[0] < 0 or p[-1] >= n:
            raise ValueError(f"scheme {scheme!r} gave client {i} an index outside 0..{n - 1}")
    if np.bincount(np.concatenate(parts), minlength=n).max() > 1:
        raise ValueError(f"scheme {scheme!r} gave the same example to more than one client")


# ---------------------------------------------------------------------------------------------
# Shards: one Arrow IPC file per client, memory-mapped when read
# ---------------------------------------------------------------------------------------------


def shard_path(shard_dir: Path, client_id: int) -> Path:
    return Path(shard_dir) / f"client_{client_id:05d}.arrow"


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary sibling then rename it over ``path``: readers, and a killed
    writer, only ever leave the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        # Cleanup must never mask the error that brought us here: on a read-only mount the
        # unlink fails too (EROFS), and that second error would be the one shown.
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        code = _errno_of(err) if isinstance(err, OSError) and err.filename is None else None
        if code is not None:  # a writer through a file object (matplotlib, pyarrow) names no file
            raise OSError(code, os.strerror(code), str(path)) from err
        raise


def _errno_of(err: OSError) -> int | None:
    """``err.errno``, or the errno its message quotes ("[errno 28]", "os error 28"), or None."""
    if err.errno is not None:
        return err.errno
    match = re.search(r"(?:\[errno |os error )(\d+)", str(err), flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def write_shards(
    data: ArrayData,
    parts: Sequence[np.ndarray],
    out_dir: Path,
    *,
    key: str | None = None,
    num_classes: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``data.subset(parts[i])`` to ``out_dir/client_{i:05d}.arrow`` and a manifest.

    Each file holds one record batch: ``x`` as FixedSizeBinary (each row's raw bytes, C order)
    and ``y`` as int64, with the row shape and dtype in the schema metadata. ``manifest.json``
    (written last) records the clients' sizes and label counts, ``key`` (default: a hash of the
    parts and labels) and any JSON-able ``info``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    row_shape, dtype = tuple(data.x.shape[1:]), data.x.dtype
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject or row_bytes == 0:
        raise ValueError(
            f"cannot shard x of dtype {dtype} and row shape {row_shape}: rows must "
            f"be fixed-size, non-empty plain values"
        )
    labels = np.asarray(data.y, dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    schema = pa.schema(
        [("x", pa.binary(row_bytes)), ("y", pa.int64())],
        metadata={_META_SHAPE: json.dumps(row_shape), _META_DTYPE: dtype.str},
    )
    files = []
    for i, part in enumerate(parts):
        x = np.ascontiguousarray(data.x[part])
        batch = pa.record_batch(
            [
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(row_bytes), len(x), [None, pa.py_buffer(x)]
                ),
                pa.array(labels[part], type=pa.int64()),
            ],
            schema=schema,
        )

        def write(tmp: Path, batch: pa.RecordBatch = batch) -> None:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                writer.write_batch(batch)

        path = shard_path(out_dir, i)
        write_atomic(path, write)
        files.append(path.name)
    counts = label_counts(parts, labels, num_classes)
    manifest = {
        "format": SHARD_FORMAT,
        "key": key if key is not None else _parts_key(parts, labels),
        "num_clients": len(parts),
        "num_examples": int(counts.sum()),
        "num_classes": int(num_classes),
        "shape": list(row_shape),
        "dtype": dtype.str,
        "counts": counts.sum(axis=1).tolist(),
        "label_counts": counts.tolist(),
        "files": files,
        **dict(info or {}),
    }
    write_atomic(out_dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return out_dir


def _parts_key(parts: Sequence[np.ndarray], labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    for p in parts:
        h.update(np.int64(len(p)).tobytes())
        h.update(np.ascontiguousarray(p, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def open_shard(path: Path) -> ArrayData:
    """Memory-map one shard file: ``x`` and ``y`` are read-only views of the mapped file, no copy.

    The mapping lives as long as the arrays do. A missing or corrupt file raises DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"shard {path} does not exist; rewrite the shards (delete their "
            f"directory and rerun, or call materialize_shards)"
        )
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            if reader.num_record_batches != 1:
                raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
            batch = reader.get_batch(0)
        meta = batch.schema.metadata or {}
        row_shape = tuple(json.loads(meta[_META_SHAPE]))
        dtype = np.dtype(meta[_META_DTYPE].decode())
        x_col, y_col = batch.column("x"), batch.column("y")
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        if x_col.type != pa.binary(row_bytes) or y_col.type != pa.int64():
            raise ValueError(
                f"column types {x_col.type}, {y_col.type} do not match shape "
                f"{row_shape} dtype {dtype}"
            )
        if x_col.null_count or y_col.null_count:
            raise ValueError("null values")
        n = len(batch)
        x = np.frombuffer(
            x_col.buffers()[1],
            dtype=dtype,
            count=n * row_bytes // dtype.itemsize,
            offset=x_col.offset * row_bytes,
        ).reshape((n, *row_shape))
        y = np.frombuffer(y_col.buffers()[1], dtype=np.int64, count=n, offset=y_col.offset * 8)
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"shard {path} is corrupt or unreadable ({type(e).__name__}: {e}); delete "
            f"its directory and rerun to rewrite the shards"
        ) from e
    return ArrayData(x, y)


def load_manifest(shard_dir: Path) -> dict[str, Any]:
    """The manifest of a shard directory; DataError if it is missing or unreadable."""
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist: {shard_dir} holds no complete set of shards"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete {shard_dir} and rerun") from e
    if not isinstance(manifest, dict) or "label_counts" not in manifest:
        raise DataError(f"{path} is not a shard manifest; delete {shard_dir} and rerun")
    return manifest


def content_digest(array: np.ndarray) -> str:
    """A hash of an array's dtype, shape and every byte: two data sets share a shard folder only
    when their examples are the same. Fashion-MNIST's 47 MB hash in about 0.1 s on a 2-core
    machine, once a run; a contiguous array is hashed in 64 MiB slices, never copied whole."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    digest = hashlib.blake2b(f"{array.dtype.str}{array.shape}".encode(), digest_size=20)
    step = 64 << 20
    for start in range(0, len(flat), step):
        digest.update(memoryview(flat[start : start + step]))
    return digest.hexdigest()


def _shards_key(
    task_name: str,
    scheme: str,
    params: Mapping[str, Any],
    num_clients: int,
    seed: int,
    data: ArrayData,
    groups: np.ndarray | None = None,
    fingerprint: str = "",
) -> str:
    """Everything that determines the shards, hashed (the examples' content included); readable
    prefix for humans."""
    labels = np.ascontiguousarray(data.y, dtype=np.int64)
    spec = json.dumps(
        {
            "format": SHARD_FORMAT,
            "task": task_name,
            "scheme": scheme,
            "params": sorted((k, repr(_plain(v))) for k, v in params.items()),
            "num_clients": num_clients,
            "seed": seed,
            "n": len(data),
            "shape": list(data.x.shape[1:]),
            "dtype": data.x.dtype.str,
            "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
            "examples": content_digest(data.x),
            "task_params": fingerprint,
            **(
                {}
                if groups is None
                else {
                    "groups": hashlib.sha256(
                        np.ascontiguousarray(groups, dtype=np.int64).tobytes()
                    ).hexdigest()
                }
            ),
        }
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    return f"{task_name}-{scheme}-{num_clients}c-s{seed}-{digest}"


def _plain(value: Any) -> Any:
    """NumPy scalars as Python ones, so 0.5 and np.float64(0.5) give one key and valid JSON."""
    return value.item() if isinstance(value, np.generic) else value


def _complete(shard_dir: Path, key: str) -> bool:
    try:
        manifest = load_manifest(shard_dir)
    except DataError:
        return False
    return manifest.get("key") == key and all((shard_dir / f).is_file() for f in manifest["files"])


def materialize_shards(
    task: Task | str,
    data: ArrayData,
    num_clients: int,
    scheme: str,
    seed: int,
    params: Mapping[str, Any],
    cache_dir: Path,
) -> Path:
    """Partition ``data`` and write its shards once under ``cache_dir/<key>``; reuse them after.

    The key hashes the task (name and parameters), scheme, params, client count, seed, and the
    examples themselves (features and labels: ``content_digest``). A
    new set is written in a temporary directory and renamed into place, so concurrent callers
    (several Ray workers, say) never see a half-written set. Returns the shard directory.
    """
    task_name = task if isinstance(task, str) else task.name
    fingerprint = "" if isinstance(task, str) else task.fingerprint()
    num_classes = None if isinstance(task, str) else task.num_classes
    cache_dir = Path(cache_dir)
    groups = None if isinstance(task, str) or not uses_groups(scheme) else task.task_index(data.x)
    key = _shards_key(task_name, scheme, params, num_clients, seed, data, groups, fingerprint)
    target = cache_dir / key
    if _complete(target, key):
        return target
    parts = partition(data.y, num_clients, scheme, seed, groups=groups, **params)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{uuid.uuid4().hex}"
    try:
        write_shards(
            data,
            parts,
            tmp,
            key=key,
            num_classes=num_classes,
            info={
                "task": task_name,
                "scheme": scheme,
                "seed": seed,
                "params": {k: _plain(params[k]) for k in sorted(params)},
            },
        )
        if target.exists():
            if _complete(target, key):  # another process finished first
                return target
            shutil.rmtree(target)  # a stale or foreign directory under our key
        os.rename(tmp, target)
    except OSError:
        if _complete(target, key):  # lost a rename race to an identical set
            return target
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Inspecting a partition
# ---------------------------------------------------------------------------------------------


def label_counts(
    manifest_or_parts: Mapping[str, Any] | Path | Sequence[np.ndarray],
    labels: np.ndarray | None = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """Examples per (client, class), shape (num_clients, num_classes).

    From a manifest (dict, shard directory or manifest path) the stored counts are returned and
    ``labels`` is not needed; from index arrays they are counted in ``labels``.
    """
    if isinstance(manifest_or_parts, (str, os.PathLike)):
        path = Path(manifest_or_parts)
        manifest_or_parts = load_manifest(path.parent if path.name == MANIFEST else path)
    if isinstance(manifest_or_parts, Mapping):
        counts = np.asarray(manifest_or_parts["label_counts"], dtype=np.int64)
        if num_classes is not None and counts.shape[1] != num_classes:
            raise ValueError(f"manifest has {counts.shape[1]} classes, expected {num_classes}")
        return counts
    if labels is None:
        raise ValueError("label_counts needs `labels` to count index arrays")
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    return np.stack(
        [np.bincount(labels[p], minlength=num_classes) for p in manifest_or_parts]
    ).astype(np.int64)


def format_label_counts(counts: np.ndarray) -> str:
    """A plain-text table: one row per client, one column per class, then the total."""
    counts = np.asarray(counts)
    header = ["client", *(str(c) for c in range(counts.shape[1])), "total"]
    rows = [[str(i), *(str(v) for v in row), str(row.sum())] for i, row in enumerate(counts)]
    rows.append(["all", *(str(v) for v in counts.sum(axis=0)), str(counts.sum())])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def plot_label_heatmap(counts: np.ndarray, path: Path, title: str) -> Path:
    """Save an annotated heat map of examples per (client, class) as a PNG (Agg, headless);
    returns ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    counts = np.asarray(counts)
    n_clients, n_classes = counts.shape
    fig = Figure(figsize=(max(4.0, 0.6 * n_classes + 2), max(3.0, 0.35 * n_clients + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="examples")
    ax.set(
        title=title,
        xlabel="class",
        ylabel="client",
        xticks=range(n_classes),
        yticks=range(n_clients),
    )
    if counts.size <= 400:  # numbers stay legible up to about 20 x 20 cells
        threshold = counts.max() / 2
        for (i, j), v in np.ndenumerate(counts):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if v > threshold else "white",
            )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
