"""Find an aggregator by name: the registry, an import path, or a ``fedmerge.aggregators`` plugin.

An experiment's ``[aggregator] name`` is resolved, in this order, as
1. a name registered with ``@register`` (an Aggregator subclass) or ``@merge_function`` (a pure
   function over state dicts) in a module that has been imported (the built-ins are);
2. an import path ``package.module:ClassName`` to an Aggregator subclass, no registration needed;
3. an entry point in the ``fedmerge.aggregators`` group of an installed distribution, so another
   package can add aggregators without touching this one.
``create_aggregator`` then checks the configured keyword arguments against the class's
``__init__`` so that a misspelt hyperparameter fails with its name instead of being ignored.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import torch

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    example_weights,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "available",
    "create_aggregator",
    "get_aggregator_class",
    "merge_function",
    "register",
]

ENTRY_POINT_GROUP = "fedmerge.aggregators"

_REGISTRY: dict[str, type[Aggregator]] = {}

A = TypeVar("A", bound=type[Aggregator])
MergeFn = Callable[..., Mapping[str, torch.Tensor]]
F = TypeVar("F", bound=MergeFn)

_HOW_TO_PLUG_IN = (
    "To plug one in: (1) decorate an Aggregator subclass with @aggregators.register(\"name\") "
    "(or a function over state dicts with @aggregators.merge_function(\"name\")) in a module that "
    "gets imported; (2) give its import path, \"package.module:ClassName\"; or (3) expose it from "
    f"an installed package under the entry-point group \"{ENTRY_POINT_GROUP}\"."
)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
                f"cannot register {_qualified(cls)} under {key!r}: a name is a non-empty string "
                "without ':' (given to @register or as the class attribute `name`)"
            )
        taken = _REGISTRY.get(key)
        if taken is not None and _qualified(taken) != _qualified(cls):
            raise ValueError(
                f"aggregator name {key!r} is already registered by {_qualified(taken)}; "
                f"cannot register {_qualified(cls)} under it"
            )
        if not cls.name:
            cls.name = key
        _REGISTRY[key] = cls
        return cls

    return decorator


def merge_function(name: str) -> Callable[[F], F]:
    """Function decorator: register ``fn(states, weights, **params) -> state`` as an aggregator.

    ``states`` are the round's client state dicts in arrival order and ``weights`` their example
    counts normalised to sum to 1. The registered Aggregator's ``__init__`` takes the function's
    remaining parameters as keywords (so configs are checked against them) and its ``aggregate``
    calls the function. The function itself is returned unchanged.
    """

    def decorator(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())
        leading = [p for p in params[:2] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        rest = params[2:]
        if len(leading) < 2 or any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in rest):
            raise TypeError(
                f"@merge_function({name!r}): {fn.__qualname__} must take (states, weights) "
                "positionally and its hyperparameters as keywords"
            )
        hyper = [p if p.kind is p.VAR_KEYWORD else p.replace(kind=p.KEYWORD_ONLY) for p in rest]
        init_signature = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *hyper]
        )

        def __init__(self: Aggregator, **kwargs: Any) -> None:
            init_signature.bind(self, **kwargs)  # TypeError on unknown or missing hyperparameters
            Aggregator.__init__(self)
            self.params = dict(kwargs)

        __init__.__signature__ = init_signature  # type: ignore[attr-defined]

        def aggregate(self: Aggregator, ctx: RoundContext,
                      updates: Sequence[ClientUpdate]) -> AggregateResult:
            weights = example_weights(updates)
            state = fn([u.state for u in updates], weights, **self.params)
            return AggregateResult(
                state=dict(state),
                metrics={"num_clients": len(updates),
                         "num_examples": sum(u.num_examples for u in updates)},
            )

        cls_name = f"MergeFunction[{fn.__qualname__}]"
        cls = type(cls_name, (Aggregator,), {
            "name": name,
            "__init__": __init__,
            "aggregate": aggregate,
            "__doc__": fn.__doc__,
            "__module__": fn.__module__,
            "__qualname__": cls_name,
        })
        register(name)(cls)
        return fn

    return decorator


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Registered names and installed entry-point names, sorted (import paths are open-ended)."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _checked_class(obj: Any, where: str) -> type[Aggregator]:
    if not (isinstance(obj, type) and issubclass(obj, Aggregator)):
        raise ValueError(f"{where} is {obj!r}, not an aggregators.Aggregator subclass")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise ValueError(
            f"{where} ({_qualified(obj)}) is abstract: it does not implement {missing}"
        )
    return obj


def _from_path(spec: str) -> type[Aggregator]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"aggregator path {spec!r} must look like \"package.module:ClassName\"")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"aggregator path {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(f"aggregator path {spec!r}: {part!r} not found in {obj!r}") from exc
    return _checked_class(obj, f"aggregator path {spec!r}")


def _from_entry_point(ep: EntryPoint) -> type[Aggregator]:
    dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
    where = f"entry point {ep.name!r} ({ep.value}, from {dist})"
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must name itself, whatever it raised
        raise ValueError(f"cannot load {where}: {type(exc).__name__}: {exc}") from exc
    return _checked_class(obj, where)


def get_aggregator_class(spec: str) -> type[Aggregator]:
    """Resolve ``spec``: a registered name, then a ``module:Class`` path, then an entry point."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        return _from_path(spec)
    eps = _entry_points()
    if spec in eps:
        return _from_entry_point(eps[spec])
    names = sorted(set(_REGISTRY) | set(eps))
    # difflib's cost is the product of the lengths: a huge name is no typo and is not searched.
    close = difflib.get_close_matches(spec, names, n=1) if len(spec) <= 100 else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    shown = repr(spec) if len(spec) <= 80 else f"{spec[:80]!r}... ({len(spec):,} characters)"
    raise ValueError(
        f"unknown aggregator {shown}.{hint} Available: {', '.join(names) or '(none)'}. "
        + _HOW_TO_PLUG_IN
    )


def create_aggregator(spec: str, params: Mapping[str, Any]) -> Aggregator:
    """Instantiate the aggregator ``spec`` names with ``params`` as keyword arguments.

    Parameter names are checked against its ``__init__`` first, so an unknown one is reported by
    name with the accepted ones; a missing one or a constructor's own ValueError/TypeError comes
    back as a ValueError naming the aggregator.
    """
    cls = get_aggregator_class(spec)
    label = f"aggregator {spec!r}"
    if spec != cls.name:
        label += f" ({cls.name or cls.__qualname__})"
    signature = inspect.signature(cls)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    accepted = [n for n, p in signature.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not accepts_any:
        for key in params:
            if key not in accepted:
                close = difflib.get_close_matches(str(key), accepted, n=1) if len(str(key)) <= 100 else []
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                shown = repr(key) if len(str(key)) <= 80 else f"{str(key)[:80]!r}... ({len(str(key)):,} characters)"
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
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label}: invalid parameters: {exc}") from exc
