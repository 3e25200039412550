"""Federated rounds of the same clients, model and data: a plain Flower FedAvg simulation vs fedmerge.

    python -m benchmarks.round            # Fashion-MNIST CNN, 10 iid clients, 5 a round, 4 rounds
    python -m benchmarks.round --quick    # digits MLP, 4 clients, 2 a round, 2 rounds: a smoke test

Both runs use fedmerge's ClientApp (``fedmerge.clients.app``: the same local training, the same shards,
the same seeded initial model), the same local Ray (``fedmerge.federation.runner.init_ray``) and the same
client resources, and both score the global model on the server's test set after every round:

- **Flower**: ``flwr.simulation.run_simulation`` with a ServerApp running Flower's own
  ``flwr.serverapp.strategy.FedAvg`` (``Strategy.start``: ``send_and_receive`` then
  ``aggregate_train``), one SuperNode per client (the node's ``partition-id`` picks the shard),
  and the centralized evaluation as ``evaluate_fn`` in the ServerApp's process;
- **fedmerge**: ``fedmerge.federation.runner.run_experiment`` with the same settings: virtual clients,
  replies streamed into the AggregatorActor, evaluation in the EvaluatorActor, metrics, events and
  a checkpoint written every round (the defaults).

A round's time is wall clock from the end of the previous round to the end of this one (after its
evaluation and, for fedmerge, its records and checkpoint); round 1 also carries the start-up (Ray
actors importing torch), so it is shown apart and the steady figure is the median of the later
rounds. **Client compute** is the ideal round: the sampled clients' local training timed
in-process without any framework (same shards, threads and seed), spread over the simulation's
parallel client slots. **Overhead** = steady round time - client compute: what the federation
(messaging, serialisation, aggregation, evaluation, bookkeeping) adds.

Each system runs in a fresh process; "server peak RSS" is that process's peak (Flower's ServerApp
runs in it) plus, for fedmerge, its AggregatorActor and EvaluatorActor processes.
"""

from __future__ import annotations

import argparse
import math
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

DEFAULT_EXPERIMENT = ROOT / "experiments" / "fashion_mnist_fedavg.toml"
SYSTEMS = ("flower", "fedmerge")
ACTOR_PREFIXES = {"aggregator": "ray::AggregatorActor", "evaluator": "ray::EvaluatorActor"}


def overrides(quick: bool, rounds: int | None, root: Path) -> list[str]:
    """The experiment both systems run (``--set`` syntax over the default experiment's file)."""
    if quick:
        sizes = [
            "data.task=digits",
            "data.num_clients=4",
            "train.batch_size=16",
            "evaluation.batch_size=512",
        ]
        rounds = rounds or 2
    else:
        sizes = ["data.task=fashion_mnist", "data.num_clients=10"]
        rounds = rounds or 4
    return [
        "name=bench-round",
        "seed=7",
        *sizes,
        "data.partitioner=iid",
        f"data.cache_dir={str(root / 'shards')!r}",
        f"output.root={str(root / 'runs')!r}",
        f"federation.num_rounds={rounds}",
        "federation.fraction_train=0.5",
        "federation.min_train_nodes=2",
        "train.local_epochs=1",
        "ray.client_num_cpus=1.0",
        "output.plot=false",
    ]


def _config(spec: Mapping[str, Any]):
    from fedmerge.federation.config import load_config

    return load_config(DEFAULT_EXPERIMENT, list(spec["overrides"]))


def _shards(config):
    """(task, test split, shard directory) exactly as ``Experiment.setup`` makes them."""
    from fedmerge.clients.partition import materialize_shards
    from fedmerge.clients.tasks import get_task
    from fedmerge.federation.server import partition_params

    task = get_task(config.data.task)
    train, test = task.load("train"), task.load("test")
    cache_dir = Path(config.data.cache_dir).resolve()
    shard_dir = materialize_shards(
        task,
        train,
        config.data.num_clients,
        config.data.partitioner,
        config.seed,
        partition_params(config.data),
        cache_dir,
    )
    return task, test, shard_dir


