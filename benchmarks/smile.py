"""SMILE construction on MiniLM-L6: full SVD vs randomised low-rank SVD, time and accuracy.

    python -m benchmarks.smile            # 4, 8 and 16 experts fine-tuned on 3 text tasks
    python -m benchmarks.smile --quick    # 1 and 2 experts, a few examples: a smoke test

The experts are real: clients of ``experiments/smile_text.toml`` (all-MiniLM-L6-v2 with a head per
task; WordNet nouns, WordNet verbs, Rotten Tomatoes; client c holds task c mod 3) fine-tune θ0
once each, as in a one-shot federated round (local training with the strategy's per-client seeds).
max(E, 3) clients are fine-tuned once; E experts are the first E of them. Fine-tuned models
are cached under ``--cache`` (a rerun only merges).

For each E and each SVD the ``Smile`` aggregator merges the experts exactly as the
AggregatorActor runs it (``aggregate`` with the actor's RoundContext): ``construct_s`` is its
upscaling (SVDs and layer swaps; ``fedmerge.aggregators.smile.upscale_model``), "merge s" the whole call.
The served MoE is scored on each task's test set (``fedmerge.federation.evaluation.evaluate_per_task``).
"Randomized" is ``torch.svd_lowrank`` with ``svd_niter`` power iterations: it computes the
top k + 10 singular triplets only, where the full SVD computes all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    add_json_flag,
    format_machine,
    machine_info,
    markdown_table,
    quiet_env,
    write_json,
)

CONFIG = ROOT / "experiments" / "smile_text.toml"
FULL = {
    "experts": (4, 8, 16),
    "overrides": ["data.max_train_examples=600", "data.max_test_examples=300"],
}
QUICK = {
    "experts": (1, 2),
    "overrides": [
        "data.max_train_examples=24",
        "data.max_test_examples=16",
        "train.batch_size=8",
        "evaluation.batch_size=64",
    ],
}
SVDS = ("full", "randomized")


def fine_tune(
    task: Any, shards: Sequence[Any], theta0: Any, cfg: Any, seed: int, cache: Path | None
) -> list[Any]:
    """One ClientUpdate per shard: θ0 trained one local round with the strategy's client seed."""
    import torch

    from fedmerge.aggregators import ClientUpdate
    from fedmerge.clients.training import get_state, train
    from fedmerge.federation.strategy import FedMergeStrategy

    path = cache / "experts.pt" if cache is not None else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=False)
    seeds = FedMergeStrategy(aggregator=None, evaluator=None, num_clients=len(shards), seed=seed)
    updates = []
    for cid, shard in enumerate(shards):
        model = task.build_model()
        model.load_state_dict(theta0)
        started = time.perf_counter()
        metrics = train(model, task, shard, cfg, seed=seeds.client_seed(1, cid))
        print(
            f"  expert {cid} (task {task.task_names[task.client_task_id(shard)]}): {len(shard)} examples, "
            f"train acc {metrics['train_accuracy']:.3f}, {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        updates.append(
            ClientUpdate(
                cid, get_state(model), len(shard), {"task_id": float(task.client_task_id(shard))}
            )
        )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(updates, path)
    return updates


