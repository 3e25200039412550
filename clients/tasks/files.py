"""Your own data files for the generic tasks (``tabular``, ``hf_text_classification``,
``hf_image_classification``), read with the ``datasets`` library's local loaders only.

A source is a file (CSV, Parquet, JSON / JSON Lines, Arrow) or a folder (an ``imagefolder``
layout ``<class>/<image>``, or a ``save_to_disk`` folder read with ``load_from_disk``); the format
comes from the suffix or the folder's contents unless the ``format`` parameter names it. Nothing
is downloaded: ``datasets`` only parses local files here.

Splits: a source with a ``test`` split (a saved DatasetDict, an image folder with ``train/`` and
``test/``) keeps it; otherwise the rows are split with a seed, stratified by label, the same in
every process. Labels: integers must lie in 0..C-1; strings become class indices in sorted order
of the train split's values (a test value unseen in train is an error).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmerge.aggregators.params import hyperparameter
from fedmerge.clients.tasks.base import ArrayData, DataError, Task, data_roots

__all__ = [
    "FORMATS",
    "FileParams",
    "FileTask",
    "LabeledSource",
    "find_source",
    "infer_format",
    "load_labeled",
    "read_source",
    "stamp",
]

FORMATS = ("auto", "csv", "parquet", "json", "arrow", "imagefolder", "disk")
"""``format`` values: ``auto`` infers from the suffix or folder; ``disk`` = ``load_from_disk``."""

SUFFIXES = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".arrow": "arrow",
}
FOLDER_FORMATS = ("imagefolder", "disk")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

WHERE_FILES_LIE = (
    "A relative path is looked up under data.data_dir (or $FEDMERGE_DATA_DIR, then the "
    "checkout's data/) first, then the current directory; an absolute path is used as given."
)


def _shown(values: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def candidates(name: str, data_dir: Path | None) -> list[Path]:
    """Every place a relative path ``name`` may lie, in lookup order (an absolute one: itself)."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return [path]
    return [root / path for root in data_roots(data_dir)] + [Path.cwd() / path]


def find_source(name: str, data_dir: Path | None, what: str = "data file") -> Path:
    """The absolute path of ``name``: the first of ``candidates`` that exists."""
    looked = candidates(name, data_dir)
    for path in looked:
        if path.exists():
            return path.resolve()
    raise DataError(
        f"{what} {name!r} not found (looked at {', '.join(map(str, looked))}). {WHERE_FILES_LIE}"
    )


def absolute(name: str, data_dir: Path | None = None) -> str:
    """``name`` as an absolute path: where it was found, else relative to the current
    directory (so another process reports the same missing path)."""
    for path in candidates(name, data_dir):
        if path.exists():
            return str(path.resolve())
    return str(candidates(name, data_dir)[-1].absolute())


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def infer_format(path: Path, format: str = "auto") -> str:
    """The loader for ``path``: ``format`` when given (checked against the path's kind), else from
    the suffix (files) or the contents (folders)."""
    if format not in FORMATS:
        raise DataError(f"format {format!r} is unknown; choose from {', '.join(FORMATS)}")
    if path.is_dir():
        if format == "auto":
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return "disk"
            if _has_images(path):
                return "imagefolder"
            raise DataError(
                f"{path} is a folder but neither a save_to_disk folder (no dataset_dict.json or "
                f"state.json) nor an image folder (no {'/'.join(IMAGE_SUFFIXES)} files); point "
                "files at a data file, or set format"
            )
        if format not in FOLDER_FORMATS:
            raise DataError(
                f"{path} is a folder, but format {format!r} reads a file; a folder is read as "
                f"{' or '.join(FOLDER_FORMATS)}"
            )
        return format
    if format == "auto":
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise DataError(
                f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r} (known: "
                f"{', '.join(SUFFIXES)}); set format to one of {', '.join(FORMATS[1:])}"
            )
        return SUFFIXES[suffix]
    if format in FOLDER_FORMATS:
        raise DataError(f"{path} is a file, but format {format!r} reads a folder")
    return format


