"""Declared hyperparameters: each one's type, default, allowed values and doc, written once.

An aggregator (or an attack, or a merge function) declares its hyperparameters as a frozen
dataclass whose fields are made with ``hyperparameter``::

    @dataclass(frozen=True)
    class Params:
        mu: float = hyperparameter(0.01, "proximal weight μ; 0 = plain FedAvg", ge=0)
        fusion: str = hyperparameter("moment", "how scopes are fused", choices=("moment", "mean"))

The checks are generated from the declaration (``check``): the field's annotation gives the type
(``int``, ``float``, ``bool``, ``str``, optionally ``| None``), ``ge``/``gt``/``le``/``lt`` a range,
``choices`` the allowed values, ``also`` extra values outside the range (``-1`` = "dense").
A bad value is a ``HyperparameterError`` naming the owner, the parameter, the value and what is
allowed; ``describe`` lists the declaration for ``fedmerge list --aggregator NAME``.
Cross-parameter constraints are not declared: the owner checks them after ``check``.

This is the same idea as the experiment config's ``_f(default, doc)`` fields (the doc lives in
the field's metadata under ``"doc"``), with the allowed values added. No flwr or ray here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Bounds",
    "HyperparameterError",
    "ParamSpec",
    "check",
    "check_fields",
    "check_value",
    "describe",
    "field_bounds",
    "format_specs",
    "hyperparameter",
    "is_declaration",
]

_MISSING = dataclasses.MISSING


class HyperparameterError(ValueError):
    """A declared hyperparameter got a value it does not allow.

    ``str()`` is ``"<owner>: <name>=<value> is invalid: must be <rule>"``; the parts stay
    available so a caller (``create_aggregator``) can name the owner its own way.
    """

    def __init__(self, owner: str, name: str, value: Any, rule: str) -> None:
        self.owner, self.name, self.value, self.rule = owner, name, value, rule
        super().__init__(f"{owner + ': ' if owner else ''}{self.detail}")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses processes (Ray) with its parts
        return (type(self), (self.owner, self.name, self.value, self.rule))

    @property
    def detail(self) -> str:
        """The message without the owner: ``"<name>=<value> is invalid: must be <rule>"``."""
        return f"{self.name}={_shown(self.value)} is invalid: must be {self.rule}"


@dataclass(frozen=True)
class Bounds:
    """What ``hyperparameter`` was given besides the default and the doc (``field_bounds``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    also: tuple[Any, ...] = ()


def hyperparameter(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    also: Sequence[Any] = (),
) -> Any:
    """A dataclass field for one hyperparameter: its default, a one-line doc and what it allows.

    ``default`` may be ``dataclasses.MISSING`` for a required parameter. ``ge``/``gt`` and
    ``le``/``lt`` bound a number (at most one of each pair); ``choices`` lists every allowed
    value; ``also`` adds values allowed outside the bounds (e.g. ``-1`` for "dense").
    """
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("hyperparameter: give at most one of ge/gt and one of le/lt")
    bounds = Bounds(
        ge=ge,
        gt=gt,
        le=le,
        lt=lt,
        also=tuple(also),
        choices=None if choices is None else tuple(choices),
    )
    metadata = {"doc": doc, "bounds": bounds}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ParamSpec:
    """One declared hyperparameter as plain text, for listings: name, type, default, rule, doc."""

    name: str
    type: str
    default: str
    allowed: str
    doc: str
    required: bool = False


def is_declaration(obj: Any) -> bool:
    """Whether ``obj`` is a hyperparameter declaration (a dataclass class)."""
    return isinstance(obj, type) and dataclasses.is_dataclass(obj)


def _hints(params: type) -> dict[str, Any]:
    return typing.get_type_hints(params)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type a value must have, whether None is allowed too) of a field annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else annotation), optional
    return annotation, False


