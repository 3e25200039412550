"""The LoRA measurements of docs/results/lora.md, resumable: what finished is not run again.

(a) federated: experiments/lora_text.toml (Rotten Tomatoes, four label-skewed clients), 5 rounds,
    three arms per seed: full fine-tuning with FedAvg, LoRA with FedIT (A and B averaged apart)
    and LoRA with the exact merge of the products B·A. Real runs (Ray + Flower) through
    ``fedmerge.federation.sweep.run_sweep``: per-round server accuracy, bytes sent and received,
    round time, from each run's metrics.parquet.
(b) one shot: experiments/smile_text.toml (text_multitask, one client per task), full fine-tunes
    against LoRA fine-tunes (lora_text.toml's adapters), each set merged by simple averaging, task
    arithmetic, TIES and SMILE (LoRA through the products, the default for these). As
    experiments/smile_text_table.py, in one process with the code a run uses (its initial model,
    client seeds, ``train``, the aggregators' ``aggregate``, LoraProducts as the server wraps it),
    so each arm fine-tunes once; client models are cached.

    .venv/bin/python experiments/lora_table.py --seeds 0 1 2 \\
        --oneshot-set data.max_train_examples=600 --oneshot-set data.max_test_examples=200

Results go to ``--out`` (runs/lora_table, git-ignored); ``--report`` (docs/results/lora) gets
lora_table.json, tables.md and federated_accuracy.png. A rerun with other settings needs another
``--out`` (the script refuses to mix them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}.items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from experiments.client_cache import load_client_models, save_client_models  # noqa: E402
from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator  # noqa: E402
from fedmerge.aggregators.lora import LoraProducts  # noqa: E402
from fedmerge.aggregators.merging import count_parameters  # noqa: E402
from fedmerge.clients.partition import limit_examples, partition  # noqa: E402
from fedmerge.clients.training import train  # noqa: E402
from fedmerge.federation.config import load_config, parse_config  # noqa: E402
from fedmerge.federation.evaluation import evaluate_per_task  # noqa: E402
from fedmerge.federation.proxy import proxy_split  # noqa: E402
from fedmerge.federation.server import federated_model, partition_params  # noqa: E402
from fedmerge.federation.strategy import FedMergeStrategy  # noqa: E402
from fedmerge.federation.sweep import Sweep, run_sweep  # noqa: E402

FEDERATED_CONFIG = ROOT / "experiments" / "lora_text.toml"
ONESHOT_CONFIG = ROOT / "experiments" / "smile_text.toml"
FULL_LR = 5e-5  # full fine-tuning's Adam step (smile_text.toml, hf_text_csv.toml)

ARMS = {  # sweep method name -> (label, its [aggregator] table, its overrides); LoRA runs first
    "lora-fedit": ("LoRA, FedIT (factors)", {"name": "fedavg", "adapters": "factors"}, []),
    "lora-products": (
        "LoRA, exact merge (products)",
        {"name": "fedavg", "adapters": "products"},
        [],
    ),
    "full": ("full fine-tuning, FedAvg", {"name": "fedavg"}, ['train.peft.method=""']),
}
TABLE_ORDER = ("full", "lora-fedit", "lora-products")
CURVES = ("system/bytes_sent", "system/bytes_received", "system/round_time_s")

MERGES = [  # label, aggregator, parameters (those of docs/results/moe.md)
    ("simple average", "simple_average", {}),
    ("task arithmetic (λ=0.3)", "task_arithmetic", {"lam": 0.3}),
    ("TIES (top 20%, λ=0.3)", "ties", {"lam": 0.3, "keep": 0.2}),
    ("SMILE (16, 32)", "smile", {"k_gate": 16, "k": 32}),
]


def nbytes(state) -> int:
    """The raw tensor bytes of a state (what the strategy counts on the wire)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def _pin(path: Path, settings: dict) -> None:
    """Record the settings a results folder was made with; refuse to mix in other ones."""
    file = path / "settings.json"
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples as lists
    if file.is_file():
        old = json.loads(file.read_text())
        if old != settings:
            raise SystemExit(
                f"{path} holds results measured with other settings ({file}); "
                "pass another --out or delete the folder"
            )
    else:
        path.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(settings, indent=1))


# ----------------------------------------------------------------------------- (a) federated


def federated_sweep(rounds: int, seeds: list[int], extra: list[str]) -> Sweep:
    overrides = (f"federation.num_rounds={rounds}", "checkpoint.every=0", *extra)
    methods = {}
    for name, (_, aggregator, sets) in ARMS.items():
        full = [*sets, f"train.lr={FULL_LR}"] if name == "full" else sets
        methods[name] = {"aggregator": aggregator, "set": full}
    return Sweep(
        path=Path(__file__),
        base=FEDERATED_CONFIG,
        seeds=tuple(seeds),
        overrides=overrides,
        axes={},
        methods=methods,
        curves=CURVES,
    )