def stamp(path: Path) -> tuple[int, int, int]:
    """What changes when the source changes (a cache key): file count, total size and newest
    modification time of the file, or of every file under the folder."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    return (
        len(stats),
        sum(s.st_size for s in stats),
        max((s.st_mtime_ns for s in stats), default=0),
    )


def _unreadable(path: str, format: str, exc: Exception) -> str:
    return (
        f"{path} cannot be read as {format} ({type(exc).__name__}: {exc}); check the file, "
        "or set format if its suffix misleads"
    )


@functools.lru_cache(maxsize=16)
def read_source(path: str, format: str, _stamp: tuple[int, int, int]) -> dict[str, Any]:
    """The splits of a source as ``datasets.Dataset`` objects by name, cached per process
    (``_stamp`` makes a changed file a new entry). Parsed into memory through a temporary
    ``datasets`` cache that is deleted afterwards, so nothing is left in ~/.cache."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - flwr-datasets depends on it
        raise DataError(
            "the file tasks read data with the datasets library, which is not installed "
            "(pip install datasets)"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars

    bars_were_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        if format == "disk":
            loaded = datasets.load_from_disk(path, keep_in_memory=True)
        else:
            with tempfile.TemporaryDirectory(prefix="fedmerge-datasets-") as cache:
                source = {"data_dir": path} if format == "imagefolder" else {"data_files": path}
                loaded = datasets.load_dataset(
                    format, **source, cache_dir=cache, keep_in_memory=True
                )
    except DataError:
        raise
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):  # datasets' word for a file of no rows
            raise DataError(_unreadable(path, format, exc)) from exc
        raise DataError(f"{path}: the train split has no rows (the file holds none)") from exc
    except Exception as exc:  # any parser error: the file is not what its format says
        raise DataError(_unreadable(path, format, exc)) from exc
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if "train" not in splits:
        raise DataError(
            f"{path} has the splits {_shown(sorted(splits))} but no 'train' split; save it with "
            "a 'train' split (and optionally 'test')"
        )
    return splits


def column_names(dataset: Any) -> list[str]:
    return list(dataset.column_names)


def require_columns(dataset: Any, names: Sequence[str], path: Path) -> None:
    """A DataError naming the first column of ``names`` that ``dataset`` lacks, and its columns."""
    there = column_names(dataset)
    for name in names:
        if name not in there:
            raise DataError(
                f"{path}: no column {name!r} (columns there: {_shown(there)}); set the task's "
                "column parameters to one of them"
            )


def arrow_column(dataset: Any, name: str):
    """A column as a pyarrow array (images undecoded: dicts of bytes and path)."""
    column = dataset.with_format("arrow")[name]
    return column.combine_chunks() if hasattr(column, "combine_chunks") else column