def _element_type(tp: Any) -> Any | None:
    """The element type of a ``tuple[X, ...]`` field (a list of values in a config), else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def _type_name(tp: Any, optional: bool) -> str:
    element = _element_type(tp)
    if element is not None:
        name = f"list of {_type_name(element, False)}"
    else:
        name = "any" if tp is Any else getattr(tp, "__name__", str(tp))
    return f"{name} | None" if optional else name


def _interval(b: Bounds) -> str:
    low = b.ge if b.ge is not None else b.gt
    high = b.le if b.le is not None else b.lt
    if low is not None and high is not None:
        opening, closing = "[" if b.ge is not None else "(", "]" if b.le is not None else ")"
        return f"in {opening}{_num(low)}, {_num(high)}{closing}"
    parts = []
    if low is not None:
        parts.append(f"{'>=' if b.ge is not None else '>'} {_num(low)}")
    if high is not None:
        parts.append(f"{'<=' if b.le is not None else '<'} {_num(high)}")
    return " ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


def _rule(tp: Any, optional: bool, b: Bounds) -> str:
    """What a field allows, as the end of "must be ..."."""
    element = _element_type(tp)
    if element is not None:
        text = "a list whose items are each " + _rule(element, False, b)
        return text + (", or None (unset)" if optional else "")
    if b.choices is not None:
        text = "one of " + ", ".join(str(c) for c in b.choices)
    elif tp is bool:
        text = "true or false"
    elif tp is int or tp is float:
        noun = "an integer" if tp is int else "a number"
        interval = _interval(b)
        text = (
            f"{noun} {interval}" if interval else ("an integer" if tp is int else "a finite number")
        )
    elif tp is str:
        text = "a string"
    elif tp is Any:
        text = "any value"
    else:
        text = f"a {_type_name(tp, False)}"
    extra = [repr(v) for v in b.also] + (["None (unset)"] if optional else [])
    return text + "".join(f", or {v}" for v in extra)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text):,} characters)"


def _fields(params: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(params))


def _bounds(f: dataclasses.Field) -> Bounds:
    b = f.metadata.get("bounds")
    return b if isinstance(b, Bounds) else Bounds()


def field_bounds(params: type, name: str) -> tuple[Any, bool, Bounds]:
    """(type, whether None is allowed, bounds) of the declared field ``name``."""
    field = {f.name: f for f in _fields(params)}[name]
    tp, optional = _base_type(_hints(params)[name])
    return tp, optional, _bounds(field)


def _checked(owner: str, name: str, tp: Any, optional: bool, b: Bounds, value: Any) -> Any:
    """``value`` as the field's type (an int given for a float becomes a float), or the error."""
    if value is None and optional:
        return None
    element = _element_type(tp)
    if element is not None:  # a list in TOML: each item checked against the element type
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise HyperparameterError(owner, name, value, _rule(tp, optional, b))
        return tuple(
            _checked(owner, f"{name}[{i}]", element, False, b, item) for i, item in enumerate(value)
        )
    if any(value == v and type(value) is type(v) for v in b.also):
        return value
    rule = _rule(tp, optional, b)
    fail = HyperparameterError(owner, name, value, rule)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail
    elif tp is int or tp is float:
        if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if tp is int else numbers.Real
        ):
            raise fail
        value = int(value) if tp is int else float(value)
        if not math.isfinite(value):
            raise fail
        if (
            (b.ge is not None and not value >= b.ge)
            or (b.gt is not None and not value > b.gt)
            or (b.le is not None and not value <= b.le)
            or (b.lt is not None and not value < b.lt)
        ):
            raise fail
    elif tp is str:
        if not isinstance(value, str):
            raise fail
    if b.choices is not None and not any(value == c and type(value) is type(c) for c in b.choices):
        raise fail
    return value


def check_value(owner: str, params: type, name: str, value: Any) -> Any:
    """One value checked against the declared field ``name`` of ``params`` (see ``check``)."""
    field = {f.name: f for f in _fields(params)}[name]
    tp, optional = _base_type(_hints(params)[name])
    return _checked(owner, name, tp, optional, _bounds(field), value)


def check_fields(owner: str, obj: Any) -> dict[str, Any]:
    """Every field of the declaration instance ``obj`` checked, as {name: value of the field's
    type}: for a declaration that checks itself in ``__post_init__`` (``AttackConfig``)."""
    hints = _hints(type(obj))
    out = {}
    for f in _fields(type(obj)):
        tp, optional = _base_type(hints[f.name])
        out[f.name] = _checked(owner, f.name, tp, optional, _bounds(f), getattr(obj, f.name))
    return out


def check(owner: str, params: type, values: Mapping[str, Any]) -> Any:
    """An instance of the declaration ``params`` from keyword ``values``, every value checked.

    An unknown name is a TypeError naming it, with a "did you mean" and the accepted names (as
    Python's own for an unexpected keyword); a missing required one a TypeError too; a bad value
    a ``HyperparameterError``. Defaults are not re-checked (the declaration's author chose them).
    """
    fields = _fields(params)
    names = [f.name for f in fields]
    for key in values:
        if key not in names:
            text = str(key)
            close = difflib.get_close_matches(text, names, n=1) if len(text) <= 100 else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"{owner + ' ' if owner else ''}has no parameter {_shown(key)}{hint}; "
                f"it accepts: {', '.join(names) or '(no parameters)'}"
            )
    missing = [
        f.name
        for f in fields
        if f.name not in values and f.default is _MISSING and f.default_factory is _MISSING
    ]
    if missing:
        raise TypeError(
            f"{owner + ': ' if owner else ''}missing a required argument: {missing[0]!r}"
        )
    hints = _hints(params)
    kwargs = {}
    for f in fields:
        if f.name in values:
            tp, optional = _base_type(hints[f.name])
            kwargs[f.name] = _checked(owner, f.name, tp, optional, _bounds(f), values[f.name])
    return params(**kwargs)


def describe(params: type) -> list[ParamSpec]:
    """The declaration's fields in order, as text: what ``fedmerge list --aggregator`` prints."""
    hints = _hints(params)
    out = []
    for f in _fields(params):
        tp, optional = _base_type(hints[f.name])
        required = f.default is _MISSING and f.default_factory is _MISSING
        default = (
            "(required)"
            if required
            else repr(f.default if f.default is not _MISSING else f.default_factory())
        )
        out.append(
            ParamSpec(
                name=f.name,
                type=_type_name(tp, optional),
                default=default,
                allowed=_rule(tp, optional, _bounds(f)),
                doc=f.metadata.get("doc", ""),
                required=required,
            )
        )
    return out


def format_specs(specs: Sequence[ParamSpec]) -> str:
    """One aligned line per parameter: name, type, default, allowed values, doc."""
    if not specs:
        return "(no hyperparameters)"
    rows = [("name", "type", "default", "allowed", "doc")]
    rows += [(s.name, s.type, s.default, s.allowed, s.doc) for s in specs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        ("  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4]).rstrip()
        for r in rows
    )