def _slots(config) -> int:
    """Clients that run at once: Flower's actor pool is CPUs // client_num_cpus (at least one)."""
    import os

    cpus = config.ray.num_cpus or os.cpu_count() or 1
    return max(1, int(cpus // config.ray.client_num_cpus))


# ---- the measurements (each in its own worker process) ------------------------------------


def measure_compute(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Local training of the clients a round samples, alone in this process: the framework-free cost."""
    import torch

    from fedmerge.clients.app import local_split
    from fedmerge.clients.partition import open_shard, shard_path
    from fedmerge.clients.training import TrainConfig, set_state, train
    from fedmerge.federation.server import Experiment

    config = _config(spec)
    task, _, shard_dir = _shards(config)
    torch.manual_seed(config.seed)
    initial = task.build_model().state_dict()
    per_round = Experiment(config, None).clients_per_round  # type: ignore[arg-type]  # only the config is read
    torch.set_num_threads(max(1, int(config.ray.client_num_cpus)))
    times = []
    for client in [0, *range(per_round)]:  # client 0 once more first, untimed: first-call costs
        data, _ = local_split(
            open_shard(shard_path(shard_dir, client)),
            config.data.local_test_fraction,
            seed=config.seed * 1_000_003 + client,
        )
        model = task.build_model()
        set_state(model, initial)
        start = time.perf_counter()
        train(model, task, data, TrainConfig(**_train_fields(config)), seed=config.seed)
        times.append(time.perf_counter() - start)
    times = times[1:]
    slots = min(_slots(config), per_round)
    return {
        "client_s": times,
        "clients_per_round": per_round,
        "slots": slots,
        "ideal_round_s": sum(times) / slots,
    }


def _train_fields(config) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config.train)


def measure_fedmerge(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``run_experiment`` as a user runs it; round boundaries from its per-round progress lines."""
    from fedmerge.federation.runner import run_experiment

    config = _config(spec)
    peaks = ProcessPeaks(ACTOR_PREFIXES)
    marks: list[float] = []

    def progress(line: str) -> None:
        if line.startswith("aggregator "):  # printed just before Flower's simulation starts
            marks.append(time.perf_counter())
        elif line.startswith("round "):
            marks.append(time.perf_counter())
            peaks.sample()

    started = time.perf_counter()
    outcome = run_experiment(config, progress=progress)
    wall = time.perf_counter() - started
    accuracy = outcome.run_dir.server_curve("accuracy")
    return {
        "round_s": [b - a for a, b in zip(marks, marks[1:])],
        "wall_s": wall,
        "start_s": marks[0] - started if marks else math.nan,
        "end_s": started + wall - marks[-1] if marks else math.nan,
        "final_accuracy": accuracy[-1][1] if accuracy else math.nan,
        "driver_peak_mb": peak_rss_mb(),
        "actor_peak_mb": dict(peaks.peaks),
    }


def run_flower_strategy(
    config: Any,
    strategy: Any,
    initial: Mapping[str, Any],
    evaluate_fn: Any,
    train_config: Mapping[str, Any],
) -> list[str]:
    """``strategy.start`` in a plain Flower ``run_simulation`` over fedmerge's ClientApp, one
    SuperNode per client, on the local Ray fedmerge would start; returns the ServerApp's errors.

    ``train_config`` is the ConfigRecord every train message carries (fedmerge's run config,
    seed, and any aggregator config the clients read)."""
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmerge.clients.app import app as client_app
    from fedmerge.federation.runner import init_ray

    failures: list[str] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            strategy.start(
                grid,
                ArrayRecord(torch_state_dict=dict(initial)),
                num_rounds=config.federation.num_rounds,
                timeout=config.federation.round_timeout_s,
                evaluate_fn=evaluate_fn,
                train_config=ConfigRecord(dict(train_config)),
            )
        except BaseException as err:
            failures.append(repr(err))
            raise

    logging.getLogger("flwr").setLevel(logging.WARNING)
    init_ray(config)
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=config.data.num_clients,
        backend_config={
            "client_resources": {
                "num_cpus": config.ray.client_num_cpus,
                "num_gpus": config.ray.client_num_gpus,
            }
        },
    )
    return failures


def measure_flower(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's FedAvg strategy in a plain ``run_simulation``, driving fedmerge's ClientApp."""
    import json

    import torch
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from fedmerge.clients.app import RUN_CONFIG_KEY
    from fedmerge.clients.tasks.base import ArrayData
    from fedmerge.clients.training import evaluate, get_state, set_state
    from fedmerge.federation.server import Experiment

    config = _config(spec)
    started = time.perf_counter()
    task, test, shard_dir = _shards(config)
    experiment = Experiment(config, None)  # type: ignore[arg-type]  # only run_config() is used
    experiment.shard_dir = shard_dir
    run_config = experiment.run_config()
    torch.manual_seed(config.seed)
    initial = get_state(task.build_model())
    test_data = ArrayData(test.x, test.y)
    eval_model = task.build_model()
    marks: list[float] = []
    accuracy: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # fedmerge does not score the initial model either
            marks.append(time.perf_counter())
            return None
        set_state(eval_model, arrays.to_torch_state_dict())
        metrics = evaluate(eval_model, task, test_data, batch_size=config.evaluation.batch_size)
        accuracy.append(metrics["accuracy"])
        marks.append(time.perf_counter())
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    strategy = FedAvg(
        fraction_train=config.federation.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=config.federation.min_train_nodes,
        min_available_nodes=config.data.num_clients,
    )
    failures = run_flower_strategy(
        config,
        strategy,
        initial,
        evaluate_fn,
        {RUN_CONFIG_KEY: json.dumps(run_config, sort_keys=True), "seed": config.seed},
    )
    wall = time.perf_counter() - started
    if failures or len(marks) != config.federation.num_rounds + 1:
        raise RuntimeError(f"the Flower run did not finish its rounds: {failures or marks}")
    return {
        "round_s": [b - a for a, b in zip(marks, marks[1:])],
        "wall_s": wall,
        "start_s": marks[0] - started,
        "end_s": started + wall - marks[-1],
        "final_accuracy": accuracy[-1],
        "driver_peak_mb": peak_rss_mb(),
        "actor_peak_mb": {},
    }


MEASURES = {"compute": measure_compute, "flower": measure_flower, "fedmerge": measure_fedmerge}


def worker(spec: Mapping[str, Any]) -> None:
    quiet_env()
    emit_result(MEASURES[spec["what"]](spec))


# ---- the driver ---------------------------------------------------------------------------


def steady_round_s(result: Mapping[str, Any]) -> float:
    """The median round time after round 1 (which carries the start-up)."""
    rounds = result["round_s"]
    return statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]


def summarise(name: str, result: Mapping[str, Any], ideal_s: float) -> list[Any]:
    rounds = result["round_s"]
    steady = steady_round_s(result)
    server_mb = result["driver_peak_mb"] + sum(result["actor_peak_mb"].values())
    return [
        name,
        f"{steady:.2f}",
        f"{ideal_s:.2f}",
        f"{steady - ideal_s:.2f}",
        f"{100 * (steady - ideal_s) / steady:.0f} %",
        f"{rounds[0]:.2f}",
        f"{result['start_s']:.1f}",
        f"{result['end_s']:.1f}",
        f"{result['wall_s']:.1f}",
        f"{server_mb:,.0f}",
        f"{result['final_accuracy']:.4f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.round", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="digits, 4 clients, 2 rounds: for a smoke test"
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds per run (default 4; --quick: 2); the first is start-up"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    add_address_flag(parser)
    add_json_flag(parser)
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if ran_as_worker(args, worker):
        return 0
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 carries the start-up")
    quiet_env()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-round-") as tmp:
        quiet_env(Path(tmp))
        spec = {
            "overrides": overrides(args.quick, args.rounds, Path(tmp))
            + address_override(args.address)
        }
        print("# One federated round: plain Flower FedAvg vs fedmerge")
        print(format_machine(info))
        print(
            "experiment: experiments/fashion_mnist_fedavg.toml with "
            + " ".join(spec["overrides"]).replace(tmp, "<tmp>")
        )
        results: dict[str, dict[str, Any]] = {}
        for what in ("compute", *SYSTEMS):
            try:
                results[what] = run_worker(
                    "benchmarks.round", {**spec, "what": what}, timeout=args.timeout
                )
            except WorkerError as err:
                print(f"  {what}: FAILED\n{err}", file=sys.stderr)
                return 1
            print(f"  {what}: done in {results[what]['process_s']:.0f}s", file=sys.stderr)
    compute = results["compute"]
    ideal = compute["ideal_round_s"]
    print(
        f"\nclient compute: {compute['clients_per_round']} clients a round, local training "
        f"{statistics.mean(compute['client_s']):.2f} s each on average, {compute['slots']} in parallel"
        f" -> ideal round {ideal:.2f} s\n"
    )
    rows = [summarise(name, results[name], ideal) for name in SYSTEMS]
    print(
        markdown_table(
            [
                "system",
                "steady round s (median)",
                "client compute s",
                "overhead s",
                "overhead share",
                "round 1 s",
                "before round 1 s",
                "after last round s",
                "whole run s",
                "server peak RSS MB",
                "final test accuracy",
            ],
            rows,
        )
    )
    print(
        "\nbefore round 1: data, shards, Ray, actors and Flower's simulation starting; after the last"
        " round: Flower and Ray stopping, and for fedmerge the final model, summary and report written."
    )
    flower_s = statistics.median(results["flower"]["round_s"][1:])
    fedmerge_s = statistics.median(results["fedmerge"]["round_s"][1:])
    write_json(
        args.json,
        {
            "machine": info,
            "overrides": spec["overrides"],
            "results": results,
            "ideal_round_s": ideal,
            "steady_round_s": {name: steady_round_s(results[name]) for name in SYSTEMS},
            "fedmerge_vs_flower": flower_s / fedmerge_s,
        },
    )
    print(
        "\nper-round times (s): "
        + "; ".join(
            f"{name} " + ", ".join(f"{t:.2f}" for t in results[name]["round_s"]) for name in SYSTEMS
        )
    )
    print(
        f"fedmerge steady round vs Flower: {flower_s / fedmerge_s:.2f}x "
        f"({'faster' if fedmerge_s < flower_s else 'slower'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
