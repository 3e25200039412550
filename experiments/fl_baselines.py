"""Federated-learning baselines on Fashion-MNIST, fedmerge beside Flower's own strategies.

Every cell is one run: a method, a Dirichlet α, a seed, and a system. ``fedmerge`` cells are
``fedmerge run`` of the default experiment with the overrides below; ``flower`` cells are a plain
``flwr.simulation.run_simulation`` whose ServerApp runs Flower's strategy of the same name with
the same hyperparameters, driving fedmerge's ClientApp (the same shards, model, initial weights
and local training), with the global model scored on the same test set after every round. Each
cell runs in a fresh process; one JSON line per finished cell goes to ``<out>/results.jsonl``, and
finished cells are skipped when the script is started again. The tables (final accuracy, mean ±
std over seeds, per system; privacy spent per round for the DP rows) go to ``<out>/tables.md``.

    .venv/bin/python experiments/fl_baselines.py --out runs/fl_baselines \\
        --methods fedavg,fedavgm,fedadam,fedyogi,fedprox --alphas 0.1,0.5 --seeds 0,1,2 \\
        --systems fedmerge,flower
    .venv/bin/python experiments/fl_baselines.py --out runs/fl_baselines --quick   # 2 rounds, a smoke test
    .venv/bin/python experiments/fl_baselines.py --out docs/results/fl_baselines --tables-only

Differences between the systems that remain by design: Flower samples clients with Python's
``random`` (seeded here) and sends every client the same training seed, fedmerge samples with its
own seeded generator and seeds each client and round apart; so the two agree in distribution (within
the seed spread), not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_EXPERIMENT = ROOT / "experiments" / "fashion_mnist_fedavg.toml"

# The hyperparameters of each method, the same for both systems (fedmerge's keyword names; the
# Flower strategy's are mapped in _flower_strategy). Plain SGD clients, as in Reddi et al. and
# Karimireddy et al.; server optimisers at the step sizes Reddi et al. report for CNNs.
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.9},
    # Flower's FedAdam always corrects the bias; fedmerge's does when asked.
    "fedadam": {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3, "bias_correction": True},
    "fedyogi": {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedprox": {"mu": 0.01},
    "scaffold": {},
    # DP-FedAvg: updates clipped to norm 1, noise calibrated to ε over the run's rounds (δ = 1e-5,
    # the accountant of sampling 10 of 20 clients without replacement).
    **{
        f"dp_eps{eps}": {
            "inner": "fedavg",
            "target_epsilon": float(eps),
            "delta": 1e-5,
            "clipping_norm": 1.0,
        }
        for eps in (1, 4, 8)
    },
}


FEDMERGE_ONLY = {"scaffold", "dp_eps1", "dp_eps4", "dp_eps8"}
"""Rows without a Flower run here: Flower has no SCAFFOLD; its DP wrappers take a noise multiplier,
not a target ε."""


def aggregator_of(method: str) -> str:
    """The registered aggregator a method row runs (the DP rows are the ``dp`` wrapper)."""
    return "dp" if method.startswith("dp_") else method


def base_overrides(alpha: float, seed: int, out: Path, rounds: int, quick: bool) -> list[str]:
    """What every cell runs: 20 clients, half of them a round, 500 training examples each on
    average (10,000 of Fashion-MNIST's 60,000), scored on 5,000 of the test images."""
    return [
        "name=fl-baselines",
        f"seed={seed}",
        "data.task=fashion_mnist",
        "data.num_clients=20",
        "data.partitioner=dirichlet",
        f"data.alpha={alpha}",
        f"data.max_train_examples={4000 if quick else 10000}",
        f"data.max_test_examples={2000 if quick else 5000}",
        f"data.cache_dir={str(out / 'shards')!r}",
        f"federation.num_rounds={rounds}",
        "federation.fraction_train=0.5",
        "federation.min_train_nodes=2",
        "train.local_epochs=1",
        "train.batch_size=32",
        "train.lr=0.05",
        "train.momentum=0.0",
        "checkpoint.every=0",
        "output.plot=false",
        "output.save_model=false",
        f"output.root={str(out / 'runs')!r}",
    ]


def cell_key(cell: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: cell[k] for k in ("system", "method", "alpha", "seed", "rounds")}, sort_keys=True
    )


