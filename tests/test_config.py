"""Config parsing: defaults, overrides, and errors that name the offending key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedmerge.federation.config import (
    ConfigError,
    apply_overrides,
    describe_fields,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "experiments" / "fashion_mnist_fedavg.toml"


def test_default_experiment_loads_with_documented_values():
    config = load_config(DEFAULT)
    assert config.data.num_clients == 10
    assert config.data.partitioner == "dirichlet" and config.data.alpha == 0.5
    assert config.aggregator.name == "fedavg" and config.aggregator.params == {}


def test_default_experiment_lists_every_field():
    raw = tomllib.loads(DEFAULT.read_text())
    for key, _, doc in describe_fields():
        node = raw
        for part in key.split("."):
            if key == "aggregator.params":
                break
            assert part in node, f"{key} missing from {DEFAULT.name}"
            node = node[part]
        assert doc, f"{key} has no doc"


def test_every_experiment_file_is_valid():
    """Experiments load as configs; sweep files (``*_sweep.toml``) load as sweeps, and every run
    they describe is a valid config."""
    from fedmerge.federation.server import build_aggregator
    from fedmerge.federation.sweep import load_sweep, run_config

    files = sorted((ROOT / "experiments").glob("*.toml"))
    assert files
    for path in files:
        if not path.name.endswith("_sweep.toml"):
            load_config(path)
            continue
        sweep = load_sweep(path)
        for setting in sweep.settings():
            for method in sweep.methods:
                build_aggregator(run_config(sweep, method, setting, sweep.seeds[0], ROOT / "runs"))


def test_overrides_are_toml_literals_or_text():
    config = load_config(
        DEFAULT,
        [
            "federation.num_rounds=3",
            "data.alpha=0.1",
            "aggregator.name=fedavg",
            "ray.aggregator.resources={aggregator = 1}",
            "output.plot=false",
        ],
    )
    assert config.federation.num_rounds == 3
    assert config.data.alpha == 0.1
    assert config.ray.aggregator.resources == {"aggregator": 1}
    assert config.output.plot is False


def test_aggregator_table_passes_extra_keys_as_params():
    config = load_config(DEFAULT, ["aggregator.lam=0.3", "aggregator.fusion=moment"])
    assert config.aggregator.params == {"lam": 0.3, "fusion": "moment"}


def test_round_trip_through_toml():
    config = load_config(DEFAULT, ["aggregator.lam=0.3"])
    assert parse_config(tomllib.loads(config.to_toml())) == config


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"dataa": {}}, "dataa"),
        ({"data": {"alfa": 0.3}}, "data.alfa"),
        ({"ray": {"aggregator": {"gpus": 1}}}, "ray.aggregator.gpus"),
    ],
)
def test_unknown_keys_are_named(raw, key):
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{key}'")):
        parse_config(raw)


def test_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean 'data.alpha'"):
        parse_config({"data": {"alfa": 0.3}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"data": {"alpha": -1.0}}, "data.alpha"),
        ({"data": {"alpha": "big"}}, "data.alpha"),
        ({"data": {"num_clients": 0}}, "data.num_clients"),
        ({"data": {"num_clients": 2.5}}, "data.num_clients"),
        ({"data": {"partitioner": "dirichlett"}}, "data.partitioner"),
        ({"data": {"task": "imagenet"}}, "data.task"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
        ({"federation": {"fraction_train": 1.5}}, "federation.fraction_train"),
        ({"federation": {"num_rounds": True}}, "federation.num_rounds"),
        ({"federation": {"min_train_nodes": 11}}, "federation.min_train_nodes"),
        ({"ray": {"client_num_cpus": 0}}, "ray.client_num_cpus"),
        (
            {"ray": {"aggregator": {"resources": {"aggregator": -1}}}},
            "ray.aggregator.resources.aggregator",
        ),
        ({"federation": {"fraction_evaluate": 0.5}}, "data.local_test_fraction"),
        ({"seed": -1}, "seed"),
        ({"output": "runs"}, "output"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nalpha = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("override", ["novalue", "=3", "a..b=1", "federation.num_rounds.x=1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        parse_config(apply_overrides({"federation": {"num_rounds": 3}}, [override]))
