"""Property-based config robustness: random keys, random-typed values and random ``--set`` strings.

Whatever is thrown at ``parse_config`` / ``apply_overrides``, the outcome is a valid
``ExperimentConfig`` (which survives a round trip through TOML) or a ``ConfigError`` whose message
names a key the input contained: never another exception, never a silent default.
"""

from __future__ import annotations

import datetime
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedmerge.federation.config import (
    ConfigError,
    ExperimentConfig,
    _short,
    apply_overrides,
    describe_fields,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "experiments" / "fashion_mnist_fedavg.toml"

FIELDS = {key: default for key, default, _ in describe_fields() if key != "aggregator.params"}
SECTIONS = sorted({key.rsplit(".", 1)[0] for key in FIELDS if "." in key} | {"aggregator"})
CHOICES = [
    "digits",
    "fashion_mnist",
    "iid",
    "dirichlet",
    "pathological",
    "sgd",
    "adam",
    "fedavg",
    "x",
    "",
]

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values of every type a TOML file or a Python caller can produce, odd ones included.
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=12),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**70),
    st.floats(min_value=-1.0, max_value=2.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(CHOICES),
    st.text(max_size=8),
    st.none(),
    st.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2100, 1, 1)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=5), inner, max_size=3),
    ),
    max_leaves=6,
)
names = st.one_of(st.sampled_from(sorted(FIELDS) + SECTIONS), st.text(max_size=10))


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


@st.composite
def raw_configs(draw) -> dict[str, Any]:
    """Nested dicts built from real keys (some with fitting values, some with anything) plus unknown keys."""
    raw: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=8, unique=True)):
        default = FIELDS[key]
        fitting = (
            st.just(default)
            if isinstance(default, (bool, str, dict))
            else st.one_of(st.just(default), st.just(type(default)(1)), st.just(type(default)(0)))
        )
        _set(raw, key, draw(st.one_of(fitting, values)))
    for _ in range(draw(st.integers(0, 2))):
        _set(raw, draw(names), draw(values))
    return raw


def _paths(tree: Any, prefix: str = "") -> set[str]:
    """Every dotted path of a nested dict, sections included."""
    if not isinstance(tree, dict):
        return set()
    out = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.add(path)
        out |= _paths(value, path + ".")
    return out


def _outcome(raw: dict[str, Any], named: set[str]) -> ExperimentConfig | None:
    try:
        config = parse_config(raw)
    except ConfigError as err:
        message = str(err)
        assert (
            any((path and path in message) or f"'{path}'" in message for path in named)
            or "top level" in message
        ), f"{message!r} names none of {sorted(named)}"
        return None
    assert isinstance(config, ExperimentConfig)
    assert (
        parse_config(tomllib.loads(config.to_toml())) == config
    )  # what a run dir stores, it can reload
    return config


@PROFILE
@given(raw_configs())
@example({"data": {"alpha": 10**400}})
@example({"name": "a/b"})
@example({"federation": {"num_rounds": 2**40}})
@example({"ray": {"aggregator": {"resources": {"gpu_node": float("inf")}}}})
def test_random_configs_are_valid_or_named_errors(raw):
    _outcome(raw, _paths(raw))


override_keys = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=12))
override_values = st.one_of(
    st.sampled_from(
        [
            "1",
            "0",
            "-1",
            "0.5",
            "1e400",
            "nan",
            "inf",
            "true",
            "'x'",
            '"digits"',
            "[1, 2]",
            "{a = 1}",
            "{}",
            "",
            "=",
            "1979-05-27",
            "[",
            "x\ny = 2",
        ]
    ),
    st.text(max_size=12),
)
overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), st.text(max_size=15)
    ),
    max_size=4,
)


@PROFILE
@given(overrides)
@example(["federation.num_rounds.x=1"])
@example(["data=3", "data.alpha=1"])
@example(["seed=1e400"])
@example(["0\x1f\x1f\U00011747\U00011af9\U00018cd6\U00018cd6\U00018d09\U0002ebe1\U0002ebe1"])
def test_random_overrides_are_valid_or_named_errors(items):
    base = tomllib.loads(DEFAULT.read_text())
    try:
        raw = apply_overrides(base, items)
    except ConfigError as err:
        # A value whose repr is long (escaped control characters) is quoted cut, as _short cuts it.
        assert any(_short(item) in str(err) for item in items), f"{err} quotes none of {items}"
        return
    named = _paths(raw) | {item.partition("=")[0].strip() for item in items}
    _outcome(raw, named)


def test_every_field_is_documented_in_the_experiment_file():
    """Every key line of the default experiment carries a comment (aggregator params are open)."""
    section = ""
    for line in DEFAULT.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if header := re.match(r"\[([\w.]+)\]", stripped):
            section = header.group(1)
            continue
        key = stripped.split("=", 1)[0].strip()
        assert "#" in stripped, f"{section}.{key} in {DEFAULT.name} has no comment"
    raw = tomllib.loads(DEFAULT.read_text())
    for key in FIELDS:
        node = raw
        for part in key.split("."):
            assert part in node, f"{key} is missing from {DEFAULT.name}"
            node = node[part]


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"data": {"alpha": 10**400}}, "data.alpha"),  # was an OverflowError
        ({"name": "a/b"}, "name"),  # was accepted, then failed when the run folder was made
        ({"name": ".."}, "name"),
        (
            {"data": {"cache_dir": "runs\0x"}},
            "data.cache_dir",
        ),  # was accepted, then a ValueError from os
        (
            {"ray": {"aggregator": {"resources": {"gpu_node": float("inf")}}}},
            "ray.aggregator.resources.gpu_node",
        ),
        (
            {"federation": {"num_rounds": 2**40}},
            "federation.num_rounds",
        ),  # metrics store rounds as int32
        ({"federation": {"max_update_norm": -1.0}}, "federation.max_update_norm"),
        ({"checkpoint": {"every": -1}}, "checkpoint.every"),
        ({"checkpoint": {"keep": 1.5}}, "checkpoint.keep"),
        ({"ray": {"evaluator": {"max_restarts": -2}}}, "ray.evaluator.max_restarts"),
    ],
)
def test_values_found_by_the_properties_are_named_errors(raw, key):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value) and len(str(info.value)) < 400


def test_a_changed_peft_setting_survives_the_run_dirs_toml_without_lora() -> None:
    """Found by the property above: a [train.peft] table whose method is "" but whose other
    settings differ from the defaults was left out of config.toml, so a resume lost them."""
    config = parse_config({"train": {"peft": {"trainable": "^head\\."}}})
    assert parse_config(tomllib.loads(config.to_toml())) == config
