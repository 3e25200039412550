"""The one-shot comparison of docs/results/moe.md: every merging method on the same client fine-tunes.

A federated run of experiments/smile_text.toml fine-tunes the three clients and merges once; a
table of ten methods would repeat the same fine-tuning ten times. This script does the round in
one process with the code a run uses — the same data caps, the by-task partition, the same
initial model, ``fedmerge.clients.training.train`` with each client's seed from the strategy, the
aggregators' own ``aggregate`` with the RoundContext the aggregator actor builds, and
``fedmerge.federation.evaluation.evaluate_per_task`` as the evaluator — then applies every method
to the one set of client models. Client models are cached under ``--cache`` so a rerun only merges.

    .venv/bin/python experiments/smile_text_table.py --out docs/results/moe_table.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments.client_cache import load_client_models, save_client_models  # noqa: E402
from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator  # noqa: E402
from fedmerge.aggregators.merging import count_parameters, stored_bytes  # noqa: E402
from fedmerge.clients.partition import limit_examples, partition  # noqa: E402
from fedmerge.clients.tasks import get_task  # noqa: E402
from fedmerge.clients.training import TrainConfig, get_state, train  # noqa: E402
from fedmerge.federation.config import load_config  # noqa: E402
from fedmerge.federation.evaluation import evaluate_per_task  # noqa: E402
from fedmerge.federation.proxy import proxy_inputs, proxy_split  # noqa: E402
from fedmerge.federation.server import partition_params  # noqa: E402
from fedmerge.federation.strategy import FedMergeStrategy  # noqa: E402

METHODS = [
    ("simple average", "simple_average", {}),
    ("task arithmetic (λ=0.3)", "task_arithmetic", {"lam": 0.3}),
    ("TIES (top 20%, λ=0.3)", "ties", {"lam": 0.3, "keep": 0.2}),
    ("SMILE (4, 16)", "smile", {"k_gate": 4, "k": 16}),
    ("SMILE (16, 32)", "smile", {"k_gate": 16, "k": 32}),
    ("SMILE (16, 64)", "smile", {"k_gate": 16, "k": 64}),
]


def fine_tune(task, shards, theta0, cfg: TrainConfig, seed: int, label: str, cache: Path):
    """Each client's model after one local round from θ0 (cached), and the seconds it took."""
    cached = load_client_models(cache, label)
    if cached is not None:
        return cached
    strategy = FedMergeStrategy(aggregator=None, evaluator=None, num_clients=len(shards), seed=seed)
    updates, seconds = [], []
    for cid, shard in enumerate(shards):
        model = task.build_model()
        model.load_state_dict(theta0)
        started = time.perf_counter()
        metrics = train(model, task, shard, cfg, seed=strategy.client_seed(1, cid))
        seconds.append(time.perf_counter() - started)
        print(
            f"  {label} client {cid} (task {task.client_task_id(shard)}): {len(shard)} examples, "
            f"train acc {metrics['train_accuracy']:.3f}, {seconds[-1]:.1f} s",
            flush=True,
        )
        updates.append(
            ClientUpdate(
                cid, get_state(model), len(shard), {"task_id": float(task.client_task_id(shard))}
            )
        )
    save_client_models(cache, label, updates, seconds)
    return updates, seconds


def per_task_of_own_models(task, updates, test, batch_size: int) -> dict[str, float]:
    """Each task scored by its own client's model (the upper / lower bound rows)."""
    groups = task.task_index(test.x)
    out: dict[str, float] = {}
    for u in updates:
        t = int(u.metrics["task_id"])
        model = task.build_model()
        model.load_state_dict(u.state)
        part = test.subset(np.flatnonzero(groups == t))
        out[f"accuracy/{task.task_names[t]}"] = evaluate_per_task(
            model, task, part, batch_size=batch_size
        )["accuracy"]
    return out


