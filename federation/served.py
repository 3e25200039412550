"""Served models of upscaling aggregators (SMILE, WEMoE): shipped, built, saved, loaded.

An aggregator that returns ``AggregateResult.served_model`` hands the server a model other than
the broadcast weights. It travels from the aggregator actor to the evaluator and the driver as a
*spec* (the task name, the swapped modules from ``fedmerge.aggregators.upscaled.describe``, the
parameter count) plus its weights as NumPy arrays, and is rebuilt on the other side from the
task's own model. The module structure depends on the spec alone, so a holder of a built served
model (the evaluator, ``fedmerge.federation.evaluation.ModelScorer``) loads the next round's
weights into it while the spec stays the same. The final one is saved as ``<name>.safetensors``
with ``<name>.json`` (the spec); ``load_served`` rebuilds it for inference:

    from fedmerge.federation.served import load_served
    model = load_served("runs/smile_text-.../served_model.safetensors")
    logits = model(task.preprocess(x))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from fedmerge.aggregators.merging import count_parameters
from fedmerge.aggregators.upscaled import describe, rebuild
from fedmerge.clients.tasks import TaskSpec

__all__ = [
    "FORMAT",
    "ServedModelError",
    "build_served",
    "empty_served",
    "load_served",
    "load_served_state",
    "save_served",
    "served_spec",
]

FORMAT = 1


class ServedModelError(ValueError):
    """A saved served model cannot be read or does not fit its task's model; the message says
    which file."""


def served_spec(
    model: nn.Module, task_name: str | Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(spec, weights as NumPy) of a served model built on the model of ``task_name`` (a name,
    or a ``TaskSpec.to_dict()`` for a task with parameters or plug-in modules)."""
    spec = {
        "format": FORMAT,
        "task": task_name if isinstance(task_name, str) else dict(task_name),
        "structure": describe(model),
        "params": count_parameters(model),
    }
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return spec, state


def empty_served(spec: Mapping[str, Any]) -> nn.Module:
    """The module structure of ``spec``: the task's model with the swaps replayed, weights unset."""
    if spec.get("format") != FORMAT:
        raise ServedModelError(
            f"served model format {spec.get('format')!r}, this version reads {FORMAT}"
        )
    task = spec["task"]
    model = (
        TaskSpec.from_dict(task if isinstance(task, Mapping) else str(task))
        .build()
        .build_federated_model()
    )
    return rebuild(model, spec["structure"])


def load_served_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy ``state`` (NumPy weights from ``served_spec``) into ``model`` strictly; returns it."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model


def build_served(
    spec: Mapping[str, Any], state: Mapping[str, np.ndarray], device: torch.device | str = "cpu"
) -> nn.Module:
    """The served model of ``spec`` with ``state`` loaded strictly, in eval mode on ``device``."""
    return load_served_state(empty_served(spec), state).to(device).eval()


def save_served(
    path: str | Path,
    model: nn.Module,
    task_name: str | Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
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
        raise ServedModelError(
            f"{spec_path}: cannot read the served model's structure ({err})"
        ) from None
    model = empty_served(spec)
    try:
        load_model(model, str(weights), strict=True)
    except (OSError, RuntimeError) as err:
        raise ServedModelError(
            f"{weights} does not fit the structure in {spec_path}: {err}"
        ) from None
    return model.to(device).eval()