def run(
    experts: Sequence[int],
    overrides: Sequence[str],
    cache: Path | None,
    threads: int,
    figures_out: dict[str, Any] | None = None,
) -> list[list[Any]]:
    """The table's rows; with ``figures_out``, every figure unrounded too (``{experts: {svd: ...}}``)."""
    import numpy as np
    import torch

    from fedmerge.aggregators import RoundContext, create_aggregator
    from fedmerge.clients.partition import limit_examples, partition
    from fedmerge.clients.tasks import get_task
    from fedmerge.clients.training import get_state
    from fedmerge.federation.config import load_config
    from fedmerge.federation.evaluation import evaluate_per_task
    from fedmerge.federation.server import partition_params

    torch.set_num_threads(threads)
    # by_task gives client c task c mod 3, so at least one client per task is fine-tuned.
    cfg = load_config(CONFIG, [*overrides, f"data.num_clients={max(*experts, 3)}"])
    task = get_task(cfg.data.task)
    groups_of = task.task_index
    train_data, test = task.load("train"), task.load("test")
    train_data = limit_examples(
        train_data, cfg.data.max_train_examples, cfg.seed, groups_of(train_data.x)
    )
    test = limit_examples(test, cfg.data.max_test_examples, cfg.seed, groups_of(test.x))
    parts = partition(
        train_data.y,
        cfg.data.num_clients,
        cfg.data.partitioner,
        cfg.seed,
        groups=groups_of(train_data.x),
        **partition_params(cfg.data),
    )
    torch.manual_seed(cfg.seed)
    theta0 = get_state(task.build_model())
    key = f"{cfg.data.task}-s{cfg.seed}-n{cfg.data.max_train_examples}-c{cfg.data.num_clients}-{cfg.train.lr}"
    updates = fine_tune(
        task,
        [train_data.subset(p) for p in parts],
        theta0,
        cfg.train,
        cfg.seed,
        cache / key if cache is not None else None,
    )
    ctx = RoundContext(
        round=1, global_state=theta0, base_state=theta0, seed=cfg.seed, build_model=task.build_model
    )
    params = {k: v for k, v in cfg.aggregator.params.items() if k != "svd"}
    rows = []
    for count in experts:
        figures: dict[str, dict[str, float]] = {}
        for svd in SVDS:
            aggregator = create_aggregator("smile", {**params, "svd": svd})
            started = time.perf_counter()
            result = aggregator.aggregate(ctx, updates[:count])
            merge_s = time.perf_counter() - started
            metrics = evaluate_per_task(
                result.served_model, task, test, batch_size=cfg.evaluation.batch_size
            )
            figures[svd] = {
                "construct_s": result.metrics["construct_s"],
                "merge_s": merge_s,
                "accuracy": metrics["accuracy"],
                "params_ratio": result.metrics["params_ratio"],
                "tasks": np.mean(
                    [
                        metrics[f"accuracy/{n}"]
                        for n in task.task_names
                        if f"accuracy/{n}" in metrics
                    ]
                ),
            }
            print(
                f"  {count} experts, {svd} SVD: construct {figures[svd]['construct_s']:.2f} s, "
                f"accuracy {metrics['accuracy']:.4f}",
                file=sys.stderr,
                flush=True,
            )
        full, rand = figures["full"], figures["randomized"]
        if figures_out is not None:
            figures_out[str(count)] = {
                svd: {k: float(v) for k, v in f.items()} for svd, f in figures.items()
            }
        rows.append(
            [
                count,
                f"{full['construct_s']:.2f}",
                f"{rand['construct_s']:.2f}",
                f"{full['construct_s'] / rand['construct_s']:.1f}x",
                f"{full['merge_s']:.2f}",
                f"{rand['merge_s']:.2f}",
                f"{full['accuracy']:.4f}",
                f"{rand['accuracy']:.4f}",
                f"{100 * (rand['accuracy'] - full['accuracy']):+.2f}",
                f"{full['params_ratio']:.2f}",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.smile", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 and 2 experts on a few examples: a smoke test"
    )
    parser.add_argument(
        "--cache",
        default=str(ROOT / "runs" / "_bench_smile"),
        help="where fine-tuned experts are kept for reruns (--quick: a temporary folder)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    quiet_env()
    plan = QUICK if args.quick else FULL
    print("# SMILE construction: full SVD vs randomised low-rank SVD (MiniLM-L6)")
    print(format_machine(machine_info()))
    print(
        f"experiments/smile_text.toml with {' '.join(plan['overrides'])}, {args.threads} torch threads"
    )
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-smile-") as tmp:
        cache = Path(tmp) if args.quick else Path(args.cache)
        figures: dict[str, Any] = {}
        rows = run(plan["experts"], plan["overrides"], cache, args.threads, figures)
    write_json(
        args.json, {"machine": machine_info(), "overrides": plan["overrides"], "experts": figures}
    )
    print()
    print(
        markdown_table(
            [
                "experts",
                "construct s, full SVD",
                "construct s, randomized",
                "speed-up",
                "merge s, full",
                "merge s, randomized",
                "accuracy, full",
                "accuracy, randomized",
                "accuracy difference (pp)",
                "served params / one model",
            ],
            rows,
        )
    )
    print(
        "\naccuracy: all tasks' test examples together; difference = randomized - full, in percentage points."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