def _class_names(dataset: Any, name: str) -> list[str] | None:
    import datasets

    feature = dataset.features.get(name)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _raw_labels(dataset: Any, name: str, path: Path, split: str) -> np.ndarray:
    """The label column as int64 or str values; None, NaN or fractional values are errors."""
    import pyarrow as pa

    column = arrow_column(dataset, name)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{path}: label column {name!r} is empty at row {row} of the {split} split "
            f"({column.null_count} empty in all); drop or fill those rows"
        )
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.dictionary_decode()
        kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return column.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_floating(kind):
        values = column.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if len(bad):
            raise DataError(
                f"{path}: label column {name!r} holds the non-integer value {float(values[bad[0]])!r} "
                f"(row {int(bad[0])} of the {split} split); labels must be integers 0..C-1 or "
                "strings (class names)"
            )
        return values.astype(np.int64)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return np.asarray(column.to_pylist(), dtype=object)
    raise DataError(
        f"{path}: label column {name!r} has type {kind}; labels must be integers 0..C-1 or "
        "strings (class names)"
    )


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train rows, test rows), each sorted: per label value (in sorted order), a seeded
    permutation of its rows gives round(count * test_fraction) to test, keeping at least one
    in train, so every class of test is in train."""
    rng = np.random.default_rng(seed)
    _, groups = np.unique(labels, return_inverse=True)
    test = []
    for group in range(int(groups.max()) + 1 if len(groups) else 0):
        rows = rng.permutation(np.flatnonzero(groups == group))
        test.append(rows[: min(round(len(rows) * test_fraction), len(rows) - 1)])
    test_rows = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), test_rows)
    return train_rows, test_rows


def encode_labels(
    train: np.ndarray,
    test: np.ndarray,
    *,
    num_classes: int,
    names: list[str] | None,
    path: Path,
    column: str,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(train y, test y, class names) as int64 class indices; see the module docstring."""
    if train.dtype == object:  # strings: class names
        if num_classes:
            raise DataError(
                f"{path}: label column {column!r} holds strings (e.g. {train[0]!r}), but "
                f"num_classes = {num_classes} declares integer labels 0..{num_classes - 1}; set "
                "num_classes = 0 to map string labels to classes, or store integers"
            )
        classes = sorted(set(train.tolist()))
        index = {name: i for i, name in enumerate(classes)}
        unseen = sorted(set(test.tolist()) - set(classes))
        if unseen:
            raise DataError(
                f"{path}: the test split's label {unseen[0]!r} in column {column!r} is not in the "
                f"train split (its classes: {_shown(classes)}); every test class needs train rows"
            )
        encode = np.vectorize(index.__getitem__, otypes=[np.int64])
        y_train = encode(train) if len(train) else np.zeros(0, np.int64)
        y_test = encode(test) if len(test) else np.zeros(0, np.int64)
        return y_train, y_test, tuple(classes)
    if test.dtype == object:
        raise DataError(
            f"{path}: label column {column!r} holds integers in train but strings in test"
        )
    count = num_classes or (len(names) if names else int(train.max()) + 1 if len(train) else 0)
    for split, y in (("train", train), ("test", test)):
        bad = np.flatnonzero((y < 0) | (y >= count))
        if len(bad):
            origin = (
                f"num_classes = {num_classes}"
                if num_classes
                else f"{count} classes inferred from the train split"
            )
            raise DataError(
                f"{path}: label {int(y[bad[0]])} in column {column!r} (row {int(bad[0])} of the "
                f"{split} split) is outside 0..{count - 1} ({origin}); labels must be integers "
                "0..C-1: fix the label or set num_classes"
            )
    classes = tuple(names) if names and len(names) == count else tuple(map(str, range(count)))
    return train.astype(np.int64), test.astype(np.int64), classes


@dataclass(frozen=True)
class LabeledSource:
    """One source split into train and test: the ``datasets.Dataset`` of each split, the rows of
    it that form the split, int64 labels and the class names."""

    path: Path
    format: str
    train: Any
    test: Any
    train_rows: np.ndarray
    test_rows: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset(self, split: str) -> tuple[Any, np.ndarray]:
        """(the Dataset, the rows of it) of ``split``."""
        return (self.train, self.train_rows) if split == "train" else (self.test, self.test_rows)

    def labels(self, split: str) -> np.ndarray:
        return self.y_train if split == "train" else self.y_test

    def column(self, split: str, name: str):
        """Column ``name`` of ``split``'s rows as a pyarrow array."""
        dataset, rows = self.dataset(split)
        return arrow_column(dataset, name).take(rows)