def run_federated(out: Path, rounds: int, seeds: list[int], extra: list[str]) -> list[dict]:
    folder = out / "federated"
    _pin(
        folder, {"config": load_config(FEDERATED_CONFIG).to_dict(), "rounds": rounds, "set": extra}
    )
    run_sweep(federated_sweep(rounds, seeds, extra), folder)
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines() if x]


def _stats(values: list[float]) -> tuple[float, float]:
    mean = float(np.mean(values))
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def federated_summary(results: list[dict]) -> dict:
    """Per arm: accuracy per round (mean, std over seeds), final accuracy, bytes and round time."""
    arms = {}
    for name in TABLE_ORDER:
        label = ARMS[name][0]
        runs = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        curves = [dict(r["curves"]["server/accuracy"]) for r in runs]
        rounds = sorted(set.intersection(*(set(c) for c in curves)))
        per_round = [_stats([c[k] for c in curves]) for k in rounds]

        def mean_of(curve: str, runs=runs) -> float:
            return float(np.mean([v for r in runs for _, v in r["curves"][curve]]))

        arms[name] = {
            "label": label,
            "seeds": [r["seed"] for r in runs],
            "rounds": rounds,
            "accuracy_mean": [m for m, _ in per_round],
            "accuracy_std": [s for _, s in per_round],
            "final": _stats([c[rounds[-1]] for c in curves]),
            "final_by_seed": {str(r["seed"]): c[rounds[-1]] for r, c in zip(runs, curves)},
            "accuracy_by_seed": {
                str(r["seed"]): [c[k] for k in rounds] for r, c in zip(runs, curves)
            },
            "best": _stats([max(c.values()) for c in curves]),
            "bytes_sent_per_round": mean_of("system/bytes_sent"),
            "bytes_received_per_round": mean_of("system/bytes_received"),
            "round_time_s": mean_of("system/round_time_s"),
            "run_dirs": [r["run_dir"] for r in runs],
        }
    return arms


def plot_federated(arms: dict, path: Path) -> None:
    """Accuracy per round: one colour per arm, one line style per seed (a mean would hide a seed
    whose partition makes every arm fail)."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    seeds = sorted({int(s) for a in arms.values() for s in a["accuracy_by_seed"]})
    for colour, arm in zip(("C0", "C1", "C2", "C3"), arms.values()):
        for seed, curve in sorted(arm["accuracy_by_seed"].items(), key=lambda x: int(x[0])):
            ax.plot(
                arm["rounds"],
                curve,
                color=colour,
                linestyle=styles[seeds.index(int(seed)) % len(styles)],
                marker="o",
                markersize=3,
                label=f"{arm['label']}, seed {seed}",
            )
    ax.set_title("Rotten Tomatoes, 4 label-skewed clients (Dirichlet 2.0): one line per seed")
    ax.set_xlabel("round")
    ax.set_ylabel("server test accuracy")
    ax.set_xticks(next(iter(arms.values()))["rounds"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- (b) one shot


def oneshot_configs(extra: list[str]):
    """The one-shot run configs: smile_text.toml as is (full) and with lora_text.toml's adapters
    and learning rate (lora); ``extra`` overrides both."""
    from fedmerge.federation.config import apply_overrides

    raw = tomllib.loads(ONESHOT_CONFIG.read_text())
    lora_train = tomllib.loads(FEDERATED_CONFIG.read_text())["train"]
    full = apply_overrides(raw, extra)
    lora = apply_overrides(raw, extra)
    lora["train"] = {**lora["train"], "lr": lora_train["lr"], "peft": dict(lora_train["peft"])}
    return {
        "full": parse_config(full, source=f"{ONESHOT_CONFIG} (full)"),
        "lora": parse_config(lora, source=f"{ONESHOT_CONFIG} with lora_text.toml's [train.peft]"),
    }


def _fine_tune(cfg, task, initial, shards, cache: Path, arm: str):
    """Each client's reply after one local round from the initial model (cached), and seconds."""
    cached = load_client_models(cache, arm)
    if cached is not None:
        return cached
    strategy = FedMergeStrategy(
        aggregator=None, evaluator=None, num_clients=len(shards), seed=cfg.seed
    )
    updates, seconds = [], []
    for cid, shard in enumerate(shards):
        model = task.build_federated_model()
        task.load_weights(model, initial)
        seed = strategy.client_seed(1, cid)
        torch.manual_seed(seed)  # as the client app does before training
        started = time.perf_counter()
        metrics = train(model, task, shard, cfg.train, seed=seed)
        seconds.append(time.perf_counter() - started)
        print(
            f"  {arm} client {cid} (task {task.client_task_id(shard)}): {len(shard)} examples, "
            f"train acc {metrics['train_accuracy']:.3f}, {seconds[-1]:.1f} s",
            flush=True,
        )
        state = task.shared_state(model)
        updates.append(
            ClientUpdate(cid, state, len(shard), {"task_id": float(task.client_task_id(shard))})
        )
    save_client_models(cache, arm, updates, seconds)
    return updates, seconds


