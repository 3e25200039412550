"""The Flower strategy: seeded client sampling, replies streamed into the aggregator actor.

Flower's ``Strategy.start`` waits for every reply of a round (``send_and_receive``) and only then
aggregates. ``FedMergeStrategy.start`` pushes the round's messages and polls for replies, handing
each one to the ``AggregatorActor`` as soon as all replies sampled before it have been handed
over. Merging thus overlaps training, the driver holds at most the replies that arrived out of
order, and the aggregator always sees updates in sampling order, so a run is reproducible.

Clients are *virtual*: the strategy samples partition ids and tells each message which shard to
train on, so any number of clients can run on a few simulation SuperNodes, and the sample does not
depend on Flower's random node ids.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from clients.app import AGGREGATOR_CONFIG_KEY, RUN_CONFIG_KEY
from federation.arrays import record_to_numpy, state_to_record

__all__ = ["ClientFailure", "FedMergeStrategy", "RoundReport", "UpdateRejected", "validate_update"]

log = logging.getLogger("fedmerge")

@dataclass(frozen=True)
class ClientFailure:
    client_id: int
    reason: str


@dataclass
class RoundReport:
    """Everything one round produced; the server app turns it into metrics rows and a log line."""

    round: int
    sampled: list[int]
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[ClientFailure] = field(default_factory=list)
    rejected: list[ClientFailure] = field(default_factory=list)
    aggregator_metrics: dict[str, float] = field(default_factory=dict)
    server_metrics: dict[str, float] = field(default_factory=dict)
    federated_metrics: dict[str, float] = field(default_factory=dict)
    skipped: str = ""
    round_time_s: float = 0.0


class UpdateRejected(ValueError):
    """A client reply that must not reach the aggregator; the message says why."""


def validate_update(arrays: Mapping[str, np.ndarray], reference: Mapping[str, tuple[tuple, np.dtype]],
                    num_examples: Any) -> None:
    """Refuse replies with missing or extra keys, wrong shapes or dtypes, NaN/Inf or bad counts."""
    if not isinstance(num_examples, (int, np.integer)) or isinstance(num_examples, bool) or num_examples <= 0:
        raise UpdateRejected(f"num-examples must be a positive integer, got {num_examples!r}")
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise UpdateRejected(f"keys differ from the global model: missing {missing}, unexpected {extra}")
    for key, (shape, dtype) in reference.items():
        value = arrays[key]
        if value.shape != shape or value.dtype != dtype:
            raise UpdateRejected(f"{key}: expected {dtype}{list(shape)}, got {value.dtype}{list(value.shape)}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise UpdateRejected(f"{key}: contains NaN or Inf")


class FedMergeStrategy(Strategy):
    """Seeded sampling of virtual clients, streaming aggregation in a Ray actor.

    Parameters follow Flower's strategies: ``fraction_train`` / ``min_train_nodes`` choose how many
    of ``num_clients`` train each round, ``fraction_evaluate`` / ``min_evaluate_nodes`` how many run
    federated evaluation on their local split. ``aggregator`` is an ``AggregatorActor`` handle and
    ``evaluator`` an ``EvaluatorActor`` handle (or None). ``run_config`` is the static part of every
    client's config (task, shard location, local training settings).
    """

    def __init__(self, *, aggregator: Any, evaluator: Any | None, num_clients: int,
                 fraction_train: float = 0.5, min_train_nodes: int = 2,
                 fraction_evaluate: float = 0.0, min_evaluate_nodes: int = 0,
                 evaluate_every: int = 1, seed: int = 0, run_config: Mapping[str, Any] | None = None,
                 expected_nodes: int = 1, on_round: Callable[[RoundReport], None] | None = None) -> None:
        self.aggregator = aggregator
        self.evaluator = evaluator
        self.num_clients = num_clients
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.evaluate_every = evaluate_every
        self.seed = seed
        self.run_config = json.dumps(dict(run_config or {}), sort_keys=True)
        self.expected_nodes = expected_nodes
        self.on_round = on_round
        self._reference: dict[str, tuple[tuple, np.dtype]] = {}
        self._nodes: list[int] = []
        self._last_round = -1

    # ---- sampling ----------------------------------------------------------------------
    def sample(self, server_round: int, fraction: float, minimum: int, stream: int) -> list[int]:
        """Partition ids for a round: seeded by (seed, round, stream), independent of the nodes."""
        size = min(self.num_clients, max(minimum, int(self.num_clients * fraction)))
        if size == 0:
            return []
        rng = np.random.default_rng([self.seed, server_round, stream])
        return sorted(int(i) for i in rng.choice(self.num_clients, size=size, replace=False))

    def _messages(self, server_round: int, clients: Sequence[int], arrays: ArrayRecord,
                  extra: Mapping[str, Any], message_type: str) -> list[Message]:
        messages = []
        for slot, cid in enumerate(clients):
            config = ConfigRecord({
                "server-round": server_round,
                "partition-id": cid,
                "seed": int(np.random.default_rng([self.seed, server_round, cid]).integers(2**31)),
                RUN_CONFIG_KEY: self.run_config,
                AGGREGATOR_CONFIG_KEY: json.dumps(dict(extra), sort_keys=True),
            })
            messages.append(Message(
                content=RecordDict({"arrays": arrays, "config": config}),
                message_type=message_type,
                dst_node_id=self._nodes[slot % len(self._nodes)],
            ))
        return messages

    # ---- Flower's Strategy interface ---------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        clients = self.sample(server_round, self.fraction_train, self.min_train_nodes, stream=0)
        extra = ray.get(self.aggregator.client_config.remote(server_round))
        return self._messages(server_round, clients, arrays, extra, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Non-streaming path (used when Flower's own ``start`` drives the strategy)."""
        report = RoundReport(round=server_round, sampled=[])
        ray.get(self.aggregator.begin_round.remote(server_round))
        pending = [self._submit(reply, report) for reply in replies]
        return self._finish_train(report, pending)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        clients = self.sample(server_round, self.fraction_evaluate, self.min_evaluate_nodes, stream=1)
        return self._messages(server_round, clients, arrays, {}, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        totals: dict[str, float] = {}
        count = 0
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content["metrics"]
            n = int(metrics["num-examples"])
            count += n
            for key in ("loss", "accuracy"):
                totals[key] = totals.get(key, 0.0) + float(metrics[key]) * n
        if count == 0:
            return None
        return MetricRecord({key: value / count for key, value in totals.items()} | {"num-examples": count})

    def summary(self) -> None:
        log.info("FedMergeStrategy: %d virtual clients, fraction_train=%s, min_train_nodes=%d, seed=%d",
                 self.num_clients, self.fraction_train, self.min_train_nodes, self.seed)

    # ---- the streaming round loop ------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              first_round: int = 1) -> Result:
        self.summary()
        self._last_round = num_rounds
        self._nodes = self._wait_for_nodes(grid, timeout)
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        self._reference = {k: (v.shape, v.dtype) for k, v in record_to_numpy(arrays).items()}
        for server_round in range(first_round, num_rounds + 1):
            started = time.perf_counter()
            report, new_arrays = self._train_round(grid, server_round, arrays, timeout)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if self.fraction_evaluate > 0 and not report.skipped:
                replies = grid.send_and_receive(
                    self.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=timeout)
                federated = self.aggregate_evaluate(server_round, replies)
                if federated is not None:
                    report.federated_metrics = {k.replace("-", "_"): float(v) for k, v in federated.items()}
                    result.evaluate_metrics_clientapp[server_round] = federated
            if report.server_metrics:
                result.evaluate_metrics_serverapp[server_round] = MetricRecord(report.server_metrics)
            report.round_time_s = time.perf_counter() - started
            if self.on_round is not None:
                self.on_round(report)
        return result

    def _wait_for_nodes(self, grid: Grid, timeout: float) -> list[int]:
        """Simulation nodes register asynchronously; sampling before they all exist skews round 1."""
        deadline = time.monotonic() + min(timeout, 120.0)
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.expected_nodes:
                return nodes
            if time.monotonic() > deadline:
                if not nodes:
                    raise RuntimeError("no Flower SuperNode connected within the round timeout")
                log.warning("only %d of %d SuperNodes connected; going on with them",
                            len(nodes), self.expected_nodes)
                return nodes
            time.sleep(0.05)

    def _train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
                     ) -> tuple[RoundReport, ArrayRecord | None]:
        messages = list(self.configure_train(server_round, arrays, ConfigRecord(), grid))
        clients = [int(m.content["config"]["partition-id"]) for m in messages]
        report = RoundReport(round=server_round, sampled=clients)
        ray.get(self.aggregator.begin_round.remote(server_round))

        ids = list(grid.push_messages(messages))
        del messages
        slot_of = {mid: slot for slot, mid in enumerate(ids)}
        outstanding = set(ids)
        arrived: dict[int, Message] = {}
        pending = []
        next_slot = 0
        deadline = time.monotonic() + timeout
        while outstanding and time.monotonic() < deadline:
            replies = list(grid.pull_messages(outstanding))
            for reply in replies:
                mid = reply.metadata.reply_to_message_id
                outstanding.discard(mid)
                arrived[slot_of[mid]] = reply
            while next_slot in arrived:  # hand over in sampling order, as soon as possible
                pending.append(self._submit(arrived.pop(next_slot), report, clients[next_slot]))
                next_slot += 1
            if outstanding and not replies:
                time.sleep(0.02)
        for mid in outstanding:
            report.failures.append(ClientFailure(clients[slot_of[mid]], f"no reply within {timeout:.0f}s"))
        for slot in sorted(arrived):
            pending.append(self._submit(arrived[slot], report, clients[slot]))
        return report, self._finish_train(report, pending)

    def _submit(self, reply: Message, report: RoundReport, client_id: int | None = None) -> Any:
        """Validate one reply and send it to the aggregator actor (non-blocking)."""
        if reply.has_error():
            cid = client_id if client_id is not None else -1
            report.failures.append(ClientFailure(cid, reply.error.reason or f"error code {reply.error.code}"))
            log.warning("round %d: client %d failed: %s", report.round, cid, report.failures[-1].reason)
            return None
        metrics = {k: v for k, v in reply.content["metrics"].items()}
        cid = int(metrics.pop("partition-id", client_id if client_id is not None else -1))
        try:
            arrays = record_to_numpy(reply.content["arrays"])
            num_examples = metrics.pop("num-examples", None)
            validate_update(arrays, self._reference, num_examples)
        except (UpdateRejected, KeyError, ValueError) as err:
            report.rejected.append(ClientFailure(cid, str(err)))
            log.warning("round %d: update of client %d rejected: %s", report.round, cid, err)
            return None
        report.client_metrics[cid] = {k: float(v) for k, v in metrics.items()}
        if client_id is None:
            report.sampled.append(cid)
        return self.aggregator.accumulate.remote(cid, arrays, int(num_examples), report.client_metrics[cid])

    def _finish_train(self, report: RoundReport, pending: list[Any]) -> ArrayRecord | None:
        accepted = [ref for ref in pending if ref is not None]
        ray.get(accepted)  # surfaces an aggregator error at the reply that caused it
        if len(accepted) < self.min_train_nodes:
            report.skipped = (f"only {len(accepted)} valid replies (min_train_nodes={self.min_train_nodes});"
                              " global model kept")
            log.warning("round %d skipped: %s", report.round, report.skipped)
            return None
        state_ref, metrics_ref = self.aggregator.finalize.remote()
        evaluate = self.evaluator is not None and (
            report.round % self.evaluate_every == 0 or report.round == self._last_round)
        eval_ref = self.evaluator.evaluate.remote(state_ref) if evaluate else None
        state, report.aggregator_metrics = ray.get([state_ref, metrics_ref])
        if eval_ref is not None:
            report.server_metrics = ray.get(eval_ref)
        return state_to_record(state)