@functools.lru_cache(maxsize=16)
def _labeled(
    path: str,
    format: str,
    _stamp: tuple[int, int, int],
    columns: tuple[str, ...],
    label_column: str,
    num_classes: int,
    test_fraction: float,
    split_seed: int,
) -> LabeledSource:
    source = Path(path)
    splits = read_source(path, format, _stamp)
    train = splits["train"]
    for split, dataset in splits.items():
        require_columns(dataset, (*columns, label_column), source)
        if split in ("train", "test") and len(dataset) == 0:
            raise DataError(f"{source}: the {split} split has no rows")
    names = _class_names(train, label_column)
    raw = _raw_labels(train, label_column, source, "train")
    if "test" in splits:
        test = splits["test"]
        train_rows, test_rows = np.arange(len(train)), np.arange(len(test))
        raw_test = _raw_labels(test, label_column, source, "test")
        raw_train = raw
    else:
        test = train
        train_rows, test_rows = seeded_split(raw, test_fraction, split_seed)
        if not len(test_rows):
            raise DataError(
                f"{source}: the test split is empty: {len(raw)} rows with test_fraction = "
                f"{test_fraction} give no test row; add rows or raise test_fraction"
            )
        raw_train, raw_test = raw[train_rows], raw[test_rows]
    y_train, y_test, classes = encode_labels(
        raw_train, raw_test, num_classes=num_classes, names=names, path=source, column=label_column
    )
    for y in (y_train, y_test, train_rows, test_rows):
        y.setflags(write=False)
    return LabeledSource(
        path=source,
        format=format,
        train=train,
        test=test,
        train_rows=train_rows,
        test_rows=test_rows,
        y_train=y_train,
        y_test=y_test,
        classes=classes,
    )


