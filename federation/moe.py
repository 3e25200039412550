"""Served models of upscaling aggregators (SMILE, WEMoE): shipped, scored per task, saved, loaded.

An aggregator that returns ``AggregateResult.served_model`` hands the server a model other than
the broadcast weights. It travels from the aggregator actor to the evaluator and the driver as a
*spec* (the task name, the swapped modules from ``fedmerge.aggregators.upscaled.describe``, the parameter
count) plus its weights as NumPy arrays, and is rebuilt on the other side from the task's own
model. The final one is saved as ``<name>.safetensors`` with ``<name>.json`` (the spec);
``load_served`` rebuilds it for inference:

    from fedmerge.federation.moe import load_served
    model = load_served("runs/smile_text-.../served_model.safetensors")
    logits = model(task.preprocess(x))

Multi-task tasks (``task_index``, ``task_names``) are scored per task: ``accuracy/<task>`` and
``loss/<task>`` next to the overall ``accuracy`` and ``loss``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from fedmerge.aggregators.merging import count_parameters
from fedmerge.aggregators.upscaled import describe, rebuild
from fedmerge.clients.tasks import get_task
from fedmerge.clients.tasks.base import ArrayData, Task
from fedmerge.clients.training import evaluate

__all__ = ["FORMAT", "ServedModelError", "build_served", "evaluate_per_task", "load_served", "proxy_inputs",
           "proxy_split", "save_served", "served_spec"]

FORMAT = 1


class ServedModelError(ValueError):
    """A saved served model cannot be read or does not fit its task's model; the message says which file."""


def served_spec(model: nn.Module, task_name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(spec, weights as NumPy) of a served model built on ``task_name``'s model."""
    spec = {"format": FORMAT, "task": task_name, "structure": describe(model),
            "params": count_parameters(model)}
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return spec, state


def _empty(spec: Mapping[str, Any]) -> nn.Module:
    if spec.get("format") != FORMAT:
        raise ServedModelError(f"served model format {spec.get('format')!r}, this version reads {FORMAT}")
    model = get_task(str(spec["task"])).build_model()
    return rebuild(model, spec["structure"])


def build_served(spec: Mapping[str, Any], state: Mapping[str, np.ndarray],
                 device: torch.device | str = "cpu") -> nn.Module:
    """The served model of ``spec`` with ``state`` loaded strictly, in eval mode on ``device``."""
    model = _empty(spec)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model.to(device).eval()


def save_served(path: str | Path, model: nn.Module, task_name: str,
                metadata: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``path`` (.safetensors, shared tensors stored once) and the spec next to it (.json)."""
    path = Path(path).with_suffix(".safetensors")
    spec, _ = served_spec(model, task_name)
    spec["metadata"] = dict(metadata or {})
    from fedmerge.federation.storage import os_errors_of

    with os_errors_of(path):  # a full disk is an OSError naming the file, not a SafetensorError
        save_model(model, str(path))
    spec_path = path.with_suffix(".json")
    spec_path.write_text(json.dumps(spec, indent=1))
    return path, spec_path


def load_served(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_served`` (give the .safetensors or the .json path)."""
    path = Path(path)
    weights, spec_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as err:
        raise ServedModelError(f"{spec_path}: cannot read the served model's structure ({err})") from None
    model = _empty(spec)
    try:
        missing, unexpected = load_model(model, str(weights), strict=True)
    except (OSError, RuntimeError) as err:
        raise ServedModelError(f"{weights} does not fit the structure in {spec_path}: {err}") from None
    return model.to(device).eval()


PROXY_SALT = 0x9E0
"""Separates the proxy hold-out's random draw from the server validation set's (same seed)."""


def proxy_split(task: Task, train: ArrayData, test: ArrayData, *, source: str, size: int,
                seed: int) -> tuple[ArrayData, ArrayData]:
    """(training data left for the clients, data whose inputs are the server's proxy inputs).

    ``source = "test"``: the test split (WEMoE's transductive setting), training data untouched.
    ``source = "held_out"``: ``size`` examples of each task drawn (seeded) out of ``train``,
    before it is partitioned, so that no client holds them; their labels are never used.
    """
    if source == "test":
        return train, test
    if source != "held_out":
        raise ValueError(f"data.proxy_inputs={source!r} is invalid: must be 'test' or 'held_out'")
    if size < 1:
        raise ValueError(f"data.proxy_size={size!r} is invalid: held_out proxy inputs need a size >= 1")
    from fedmerge.federation.scoring import hold_out  # imports Ray, which loading a served model does not need

    task_index = getattr(task, "task_index", None)
    groups = None if task_index is None else task_index(train.x)
    return hold_out(train, size, seed, groups=groups, key="data.proxy_size", salt=PROXY_SALT)


def proxy_inputs(task: Task, data: ArrayData) -> dict[int, np.ndarray]:
    """The server's unlabelled inputs per task index (one task: all under 0)."""
    task_index = getattr(task, "task_index", None)
    if task_index is None:
        return {0: data.x}
    groups = task_index(data.x)
    return {int(t): data.x[groups == t] for t in np.unique(groups)}


def evaluate_per_task(model: nn.Module, task: Task, data: ArrayData, *, batch_size: int,
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """``loss``/``accuracy`` over all of ``data`` and, for a multi-task task, per task."""
    start = time.perf_counter()
    task_index = getattr(task, "task_index", None)
    if task_index is None:
        metrics = evaluate(model, task, data, batch_size=batch_size, device=device)
    else:
        groups = task_index(data.x)
        names = list(getattr(task, "task_names", []))
        metrics, total, loss_sum, correct = {}, 0, 0.0, 0.0
        for t in np.unique(groups):
            part = data.subset(np.flatnonzero(groups == t))
            m = evaluate(model, task, part, batch_size=batch_size, device=device)
            name = names[t] if t < len(names) else str(int(t))
            metrics[f"accuracy/{name}"], metrics[f"loss/{name}"] = m["accuracy"], m["loss"]
            total += len(part)
            loss_sum += m["loss"] * len(part)
            correct += m["accuracy"] * len(part)
        metrics["accuracy"], metrics["loss"] = correct / total, loss_sum / total
    metrics.pop("num_examples", None)
    metrics["evaluate_s"] = time.perf_counter() - start
    return metrics
