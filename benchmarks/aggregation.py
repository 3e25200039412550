"""FedAvg merge throughput and peak memory: fedmerge's streaming FedAvg vs Flower's FedAvg.

    python -m benchmarks.aggregation            # 10 x 10M, 50 x 10M, 100 x 25M float32 parameters
    python -m benchmarks.aggregation --quick    # 4 x 1M: seconds, for the tests

For each cell (N clients x P float32 parameters, split into a few tensors like a model's layers)
the same client weights go through:

- **Flower**: N reply ``Message``s, all held at once (Flower's ``Grid.send_and_receive`` returns
  every reply of a round together), merged by ``flwr.serverapp.strategy.FedAvg().aggregate_train``
  (reply checks, then ``aggregate_arrayrecords``, then the metrics): the call that Flower's
  ``Strategy.start`` makes. Replies are real Messages: the process takes a task identity, as
  ``flwr.simulation.run_simulation`` does for its ServerApp.
- **fedmerge**: one reply at a time, made just in time and dropped once handed over, through
  ``fedmerge.federation.arrays.record_to_numpy`` (zero-copy views of the Array bytes) and
  ``fedmerge.aggregators.fedavg.FedAvg`` begin_round / accumulate / finalize, in-process: the merge alone.
- **fedmerge, float32 sums**: the same with ``FedAvg(accumulator="float32")``, which sums in
  float32 as Flower does (12 bytes of traffic per parameter instead of 20; error bound in FedAvg).
- **fedmerge + Ray**: the whole server path of ``FedMergeStrategy``: ``record_to_numpy``, the
  run's ``UpdateValidator`` (layout, NaN/Inf, update norm), ``RoundAggregation.accumulate``
  (``ray.put`` into the object store, ``AggregatorActor.accumulate`` without waiting), then
  ``finalize`` and ``state_to_record``, on a local Ray. Replies are handed over back to back, so
  the driver's checks overlap the actor's merge as in a real round. "restarts 3" is the default
  config (``ray.aggregator.max_restarts = 3``: replies stay in the object store for a replay into
  a restarted actor until a snapshot of the actor's sums, taken every ``SNAPSHOT_EVERY`` replies,
  replaces them); "restarts 0" lets each reply go once merged.

Only the merge is timed; making a reply (which a real server receives over the network) is not.
Throughput is GB of client float32 weights merged per second (N * P * 4 bytes / seconds). The
ceiling is the machine's in-place a*x + y bandwidth, torch ``y.add_(x, alpha=a)`` over P float32
(bytes of x per second), with the threads the merges get (``--threads``, default 1). fedmerge
accumulates in float64 by default (exact and independent of arrival order), which moves 20 bytes
per parameter where the float32 ceiling moves 12, and reads each reply once more to refuse NaN/Inf
before adding it (4 bytes): about half the ceiling is its bound. With float32 sums it moves 16
bytes, so about three quarters of the ceiling.

Every measurement runs in a fresh process and reports its peak resident memory (``ru_maxrss``);
for the Ray paths the actor's ``VmHWM`` is added (an upper bound: object-store pages touched by
both processes count twice); beside it, the driver's and actor's summed private memory
(``RssAnon``, sampled every 10 ms), which leaves the object store's shared pages out. "growth" is
the peak minus the resident memory just before the first reply was made, also shown in model
sizes (P * 4 bytes): Flower's grows with N, fedmerge's should not. A cell whose projected peak exceeds ``--max-gb`` or 85 % of the available memory is skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.common import (
    PrivatePeak,
    WorkerError,
    add_worker_flag,
    emit_result,
    format_machine,
    machine_info,
    markdown_table,
    mem_available_gb,
    peak_rss_mb,
    proc_peak_mb,
    quiet_env,
    ran_as_worker,
    rss_mb,
    run_worker,
)

FULL_CELLS = "10x10M,50x10M,100x25M"
QUICK_CELLS = "4x1M"
PATHS = ("flower", "fedmerge", "fedmerge-fp32", "fedmerge-ray", "fedmerge-ray-norestart")
LAYER_SHARES = (0.4, 0.3, 0.2, 0.1)  # of P, largest layer first, like an MLP's weight matrices
ROW_WIDTH = 1024
POOL = 2  # distinct reply contents; client i sends content i % POOL
BASELINE_GB = 0.7  # resident memory of a worker after importing torch, flwr and ray (measured ~0.5)


# ---- the workload -------------------------------------------------------------------------


def parse_cells(text: str) -> list[tuple[int, int]]:
    """'50x10M,100x25M' -> [(50, 10_000_000), (100, 25_000_000)] (k, M, G suffixes)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}
    cells = []
    for item in text.split(","):
        clients, _, params = item.strip().lower().partition("x")
        mult = scale.get(params[-1:], 1)
        number = params[:-1] if params[-1:] in scale else params
        try:
            cells.append((int(clients), int(float(number) * mult)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"cell {item!r} must look like 50x10M") from None
    return cells


def layer_shapes(num_params: int) -> dict[str, tuple[int, ...]]:
    """A model-like split of exactly ``num_params`` floats: weight matrices of falling size with
    their biases, and a 1-D ``head`` tensor holding the remainder."""
    shapes: dict[str, tuple[int, ...]] = {}
    used = 0
    for i, share in enumerate(LAYER_SHARES):
        rows = int(num_params * share) // (ROW_WIDTH + 1)
        if rows:
            shapes[f"layer{i}.weight"] = (rows, ROW_WIDTH)
            shapes[f"layer{i}.bias"] = (rows,)
            used += rows * (ROW_WIDTH + 1)
    shapes["head"] = (num_params - used,)
    return shapes


def num_examples(client: int) -> int:
    """Unequal example counts, so the weighting matters."""
    return 50 + (client * 37) % 200


def base_state(num_params: int, seed: int = 0):
    """The round's global model: seeded normal weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in layer_shapes(num_params).items()}


def client_record(base: Mapping[str, Any], client: int):
    """Client ``client``'s reply arrays, in fresh memory, serialised into an ArrayRecord the way
    ``fedmerge.clients.app`` builds its reply: the global weights moved by one of ``POOL`` steps (so that
    the Ray path can reuse ``POOL`` prebuilt replies and every path merges the same values)."""
    from flwr.app import ArrayRecord

    step = 1e-3 * (client % POOL + 1)
    return ArrayRecord(torch_state_dict={k: v + step for k, v in base.items()})


def checksum(arrays: Mapping[str, Any]) -> list[float]:
    """(sum, sum of absolute values) of every merged value, in float64: paths must agree on the
    sum up to float32 rounding, i.e. a gap far below 1e-6 of the absolute sum."""
    import numpy as np

    values = [np.asarray(v, dtype=np.float64) for v in arrays.values()]
    return [float(sum(v.sum() for v in values)), float(sum(np.abs(v).sum() for v in values))]


# ---- the measurements (each in its own worker process) ------------------------------------


def measure_ceiling(num_params: int, repeats: int = 7) -> dict[str, Any]:
    """Median time of y.add_(x, alpha=a) over P float32 (y's pages touched before timing)."""
    import torch

    x, y = torch.randn(num_params), torch.randn(num_params)
    y.add_(x, alpha=0.5)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y.add_(x, alpha=0.5)
        times.append(time.perf_counter() - start)
    return {"fp32_s": sorted(times)[len(times) // 2], "torch_threads": torch.get_num_threads()}


def _task_identity() -> None:
    """Let this process build Messages, as run_simulation does for the ServerApp it hosts."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


def _reply(record: Any, client: int):
    """A train reply from node ``client + 1`` carrying ``record`` and its example count."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    instruction = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=client + 1,
        message_type=MessageType.TRAIN,
    )
    metrics = MetricRecord({"num-examples": num_examples(client), "train_loss": 0.5})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=instruction)


def measure_flower(clients: int, num_params: int) -> dict[str, Any]:
    """Flower's FedAvg.aggregate_train over all N replies held in memory at once."""
    import logging

    from flwr.serverapp.strategy import FedAvg

    logging.getLogger("flwr").setLevel(logging.WARNING)
    _task_identity()
    base = base_state(num_params)
    start_rss = rss_mb()
    replies = [_reply(client_record(base, i), i) for i in range(clients)]
    start = time.perf_counter()
    arrays, _ = FedAvg().aggregate_train(1, replies)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "start_mb": start_rss,
        "peak_mb": peak_rss_mb(),
        "checksum": checksum({k: a.numpy() for k, a in arrays.items()}),
    }


def measure_fedmerge(clients: int, num_params: int, accumulator: str = "float64") -> dict[str, Any]:
    """fedmerge's FedAvg, in-process, fed one reply at a time (each dropped once accumulated)."""
    from fedmerge.aggregators.base import ClientUpdate, RoundContext
    from fedmerge.aggregators.fedavg import FedAvg
    from fedmerge.federation.arrays import record_to_numpy, to_torch_state

    base = base_state(num_params)
    aggregator = FedAvg(accumulator=accumulator)
    aggregator.begin_round(RoundContext(round=1, global_state=base, base_state=base))
    start_rss = rss_mb()
    seconds = 0.0
    for i in range(clients):
        record = client_record(base, i)  # arrives from the network: not timed
        start = time.perf_counter()
        arrays = record_to_numpy(record)
        aggregator.accumulate(
            ClientUpdate(client_id=i, state=to_torch_state(arrays), num_examples=num_examples(i))
        )
        seconds += time.perf_counter() - start
        del record, arrays
    start = time.perf_counter()
    result = aggregator.finalize()
    seconds += time.perf_counter() - start
    return {
        "seconds": seconds,
        "start_mb": start_rss,
        "peak_mb": peak_rss_mb(),
        "checksum": checksum({k: v.numpy() for k, v in result.state.items()}),
    }


def _plasma_mib() -> float:
    """MiB held in Ray's object store now (Ray's own accounting)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    # Name this run's cluster: other local Ray instances on the machine make a bare call ambiguous.
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Plasma memory usage (\d+) MiB", summary)
    return float(match.group(1)) if match else 0.0


def _ray_round(
    aggregation: Any, validator: Any, server_round: int, pool: Sequence[Any], clients: int
) -> None:
    """One untimed round through the same calls, to warm the actor up."""
    from fedmerge.federation.arrays import record_to_numpy

    aggregation.begin_round(server_round)
    validator.set_global(aggregation.state.global_state)
    for i in range(clients):
        arrays = record_to_numpy(pool[i % POOL])
        aggregation.accumulate(
            i, arrays, num_examples(i), {"update_norm": validator(i, arrays, num_examples(i))}
        )
    aggregation.finalize()


def measure_fedmerge_ray(clients: int, num_params: int, restarts: int = 3) -> dict[str, Any]:
    """FedMergeStrategy's server path on a local Ray: for each reply, the steps of its ``_submit``
    (``record_to_numpy``, the run's ``UpdateValidator``, ``RoundAggregation.accumulate``, which
    ``ray.put``s the reply and calls ``AggregatorActor.accumulate`` without waiting), then
    ``RoundAggregation.finalize`` and ``state_to_record``, as its ``_finish_train`` does.

    Replies are handed over back to back from a pool of prebuilt ones (their bytes are never
    mutated), so the timed loop is the server's own work, with the overlap of driver and actor
    that a real round gets; each hand-over is still a new object in Ray's object store.
    ``restarts`` is ``ray.aggregator.max_restarts``: above 0 (the default, 3) replies stay in the
    object store for a replay into a restarted actor until a snapshot of the actor's round covers
    them.
    """
    import ray

    from fedmerge.aggregators.fedavg import FedAvg
    from fedmerge.federation.actors import AggregatorActor
    from fedmerge.federation.arrays import record_to_numpy, state_to_record, to_numpy_state
    from fedmerge.federation.config import ExperimentConfig, RayConfig
    from fedmerge.federation.recovery import ActorGuard, RoundAggregation, RoundState
    from fedmerge.federation.runner import init_ray
    from fedmerge.federation.validation import UpdateValidator

    init_ray(ExperimentConfig(ray=RayConfig(num_cpus=2)))
    try:
        base = base_state(num_params)
        global_state = to_numpy_state(base)
        actor = AggregatorActor.options(num_cpus=0, max_restarts=restarts).remote(
            FedAvg(), global_state, 0
        )
        actor_pid = int(ray.get(actor.placement.remote())["pid"])
        aggregation = RoundAggregation(
            actor,
            RoundState(0, global_state, {}),
            ActorGuard("aggregator", max_restarts=restarts, timeout=600),
        )
        validator = UpdateValidator()
        pool = [client_record(base, i) for i in range(POOL)]
        _ray_round(aggregation, validator, 1, pool, 1)  # warm-up: the actor's first merge is slower
        aggregation.begin_round(2)
        validator.set_global(aggregation.state.global_state)
        start_rss, actor_start = rss_mb(), rss_mb(actor_pid)
        private = PrivatePeak([os.getpid(), actor_pid]).start()
        validate_s = handover_s = 0.0
        start = time.perf_counter()
        for i in range(clients):
            arrays = record_to_numpy(pool[i % POOL])
            mark = time.perf_counter()
            metrics = {"update_norm": validator(i, arrays, num_examples(i))}
            validate_s += time.perf_counter() - mark
            mark = time.perf_counter()
            aggregation.accumulate(i, arrays, num_examples(i), metrics)
            handover_s += time.perf_counter() - mark
            del arrays
        plasma_mib = _plasma_mib()  # every reply handed over; kept ones not released yet
        kept = aggregation.num_kept
        mark = time.perf_counter()
        _, state, round_metrics = aggregation.finalize()
        merged = state_to_record(state)
        seconds = time.perf_counter() - start
        finalize_wait_s = time.perf_counter() - mark
        private.stop()
        actor_peak, driver_peak = proc_peak_mb(actor_pid) or 0.0, peak_rss_mb()
        return {
            "seconds": seconds,
            "start_mb": start_rss + actor_start,
            "peak_mb": driver_peak + actor_peak,
            "driver_peak_mb": driver_peak,
            "actor_peak_mb": actor_peak,
            "private_start_mb": private.start_mb,
            "private_peak_mb": private.peak_mb,
            "object_store_mb": plasma_mib * 2**20 / 1e6,
            "driver_validate_s": validate_s,
            "driver_handover_s": handover_s,
            "finalize_wait_s": finalize_wait_s,
            "actor_merge_s": round_metrics.get("aggregate_s"),
            "max_restarts": restarts,
            "snapshots": aggregation.snapshots,
            "kept_before_finalize": kept,
            "checksum": checksum({k: a.numpy() for k, a in merged.items()}),
        }
    finally:
        ray.shutdown()


MEASURES = {
    "flower": measure_flower,
    "fedmerge": measure_fedmerge,
    "fedmerge-fp32": lambda n, p: measure_fedmerge(n, p, accumulator="float32"),
    "fedmerge-ray": lambda n, p: measure_fedmerge_ray(n, p, restarts=3),
    "fedmerge-ray-norestart": lambda n, p: measure_fedmerge_ray(n, p, restarts=0),
}


def worker(spec: Mapping[str, Any]) -> None:
    import torch

    quiet_env()
    torch.set_num_threads(spec.get("threads", 1))
    if spec["path"] == "ceiling":
        emit_result(measure_ceiling(spec["params"]))
        return
    measure = MEASURES[spec["path"]]
    if not spec["path"].startswith("fedmerge-ray"):  # those warm up inside their own cluster
        measure(2, 4096)  # first-call costs (lazy imports, thread pools) stay out of the figure
    emit_result(measure(spec["clients"], spec["params"]))


# ---- the driver ---------------------------------------------------------------------------


def projected_gb(path: str, clients: int, num_params: int) -> float:
    """A generous estimate of a measurement's peak, to refuse one that would not fit."""
    model_gb = num_params * 4 / 1e9
    per_path = {
        "flower": clients * model_gb + 5 * model_gb,  # every reply held, plus Flower's temporaries
        "fedmerge": 8 * model_gb,  # base, one reply, its bytes, float64 sum + temps
        "fedmerge-fp32": 8 * model_gb,
        # driver and actor, object-store copy, second process; with restarts the replies a snapshot
        # does not cover yet (SNAPSHOT_EVERY + MAX_IN_FLIGHT + 1 at most) and up to 3 float64 snapshots
        "fedmerge-ray": (min(clients, 13) + 6 + 14) * model_gb + BASELINE_GB,
        "fedmerge-ray-norestart": 14 * model_gb + BASELINE_GB,
        "ceiling": 4 * model_gb,
    }
    return per_path[path] + BASELINE_GB


def run_cell(
    clients: int, num_params: int, max_gb: float, timeout: float, paths: Sequence[str], threads: int
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for path in ("ceiling", *paths):
        need = projected_gb(path, clients, num_params)
        limit = min(max_gb, 0.85 * mem_available_gb())
        label = f"{clients} x {num_params / 1e6:g}M {path}"
        if need > limit:
            results[path] = {"skipped": f"skipped (needs ~{need:.1f} GB)"}
            print(
                f"  {label}: skipped, needs ~{need:.1f} GB, limit {limit:.1f} GB", file=sys.stderr
            )
            continue
        try:
            results[path] = run_worker(
                "benchmarks.aggregation",
                {"path": path, "clients": clients, "params": num_params, "threads": threads},
                timeout=timeout,
            )
        except WorkerError as err:
            results[path] = {"skipped": "failed"}
            print(f"  {label}: FAILED\n{err}", file=sys.stderr)
            continue
        print(f"  {label}: done in {results[path]['process_s']:.0f}s", file=sys.stderr)
    return results


def _gbps(result: Mapping[str, Any], data_gb: float) -> str:
    if "skipped" in result:
        return result["skipped"]
    return f"{data_gb / result['seconds']:.2f} ({result['seconds']:.2f} s)"


def _ratio(result: Mapping[str, Any], flower: Mapping[str, Any]) -> str:
    if "seconds" not in result or "seconds" not in flower:
        return "-"
    return f"{flower['seconds'] / result['seconds']:.2f}x"


def _memory(result: Mapping[str, Any], model_mb: float) -> str:
    if "skipped" in result:
        return result["skipped"]
    growth = result["peak_mb"] - result["start_mb"]
    return f"{result['peak_mb']:,.0f} (+{growth:,.0f} = {growth / model_mb:.1f} models)"


def throughput_table(cells: Sequence[tuple[int, int]], results: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for (clients, num_params), res in zip(cells, results):
        data_gb = clients * num_params * 4 / 1e9
        ceiling = res["ceiling"]
        ceiling_gbps = None if "skipped" in ceiling else num_params * 4 / 1e9 / ceiling["fp32_s"]
        fedmerge = res.get("fedmerge", {})
        rows.append(
            [
                f"{clients} x {num_params / 1e6:g}M",
                f"{data_gb:.2f}",
                *(_gbps(res[p], data_gb) if p in res else "-" for p in PATHS),
                _ratio(fedmerge, res.get("flower", {})),
                _ratio(res.get("fedmerge-fp32", {}), res.get("flower", {})),
                _ratio(res.get("fedmerge-ray-norestart", {}), res.get("flower", {})),
                "-" if ceiling_gbps is None else f"{ceiling_gbps:.2f}",
                *(
                    f"{100 * data_gb / res[p]['seconds'] / ceiling_gbps:.0f} %"
                    if ceiling_gbps and "seconds" in res.get(p, {})
                    else "-"
                    for p in ("fedmerge", "fedmerge-fp32")
                ),
            ]
        )
    return markdown_table(
        [
            "clients x params",
            "GB merged",
            "Flower FedAvg GB/s (s)",
            "fedmerge GB/s (s)",
            "fedmerge, float32 sums GB/s (s)",
            "fedmerge + Ray, restarts 3 GB/s (s)",
            "fedmerge + Ray, restarts 0 GB/s (s)",
            "fedmerge vs Flower",
            "fedmerge float32 sums vs Flower",
            "fedmerge + Ray (restarts 0) vs Flower",
            "ceiling fp32 a*x+y GB/s",
            "fedmerge / ceiling",
            "fedmerge float32 sums / ceiling",
        ],
        rows,
    )


def memory_table(cells: Sequence[tuple[int, int]], results: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for (clients, num_params), res in zip(cells, results):
        model_mb = num_params * 4 / 1e6
        rows.append(
            [
                f"{clients} x {num_params / 1e6:g}M",
                f"{model_mb:,.0f}",
                *(_memory(res[p], model_mb) if p in res else "-" for p in PATHS),
            ]
        )
        for path in ("fedmerge-ray", "fedmerge-ray-norestart"):
            store = res.get(path, {}).get("object_store_mb")
            rows[-1].append("-" if store is None else f"{store:,.0f}")
        for path in ("fedmerge-ray", "fedmerge-ray-norestart"):
            r = res.get(path, {})
            rows[-1].append(
                _memory(
                    {"peak_mb": r["private_peak_mb"], "start_mb": r["private_start_mb"]}, model_mb
                )
                if "private_peak_mb" in r
                else "-"
            )
    return markdown_table(
        [
            "clients x params",
            "one model MB",
            "Flower FedAvg peak MB (growth)",
            "fedmerge peak MB (growth)",
            "fedmerge, float32 sums peak MB (growth)",
            "fedmerge + Ray, restarts 3: driver+actor peak MB (growth)",
            "fedmerge + Ray, restarts 0: driver+actor peak MB (growth)",
            "object store before finalize MB, restarts 3",
            "object store, restarts 0",
            "restarts 3: driver+actor private (RssAnon) peak MB (growth)",
            "restarts 0: driver+actor private (RssAnon) peak MB (growth)",
        ],
        rows,
    )


def ray_breakdown_table(
    cells: Sequence[tuple[int, int]], results: Sequence[Mapping[str, Any]]
) -> str:
    """Where the Ray paths' time goes, per reply: the driver's checks, its hand-over (``ray.put``
    and the call), the actor's own merge time (its ``aggregate_s`` metric), and the wait at the end."""
    rows = []
    for (clients, num_params), res in zip(cells, results):
        for path, restarts in (("fedmerge-ray", 3), ("fedmerge-ray-norestart", 0)):
            r = res.get(path, {})
            if "seconds" not in r:
                continue
            per = lambda key: f"{1e3 * r[key] / clients:.1f}" if r.get(key) is not None else "-"  # noqa: E731
            rows.append(
                [
                    f"{clients} x {num_params / 1e6:g}M",
                    restarts,
                    per("seconds"),
                    per("driver_validate_s"),
                    per("driver_handover_s"),
                    per("actor_merge_s"),
                    f"{r['finalize_wait_s']:.2f}",
                    r.get("snapshots", "-"),
                    r.get("kept_before_finalize", "-"),
                ]
            )
    return markdown_table(
        [
            "clients x params",
            "restarts",
            "total ms/reply",
            "driver checks ms/reply",
            "driver hand-over ms/reply",
            "actor merge ms/reply",
            "wait in finalize s",
            "snapshots taken",
            "replies kept before finalize",
        ],
        rows,
    )


def agreement(results: Sequence[Mapping[str, Any]]) -> str:
    """Whether every path that ran produced the same merged weights (up to float32 rounding)."""
    worst = 0.0
    for res in results:
        sums = [r["checksum"] for p, r in res.items() if p != "ceiling" and "checksum" in r]
        if len(sums) > 1:
            values = [total for total, _ in sums]
            worst = max(worst, (max(values) - min(values)) / max(scale for _, scale in sums))
    verdict = "yes" if worst < 1e-6 else "NO"
    return (
        f"merged weights agree across paths: {verdict} (largest gap between the paths' sums of the merged"
        f" weights: {worst:.1e} of their absolute sum)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.aggregation", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"tiny sizes ({QUICK_CELLS}) for a smoke test"
    )
    parser.add_argument("--cells", help=f"NxP list (default {FULL_CELLS}; --quick: {QUICK_CELLS})")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"which of {','.join(PATHS)} to run"
    )
    parser.add_argument(
        "--max-gb", type=float, default=14.0, help="skip a measurement projected above this"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the in-process merges and the ceiling (default 1: what Ray gives"
        " the AggregatorActor, and Flower's NumPy merge is single-threaded too)",
    )
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if ran_as_worker(args, worker):
        return 0
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    cells = parse_cells(args.cells or (QUICK_CELLS if args.quick else FULL_CELLS))
    quiet_env()
    info = machine_info()
    print("# FedAvg aggregation: fedmerge vs Flower")
    print(format_machine(info))
    results = [run_cell(n, p, args.max_gb, args.timeout, paths, args.threads) for n, p in cells]
    threads = next(
        (r["ceiling"]["torch_threads"] for r in results if "torch_threads" in r["ceiling"]), "?"
    )
    print("\n## Throughput: GB of client float32 weights merged per second (merge time in s)\n")
    print(throughput_table(cells, results))
    print(
        f"\ntorch threads: {threads} in-process (the AggregatorActor gets 1 from Ray); Flower's merge is NumPy,"
        " one thread. The Ray path includes the driver's checks of each reply (NaN/Inf, update norm),"
        " its copy into Ray's object store and the actor's merge, overlapped as in a real round."
    )
    print("\n## Peak resident memory, MB (growth over the process before the first reply)\n")
    print(memory_table(cells, results))
    if any(
        "seconds" in r.get(p, {})
        for r in results
        for p in ("fedmerge-ray", "fedmerge-ray-norestart")
    ):
        print("\n## fedmerge + Ray: where the time goes\n")
        print(ray_breakdown_table(cells, results))
    print("\n" + agreement(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