def load_labeled(
    path: Path,
    *,
    format: str = "auto",
    columns: Sequence[str] = (),
    label_column: str = "label",
    num_classes: int = 0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> LabeledSource:
    """The source at ``path`` split and labelled (cached per process on the path, its stamp and
    these arguments). ``columns`` must exist besides the label column."""
    fmt = infer_format(path, format)
    return _labeled(
        str(path),
        fmt,
        stamp(path),
        tuple(columns),
        label_column,
        int(num_classes),
        float(test_fraction),
        int(split_seed),
    )


# ---- the parameters and the task base the three file tasks share ------------------------------
@dataclass(frozen=True)
class FileParams:
    """What every file task takes: where the data lie, how they split, what the label is."""

    files: tuple[str, ...] = hyperparameter(
        (),
        "data files or folders (csv, parquet, json/jsonl, arrow, an image folder, a "
        "save_to_disk folder); several = a multi-task data set, one task per file",
    )
    format: str = hyperparameter(
        "auto", "how the files are read; auto = from the suffix or folder", choices=FORMATS
    )
    label_column: str = hyperparameter("label", "the column holding the class label")
    num_classes: int = hyperparameter(
        0,
        "classes per task: integer labels must lie in 0..num_classes-1; 0 = inferred from the "
        "train split (max label + 1, or the number of distinct string labels)",
        ge=0,
    )
    task_names: tuple[str, ...] = hyperparameter(
        (), "one name per file for multi-task data; empty = the file stems"
    )
    test_fraction: float = hyperparameter(
        0.2, "share of rows held out as the test split when a source has none", gt=0, lt=1
    )
    split_seed: int = hyperparameter(0, "seed of that train/test split", ge=0)


ROWS_CACHED = 8
"""Splits kept per process (``FileTask.load``): keyed on the task class, its params, the resolved
paths and their stamps, so a changed file is read again."""
_ROWS: dict[tuple, ArrayData] = {}

_STEM = re.compile(r"(\.[A-Za-z0-9]+)+$")


class FileTask(Task):
    """A task over ``files``: resolves them, splits and labels them (``load_labeled``), and is
    multi-task when there are several (rows then carry their task index in column 0)."""

    Params: Any = FileParams
    multi_task_ok: bool = True  # False: one file only (hf_image_classification)

    def __init__(self, **params: Any) -> None:
        if isinstance(params.get("files"), str):  # a single path given as a string
            params["files"] = [params["files"]]
        super().__init__(**params)
        p = self.params
        label = f"task {self.name!r}"
        if not p.files:
            raise ValueError(f'data.task_params: {label} needs files, e.g. files = ["my_data.csv"]')
        if not all(f.strip() for f in p.files):
            raise ValueError(
                f"data.task_params: {label}: files={list(p.files)!r} has an empty path"
            )
        if len(p.files) > 1 and not self.multi_task_ok:
            raise ValueError(
                f"data.task_params: {label} reads one data set, got {len(p.files)} files: "
                f"{list(p.files)!r}; give one"
            )
        if p.task_names and len(p.task_names) != len(p.files):
            raise ValueError(
                f"data.task_params: {label}: task_names has {len(p.task_names)} names for "
                f"{len(p.files)} files; give one name per file, or none (the file stems)"
            )
        names = self.task_names or [""]
        if len(set(names)) != len(names):
            raise ValueError(
                f"data.task_params: {label}: task names {names!r} repeat (file stems are the "
                "default); set task_names to distinct names"
            )
        self._data_dir: Path | None = None

    # ---- names and paths ----
    @property
    def task_names(self) -> list[str]:  # type: ignore[override]
        """One name per file when there are several (task_names, else the stems); else []."""
        if len(self.params.files) < 2:
            return []
        if self.params.task_names:
            return list(self.params.task_names)
        return [_STEM.sub("", Path(f.rstrip("/")).name) or f for f in self.params.files]

    def portable_params(self) -> dict[str, Any]:
        values = dataclasses.asdict(self.params)
        values["files"] = [absolute(f, self._data_dir) for f in self.params.files]
        return values

    def sources(self, data_dir: Path | None = None) -> list[Path]:
        """The resolved path of every file (a DataError names where each missing one was
        looked for)."""
        if data_dir is not None:
            self._data_dir = Path(data_dir)
        return [find_source(f, self._data_dir) for f in self.params.files]

    def columns(self) -> tuple[str, ...]:
        """The columns, besides the label, every source must have."""
        return ()

    def labeled(self, data_dir: Path | None = None) -> list[LabeledSource]:
        """Every source, split and labelled (cached)."""
        p = self.params
        return [
            load_labeled(
                path,
                format=p.format,
                columns=self.columns(),
                label_column=p.label_column,
                num_classes=p.num_classes,
                test_fraction=p.test_fraction,
                split_seed=p.split_seed,
            )
            for path in self.sources(data_dir)
        ]

    @property
    def task_num_classes(self) -> list[int]:
        """Classes of each task (reads the data's labels when num_classes is 0)."""
        return [s.num_classes for s in self.labeled()]

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.params.num_classes or max(self.task_num_classes)

    @property
    def class_names(self) -> list[tuple[str, ...]]:
        """The class names of each task (string labels in sorted order, else "0".."C-1")."""
        return [s.classes for s in self.labeled()]

    # ---- rows ----
    def rows(self, source: LabeledSource, split: str) -> np.ndarray:
        """The stored rows of one source's split (subclasses: features, token ids, pixels)."""
        raise NotImplementedError

    def load(self, split: str, data_dir: Path | None = None) -> ArrayData:
        """Every source's split, one after another; multi-task rows start with the task index."""
        if split not in ("train", "test"):
            raise ValueError(
                f"unknown split {split!r} for {self.name}; choose from ['test', 'train']"
            )
        paths = self.sources(data_dir)
        key = (type(self), self.params, split, tuple(map(str, paths)), self._stamps())
        if key not in _ROWS:
            sources = self.labeled()
            parts = [self.rows(s, split) for s in sources]
            if len(parts) > 1:
                parts = [
                    np.concatenate(
                        [np.full((len(x), 1), t, dtype=x.dtype), x.reshape(len(x), -1)], 1
                    )
                    for t, x in enumerate(parts)
                ]
            x = np.ascontiguousarray(np.concatenate(parts))
            y = np.concatenate([s.labels(split) for s in sources])
            x.setflags(write=False)
            y.setflags(write=False)
            while len(_ROWS) >= ROWS_CACHED:
                _ROWS.pop(next(iter(_ROWS)))
            _ROWS[key] = ArrayData(x, y)
        return _ROWS[key]

    def _stamps(self) -> tuple:
        return tuple(stamp(p) for p in self.sources())

    def task_index(self, x: np.ndarray) -> np.ndarray | None:
        """Column 0 of multi-task rows, as int64; None for one task."""
        if len(self.params.files) < 2:
            return None
        return np.asarray(x[:, 0], dtype=np.int64)