def _score(task, state_or_model, test, batch: int) -> dict[str, float]:
    if isinstance(state_or_model, torch.nn.Module):
        model = state_or_model
    else:
        model = task.build_federated_model()
        task.load_weights(model, state_or_model)
    metrics = evaluate_per_task(model, task, test, batch_size=batch)
    accs = {
        n: float(metrics[f"accuracy/{n}"]) for n in task.task_names if f"accuracy/{n}" in metrics
    }
    return {**accs, "average": float(np.mean(list(accs.values())))}


def run_oneshot(out: Path, extra: list[str], threads: int, arms: list[str]) -> dict:
    torch.set_num_threads(threads)
    folder = out / "oneshot"
    configs = oneshot_configs(extra)
    _pin(folder, {arm: cfg.to_dict() for arm, cfg in configs.items()})
    results_file = folder / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1))

    for arm, cfg in configs.items():
        if arm not in arms:
            continue
        task = cfg.task_spec.build()
        groups_of = task.task_index
        train_data, test = task.load("train"), task.load("test")
        train_data = limit_examples(
            train_data, cfg.data.max_train_examples, cfg.seed, groups_of(train_data.x)
        )
        test = limit_examples(test, cfg.data.max_test_examples, cfg.seed, groups_of(test.x))
        train_data, _ = proxy_split(
            task, train_data, test, source=cfg.data.proxy_inputs, size=0, seed=cfg.seed
        )
        parts = partition(
            train_data.y,
            cfg.data.num_clients,
            cfg.data.partitioner,
            cfg.seed,
            groups=groups_of(train_data.x),
            **partition_params(cfg.data),
        )
        shards = [train_data.subset(p) for p in parts]
        model0 = federated_model(task, seed=cfg.seed, products=task.adapter is not None)
        initial = model0.initial_state
        mine = results.setdefault(arm, {"rows": {}})
        print(f"one shot, {arm}: fine-tuning {len(shards)} clients", flush=True)
        updates, seconds = _fine_tune(cfg, task, initial, shards, folder / "cache", arm)
        one_model = count_parameters(task.build_federated_model())
        mine.update(
            fine_tune_s_per_client=float(np.mean(seconds)),
            bytes_sent_per_round=len(shards) * nbytes(initial),
            bytes_received_per_round=sum(nbytes(u.state) for u in updates),
            trainable_params=int(sum(t.numel() for t in updates[0].state.values())),
            model_params=int(one_model),
        )
        save()
        batch = cfg.evaluation.batch_size
        if "individual" not in mine["rows"]:
            accs = {}
            groups = task.task_index(test.x)
            for u in updates:  # each task scored by its own client's model
                t = int(u.metrics["task_id"])
                part = test.subset(np.flatnonzero(groups == t))
                accs[task.task_names[t]] = _score(task, u.state, part, batch)[task.task_names[t]]
            mine["rows"]["individual"] = {
                **accs,
                "average": float(np.mean(list(accs.values()))),
                "label": "individual fine-tunes (each on its task)",
            }
            save()
        for label, name, params in MERGES:
            if label in mine["rows"]:
                continue
            aggregator = create_aggregator(name, params)
            if model0.layout:  # what the server does under adapters = "auto" for these
                aggregator = LoraProducts(aggregator, model0.layout)
            ctx = RoundContext(
                round=1,
                global_state=initial,
                base_state=initial,
                seed=cfg.seed,
                build_model=task.build_federated_model,
            )
            started = time.perf_counter()
            result = aggregator.aggregate(ctx, updates)
            merge_s = time.perf_counter() - started
            served = result.served_model if result.served_model is not None else result.state
            row = _score(task, served, test, batch)
            row.update(label=label, merge_s=merge_s)
            if "params_ratio" in result.metrics:
                row["params_ratio"] = float(result.metrics["params_ratio"])
            mine["rows"][label] = row
            print(
                f"  {arm} {label}: "
                + "  ".join(f"{n} {row[n]:.3f}" for n in task.task_names)
                + f"  avg {row['average']:.3f}",
                flush=True,
            )
            save()
        mine["task_names"] = list(task.task_names)
        save()
    return results


