"""Find an aggregator by name: the registry, an import path, or a ``fedmerge.aggregators`` plugin.

An experiment's ``[aggregator] name`` is resolved, in this order, as
1. a name registered with ``@register`` (an Aggregator subclass) or ``@merge_function`` (a pure
   function over state dicts) in a module that has been imported (the built-ins are);
2. an import path ``package.module:ClassName`` to an Aggregator subclass, no registration needed;
3. an entry point in the ``fedmerge.aggregators`` group of an installed distribution, so another
   package can add aggregators without touching this one.
``create_aggregator`` then checks the configured keyword arguments against the class's declared
``Params`` (``fedmerge.aggregators.params``; the built-ins all declare theirs) or, for a class
without one, its ``__init__``, so that a misspelt hyperparameter fails with its name instead of
being ignored and a bad value names the parameter and what it allows.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    declared_params,
    example_weights,
)
from fedmerge.aggregators.params import (
    HyperparameterError,
    ParamSpec,
    describe,
    hyperparameter,
    is_declaration,
)
from fedmerge.plugins import Registry, concrete_subclass, qualified

__all__ = [
    "AGGREGATORS",
    "ENTRY_POINT_GROUP",
    "aggregator_params",
    "available",
    "create_aggregator",
    "get_aggregator_class",
    "merge_function",
    "register",
]

ENTRY_POINT_GROUP = "fedmerge.aggregators"

A = TypeVar("A", bound=type[Aggregator])
MergeFn = Callable[..., Mapping[str, torch.Tensor]]
F = TypeVar("F", bound=MergeFn)

_HOW_TO_PLUG_IN = (
    'To plug one in: (1) decorate an Aggregator subclass with @fedmerge.register("name") '
    '(or a function over state dicts with @fedmerge.merge_function("name")) in a module that '
    'gets imported (list it in [run] plugins); (2) give its import path, "package.module:ClassName"; '
    f'or (3) expose it from an installed package under the entry-point group "{ENTRY_POINT_GROUP}".'
)


AGGREGATORS: Registry[type[Aggregator]] = Registry(
    "aggregator",
    ENTRY_POINT_GROUP,
    accept=concrete_subclass(Aggregator, "an aggregators.Aggregator subclass"),
    how_to=_HOW_TO_PLUG_IN,
)
"""Every aggregator by name: the built-ins register when ``fedmerge.aggregators`` is imported."""


def register(name: str | None = None) -> Callable[[A], A]:
    """Class decorator: make an Aggregator subclass available under ``name`` (default ``cls.name``).

    A class without a ``name`` of its own takes the registered one. Registering a second class
    under a taken name is a ValueError naming both; the same class (same module and qualified
    name, e.g. after a module reload) may register again and replaces the old entry.
    """

    def decorator(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            raise TypeError(f"@register expects an Aggregator subclass, got {cls!r}")
        key = cls.name if name is None else name
        if not isinstance(key, str) or not key.strip() or ":" in key:
            raise ValueError(
                f"cannot register {qualified(cls)} under {key!r}: a name is a non-empty string "
                "without ':' (given to @register or as the class attribute `name`)"
            )
        AGGREGATORS.add(key, cls)
        if not cls.name:
            cls.name = key
        return cls

    return decorator


def merge_function(name: str, *, params: type | None = None) -> Callable[[F], F]:
    """Function decorator: register ``fn(states, weights, **params) -> state`` as an aggregator.

    ``states`` are the round's client state dicts in arrival order and ``weights`` their example
    counts normalised to sum to 1. The function's remaining parameters are its hyperparameters,
    keyword-only: ``params`` declares them (a frozen dataclass of ``hyperparameter`` fields with
    the same names, giving each a doc and its allowed values), else a declaration is made from
    the signature (annotation as type, default as default, no range, no doc). The registered
    Aggregator checks its keywords against it and its ``aggregate`` calls the function. The
    function itself is returned unchanged.
    """

    def decorator(fn: F) -> F:
        signature = inspect.signature(fn)
        items = list(signature.parameters.values())
        leading = [p for p in items[:2] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        rest = items[2:]
        if len(leading) < 2 or any(
            p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in rest
        ):
            raise TypeError(
                f"@merge_function({name!r}): {fn.__qualname__} must take (states, weights) "
                "positionally and its hyperparameters as keywords (no **kwargs)"
            )
        if params is None:
            declaration = _declaration_from(fn, rest)
        else:
            if not is_declaration(params):
                raise TypeError(
                    f"@merge_function({name!r}): params must be a dataclass, got {params!r}"
                )
            declared = [f.name for f in dataclasses.fields(params)]
            if declared != [p.name for p in rest]:
                raise TypeError(
                    f"@merge_function({name!r}): params declares {declared} but "
                    f"{fn.__qualname__} takes {[p.name for p in rest]}"
                )
            declaration = params

        def __init__(self: Aggregator, **kwargs: Any) -> None:
            Aggregator.__init__(self)
            checked = self.set_hyperparameters(kwargs)
            self.params = {f.name: getattr(checked, f.name) for f in dataclasses.fields(checked)}

        def aggregate(
            self: Aggregator, ctx: RoundContext, updates: Sequence[ClientUpdate]
        ) -> AggregateResult:
            weights = example_weights(updates)
            state = fn([u.state for u in updates], weights, **self.params)
            return AggregateResult(
                state=dict(state),
                metrics={
                    "num_clients": len(updates),
                    "num_examples": sum(u.num_examples for u in updates),
                },
            )

        cls_name = f"MergeFunction[{fn.__qualname__}]"
        cls = type(
            cls_name,
            (Aggregator,),
            {
                "name": name,
                "Params": declaration,
                "__init__": __init__,
                "aggregate": aggregate,
                "__doc__": fn.__doc__,
                "__module__": fn.__module__,
                "__qualname__": cls_name,
            },
        )
        register(name)(cls)
        return fn

    return decorator


def _declaration_from(fn: Callable[..., Any], keywords: Sequence[inspect.Parameter]) -> type:
    """A frozen dataclass of ``fn``'s keyword parameters: annotation, default, no range or doc."""
    hints = typing.get_type_hints(fn)
    spec = []
    for p in keywords:
        tp = hints.get(p.name, Any)
        default = dataclasses.MISSING if p.default is p.empty else p.default
        spec.append((p.name, tp, hyperparameter(default, "")))
    return dataclasses.make_dataclass(f"{fn.__name__}_params", spec, frozen=True, kw_only=True)


