"""A LoRA round next to a full fine-tuning round: time, bytes on the wire, server memory.

    python -m benchmarks.lora            # all-MiniLM-L6-v2 on Rotten Tomatoes, 4 clients, 3 rounds
    python -m benchmarks.lora --quick    # digits MLP, LoRA on its first layer: a smoke test

Every arm is a real fedmerge experiment (``run_experiment``: Ray, the server actors and Flower's
simulation, as ``fedmerge run`` does) of ``experiments/lora_text.toml`` with the same clients,
data, partition and seed; only the training and the merge differ:

- **full**: full fine-tuning (``train.peft.method = ""``) at the encoder's usual Adam step
  (``--full-lr``, 5e-5: the adapters' 1e-3 would wreck a pretrained encoder); every tensor of the
  model travels both ways and FedAvg merges them all;
- **fedit**: LoRA adapters (rank 8 on query and value) and the head train and travel; A and B are
  averaged apart (``aggregator.adapters = "factors"``, FedIT);
- **products**: the same clients; the server merges the products B·A exactly and folds them into
  the adapted layers' base weights (``"products"``), so it also sends those base weights down.

A round's time is wall clock from the end of the previous round to the end of this one (its
evaluation, records and checkpoint included); round 1 also carries the start-up and is shown
apart, the steady figure is the median of the later rounds. Bytes sent and received per round are
the run's own ``bytes_sent`` / ``bytes_received`` system metrics (``np.save`` bytes of the arrays
as Flower carries them); "one update" is the bytes of the tensors a client sends back, computed
from the shared model, and checked against the received bytes. Each arm runs in a fresh process;
server memory is the peak resident set (VmHWM) of that driver and of its AggregatorActor and
EvaluatorActor processes (``benchmarks.common``), an upper bound when summed.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    ProcessPeaks,
    WorkerError,
    add_address_flag,
    add_json_flag,
    add_worker_flag,
    address_override,
    emit_result,
    format_machine,
    machine_info,
    markdown_table,
    peak_rss_mb,
    quiet_env,
    ran_as_worker,
    run_worker,
    write_json,
)

ARMS = ("full", "fedit", "products")
ACTOR_PREFIXES = {"aggregator": "ray::AggregatorActor", "evaluator": "ray::EvaluatorActor"}
ROUND_LINE = re.compile(r"round +\d+/\d+ ")  # the per-round progress line (not the final table's)

FULL = {
    "experiment": ROOT / "experiments" / "lora_text.toml",
    "clients": 4,
    "rounds": 3,
    "examples": 64,
    "test_examples": 200,
    "full_lr": 5e-5,
    # Pinned, so the figures in docs/benchmarks.md stay what they measured whatever the experiment
    # file's tuning: rank-8 adapters on query and value, label skew 1.0, adapters at lr 1e-3.
    "extra": [
        "train.peft.target_modules=['query', 'value']",
        "data.alpha=1.0",
        "train.lr=0.001",
    ],
}
# The digits MLP is Sequential(Linear 64->64, ReLU, Linear 64->10): adapters on the first layer,
# the last one (the head) trains in full (as in tests/test_lora_end_to_end.py).
QUICK = {
    "experiment": ROOT / "experiments" / "fashion_mnist_fedavg.toml",
    "clients": 3,
    "rounds": 2,
    "examples": 120,
    "test_examples": 300,
    "full_lr": 0.01,
    "extra": [
        "data.task='digits'",
        "train.batch_size=16",
        "train.optimizer='adam'",
        "train.lr=0.01",
        "evaluation.batch_size=512",
        "train.peft.method='lora'",
        "train.peft.r=4",
        "train.peft.target_modules=['0']",
        "train.peft.trainable='^2\\.'",
    ],
}


def overrides(
    plan: Mapping[str, Any], clients: int, rounds: int, examples: int, root: Path
) -> list[str]:
    """What every arm shares (``--set`` syntax over the plan's experiment file)."""
    return [
        "name=bench-lora",
        *plan["extra"],
        f"data.num_clients={clients}",
        f"data.max_train_examples={clients * examples}",
        f"data.max_test_examples={plan['test_examples']}",
        f"data.cache_dir={str(root / 'shards')!r}",
        f"output.root={str(root / 'runs')!r}",
        f"federation.num_rounds={rounds}",
        "federation.fraction_train=1.0",
        f"federation.min_train_nodes={clients}",
        "ray.client_num_cpus=1.0",
        "output.plot=false",
    ]


def arm_overrides(arm: str, full_lr: float) -> list[str]:
    """What one arm changes over the shared overrides."""
    if arm == "full":
        return ["train.peft.method=''", f"train.lr={full_lr!r}"]
    return [f"aggregator.adapters='{'factors' if arm == 'fedit' else 'products'}'"]


# ---- the measurement (one arm, in its own worker process) ---------------------------------


def wire_bytes(state: Mapping[str, Any]) -> int:
    """The bytes Flower carries for ``state``'s tensors (``flwr.app.Array``: ``np.save`` format)."""
    from flwr.app import Array

    return sum(len(Array(v.detach().cpu().numpy()).data) for v in state.values())


def _series(run_dir, scope: str, metric: str) -> list[float]:
    rows = [
        r for r in run_dir.metrics().to_pylist() if r["scope"] == scope and r["metric"] == metric
    ]
    return [r["value"] for r in sorted(rows, key=lambda r: r["round"])]


def measure_arm(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One arm run as a user runs it; round boundaries from its per-round progress lines."""
    from fedmerge.federation.config import load_config
    from fedmerge.federation.runner import run_experiment
    from fedmerge.federation.server import build_aggregator, federated_model, merges_products

    config = load_config(spec["experiment"], list(spec["overrides"]))
    peaks = ProcessPeaks(ACTOR_PREFIXES)
    marks: list[float] = []

    def progress(line: str) -> None:
        if line.startswith("aggregator "):  # printed just before Flower's simulation starts
            marks.append(time.perf_counter())
        elif ROUND_LINE.match(line):
            marks.append(time.perf_counter())
            peaks.sample()

    started = time.perf_counter()
    outcome = run_experiment(config, progress=progress)
    wall = time.perf_counter() - started
    driver_peak_mb = peak_rss_mb()  # before this process builds the model once more below
    run = outcome.run_dir
    accuracy = run.server_curve("accuracy")
    shared = federated_model(
        config.task_spec.build(),
        seed=config.seed,
        products=merges_products(config, build_aggregator(config)),
    )
    reply = {k: shared.initial_state[k] for k in shared.reply_keys}
    responded = [
        s - f
        for s, f in zip(
            _series(run, "system", "clients_sampled"), _series(run, "system", "clients_failed")
        )
    ]
    return {
        "round_s": [b - a for a, b in zip(marks, marks[1:])],
        "wall_s": wall,
        "start_s": marks[0] - started if marks else math.nan,
        "bytes_sent": _series(run, "system", "bytes_sent"),
        "bytes_received": _series(run, "system", "bytes_received"),
        "clients_responded": responded,
        "aggregate_s": _series(run, "aggregator", "aggregate_s"),
        "evaluate_s": _series(run, "server", "evaluate_s"),
        "update_bytes": wire_bytes(reply),
        "update_params": sum(v.numel() for v in reply.values()),
        "global_bytes": wire_bytes(shared.initial_state),
        "reply_keys": sorted(shared.reply_keys),
        "final_accuracy": accuracy[-1][1] if accuracy else math.nan,
        "driver_peak_mb": driver_peak_mb,
        "actor_peak_mb": dict(peaks.peaks),
    }


def worker(spec: Mapping[str, Any]) -> None:
    quiet_env()
    emit_result(measure_arm(spec))


# ---- the driver ---------------------------------------------------------------------------


def steady_round_s(result: Mapping[str, Any]) -> float:
    """The median round time after round 1 (which carries the start-up)."""
    rounds = result["round_s"]
    return statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]


def summarise(arm: str, result: Mapping[str, Any], full: Mapping[str, Any] | None) -> list[Any]:
    mb = 1e6
    sent = statistics.mean(result["bytes_sent"]) / mb
    received = statistics.mean(result["bytes_received"]) / mb
    actors = result["actor_peak_mb"]
    share = (
        f"{100 * result['update_bytes'] / full['update_bytes']:.2f} %" if full is not None else "-"
    )
    return [
        arm,
        f"{steady_round_s(result):.2f}",
        f"{result['round_s'][0]:.2f}",
        f"{sent:,.3f}",
        f"{received:,.3f}",
        f"{result['update_bytes'] / mb:,.3f}",
        share,
        f"{result['update_params']:,}",
        f"{result['driver_peak_mb']:,.0f}",
        f"{actors.get('aggregator', 0.0):,.0f}",
        f"{actors.get('evaluator', 0.0):,.0f}",
        f"{result['driver_peak_mb'] + sum(actors.values()):,.0f}",
        f"{result['final_accuracy']:.4f}",
    ]


def breakdown(arm: str, result: Mapping[str, Any]) -> list[Any]:
    """Where a steady round goes: the server actors' own timings against the whole round."""
    steady = steady_round_s(result)
    aggregate = statistics.median(result["aggregate_s"][1:])
    evaluate = statistics.median(result["evaluate_s"][1:])
    return [
        arm,
        f"{steady:.2f}",
        f"{aggregate:.2f}",
        f"{evaluate:.2f}",
        f"{steady - aggregate - evaluate:.2f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lora", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="digits MLP with LoRA on its first layer, 3 clients, 2 rounds: a smoke test",
    )
    parser.add_argument("--clients", type=int, help="clients, all train every round (default 4)")
    parser.add_argument(
        "--rounds", type=int, help="rounds per arm (default 3; --quick: 2); round 1 is start-up"
    )
    parser.add_argument(
        "--examples",
        type=int,
        help="training examples per client on average (Dirichlet split; default 64)",
    )
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"which of {','.join(ARMS)} to run (default all)",
    )
    parser.add_argument(
        "--full-lr", type=float, help="the full fine-tuning arm's learning rate (default 5e-5)"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per arm")
    add_address_flag(parser)
    add_json_flag(parser)
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if ran_as_worker(args, worker):
        return 0
    plan = QUICK if args.quick else FULL
    clients = args.clients if args.clients is not None else plan["clients"]
    rounds = args.rounds if args.rounds is not None else plan["rounds"]
    examples = args.examples if args.examples is not None else plan["examples"]
    full_lr = args.full_lr if args.full_lr is not None else plan["full_lr"]
    if rounds < 2:
        parser.error(f"--rounds must be >= 2 (round 1 carries the start-up), got {rounds}")
    if clients < 1 or examples < 1:
        parser.error(f"--clients and --examples must be >= 1, got {clients} and {examples}")
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - set(ARMS):
        parser.error(f"--arms takes names from {','.join(ARMS)}, got {args.arms!r}")
    quiet_env()
    info = machine_info()
    experiment = Path(plan["experiment"])
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-lora-") as tmp:
        quiet_env(Path(tmp))
        shared = overrides(plan, clients, rounds, examples, Path(tmp)) + address_override(
            args.address
        )
        print("# A LoRA round next to a full fine-tuning round")
        print(format_machine(info))
        print(
            f"experiment: {experiment.relative_to(ROOT)} with "
            + " ".join(shared).replace(tmp, "<tmp>")
        )
        for arm in arms:
            spec = {
                "experiment": str(experiment),
                "overrides": [*shared, *arm_overrides(arm, full_lr)],
            }
            print(f"  {arm}: {' '.join(arm_overrides(arm, full_lr))}")
            try:
                results[arm] = run_worker("benchmarks.lora", spec, timeout=args.timeout)
            except WorkerError as err:
                print(f"  {arm}: FAILED\n{err}", file=sys.stderr)
                return 1
            results[arm]["overrides"] = [o.replace(tmp, "<tmp>") for o in spec["overrides"]]
            print(f"  {arm}: done in {results[arm]['process_s']:.0f}s", file=sys.stderr)
    full = results.get("full")
    print()
    print(
        markdown_table(
            [
                "arm",
                "steady round s (median)",
                "round 1 s",
                "sent MB / round",
                "received MB / round",
                "one update MB",
                "update / full update",
                "update params",
                "driver peak RSS MB",
                "aggregator peak RSS MB",
                "evaluator peak RSS MB",
                "server peak RSS MB",
                "final test accuracy",
            ],
            [summarise(arm, results[arm], full) for arm in arms],
        )
    )
    print(
        "\nsent: the global model's shared tensors to every sampled client; received: the clients'"
        " replies; one update: the tensors one client sends back. Server peak RSS sums the driver"
        " and the two actors (an upper bound: shared pages count in each)."
    )
    print()
    print(
        markdown_table(
            [
                "arm",
                "steady round s (median)",
                "aggregate s",
                "evaluate s",
                "rest s (clients, messages, records)",
            ],
            [breakdown(arm, results[arm]) for arm in arms],
        )
    )
    print(
        "\naggregate: the AggregatorActor's merge of the round (its aggregate_s metric); evaluate:"
        " the EvaluatorActor scoring the global model on the test set; medians of rounds 2.."
    )
    print(
        "per-round times (s): "
        + "; ".join(
            f"{arm} " + ", ".join(f"{t:.2f}" for t in results[arm]["round_s"]) for arm in arms
        )
    )
    write_json(
        args.json,
        {
            "machine": info,
            "experiment": str(experiment.relative_to(ROOT)),
            "clients": clients,
            "rounds": rounds,
            "examples_per_client": examples,
            "arms": results,
            "steady_round_s": {arm: steady_round_s(results[arm]) for arm in arms},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
