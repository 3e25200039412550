"""Client-side loss terms that an aggregator asks its clients to add to their local objective.

An aggregator's ``client_config(round)`` may return ``{"terms": [spec, ...]}`` where each spec is
a JSON-serialisable ``{"term": name, **params}``. The client builds the terms with
``build_terms(specs, model, global_state)`` right after loading the round's global model and
passes them to ``fedmerge.clients.training.train(..., loss_terms=...)``, which adds each term's value to
the task loss at every step. A term is made by a factory registered with ``@register_term``:
``factory(model, global_state, **params) -> LossTerm``, where ``global_state`` is the received
global model (detached copies) and ``params`` are the spec's other keys, checked against the
factory's signature. A factory that declares the keyword ``aggregator_arrays`` also receives
the tensors the aggregator sent this client (``Aggregator.client_arrays``; None when none came),
which no spec may set. Factories live next to the aggregator that uses them (FedProx, WSA); the
built-ins register when the ``aggregators`` package is imported.

Pure torch: no flwr or ray.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from fedmerge.plugins import PluginError, Registry, qualified

__all__ = [
    "ENTRY_POINT_GROUP",
    "TERMS",
    "LossTerm",
    "TermFactory",
    "available_terms",
    "build_terms",
    "register_term",
]

# The same contract as fedmerge.clients.training.LossTerm: a differentiable scalar computed from the model.
LossTerm = Callable[[nn.Module], torch.Tensor]
TermFactory = Callable[..., LossTerm]

F = TypeVar("F", bound=TermFactory)

ENTRY_POINT_GROUP = "fedmerge.loss_terms"


ARRAYS_KEYWORD = "aggregator_arrays"
"""The factory keyword that receives the aggregator's per-client tensors, never a spec's."""


def _hyperparameters(factory: TermFactory) -> dict[str, inspect.Parameter]:
    """The factory's parameters after (model, global_state): what a spec may set."""
    params = dict(list(inspect.signature(factory).parameters.items())[2:])
    params.pop(ARRAYS_KEYWORD, None)
    return params


def _takes_arrays(factory: TermFactory) -> bool:
    return ARRAYS_KEYWORD in inspect.signature(factory).parameters


def _checked_factory(obj: Any, where: str) -> TermFactory:
    if not callable(obj):
        raise PluginError(f"{where} is {obj!r}, not a factory(model, global_state, **params)")
    params = list(inspect.signature(obj).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) < 2 or any(p.kind not in positional for p in params[:2]):
        raise PluginError(
            f"{where} must take (model, global_state) positionally, then its parameters"
        )
    return obj


TERMS: Registry[TermFactory] = Registry(
    "client term",
    ENTRY_POINT_GROUP,
    accept=_checked_factory,
    how_to=(
        'To plug one in: decorate factory(model, global_state, **params) with @register_term("name") '
        "in the module of the aggregator that asks for it (or one listed in [run] plugins), or "
        f'expose it under the entry-point group "{ENTRY_POINT_GROUP}".'
    ),
)


def register_term(name: str) -> Callable[[F], F]:
    """Function decorator: make ``factory(model, global_state, **params)`` the term ``name``.

    A second factory under a taken name is a ValueError naming both; the same function (same
    module and qualified name, e.g. after a module reload) may register again.
    """

    def decorator(factory: F) -> F:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"cannot register {qualified(factory)} under {name!r}: "
                "a term name is a non-empty string"
            )
        try:
            TERMS.add(name, factory)
        except PluginError as exc:
            raise TypeError(f"@register_term({name!r}): {exc}") from None
        return factory

    return decorator


def available_terms() -> list[str]:
    """The registered and installed term names, sorted."""
    return TERMS.available()


def _build(
    index: int,
    spec: Any,
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    arrays: Mapping[str, torch.Tensor] | None,
) -> LossTerm:
    where = f"client term {index}"
    if not isinstance(spec, Mapping) or "term" not in spec:
        raise ValueError(f'{where}: a spec is a mapping {{"term": name, **params}}, got {spec!r}')
    name = spec["term"]
    try:
        factory = TERMS.resolve(name)
    except PluginError as exc:
        raise ValueError(f"{where}: {exc}") from None
    params = {k: v for k, v in spec.items() if k != "term"}
    if ARRAYS_KEYWORD in params:
        raise ValueError(
            f"{where} ({name!r}): {ARRAYS_KEYWORD!r} comes from the server, not a spec"
        )
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
    if _takes_arrays(factory):
        params[ARRAYS_KEYWORD] = arrays
    try:
        return factory(model, global_state, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label}: {exc}") from exc


def build_terms(
    specs: Sequence[Mapping[str, Any]],
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    aggregator_arrays: Mapping[str, torch.Tensor] | None = None,
) -> list[LossTerm]:
    """One ``LossTerm`` per spec, in order; a ValueError names an unknown term or parameter.

    ``global_state`` is the model the client received this round (the round's θt), as detached
    tensors that the terms may keep as constants; ``aggregator_arrays`` the aggregator's tensors
    for this client (from the network: the factories that take them validate them).
    """
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"client terms must be a list of specs, got {type(specs).__name__}")
    return [_build(i, spec, model, global_state, aggregator_arrays) for i, spec in enumerate(specs)]