def available() -> list[str]:
    """Registered names and installed entry-point names, sorted (import paths are open-ended)."""
    return AGGREGATORS.available()


def get_aggregator_class(spec: str) -> type[Aggregator]:
    """Resolve ``spec``: a registered name, then a ``module:Class`` path, then an entry point."""
    return AGGREGATORS.resolve(spec)


def create_aggregator(spec: str, params: Mapping[str, Any]) -> Aggregator:
    """Instantiate the aggregator ``spec`` names with ``params`` as keyword arguments.

    Parameter names are checked against its signature first (its ``Params`` when it declares
    one, else its ``__init__``), so an unknown one is reported by name with the accepted ones; a
    declared parameter's bad value comes back as ``aggregator 'name': key=value is invalid: must
    be ...``; a missing one or a constructor's own ValueError/TypeError as a ValueError naming
    the aggregator.
    """
    cls = get_aggregator_class(spec)
    label = f"aggregator {spec!r}"
    if spec != cls.name:
        label += f" ({cls.name or cls.__qualname__})"
    signature = inspect.signature(cls)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    accepted = [
        n
        for n, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if not accepts_any:
        for key in params:
            if key not in accepted:
                close = (
                    difflib.get_close_matches(str(key), accepted, n=1)
                    if len(str(key)) <= 100
                    else []
                )
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                shown = (
                    repr(key)
                    if len(str(key)) <= 80
                    else f"{str(key)[:80]!r}... ({len(str(key)):,} characters)"
                )
                raise ValueError(
                    f"{label} has no parameter {shown}{hint}; it accepts: "
                    f"{', '.join(accepted) or '(no parameters)'}"
                )
    try:
        signature.bind(**params)
    except TypeError as exc:
        raise ValueError(f"{label}: {exc}; it accepts: {', '.join(accepted)}") from exc
    try:
        return cls(**params)
    except HyperparameterError as exc:  # a declared parameter's value: name it under this label
        raise ValueError(f"{label}: {exc.detail}") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label}: invalid parameters: {exc}") from exc


def aggregator_params(spec: str) -> list[ParamSpec]:
    """The declared hyperparameters of the aggregator ``spec`` names (``fedmerge list
    --aggregator``): from its ``Params``, or, for a class without one, from its ``__init__``
    keywords (type from the annotation, no range, no doc)."""
    cls = get_aggregator_class(spec)
    params = declared_params(cls)
    if params is not None:
        return describe(params)
    out = []
    for name, p in inspect.signature(cls).parameters.items():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        annotation = p.annotation if p.annotation is not p.empty else ""
        required = p.default is p.empty
        out.append(
            ParamSpec(
                name=name,
                type=getattr(annotation, "__name__", str(annotation)),
                default="(required)" if required else repr(p.default),
                allowed="(not declared)",
                doc="",
                required=required,
            )
        )
    return out
