"""Describe and rebuild models whose layers an upscaling aggregator replaced (SMILE, WEMoE).

An upscaled (served) model is the run's ordinary model with some submodules swapped for
mixture-of-experts modules. ``describe`` lists the swaps (path, module type, constructor config:
plain JSON data), and ``rebuild`` replays them on a fresh copy of the ordinary model with empty
modules of the right shapes, after which ``load_state_dict`` fills in the weights. Structure and
weights thus travel (Ray) and persist (safetensors + JSON) without pickling code.

A module type is a class registered with ``@module_type("name")`` that implements
``config() -> dict`` and ``classmethod empty(config, shared) -> module``; ``shared`` is one dict
per rebuild through which modules that share a submodule (E-WEMoE's single router) find it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

__all__ = ["Removed", "describe", "module_type", "rebuild", "set_submodule"]

_TYPES: dict[str, type[nn.Module]] = {}
M = TypeVar("M", bound=type[nn.Module])


def module_type(name: str) -> Callable[[M], M]:
    """Class decorator: register an upscaled module type under ``name``."""

    def decorate(cls: M) -> M:
        taken = _TYPES.get(name)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"upscaled module type {name!r} is already taken by {taken.__qualname__}"
            )
        cls.module_type = name
        _TYPES[name] = cls
        return cls

    return decorate


@module_type("removed")
class Removed(nn.Identity):
    """Stands where a layer was folded into another module (WEMoE's second MLP linear)."""

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def empty(cls, config: Mapping[str, Any], shared: dict[str, Any]) -> Removed:
        return cls()


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root`` (the parent must exist)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """The swaps in ``model``: ``[{"path", "type", "config"}]`` in module order (outermost only)."""
    entries: list[dict[str, Any]] = []
    for path, module in model.named_modules():
        name = getattr(type(module), "module_type", None)
        if name is None or name not in _TYPES or type(module) is not _TYPES[name]:
            continue
        if any(path.startswith(e["path"] + ".") for e in entries):
            continue  # inside a swapped module: rebuilt by it
        entries.append({"path": path, "type": name, "config": module.config()})
    return entries


def rebuild(model: nn.Module, structure: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Apply the swaps of ``describe`` to ``model`` (in place) with empty modules; returns it."""
    shared: dict[str, Any] = {}
    for entry in structure:
        kind = entry.get("type")
        if kind not in _TYPES:
            raise ValueError(
                f"unknown upscaled module type {kind!r} at {entry.get('path')!r}; "
                f"known: {', '.join(sorted(_TYPES))}"
            )
        try:
            model.get_submodule(entry["path"])
        except AttributeError as err:
            raise ValueError(
                f"the model has no module {entry['path']!r} to replace: {err}"
            ) from None
        set_submodule(model, entry["path"], _TYPES[kind].empty(entry["config"], shared))
    return model
