"""Sweeps: one experiment over methods x settings x seeds, summarised as mean ± std.

A sweep file (TOML) names a base experiment and what varies::

    config = "wsa_vs_fedavg.toml"          # base experiment, relative to the sweep file
    seeds = [1, 2, 3]
    set = ["federation.num_rounds=30"]     # overrides for every run
    curves = ["aggregator/scope_sigma_spread"]   # scope/metric curves plotted beside accuracy

    [axes]                                 # every combination is one setting
    "data.alpha" = [0.1, 0.5]

    [methods.fedavg]                       # the [aggregator] table of the method's runs
    aggregator = { name = "fedavg" }
    [methods.wsa-0.1]
    aggregator = { name = "wsa", lam = 0.1 }
    set = []                               # the method's own overrides (optional)

``fedmerge sweep FILE --out DIR`` runs what ``DIR/results.jsonl`` does not hold yet (so a stopped
sweep continues where it stopped), then writes ``DIR/summary.md`` (final and best accuracy, mean ±
std over seeds, per method and setting) and one plot per setting and curve, each line the mean
over seeds. ``--seeds``, ``--methods`` and ``--only`` run part of it; the summary always covers
everything in ``results.jsonl``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from fedmerge.federation.config import ConfigError, apply_overrides, parse_config
from fedmerge.federation.results import RunDir, format_table, plot_curves

__all__ = ["Sweep", "load_sweep", "run_sweep", "summarize_sweep"]


@dataclass(frozen=True)
class Sweep:
    path: Path
    base: Path
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    axes: dict[str, list[Any]]
    methods: dict[str, dict[str, Any]]
    curves: tuple[str, ...]

    def settings(self) -> list[dict[str, Any]]:
        keys = list(self.axes)
        return [
            dict(zip(keys, values)) for values in itertools.product(*(self.axes[k] for k in keys))
        ]


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; errors name the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read sweep file {path}: {err}") from None
    unknown = sorted(set(raw) - {"config", "seeds", "set", "axes", "methods", "curves"})
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown keys {unknown}")
    if not isinstance(raw.get("config"), str):
        raise ConfigError(f"sweep file {path}: 'config' must name the base experiment file")
    base = (path.parent / raw["config"]).resolve()
    if not base.is_file():
        raise ConfigError(f"sweep file {path}: config {base} does not exist")
    seeds = raw.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(
            f"sweep file {path}: 'seeds' must be a non-empty list of non-negative integers"
        )
    axes = raw.get("axes", {})
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep file {path}: axes.{key} must be a non-empty list of values")
    methods = raw.get("methods", {})
    if not methods:
        raise ConfigError(f"sweep file {path}: no [methods.<name>] tables")
    for name, method in methods.items():
        extra = sorted(set(method) - {"aggregator", "set"})
        if extra or not isinstance(method.get("aggregator", {}).get("name"), str):
            raise ConfigError(
                f"sweep file {path}: methods.{name} needs aggregator = {{ name = ... }} "
                f"and may have set = [...]" + (f"; unknown keys {extra}" if extra else "")
            )
    curves = raw.get("curves", [])
    for curve in curves:
        if curve.count("/") != 1:
            raise ConfigError(f"sweep file {path}: curve {curve!r} must be 'scope/metric'")
    return Sweep(
        path,
        base,
        tuple(seeds),
        tuple(raw.get("set", [])),
        dict(axes),
        dict(methods),
        tuple(curves),
    )


def _label(setting: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in setting.items()) or "base"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def run_config(sweep: Sweep, method: str, setting: Mapping[str, Any], seed: int, root: Path):
    """The experiment config of one (method, setting, seed) run."""
    raw = tomllib.loads(sweep.base.read_text(encoding="utf-8"))
    spec = sweep.methods[method]
    overrides = [
        *sweep.overrides,
        *(_override(k, v) for k, v in setting.items()),
        *spec.get("set", []),
    ]
    raw = apply_overrides(raw, overrides)
    raw["aggregator"] = dict(spec["aggregator"])
    raw["seed"] = seed
    raw["name"] = _slug(f"{method}-{_label(setting)}-s{seed}")
    raw.setdefault("output", {})["root"] = str(root / "runs")
    return parse_config(
        raw, source=f"{sweep.path} (method {method}, {_label(setting)}, seed {seed})"
    )


def _curve(run: RunDir, curve: str) -> list[tuple[int, float]]:
    scope, metric = curve.split("/")
    table = run.metrics()
    rows = table.filter(pc.and_(pc.equal(table["scope"], scope), pc.equal(table["metric"], metric)))
    rows = rows.filter(pc.is_null(rows["client_id"]))
    return sorted(zip(rows.column("round").to_pylist(), rows.column("value").to_pylist()))


def _load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    only: Mapping[str, Any] | None = None,
    address: str | None = None,
    progress: Callable[[str], None] = print,
) -> Path:
    """Run every (setting, method, seed) not yet in ``out/results.jsonl``; returns the summary path.

    ``address``: a Ray cluster every run attaches to (as ``fedmerge run --address``)."""
    from fedmerge.federation.runner import run_experiment

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {
        (r["method"], json.dumps(r["setting"], sort_keys=True), r["seed"])
        for r in _load_results(results_path)
    }
    unknown = sorted(set(methods or ()) - set(sweep.methods))
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; the sweep has {sorted(sweep.methods)}")
    todo = [
        (setting, method, seed)
        for setting in sweep.settings()
        if all(setting.get(k) == v for k, v in (only or {}).items())
        for seed in (seeds or sweep.seeds)
        for method in (methods or sweep.methods)
        if (method, json.dumps(setting, sort_keys=True), seed) not in done
    ]
    for number, (setting, method, seed) in enumerate(todo, 1):
        progress(f"=== sweep run {number}/{len(todo)}: {method}, {_label(setting)}, seed {seed}")
        config = run_config(sweep, method, setting, seed, out)
        run = run_experiment(config, address=address, progress=progress).run_dir
        record = {
            "method": method,
            "setting": setting,
            "seed": seed,
            "run_dir": str(run.path),
            "curves": {
                "server/accuracy": run.server_curve("accuracy"),
                **{curve: _curve(run, curve) for curve in sweep.curves},
            },
        }
        with results_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return summarize_sweep(sweep, out)


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f} (1 seed)"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} ± {std:.4f}"


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[tuple[int, float]]:
    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for r, v in curve:
            by_round.setdefault(int(r), []).append(float(v))
    return sorted((r, sum(v) / len(v)) for r, v in by_round.items() if len(v) == len(curves))


def summarize_sweep(sweep: Sweep, out: str | Path) -> Path:
    """Write ``summary.md`` (a table per setting) and the per-setting plots from ``results.jsonl``."""
    out = Path(out)
    results = _load_results(out / "results.jsonl")
    lines = [
        f"Sweep `{sweep.path.name}` over `{sweep.base.name}`: final and best test accuracy, "
        "mean ± sample std over seeds.",
        "",
    ]
    for setting in sweep.settings():
        key = json.dumps(setting, sort_keys=True)
        mine = [r for r in results if json.dumps(r["setting"], sort_keys=True) == key]
        if not mine:
            continue
        rows, curves = [], {c: {} for c in ("server/accuracy", *sweep.curves)}
        for method in sweep.methods:
            runs = [r for r in mine if r["method"] == method]
            if not runs:
                continue
            accuracy = [r["curves"]["server/accuracy"] for r in runs]
            finals = [c[-1][1] for c in accuracy if c]
            bests = [max(v for _, v in c) for c in accuracy if c]
            rows.append([method, len(runs), _mean_std(finals), _mean_std(bests)])
            for curve in curves:
                series = [r["curves"].get(curve, []) for r in runs]
                if all(series):
                    curves[curve][method] = _mean_curve(series)
        lines += [
            f"### {_label(setting)}",
            "",
            "```",
            format_table(["method", "seeds", "final accuracy", "best accuracy"], rows),
            "```",
            "",
        ]
        for curve, by_method in curves.items():
            if not by_method:
                continue
            name = _slug(f"{_label(setting)}-{curve.replace('/', '-')}") + ".png"
            plot_curves(
                by_method,
                out / name,
                title=f"{_label(setting)}: {curve} (mean over seeds)",
                ylabel=curve.split("/")[1],
            )
            lines += [f"![{curve}, {_label(setting)}]({name})", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines), encoding="utf-8")
    return summary