def _agrees(old: dict, new: dict) -> bool:
    """``new`` has every setting of ``old`` (fields added to the config since keep their defaults)."""
    return all(
        _agrees(v, new.get(k))
        if isinstance(v, dict) and isinstance(new.get(k), dict)
        else new.get(k) == v
        for k, v in old.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "smile_text.toml"))
    parser.add_argument(
        "--set", action="append", default=[], help="config override, as for fedmerge run"
    )
    parser.add_argument("--cache", default=str(ROOT / "runs" / "_smile_text_table"))
    parser.add_argument("--wemoe-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--aggregators",
        default="",
        help="comma-separated aggregator names (e.g. wemoe): run only their rows and replace "
        "them in an existing --out report, keeping its other rows",
    )
    args = parser.parse_args()
    only = {a.strip() for a in args.aggregators.split(",") if a.strip()}
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    task = get_task(cfg.data.task)
    groups_of = task.task_index
    train_data, test = task.load("train"), task.load("test")
    train_data = limit_examples(
        train_data, cfg.data.max_train_examples, cfg.seed, groups_of(train_data.x)
    )
    test = limit_examples(test, cfg.data.max_test_examples, cfg.seed, groups_of(test.x))
    train_data, proxy_source = proxy_split(
        task,
        train_data,
        test,
        source=cfg.data.proxy_inputs,
        size=cfg.data.proxy_size,
        seed=cfg.seed,
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
    torch.manual_seed(cfg.seed)
    model0 = task.build_model()
    theta0 = get_state(model0)
    one_model = count_parameters(model0)
    batch = cfg.evaluation.batch_size
    key = f"{cfg.data.task}-s{cfg.seed}-n{cfg.data.max_train_examples}-c{cfg.data.num_clients}"
    if cfg.data.proxy_inputs == "held_out":  # the clients trained on less
        key += f"-proxy{cfg.data.proxy_size}"
    cache = Path(args.cache)
    timing: dict[str, float] = {}
    rows: list[dict] = []

    def row(name: str, metrics: dict[str, float], params: float, **extra: float) -> None:
        accs = {n: metrics[f"accuracy/{n}"] for n in task.task_names}
        rows.append(
            {
                "method": name,
                **accs,
                "average": float(np.mean(list(accs.values()))),
                "params_ratio": params,
                **extra,
            }
        )
        print(
            f"{name:28s} "
            + "  ".join(f"{n} {a:.3f}" for n, a in accs.items())
            + f"  avg {rows[-1]['average']:.3f}  params x{params:.2f}",
            flush=True,
        )

    print(f"fine-tuning {len(shards)} clients, {cfg.train}", flush=True)
    updates, seconds = fine_tune(task, shards, theta0, cfg.train, cfg.seed, f"{key}-full", cache)
    timing["fine_tune_s_per_client"] = float(np.mean(seconds))
    heads_cfg = TrainConfig(**{**cfg.train.__dict__, "trainable": r"^heads\.", "lr": 1e-3})
    head_updates, head_seconds = fine_tune(
        task, shards, theta0, heads_cfg, cfg.seed, f"{key}-heads", cache
    )
    timing["heads_only_s_per_client"] = float(np.mean(head_seconds))

    if not only:
        started = time.perf_counter()
        row(
            "individual fine-tuned (upper)",
            per_task_of_own_models(task, updates, test, batch),
            float(len(updates)),
        )
        row(
            "pretrained + heads (lower)",
            per_task_of_own_models(task, head_updates, test, batch),
            1.0,
        )
        timing["evaluate_s_bounds"] = time.perf_counter() - started

    proxy = {t: task.preprocess(x) for t, x in proxy_inputs(task, proxy_source).items()}
    ctx = RoundContext(
        round=1,
        global_state=theta0,
        base_state=theta0,
        seed=cfg.seed,
        build_model=task.build_model,
        proxy_inputs=proxy,
    )
    for name, agg_name, params in [
        *METHODS,
        ("WEMoE", "wemoe", {"steps": args.wemoe_steps}),
        ("E-WEMoE (10%, shared router)", "wemoe", {"steps": args.wemoe_steps, "efficient": True}),
    ]:
        if only and agg_name not in only:
            continue
        started = time.perf_counter()
        result = create_aggregator(agg_name, params).aggregate(ctx, updates)
        merge_s = time.perf_counter() - started
        if result.served_model is not None:
            model = result.served_model
        else:
            model = task.build_model()
            model.load_state_dict(result.state)
        started = time.perf_counter()
        metrics = evaluate_per_task(model, task, test, batch_size=batch)
        eval_s = time.perf_counter() - started
        params_ratio = result.metrics.get("params_ratio", count_parameters(model) / one_model)
        row(
            name,
            metrics,
            float(params_ratio),
            merge_s=merge_s,
            evaluate_s=eval_s,
            bytes_ratio=stored_bytes(model) / stored_bytes(model0),  # sparse positions included
            **{
                k: float(v)
                for k, v in result.metrics.items()
                if k.endswith("_s") or k.startswith("router_")
            },
        )
    report = {
        "config": cfg.to_dict(),
        "rows": rows,
        "timing": timing,
        "one_model_params": one_model,
        "threads": args.threads,
        "loadavg": os.getloadavg(),
    }
    if (
        only and args.out and Path(args.out).is_file()
    ):  # replace these rows, keep the rest as measured
        old = json.loads(Path(args.out).read_text())
        if not _agrees(old["config"], report["config"]):
            raise SystemExit(
                f"{args.out} was measured with another config; run every row (no --aggregators)"
            )
        new = {r["method"]: r for r in rows}
        report = {
            **old,
            "rows": [new.pop(r["method"], r) for r in old["rows"]] + list(new.values()),
            "timing": {**old["timing"], **timing},
            "rerun": [
                *old.get("rerun", []),
                {
                    "rows": [r["method"] for r in rows],
                    "loadavg": os.getloadavg(),
                    "threads": args.threads,
                },
            ],
        }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(timing))


if __name__ == "__main__":
    main()
