"""Client-side loss terms that an aggregator asks its clients to add to their local objective.

An aggregator's ``client_config(round)`` may return ``{"terms": [spec, ...]}`` where each spec is
a JSON-serialisable ``{"term": name, **params}``. The client builds the terms with
``build_terms(specs, model, global_state)`` right after loading the round's global model and
passes them to ``fedmerge.clients.training.train(..., loss_terms=...)``, which adds each term's value to
the task loss at every step. A term is made by a factory registered with ``@register_term``:
``factory(model, global_state, **params) -> LossTerm``, where ``global_state`` is the received
global model (detached copies) and ``params`` are the spec's other keys, checked against the
factory's signature. Factories live next to the aggregator that uses them (FedProx, WSA); the
built-ins register when the ``aggregators`` package is imported.

Pure torch: no flwr or ray.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["LossTerm", "TermFactory", "available_terms", "build_terms", "register_term"]

# The same contract as fedmerge.clients.training.LossTerm: a differentiable scalar computed from the model.
LossTerm = Callable[[nn.Module], torch.Tensor]
TermFactory = Callable[..., LossTerm]

F = TypeVar("F", bound=TermFactory)

_TERMS: dict[str, TermFactory] = {}


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _hyperparameters(factory: TermFactory) -> dict[str, inspect.Parameter]:
    """The factory's parameters after (model, global_state): what a spec may set."""
    return dict(list(inspect.signature(factory).parameters.items())[2:])


def register_term(name: str) -> Callable[[F], F]:
    """Function decorator: make ``factory(model, global_state, **params)`` the term ``name``.

    A second factory under a taken name is a ValueError naming both; the same function (same
    module and qualified name, e.g. after a module reload) may register again.
    """

    def decorator(factory: F) -> F:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"cannot register {_qualified(factory)} under {name!r}: "
                "a term name is a non-empty string"
            )
        params = list(inspect.signature(factory).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if len(params) < 2 or any(p.kind not in positional for p in params[:2]):
            raise TypeError(
                f"@register_term({name!r}): {_qualified(factory)} must take "
                "(model, global_state) positionally, then its parameters"
            )
        taken = _TERMS.get(name)
        if taken is not None and _qualified(taken) != _qualified(factory):
            raise ValueError(
                f"client term {name!r} is already registered by {_qualified(taken)}; "
                f"cannot register {_qualified(factory)} under it"
            )
        _TERMS[name] = factory
        return factory

    return decorator


def available_terms() -> list[str]:
    """The registered term names, sorted."""
    return sorted(_TERMS)


def _build(
    index: int, spec: Any, model: nn.Module, global_state: Mapping[str, torch.Tensor]
) -> LossTerm:
    where = f"client term {index}"
    if not isinstance(spec, Mapping) or "term" not in spec:
        raise ValueError(f'{where}: a spec is a mapping {{"term": name, **params}}, got {spec!r}')
    name = spec["term"]
    factory = _TERMS.get(name) if isinstance(name, str) else None
    if factory is None:
        close = difflib.get_close_matches(str(name), list(_TERMS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{where}: unknown client term {name!r}.{hint} "
            f"Available: {', '.join(available_terms()) or '(none)'}"
        )
    params = {k: v for k, v in spec.items() if k != "term"}
    accepted = _hyperparameters(factory)
    label = f"{where} ({name!r})"
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        for key in params:
            if key not in accepted:
                raise ValueError(
                    f"{label} has no parameter {key!r}; it accepts: "
                    f"{', '.join(accepted) or '(no parameters)'}"
                )
    missing = [
        k
        for k, p in accepted.items()
        if p.default is p.empty and p.kind is not p.VAR_KEYWORD and k not in params
    ]
    if missing:
        raise ValueError(f"{label} is missing parameter {missing[0]!r}")
    try:
        return factory(model, global_state, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label}: {exc}") from exc


def build_terms(
    specs: Sequence[Mapping[str, Any]], model: nn.Module, global_state: Mapping[str, torch.Tensor]
) -> list[LossTerm]:
    """One ``LossTerm`` per spec, in order; a ValueError names an unknown term or parameter.

    ``global_state`` is the model the client received this round (the round's θt), as detached
    tensors that the terms may keep as constants.
    """
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"client terms must be a list of specs, got {type(specs).__name__}")
    return [_build(i, spec, model, global_state) for i, spec in enumerate(specs)]