# ---- one cell, in its own process ---------------------------------------------------------------


def _config(cell: Mapping[str, Any]):
    from fedmerge.federation.config import load_config

    out = Path(cell["out"])
    overrides = base_overrides(cell["alpha"], cell["seed"], out, cell["rounds"], cell["quick"])
    return load_config(DEFAULT_EXPERIMENT, overrides)


def run_fedmerge(cell: Mapping[str, Any]) -> dict[str, Any]:
    import dataclasses

    from fedmerge.federation.config import AggregatorConfig
    from fedmerge.federation.runner import run_experiment

    config = dataclasses.replace(
        _config(cell),
        aggregator=AggregatorConfig(
            name=aggregator_of(cell["method"]), params=dict(METHODS[cell["method"]])
        ),
    )
    run = run_experiment(config, progress=lambda _: None).run_dir
    per_round: dict[str, list[float]] = {"accuracy": [a for _, a in run.server_curve("accuracy")]}
    for row in run.metrics().to_pylist():
        if row["scope"] == "aggregator" and row["metric"].startswith("dp_"):
            per_round.setdefault(row["metric"], []).append(row["value"])
    return {"per_round": per_round, "run_dir": str(run.path)}


def _flower_strategy(method: str, n: int, fraction: float, minimum: int):
    from flwr.serverapp import strategy as fl

    common = {
        "fraction_train": fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": minimum,
        "min_available_nodes": n,
    }
    p = METHODS[method]
    if method == "fedavg":
        return fl.FedAvg(**common)
    if method == "fedavgm":
        return fl.FedAvgM(
            server_learning_rate=p["server_learning_rate"],
            server_momentum=p["server_momentum"],
            **common,
        )
    if method in ("fedadam", "fedyogi"):
        cls = fl.FedAdam if method == "fedadam" else fl.FedYogi
        return cls(eta=p["eta"], beta_1=p["beta_1"], beta_2=p["beta_2"], tau=p["tau"], **common)
    if method == "fedprox":
        return fl.FedProx(proximal_mu=p["mu"], **common)
    raise ValueError(f"Flower has no strategy for {method!r} here")


