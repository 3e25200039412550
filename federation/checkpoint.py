"""Per-round checkpoints: what a killed run needs to go on exactly where it stopped.

``RUN_DIR/checkpoints/round_00003/`` holds the state after round 3:

- ``global.safetensors``: the global weights the next round broadcasts;
- ``aggregator.safetensors`` + ``aggregator.json``: ``Aggregator.state_dict()``, its tensors and
  arrays in safetensors and the plain data around them in JSON (never a pickle, so loading a
  checkpoint runs no code);
- ``served.safetensors`` + ``served.json``, only when the aggregator serves its own model (SMILE,
  WEMoE): the last merged round's served model (``fedmerge.federation.served`` weights and spec), so that a
  resumed run serves, scores and saves exactly what an uninterrupted one would;
- ``checkpoint.json``, written last: format, round, seed, the run's resolved config (its
  ``ExperimentConfig.to_dict()``) with the SHA-256 of its canonical JSON (``config_digest``), and
  the SHA-256 of every other file.

Nothing else is needed: client sampling and every client's training seed are pure functions of
(seed, round, client) (``FedMergeStrategy.sample`` / ``client_seed``) and the initial model is
rebuilt from the seed, so the run keeps no RNG state between rounds.

A checkpoint is written into a temporary directory beside its final place and renamed into it,
so ``round_*`` directories are always complete; a crash mid-write leaves only a ``.tmp`` one,
removed by the next write. Loading checks every field of ``checkpoint.json`` strictly (types,
the round against the folder's name, the config against its digest) and every file's hash, and
names the file and field that is missing, truncated, corrupt or forged. Format 1 checkpoints
(without config or served model) are refused: no backward compatibility.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from fedmerge.federation.results import RunFileError
from fedmerge.federation.storage import named_os_error, os_errors_of

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "config_changes",
    "config_digest",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = 2
META = "checkpoint.json"
GLOBAL = "global.safetensors"
AGGREGATOR_TENSORS = "aggregator.safetensors"
AGGREGATOR_DATA = "aggregator.json"
SERVED_TENSORS = "served.safetensors"
SERVED_SPEC = "served.json"
_REQUIRED = (GLOBAL, AGGREGATOR_TENSORS, AGGREGATOR_DATA)
_META_KEYS = {"format", "round", "seed", "config", "config_digest", "files"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"round_(\d{5,})")
_TENSOR, _ARRAY, _DICT = "__tensor__", "__ndarray__", "__dict__"


class CheckpointError(RunFileError):
    """A checkpoint cannot be written or read; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``round``: global weights (NumPy, in their own dtypes) and aggregator state."""

    round: int
    seed: int
    global_state: dict[str, np.ndarray]
    aggregator_state: dict[str, Any]
    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # the run's ExperimentConfig.to_dict()
    served: tuple[dict[str, Any], dict[str, np.ndarray]] | None = (
        None  # fedmerge.federation.served spec, weights
    )


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys, no spaces): equal configs, equal digests."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the run's config cannot be stored in a checkpoint as JSON: {exc}"
        ) from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_changes(
    recorded: Mapping[str, Any], current: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, recorded value, current value)`` of every leaf where two configs differ
    (``MISSING`` where a key is absent on one side), sorted by key; both go through JSON first, so
    a tuple equals its list."""

    def flat(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                flat(item, f"{prefix}.{key}" if prefix else str(key), out)
        else:
            out[prefix] = value
        return out

    a = flat(json.loads(json.dumps(recorded)), "", {})
    b = flat(json.loads(json.dumps(current)), "", {})
    return [
        (key, a.get(key, MISSING), b.get(key, MISSING))
        for key in sorted(a.keys() | b.keys())
        if a.get(key, MISSING) != b.get(key, MISSING) or type(a.get(key)) is not type(b.get(key))
    ]


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


MISSING = _Missing()


def checkpoint_name(round: int) -> str:
    return f"round_{round:05d}"


def save_checkpoint(
    directory: Path,
    round: int,
    seed: int,
    global_state: Mapping[str, np.ndarray],
    aggregator_state: Mapping[str, Any],
    *,
    keep: int = 0,
    config: Mapping[str, Any] | None = None,
    served: tuple[Mapping[str, Any], Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write the checkpoint of ``round`` under ``directory`` atomically; keep the newest ``keep``
    (0 = all). Returns its path. ``config`` is the run's resolved config (``to_dict()``), which a
    resume compares with the run folder's; ``served`` the served model (spec, weights) when the
    aggregator serves its own. Aggregator state other than tensors, arrays and JSON data is
    refused with a CheckpointError naming its key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, skeleton = _split(aggregator_state)
    config = dict(config or {})
    digest = config_digest(config)
    final = directory / checkpoint_name(round)
    tmp = directory / f".{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        with os_errors_of(
            final / GLOBAL
        ):  # a full disk is an OSError naming the file, not a SafetensorError
            save_numpy(
                {k: np.asarray(v, order="C") for k, v in global_state.items()}, str(tmp / GLOBAL)
            )
        with os_errors_of(final / AGGREGATOR_TENSORS):
            save_torch(tensors, str(tmp / AGGREGATOR_TENSORS))
        (tmp / AGGREGATOR_DATA).write_text(json.dumps(skeleton), encoding="utf-8")
        names = list(_REQUIRED)
        if served is not None:
            spec, weights = served
            save_numpy(
                {k: np.asarray(v, order="C") for k, v in weights.items()}, str(tmp / SERVED_TENSORS)
            )
            (tmp / SERVED_SPEC).write_text(json.dumps(spec, allow_nan=False), encoding="utf-8")
            names += [SERVED_TENSORS, SERVED_SPEC]
        files = {name: _sha256(tmp / name) for name in names}
        meta = {
            "format": FORMAT,
            "round": round,
            "seed": seed,
            "config": config,
            "config_digest": digest,
            "files": files,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():  # the same round written again (a resumed run redoing it)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(directory)
    except OSError as err:  # a disk that fills under write_text names no file: name the checkpoint
        raise named_os_error(err, final) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(directory, keep)
    return final


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """The (round, path) of every complete checkpoint under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _NAME.fullmatch(p.name)) and p.is_dir()
    ]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint under ``directory`` (None when there is none), fully verified."""
    found = list_checkpoints(directory)
    return load_checkpoint(found[-1][1]) if found else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint directory; CheckpointError names the bad file (and field)."""
    path = Path(path)
    meta_path = path / META
    meta = _read_json(meta_path)
    round, seed, config, files = _check_meta(meta, meta_path, path.name)
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint file {file} is corrupt or truncated (its SHA-256 differs "
                f"from the one recorded in {meta_path})"
            )
    global_state = _read_safetensors(path / GLOBAL, load_numpy)
    tensors = _read_safetensors(path / AGGREGATOR_TENSORS, load_torch)
    skeleton = _read_json(path / AGGREGATOR_DATA, strict=False)
    try:
        aggregator_state = _join(skeleton, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint file {path / AGGREGATOR_DATA} does not match "
            f"{path / AGGREGATOR_TENSORS}: {exc}"
        ) from exc
    served = None
    if SERVED_TENSORS in files:
        spec = _read_json(path / SERVED_SPEC)
        if not isinstance(spec, dict):
            raise CheckpointError(
                f"checkpoint file {path / SERVED_SPEC} must hold a JSON object (a served "
                f"model's spec), got {type(spec).__name__}"
            )
        served = (spec, _read_safetensors(path / SERVED_TENSORS, load_numpy))
    return Checkpoint(
        round=round,
        seed=seed,
        global_state=global_state,
        aggregator_state=aggregator_state,
        path=path,
        config=config,
        served=served,
    )


def _check_meta(
    meta: Any, meta_path: Path, folder: str
) -> tuple[int, int, dict[str, Any], dict[str, str]]:
    """The round, seed, config and file hashes of a ``checkpoint.json``, every field checked for its
    type and meaning (it is read from disk and may be forged): a CheckpointError names the field."""

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {meta_path}: field {field!r} {problem}")

    if not isinstance(meta, dict):
        raise CheckpointError(
            f"checkpoint file {meta_path} must hold a JSON object, got {type(meta).__name__}"
        )
    missing, unknown = sorted(_META_KEYS - meta.keys()), sorted(meta.keys() - _META_KEYS)
    if "format" in meta and (not _is_int(meta["format"]) or meta["format"] != FORMAT):
        raise bad(
            "format",
            f"is {_short(meta['format'])}; this version reads format {FORMAT} only (checkpoints "
            "of older versions cannot be resumed: start the run again)",
        )
    if missing:
        raise bad(missing[0], "is missing")
    if unknown:
        raise bad(unknown[0], "is not a field of a checkpoint description")
    round, seed, config, files = meta["round"], meta["seed"], meta["config"], meta["files"]
    if not _is_int(round) or round < 0:
        raise bad("round", f"must be a non-negative integer, got {_short(round)}")
    named = _NAME.fullmatch(folder)
    if named is not None and int(named.group(1)) != round:
        raise bad(
            "round",
            f"is {round}, but the checkpoint's folder {folder} is that of round {int(named.group(1))}",
        )
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise bad("seed", f"must be an integer in [0, 2**63), got {_short(seed)}")
    if not isinstance(config, dict):
        raise bad(
            "config",
            f"must be a JSON object (the run's resolved config), got {type(config).__name__}",
        )
    if not isinstance(meta["config_digest"], str) or config_digest(config) != meta["config_digest"]:
        raise bad(
            "config_digest",
            "is not the SHA-256 of the recorded config: the config was edited or corrupted",
        )
    if config and config.get("seed") != seed:
        raise bad(
            "seed", f"is {seed}, but the recorded config says seed = {_short(config.get('seed'))}"
        )
    if not isinstance(files, dict):
        raise bad(
            "files", f"must be a JSON object of file name -> SHA-256, got {type(files).__name__}"
        )
    allowed = {*_REQUIRED, SERVED_TENSORS, SERVED_SPEC}
    for name, digest in files.items():
        if name not in allowed:
            raise bad("files", f"names {_short(name)}, which is not a checkpoint file")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise bad("files", f"records {_short(digest)} for {name}: not a SHA-256 hex digest")
    for name in _REQUIRED:
        if name not in files:
            raise bad("files", f"records no SHA-256 for {name}")
    if (SERVED_TENSORS in files) != (SERVED_SPEC in files):
        raise bad("files", f"must record both {SERVED_TENSORS} and {SERVED_SPEC}, or neither")
    return round, seed, config, files


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- aggregator state: tensors apart, plain data as JSON -------------------------------------


def _split(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors and arrays of a (nested) state, keyed by their path, and the JSON skeleton that
    marks where each one goes."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().clone().contiguous()  # clone: no shared storage
            return {_TENSOR: path}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise CheckpointError(
                    f"aggregator state {path} is an object array: it would need a pickle"
                )
            tensors[path] = torch.from_numpy(np.array(value, copy=True, order="C"))
            return {_ARRAY: path}
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise CheckpointError(
                    f"aggregator state {path or '(top level)'}: key {bad[0]!r} is not a string"
                )
            out = {k: walk(v, f"{path}/{k}" if path else k) for k, v in value.items()}
            return (
                {_DICT: out}
                if len(out) == 1 and next(iter(out)) in (_TENSOR, _ARRAY, _DICT)
                else out
            )
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(
            f"aggregator state {path or '(top level)'} is a {type(value).__name__}: "
            "only tensors, arrays and JSON data (dict, list, str, number, bool, None) "
            "are checkpointed, never pickles"
        )

    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"Aggregator.state_dict() must return a dict, got {type(state).__name__}"
        )
    return tensors, walk(state, "")


def _join(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``_split`` (tuples come back as lists)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_ARRAY}:
            return tensors[skeleton[_ARRAY]].numpy()
        if set(skeleton) == {_DICT}:
            return {k: _join(v, tensors) for k, v in skeleton[_DICT].items()}
        return {k: _join(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_join(v, tensors) for v in skeleton]
    return skeleton


# ---- files -----------------------------------------------------------------------------------


def _prune(directory: Path, keep: int) -> None:
    """Drop all but the newest ``keep`` checkpoints (0 = keep all) and leftovers of killed writes."""
    for leftover in directory.glob(".round_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep > 0:
        for _, path in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def _read_json(path: Path, strict: bool = True) -> Any:
    """A checkpoint's JSON file; ``strict`` (the description and the served spec) also refuses
    NaN, Infinity and numbers that overflow a float (aggregator state may hold an infinity)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        text = path.read_text(encoding="utf-8")
        if not strict:
            return json.loads(text)
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (
        ValueError,
        RecursionError,
    ) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise CheckpointError(
            f"checkpoint file {path} is not valid JSON (truncated?): {exc}"
        ) from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def _read_safetensors(path: Path, load: Any) -> dict[str, Any]:
    try:
        return dict(load(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry) to disk, so a checkpoint survives a power cut too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
