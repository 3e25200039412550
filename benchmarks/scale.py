"""Thousands of virtual clients: rounds per minute and server memory, fedmerge vs plain Flower.

    python -m benchmarks.scale            # Fashion-MNIST CNN, 1,000 and 10,000 clients, 100 a round
    python -m benchmarks.scale --quick    # digits MLP, 50 and 500 clients, 10 a round: a smoke test

Both systems run the same experiment (the default one with an iid split, so every client holds
the same share and rounds of different runs do the same work; 3 rounds) through fedmerge's
ClientApp, as in ``benchmarks.round``:

- **fedmerge**: clients are *virtual*: the strategy samples partition ids and sends each message
  to one of as many simulation SuperNodes as clients train a round, so nothing on the server is
  sized by the number of clients except the list of shard sizes;
- **Flower**: ``run_simulation`` with one SuperNode per client (Flower's way to simulate N
  clients: the SuperNode's ``partition-id`` picks its shard) and Flower's FedAvg sampling 100.

Shards are partitioned and written once beforehand (timed and shown apart: that is data
preparation, cached across runs). "rounds / min" is 60 / the median of rounds 2..R (round 1
carries the start-up); "server peak RSS" is the peak of the process hosting the ServerApp (and
Flower's in-memory SuperLink), plus fedmerge's AggregatorActor and EvaluatorActor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    WorkerError,
    add_address_flag,
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
)

FULL = {"task": "fashion_mnist", "clients": (1000, 10000), "per_round": 100, "rounds": 3}
QUICK = {"task": "digits", "clients": (50, 500), "per_round": 10, "rounds": 2}
SYSTEMS = ("flower", "fedmerge")


def overrides(task: str, num_clients: int, per_round: int, rounds: int, root: Path) -> list[str]:
    extra = ["train.batch_size=16", "evaluation.batch_size=512"] if task == "digits" else []
    return [
        "name=bench-scale",
        "seed=7",
        f"data.task={task}",
        f"data.num_clients={num_clients}",
        "data.partitioner=iid",
        f"data.cache_dir={str(root / 'shards')!r}",
        f"output.root={str(root / 'runs')!r}",
        f"federation.num_rounds={rounds}",
        f"federation.fraction_train={per_round / num_clients!r}",
        f"federation.min_train_nodes={per_round}",
        "train.local_epochs=1",
        "ray.client_num_cpus=1.0",
        "output.plot=false",
        "checkpoint.keep=1",
        *extra,
    ]


def measure_prepare(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Partition the data and write the shards (what a first run does before its rounds)."""
    from benchmarks.round import _config, _shards

    started = time.perf_counter()
    _, _, shard_dir = _shards(_config(spec))
    return {
        "seconds": time.perf_counter() - started,
        "peak_mb": peak_rss_mb(),
        "files": sum(1 for _ in Path(shard_dir).glob("client_*.arrow")),
    }


def worker(spec: Mapping[str, Any]) -> None:
    from benchmarks.round import MEASURES

    quiet_env()
    if spec["what"] == "prepare":
        emit_result(measure_prepare(spec))
    else:
        emit_result(MEASURES[spec["what"]](spec))


def row(
    system: str, clients: int, result: Mapping[str, Any], prepare: Mapping[str, Any]
) -> list[Any]:
    rounds = result["round_s"]
    steady = statistics.median(rounds[1:])
    actors = sum(result["actor_peak_mb"].values())
    return [
        system,
        f"{clients:,}",
        f"{60 / steady:.1f}",
        f"{steady:.2f}",
        f"{rounds[0]:.1f}",
        f"{result['start_s']:.1f}",
        f"{result['driver_peak_mb']:,.0f}",
        f"{actors:,.0f}" if actors else "-",
        f"{result['driver_peak_mb'] + actors:,.0f}",
        f"{prepare['seconds']:.1f}",
        f"{result['final_accuracy']:.4f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="digits, 50 and 500 clients, 10 a round: a smoke test"
    )
    parser.add_argument(
        "--clients", help="comma-separated client counts (default 1000,10000; --quick: 50,500)"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="which of flower,fedmerge to run"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    add_address_flag(parser)
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if ran_as_worker(args, worker):
        return 0
    plan = dict(QUICK if args.quick else FULL)
    if args.clients:
        try:
            plan["clients"] = tuple(int(c) for c in args.clients.split(","))
        except ValueError:
            parser.error(f"--clients must be integers separated by commas, got {args.clients!r}")
        if min(plan["clients"]) < plan["per_round"]:
            parser.error(
                f"every client count must be >= the {plan['per_round']} clients sampled a round"
            )
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        parser.error(
            f"unknown system(s) {sorted(set(systems) - set(SYSTEMS))}; choose from {', '.join(SYSTEMS)}"
        )
    quiet_env()
    print("# Scale: virtual clients, fedmerge vs plain Flower")
    print(format_machine(machine_info()))
    print(
        f"task {plan['task']}, iid shards, {plan['per_round']} clients sampled a round, {plan['rounds']} rounds, "
        "1 local epoch, 1 CPU per client"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-scale-") as tmp:
        quiet_env(Path(tmp))
        for clients in plan["clients"]:
            spec = {
                "overrides": overrides(
                    plan["task"], clients, plan["per_round"], plan["rounds"], Path(tmp)
                )
                + address_override(args.address)
            }
            try:
                prepare = run_worker(
                    "benchmarks.scale", {**spec, "what": "prepare"}, timeout=args.timeout
                )
                print(
                    f"  {clients} clients: shards written in {prepare['seconds']:.0f}s",
                    file=sys.stderr,
                )
                for system in systems:
                    result = run_worker(
                        "benchmarks.scale", {**spec, "what": system}, timeout=args.timeout
                    )
                    print(
                        f"  {clients} clients {system}: done in {result['process_s']:.0f}s",
                        file=sys.stderr,
                    )
                    rows.append(row(system, clients, result, prepare))
            except WorkerError as err:
                print(f"  {clients} clients: FAILED\n{err}", file=sys.stderr)
                return 1
    print()
    print(
        markdown_table(
            [
                "system",
                "clients",
                "rounds / min",
                "steady round s",
                "round 1 s",
                "before round 1 s",
                "driver peak RSS MB",
                "server actors peak RSS MB",
                "server peak RSS MB",
                "shards written once, s",
                "final test accuracy",
            ],
            rows,
        )
    )
    print(
        "\nmemory flat in the number of clients means the peak RSS rows of one system agree across client counts."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