# ----------------------------------------------------------------------------- report


def _pm(stat, digits: int = 3) -> str:
    mean, std = stat
    return (
        f"{mean:.{digits}f}" if not math.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _md(headers: list[str], rows: list[list[object]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        "",
    ]


def tables(arms: dict, oneshot: dict) -> str:
    """The Markdown tables of docs/results/lora.md."""
    lines = []
    if arms:
        rounds = next(iter(arms.values()))["rounds"]
        lines += ["(a) federated: server test accuracy per round, mean ± std over seeds", ""]
        lines += _md(
            ["arm", "seeds", *(f"round {r}" for r in rounds), "best"],
            [
                [
                    a["label"],
                    ", ".join(str(s) for s in a["seeds"]),
                    *(_pm(ms) for ms in zip(a["accuracy_mean"], a["accuracy_std"], strict=True)),
                    _pm(a["best"]),
                ]
                for a in arms.values()
            ],
        )
        seeds = sorted({int(s) for a in arms.values() for s in a["final_by_seed"]})
        lines += ["(a) federated: final (last round) accuracy of each seed", ""]
        lines += _md(
            ["arm", *(f"seed {s}" for s in seeds)],
            [
                [
                    a["label"],
                    *(f"{a['final_by_seed'].get(str(s), float('nan')):.4f}" for s in seeds),
                ]
                for a in arms.values()
            ],
        )
        full = arms.get("full")
        rows = []
        for a in arms.values():

            def ratio(key: str, a: dict = a) -> str:
                return f"{full[key] / a[key]:.1f}×" if full and a[key] else "-"

            rows.append(
                [
                    a["label"],
                    _mb(a["bytes_sent_per_round"]),
                    ratio("bytes_sent_per_round"),
                    _mb(a["bytes_received_per_round"]),
                    ratio("bytes_received_per_round"),
                    f"{a['round_time_s']:.0f}",
                ]
            )
        lines += ["(a) federated: traffic and time per round (mean over rounds and seeds)", ""]
        lines += _md(
            [
                "arm",
                "MB sent / round",
                "less than full",
                "MB received / round",
                "less than full",
                "s / round",
            ],
            rows,
        )
    for arm, data in oneshot.items():
        if "task_names" not in data:
            continue
        names = data["task_names"]
        lines += [
            f"(b) one shot, {arm}: {_mb(data['bytes_sent_per_round'])} MB sent, "
            f"{_mb(data['bytes_received_per_round'])} MB received in the round; "
            f"{data['trainable_params']:,} of {data['model_params']:,} parameters travel back "
            f"from a client; {data['fine_tune_s_per_client']:.0f} s fine-tuning per client",
            "",
        ]
        lines += _md(
            ["method", *names, "average", "params"],
            [
                [
                    r["label"],
                    *(f"{r[n]:.3f}" for n in names),
                    f"{r['average']:.3f}",
                    f"{r['params_ratio']:.2f}×" if "params_ratio" in r else "",
                ]
                for r in data["rows"].values()
            ],
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "federated", "oneshot", "report"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="override of lora_text.toml")
    parser.add_argument(
        "--oneshot-set", action="append", default=[], help="override of smile_text.toml"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one shot")
    parser.add_argument(
        "--oneshot-arms", nargs="+", choices=["full", "lora"], default=["full", "lora"]
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "lora_table"))
    parser.add_argument("--report", default=str(ROOT / "docs" / "results" / "lora"))
    args = parser.parse_args()
    out, report = Path(args.out), Path(args.report)
    if args.part in ("all", "federated"):
        run_federated(out, args.rounds, args.seeds, args.set)
    if args.part in ("all", "oneshot"):
        run_oneshot(out, args.oneshot_set, args.threads, args.oneshot_arms)
    fed_file = out / "federated" / "results.jsonl"
    results = (
        [json.loads(x) for x in fed_file.read_text().splitlines() if x] if fed_file.exists() else []
    )
    arms = federated_summary(results)
    one_file = out / "oneshot" / "results.json"
    oneshot = json.loads(one_file.read_text()) if one_file.is_file() else {}
    report.mkdir(parents=True, exist_ok=True)
    if arms:
        plot_federated(arms, report / "federated_accuracy.png")
    (report / "lora_table.json").write_text(
        json.dumps({"federated": arms, "oneshot": oneshot, "loadavg": os.getloadavg()}, indent=1)
    )
    text = tables(arms, oneshot)
    (report / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
