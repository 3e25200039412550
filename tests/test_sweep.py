"""Sweeps: the file format's errors, and a real two-method digits sweep that resumes and summarises."""

from __future__ import annotations

import json

import pytest

from fedmerge.federation.config import ConfigError
from fedmerge.federation.sweep import load_sweep, run_config, run_sweep

from .conftest import DEFAULT_EXPERIMENT, digits_overrides

TINY = """
config = "{base}"
seeds = [3]
set = {overrides}
curves = ["aggregator/scope_sigma_spread"]

[axes]
"data.alpha" = [0.5]

[methods.fedavg]
aggregator = {{ name = "wsa", lam = 0.0 }}

[methods.wsa]
aggregator = {{ name = "wsa", lam = 0.1 }}
set = ["train.lr=0.04"]
"""


def write_sweep(tmp_path, text: str | None = None, **overrides):
    path = tmp_path / "sweep.toml"
    items = digits_overrides(
        tmp_path, "federation.num_rounds=1", "checkpoint.every=0", "output.plot=false"
    )
    path.write_text(text or TINY.format(base=DEFAULT_EXPERIMENT, overrides=json.dumps(items)))
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ('config = "nope.toml"\n[methods.a]\naggregator = {{ name = "fedavg" }}', "does not exist"),
        ('config = "{base}"', r"no \[methods.<name>\] tables"),
        (
            'config = "{base}"\nseeds = []\n[methods.a]\naggregator = {{ name = "fedavg" }}',
            "'seeds' must be",
        ),
        ('config = "{base}"\n[methods.a]\nagg = 1', "methods.a needs aggregator"),
        (
            'config = "{base}"\n[axes]\n"data.alpha" = []\n[methods.a]\naggregator = {{ name = "fedavg" }}',
            "axes.data.alpha",
        ),
        (
            'config = "{base}"\nrounds = 3\n[methods.a]\naggregator = {{ name = "fedavg" }}',
            r"unknown keys \['rounds'\]",
        ),
    ],
)
def test_bad_sweep_files_are_named_errors(tmp_path, body, message):
    path = write_sweep(tmp_path, body.format(base=DEFAULT_EXPERIMENT))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_each_run_gets_its_method_setting_and_seed(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    config = run_config(sweep, "wsa", {"data.alpha": 0.5}, 3, tmp_path / "out")
    assert (config.aggregator.name, config.aggregator.params) == ("wsa", {"lam": 0.1})
    assert (config.seed, config.data.alpha, config.train.lr, config.federation.num_rounds) == (
        3,
        0.5,
        0.04,
        1,
    )
    assert config.output.root == str(tmp_path / "out" / "runs")


@pytest.mark.slow
def test_a_sweep_runs_once_resumes_and_summarises(tmp_path, ray_address):
    sweep = load_sweep(write_sweep(tmp_path))
    out = tmp_path / "out"
    lines: list[str] = []
    summary = run_sweep(sweep, out, methods=["fedavg"], address=ray_address, progress=lines.append)
    assert sum(line.startswith("=== sweep run") for line in lines) == 1
    lines.clear()
    summary = run_sweep(
        sweep, out, address=ray_address, progress=lines.append
    )  # fedavg is done: only wsa runs
    assert [line for line in lines if line.startswith("=== sweep run")] == [
        "=== sweep run 1/1: wsa, alpha=0.5, seed 3"
    ]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in results] == ["fedavg", "wsa"]
    assert all(
        len(r["curves"]["server/accuracy"]) == 1
        and len(r["curves"]["aggregator/scope_sigma_spread"]) == 1
        for r in results
    )
    text = summary.read_text()
    for r in results:
        final = r["curves"]["server/accuracy"][-1][1]
        assert f"{final:.4f} (1 seed)" in text
    assert (out / "alpha=0.5-server-accuracy.png").is_file()
    assert (out / "alpha=0.5-aggregator-scope_sigma_spread.png").is_file()
