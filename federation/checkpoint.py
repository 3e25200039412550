"""Per-round checkpoints: what a killed run needs to go on exactly where it stopped.

``RUN_DIR/checkpoints/round_00003/`` holds the state after round 3:

- ``global.safetensors``: the global weights the next round broadcasts;
- ``aggregator.safetensors`` + ``aggregator.json``: ``Aggregator.state_dict()``, its tensors and
  arrays in safetensors and the plain data around them in JSON (never a pickle, so loading a
  checkpoint runs no code);
- ``checkpoint.json``, written last: format, round, seed and the SHA-256 of every other file.

Nothing else is needed: client sampling and every client's training seed are pure functions of
(seed, round, client) (``FedMergeStrategy.sample`` / ``client_seed``) and the initial model is
rebuilt from the seed, so the run keeps no RNG state between rounds.

A checkpoint is written into a temporary directory beside its final place and renamed into it,
so ``round_*`` directories are always complete; a crash mid-write leaves only a ``.tmp`` one,
removed by the next write. Loading checks every file's hash and names the file that is missing,
truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file as load_torch, save_file as save_torch

from federation.results import RunFileError
from federation.storage import named_os_error, os_errors_of

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = 1
META = "checkpoint.json"
GLOBAL = "global.safetensors"
AGGREGATOR_TENSORS = "aggregator.safetensors"
AGGREGATOR_DATA = "aggregator.json"
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


def checkpoint_name(round: int) -> str:
    return f"round_{round:05d}"


def save_checkpoint(directory: Path, round: int, seed: int, global_state: Mapping[str, np.ndarray],
                    aggregator_state: Mapping[str, Any], *, keep: int = 0) -> Path:
    """Write the checkpoint of ``round`` under ``directory`` atomically; keep the newest ``keep``
    (0 = all). Returns its path. Aggregator state other than tensors, arrays and JSON data is
    refused with a CheckpointError naming its key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, skeleton = _split(aggregator_state)
    final = directory / checkpoint_name(round)
    tmp = directory / f".{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        with os_errors_of(final / GLOBAL):  # a full disk is an OSError naming the file, not a SafetensorError
            save_numpy({k: np.asarray(v, order="C") for k, v in global_state.items()}, str(tmp / GLOBAL))
        with os_errors_of(final / AGGREGATOR_TENSORS):
            save_torch(tensors, str(tmp / AGGREGATOR_TENSORS))
        (tmp / AGGREGATOR_DATA).write_text(json.dumps(skeleton), encoding="utf-8")
        files = {name: _sha256(tmp / name) for name in (GLOBAL, AGGREGATOR_TENSORS, AGGREGATOR_DATA)}
        meta = {"format": FORMAT, "round": round, "seed": seed, "files": files}
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():  # the same round written again (a resumed run redoing it)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(directory)
    except OSError as err:  # a disk that fills under write_text names no file: name the checkpoint
        raise named_os_error(err, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(directory, keep)
    return final


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """The (round, path) of every complete checkpoint under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint under ``directory`` (None when there is none), fully verified."""
    found = list_checkpoints(directory)
    return load_checkpoint(found[-1][1]) if found else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint directory; CheckpointError names the bad file."""
    path = Path(path)
    meta_path = path / META
    meta = _read_json(meta_path)
    try:
        round, seed, files = int(meta["round"]), int(meta["seed"]), dict(meta["files"])
        if meta["format"] != FORMAT:
            raise ValueError(f"format {meta['format']!r}, this version reads {FORMAT}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {meta_path} is not a valid checkpoint description: {exc}") from exc
    for name in (GLOBAL, AGGREGATOR_TENSORS, AGGREGATOR_DATA):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != files.get(name):
            raise CheckpointError(f"checkpoint file {file} is corrupt or truncated (its SHA-256 differs "
                                  f"from the one recorded in {meta_path})")
    global_state = _read_safetensors(path / GLOBAL, load_numpy)
    tensors = _read_safetensors(path / AGGREGATOR_TENSORS, load_torch)
    skeleton = _read_json(path / AGGREGATOR_DATA)
    try:
        aggregator_state = _join(skeleton, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path / AGGREGATOR_DATA} does not match "
                              f"{path / AGGREGATOR_TENSORS}: {exc}") from exc
    return Checkpoint(round=round, seed=seed, global_state=global_state, aggregator_state=aggregator_state,
                      path=path)


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
                raise CheckpointError(f"aggregator state {path} is an object array: it would need a pickle")
            tensors[path] = torch.from_numpy(np.array(value, copy=True, order="C"))
            return {_ARRAY: path}
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise CheckpointError(f"aggregator state {path or '(top level)'}: key {bad[0]!r} is not a string")
            out = {k: walk(v, f"{path}/{k}" if path else k) for k, v in value.items()}
            return {_DICT: out} if len(out) == 1 and next(iter(out)) in (_TENSOR, _ARRAY, _DICT) else out
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"aggregator state {path or '(top level)'} is a {type(value).__name__}: "
                              "only tensors, arrays and JSON data (dict, list, str, number, bool, None) "
                              "are checkpointed, never pickles")

    if not isinstance(state, Mapping):
        raise CheckpointError(f"Aggregator.state_dict() must return a dict, got {type(state).__name__}")
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


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON (truncated?): {exc}") from exc


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