def run_flower(cell: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's strategy in a plain ``run_simulation``, driving fedmerge's ClientApp."""
    import random

    import numpy as np
    import torch
    from flwr.app import ArrayRecord, MetricRecord

    from benchmarks.round import run_flower_strategy
    from fedmerge.aggregators import create_aggregator
    from fedmerge.clients.app import AGGREGATOR_CONFIG_KEY, RUN_CONFIG_KEY
    from fedmerge.clients.partition import limit_examples, materialize_shards
    from fedmerge.clients.tasks.base import ArrayData
    from fedmerge.clients.training import evaluate, get_state, set_state
    from fedmerge.federation.server import Experiment, partition_params

    cfg = _config(cell)
    task = cfg.task_spec.build()
    train, test = task.load("train"), task.load("test")
    train = limit_examples(train, cfg.data.max_train_examples, cfg.seed, task.task_index(train.x))
    test = limit_examples(test, cfg.data.max_test_examples, cfg.seed, task.task_index(test.x))
    shard_dir = materialize_shards(
        task,
        train,
        cfg.data.num_clients,
        cfg.data.partitioner,
        cfg.seed,
        partition_params(cfg.data),
        Path(cfg.data.cache_dir).resolve(),
    )
    experiment = Experiment(cfg, None)  # type: ignore[arg-type]  # only run_config() is used
    experiment.shard_dir = shard_dir
    run_config = experiment.run_config()
    torch.manual_seed(cfg.seed)
    initial = get_state(task.build_model())
    eval_model, test_data = task.build_model(), ArrayData(test.x, test.y)
    accuracy: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        set_state(eval_model, arrays.to_torch_state_dict())
        metrics = evaluate(eval_model, task, test_data, batch_size=cfg.evaluation.batch_size)
        accuracy.append(metrics["accuracy"])
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    n = cfg.data.num_clients
    strategy = _flower_strategy(
        cell["method"], n, cfg.federation.fraction_train, cfg.federation.min_train_nodes
    )
    # FedProx's proximal term is the client's to add: Flower sends mu, fedmerge's ClientApp takes
    # the same term spec fedmerge's FedProx sends.
    extra = create_aggregator(aggregator_of(cell["method"]), METHODS[cell["method"]]).client_config(
        1
    )
    random.seed(cfg.seed)  # Flower samples clients with Python's random
    np.random.seed(cfg.seed)
    failures = run_flower_strategy(
        cfg,
        strategy,
        initial,
        evaluate_fn,
        {
            RUN_CONFIG_KEY: json.dumps(run_config, sort_keys=True),
            AGGREGATOR_CONFIG_KEY: json.dumps(extra, sort_keys=True),
            "seed": cfg.seed,
        },
    )
    if failures or len(accuracy) != cfg.federation.num_rounds:
        raise RuntimeError(f"the Flower run did not finish its rounds: {failures or accuracy}")
    return {"per_round": {"accuracy": accuracy}}


def run_cell(cell: Mapping[str, Any]) -> dict[str, Any]:
    from benchmarks.common import quiet_env

    quiet_env()
    started = time.perf_counter()
    result = (run_fedmerge if cell["system"] == "fedmerge" else run_flower)(cell)
    return {**json.loads(cell_key(cell)), **result, "wall_s": time.perf_counter() - started}


# ---- the driver ---------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def tables(rows: Sequence[Mapping[str, Any]]) -> str:
    """Final test accuracy (%) per method and α, fedmerge and Flower side by side."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    alphas = sorted({r["alpha"] for r in rows})
    head = ["method"] + [f"α = {a:g}: {s}" for a in alphas for s in ("fedmerge", "Flower")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method]
        for alpha in alphas:
            for system in ("fedmerge", "flower"):
                finals = [
                    r["per_round"]["accuracy"][-1]
                    for r in rows
                    if (r["method"], r["alpha"], r["system"]) == (method, alpha, system)
                ]
                cells.append(_mean_std(finals) + (f" (n={len(finals)})" if finals else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _finals(rows, method, alpha, system) -> list[float]:
    return [
        r["per_round"]["accuracy"][-1]
        for r in rows
        if (r["method"], r["alpha"], r["system"]) == (method, alpha, system)
    ]


def agreement(rows: Sequence[Mapping[str, Any]]) -> str:
    """fedmerge minus Flower, in points, beside the seed spread of that difference: the
    standard error sqrt(s1²/n1 + s2²/n2) of the two means. "within" when |Δ| is at most twice it."""
    lines = [
        "| method | α | fedmerge − Flower (points) | 2 × std. error | verdict |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        for alpha in sorted({r["alpha"] for r in rows}):
            ours, theirs = (_finals(rows, method, alpha, s) for s in ("fedmerge", "flower"))
            if len(ours) < 2 or len(theirs) < 2:
                continue
            delta = 100 * (statistics.fmean(ours) - statistics.fmean(theirs))
            se = (
                100
                * (
                    statistics.variance(ours) / len(ours)
                    + statistics.variance(theirs) / len(theirs)
                )
                ** 0.5
            )
            verdict = "within" if abs(delta) <= 2 * se else "outside"
            lines.append(f"| {method} | {alpha:g} | {delta:+.1f} | {2 * se:.1f} | {verdict} |")
    return "\n".join(lines) + "\n"


def privacy(rows: Sequence[Mapping[str, Any]]) -> str:
    """The DP rows: ε after each round (the same for every seed: it depends on z, N, m and the
    rounds only) and the final accuracy."""
    lines = []
    for method in (m for m in METHODS if m.startswith("dp_")):
        picked = [r for r in rows if r["method"] == method and "dp_epsilon" in r["per_round"]]
        if not picked:
            continue
        eps = picked[0]["per_round"]["dp_epsilon"]
        z = picked[0]["per_round"].get("dp_noise_multiplier", [float("nan")])[0]
        alphas = sorted({r["alpha"] for r in picked})
        finals = ", ".join(
            f"α = {a:g}: {_mean_std(_finals(picked, method, a, 'fedmerge'))}" for a in alphas
        )
        lines.append(
            f"| {method} | {z:.3f} | " + " ".join(f"{e:.2f}" for e in eps) + f" | {finals} |"
        )
    if not lines:
        return ""
    head = "| row | noise multiplier z | ε after rounds 1, 2, … (δ = 1e-5) | final accuracy (%) |"
    return "\n".join([head, "|---|---|---|---|", *lines]) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Mean test accuracy per round, one panel per α, fedmerge solid and Flower dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in rows})
    fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for i, method in enumerate(METHODS):
            for system, style in (("fedmerge", "-"), ("flower", "--")):
                curves = [
                    r["per_round"]["accuracy"]
                    for r in rows
                    if (r["method"], r["alpha"], r["system"]) == (method, alpha, system)
                ]
                if not curves:
                    continue
                mean = [statistics.fmean(c) for c in zip(*curves)]
                ax.plot(
                    range(1, len(mean) + 1),
                    mean,
                    style,
                    color=f"C{i}",
                    label=f"{method} ({'Flower' if system == 'flower' else 'fedmerge'})",
                )
        ax.set_title(f"Dirichlet α = {alpha:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fl_baselines")
    parser.add_argument("--methods", default="fedavg,fedavgm,fedadam,fedyogi,fedprox")
    parser.add_argument("--alphas", default="0.1,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--systems", default="fedmerge,flower")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 rounds on 4,000 examples")
    parser.add_argument(
        "--tables-only", action="store_true", help="write the tables and plot from results.jsonl"
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # a worker: run one cell, print JSON
    args = parser.parse_args(argv)
    if args.cell:
        print("RESULT " + json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rounds = 2 if args.quick else args.rounds
    for name in args.methods.split(","):
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    results = out / "results.jsonl"
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[cell_key(row)] = row
    cells = [
        {
            "system": system,
            "method": method,
            "alpha": float(alpha),
            "seed": int(seed),
            "rounds": rounds,
            "quick": args.quick,
            "out": str(out),
        }
        for seed in args.seeds.split(",")  # seed outermost: a stopped grid has whole seeds
        for alpha in args.alphas.split(",")
        for method in args.methods.split(",")
        for system in args.systems.split(",")
        if not (system == "flower" and method in FEDMERGE_ONLY)
    ]
    for i, cell in enumerate([] if args.tables_only else cells, 1):
        key = cell_key(cell)
        if key in done:
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--cell", json.dumps(cell)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"[{i}/{len(cells)}] {key} FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        row = json.loads(lines[-1][len("RESULT ") :])
        done[key] = row
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        final = row["per_round"]["accuracy"][-1]
        print(f"[{i}/{len(cells)}] {key} accuracy {final:.4f} ({row['wall_s']:.0f} s)", flush=True)
    rows = list(done.values())
    table = "\n".join(
        part for part in (tables(rows), agreement(rows), privacy(rows)) if part.strip()
    )
    (out / "tables.md").write_text(table)
    if rows:
        plot(rows, out / "accuracy.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
