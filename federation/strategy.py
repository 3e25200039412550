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
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedmerge.clients.app import (
    AGGREGATOR_ARRAYS_KEY,
    AGGREGATOR_CONFIG_KEY,
    PLACEMENT_KEY,
    RUN_CONFIG_KEY,
)
from fedmerge.federation.arrays import ArrayFormatError, record_to_numpy, state_to_record
from fedmerge.federation.recovery import ActorGuard, RoundAggregation, RoundState
from fedmerge.federation.validation import (
    DEFAULT_MAX_UPDATE_NORM_RATIO,
    UpdateRejected,
    UpdateValidator,
    validate_update,
)

__all__ = [
    "ClientFailure",
    "FedMergeStrategy",
    "RoundReport",
    "UpdateRejected",
    "client_error_text",
    "validate_update",
]

log = logging.getLogger("fedmerge")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def client_error_text(reason: str) -> str:
    """The gist of a failed client's error: Flower wraps the client's exception in Ray's remote
    traceback (with terminal colours); the log keeps all of it, the run's events only the
    exception's own message."""
    text = _ANSI.sub("", reason or "").strip()
    marker = "Message: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
        text = text.removesuffix("'>").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


MAX_METRICS = 32
"""Entries a reply's metrics (or placement) record may hold: the ClientApp sends five."""

MAX_NAME_CHARS = 200
"""Longest metric name or placement string accepted; longer ones would flood metrics.parquet."""

MAX_REASON_CHARS = 500
"""A rejection or failure reason is clipped to this many characters for the log and events.jsonl."""


def _clip(text: str) -> str:
    return (
        text
        if len(text) <= MAX_REASON_CHARS
        else text[:MAX_REASON_CHARS] + f"... ({len(text)} characters)"
    )


def _error_reason(reply: Message) -> str:
    """A failed client's reason, whatever Flower (or a hostile node) put into the error."""
    error = reply.error
    reason = error.reason if isinstance(error.reason, str) else ""
    code = error.code if isinstance(error.code, int) else repr(error.code)
    return _clip(client_error_text(reason[: 64 * MAX_REASON_CHARS]) or f"error code {code}")


def _reply_to(reply: Message) -> Any:
    """The message id a reply answers, or None when it cannot be read."""
    try:
        return reply.metadata.reply_to_message_id
    except Exception:
        return None


def _evaluate_metrics(reply: Message) -> tuple[int, dict[str, float]]:
    """(num-examples, {loss, accuracy}) of an evaluate reply; ``UpdateRejected`` when they are not
    a positive integer and finite numbers in a MetricRecord."""
    metrics = (
        reply.content["metrics"]
        if isinstance(reply.content, RecordDict) and "metrics" in reply.content
        else None
    )
    if not isinstance(metrics, MetricRecord):
        raise UpdateRejected("no 'metrics' MetricRecord in the evaluate reply")
    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise UpdateRejected(f"num-examples must be a positive integer, got {_clip(repr(n))}")
    values = {}
    for key in ("loss", "accuracy"):
        value = metrics.get(key)
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise UpdateRejected(f"{key} must be a finite number, got {_clip(repr(value))}")
        values[key] = float(value)
    return n, values


@dataclass(frozen=True)
class ClientFailure:
    client_id: int
    reason: str


@dataclass
class RoundReport:
    """Everything one round produced; the server app turns it into metrics rows, events and a log
    line, and checkpoints ``state`` (the weights and aggregator state after the round)."""

    round: int
    sampled: list[int]
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[ClientFailure] = field(default_factory=list)
    rejected: list[ClientFailure] = field(default_factory=list)
    aggregator_metrics: dict[str, float] = field(default_factory=dict)
    server_metrics: dict[str, float] = field(default_factory=dict)
    federated_metrics: dict[str, float] = field(default_factory=dict)
    skipped: str = ""
    restarts: list[str] = field(default_factory=list)
    round_time_s: float = 0.0
    # Array bytes on the wire: the global model to every message (train and evaluate), and the
    # train replies that arrived (``np.save`` bytes as Flower carries them).
    bytes_sent: int = 0
    bytes_received: int = 0
    state: RoundState | None = field(default=None, repr=False)
    served: Any = field(
        default=None, repr=False
    )  # Ray ref of the last merged round's served model, or None
    client_placement: dict[int, dict[str, str]] = field(default_factory=dict)
    # Where the server actors ran, as their round calls (finalize, evaluate) reported it; a role the
    # round did not call (a skipped round, no evaluation this round) is absent.
    actor_placement: dict[str, dict[str, str]] = field(default_factory=dict)


class FedMergeStrategy(Strategy):
    """Seeded sampling of virtual clients, validated replies, streaming aggregation in a Ray actor.

    Parameters follow Flower's strategies: ``fraction_train`` / ``min_train_nodes`` choose how many
    of ``num_clients`` train each round, ``fraction_evaluate`` / ``min_evaluate_nodes`` how many run
    federated evaluation on their local split. ``aggregator`` is an ``AggregatorActor`` handle and
    ``evaluator`` an ``EvaluatorActor`` handle (or None). ``run_config`` is the static part of every
    client's config (task, shard location, local training settings).

    Reliability: every reply is checked (``federation.validation``; ``max_update_norm``,
    ``max_update_norm_ratio`` and ``shard_sizes`` bound its distance from the global model and its
    example count) and a bad one is rejected with its reason: a reply is hostile until checked, so
    *any* exception raised while it is unpacked or validated rejects that reply and never ends the
    round; a reply to a message this round never sent, or a second reply to one, is ignored; a
    dead actor is restarted up to ``aggregator_restarts`` /
    ``evaluator_restarts`` times and the round replayed into it (``federation.recovery``).
    ``reply_keys`` are the keys a train reply holds when they are fewer than the global model's
    (LoRA: the adapters and heads; None: all of them).
    """

    def __init__(
        self,
        *,
        aggregator: Any,
        evaluator: Any | None,
        num_clients: int,
        fraction_train: float = 0.5,
        min_train_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        evaluate_every: int = 1,
        seed: int = 0,
        run_config: Mapping[str, Any] | None = None,
        expected_nodes: int = 1,
        on_round: Callable[[RoundReport], None] | None = None,
        max_update_norm: float = 0.0,
        max_update_norm_ratio: float = DEFAULT_MAX_UPDATE_NORM_RATIO,
        shard_sizes: Sequence[int] | None = None,
        aggregator_restarts: int = 0,
        evaluator_restarts: int = 0,
        reply_keys: Sequence[str] | None = None,
    ) -> None:
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
        self.validator = UpdateValidator(
            max_update_norm=max_update_norm,
            max_update_norm_ratio=max_update_norm_ratio,
            shard_sizes=shard_sizes,
        )
        self.aggregator_restarts = aggregator_restarts
        self.evaluator_restarts = evaluator_restarts
        self.reply_keys = None if reply_keys is None else tuple(reply_keys)
        self._bytes_sent = 0
        self._aggregation: RoundAggregation | None = None
        self._evaluator_guard: ActorGuard | None = None
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

    def client_seed(self, server_round: int, client_id: int) -> int:
        """The seed of one client's local training in one round: a pure function of (seed, round,
        client), so a resumed or replayed round trains exactly as the first attempt did."""
        return int(np.random.default_rng([self.seed, server_round, client_id]).integers(2**31))

    def _messages(
        self,
        server_round: int,
        clients: Sequence[int],
        arrays: ArrayRecord,
        extra: Mapping[str, Any],
        message_type: str,
        client_arrays: Callable[[int], Mapping[str, np.ndarray] | None] | None = None,
    ) -> list[Message]:
        """One message per client; ``client_arrays(cid)`` gives a client its own extra tensors
        (the aggregator's, e.g. SCAFFOLD's correction), sent as a second ArrayRecord."""
        messages = []
        self._bytes_sent += len(clients) * sum(len(a.data) for a in arrays.values())
        for slot, cid in enumerate(clients):
            content = {"arrays": arrays}
            own = None if client_arrays is None else client_arrays(cid)
            if own is not None:
                record = state_to_record(own)
                self._bytes_sent += sum(len(a.data) for a in record.values())
                content[AGGREGATOR_ARRAYS_KEY] = record
            config = ConfigRecord(
                {
                    "server-round": server_round,
                    "partition-id": cid,
                    "seed": self.client_seed(server_round, cid),
                    RUN_CONFIG_KEY: self.run_config,
                    AGGREGATOR_CONFIG_KEY: json.dumps(dict(extra), sort_keys=True),
                }
            )
            messages.append(
                Message(
                    content=RecordDict({**content, "config": config}),
                    message_type=message_type,
                    dst_node_id=self._nodes[slot % len(self._nodes)],
                )
            )
        return messages

    # ---- Flower's Strategy interface ---------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        clients = self.sample(server_round, self.fraction_train, self.min_train_nodes, stream=0)
        aggregation = self._require_aggregation()
        extra = aggregation.client_config(server_round)
        self.validator.set_client_clip(extra)
        return self._messages(
            server_round,
            clients,
            arrays,
            extra,
            MessageType.TRAIN,
            lambda cid: aggregation.client_arrays(server_round, cid),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Non-streaming path (all of a round's replies at once); needs the state ``start`` set up."""
        report = RoundReport(round=server_round, sampled=[])
        self._begin_round(server_round)
        for reply in replies:
            self._submit(reply, report)
        new_arrays = self._finish_train(report)
        return new_arrays, MetricRecord(
            report.aggregator_metrics
        ) if report.aggregator_metrics else None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        clients = self.sample(
            server_round, self.fraction_evaluate, self.min_evaluate_nodes, stream=1
        )
        return self._messages(server_round, clients, arrays, {}, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted loss and accuracy of the evaluate replies; a failed or malformed reply
        is left out (and logged), never the end of the round."""
        totals: dict[str, float] = {}
        count = 0
        for reply in replies:
            try:
                if reply.has_error():
                    continue
                n, values = _evaluate_metrics(reply)
            except Exception as err:
                log.warning(
                    "round %d: evaluate reply left out: %s",
                    server_round,
                    _clip(
                        str(err)
                        if isinstance(err, UpdateRejected)
                        else f"{type(err).__name__}: {err}"
                    ),
                )
                continue
            count += n
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value * n
        if count == 0:
            return None
        return MetricRecord(
            {key: value / count for key, value in totals.items()} | {"num-examples": count}
        )

    def summary(self) -> None:
        log.info(
            "FedMergeStrategy: %d virtual clients, fraction_train=%s, min_train_nodes=%d, seed=%d",
            self.num_clients,
            self.fraction_train,
            self.min_train_nodes,
            self.seed,
        )

    # ---- the streaming round loop ------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
        aggregator_state: Mapping[str, Any] | None = None,
        served: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    ) -> Result:
        """Run rounds ``first_round..num_rounds`` from ``initial_arrays``.

        A resumed run passes the checkpoint's weights, ``first_round`` = its round + 1, the
        aggregator state it restored into the actor (kept to restore the actor again if it dies)
        and the checkpoint's served model, which stays served until a round merges a new one.
        """
        self.summary()
        self._last_round = num_rounds
        self._nodes = self._wait_for_nodes(grid, timeout)
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        self._start_aggregation(
            RoundState(first_round - 1, record_to_numpy(arrays), dict(aggregator_state or {})),
            timeout,
        )
        if served is not None:
            self._require_aggregation().served = ray.put(served)
        for server_round in range(first_round, num_rounds + 1):
            started = time.perf_counter()
            report, new_arrays = self._train_round(grid, server_round, arrays, timeout)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if self.fraction_evaluate > 0 and not report.skipped:
                replies = grid.send_and_receive(
                    self.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                    timeout=timeout,
                )
                federated = self.aggregate_evaluate(server_round, replies)
                report.bytes_sent += self._take_bytes_sent()
                if federated is not None:
                    report.federated_metrics = {
                        k.replace("-", "_"): float(v) for k, v in federated.items()
                    }
                    result.evaluate_metrics_clientapp[server_round] = federated
            if report.server_metrics:
                result.evaluate_metrics_serverapp[server_round] = MetricRecord(
                    report.server_metrics
                )
            report.round_time_s = time.perf_counter() - started
            report.state = self._require_aggregation().state
            report.served = self._require_aggregation().served
            report.restarts = self._take_restart_notes()
            if self.on_round is not None:
                self.on_round(report)
        return result

    def _start_aggregation(self, state: RoundState, timeout: float) -> None:
        self._aggregation = RoundAggregation(
            self.aggregator,
            state,
            ActorGuard("aggregator", max_restarts=self.aggregator_restarts, timeout=timeout),
        )
        self._evaluator_guard = ActorGuard(
            "evaluator", max_restarts=self.evaluator_restarts, timeout=timeout
        )

    def served_model_ref(self) -> Any | None:
        """The Ray ref of the last merged round's served model (``fedmerge.federation.served`` spec, weights;
        None inside when the broadcast weights are served), or None before any round merged."""
        return None if self._aggregation is None else self._aggregation.served

    def _require_aggregation(self) -> RoundAggregation:
        if self._aggregation is None:
            raise RuntimeError("FedMergeStrategy drives its own rounds: call start()")
        return self._aggregation

    def _begin_round(self, server_round: int, sampled: Sequence[int] = ()) -> None:
        """Open the round on the aggregator; replies are checked against the model it broadcasts."""
        aggregation = self._require_aggregation()
        aggregation.begin_round(server_round, sampled)
        self.validator.set_global(aggregation.state.global_state, keys=self.reply_keys)

    def _take_bytes_sent(self) -> int:
        sent, self._bytes_sent = self._bytes_sent, 0
        return sent

    def _take_restart_notes(self) -> list[str]:
        guards = [self._require_aggregation().guard, self._evaluator_guard]
        return [note for guard in guards if guard is not None for note in guard.take_notes()]

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
                log.warning(
                    "only %d of %d SuperNodes connected; going on with them",
                    len(nodes),
                    self.expected_nodes,
                )
                return nodes
            time.sleep(0.05)

    def _train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
    ) -> tuple[RoundReport, ArrayRecord | None]:
        messages = list(self.configure_train(server_round, arrays, ConfigRecord(), grid))
        clients = [int(m.content["config"]["partition-id"]) for m in messages]
        report = RoundReport(round=server_round, sampled=clients)
        self._begin_round(server_round, clients)

        ids = list(grid.push_messages(messages))
        del messages
        slot_of = {mid: slot for slot, mid in enumerate(ids)}
        outstanding = set(ids)
        arrived: dict[int, Message] = {}
        next_slot = 0
        deadline = time.monotonic() + timeout
        while outstanding and time.monotonic() < deadline:
            replies = list(grid.pull_messages(outstanding))
            for reply in replies:
                mid = _reply_to(reply)
                if mid not in outstanding:  # unknown, or answered already: never merged twice
                    log.warning(
                        "round %d: ignored a reply to %s, which is no outstanding message of the round",
                        server_round,
                        _clip(repr(mid)),
                    )
                    continue
                outstanding.discard(mid)
                arrived[slot_of[mid]] = reply
            while next_slot in arrived:  # hand over in sampling order, as soon as possible
                self._submit(arrived.pop(next_slot), report, clients[next_slot])
                next_slot += 1
            if outstanding and not replies:
                time.sleep(0.02)
        for mid in outstanding:
            self._fail(report, clients[slot_of[mid]], f"no reply within {timeout:g} s")
        for slot in sorted(arrived):
            self._submit(arrived[slot], report, clients[slot])
        report.bytes_sent += self._take_bytes_sent()
        return report, self._finish_train(report)

    def _submit(self, reply: Message, report: RoundReport, client_id: int | None = None) -> None:
        """Validate one reply and hand it to the aggregator (non-blocking), or record why not.

        Whatever is wrong with the reply (a record of another type, a mangled array, a metric that
        is no number, an error reply with an odd reason) costs this reply only: it is recorded as a
        failure or rejection with its reason, and the round goes on."""
        cid = client_id if client_id is not None else -1
        try:
            failed = reply.has_error()
            reason = _error_reason(reply) if failed else ""
        except Exception as err:  # not even a readable Message
            report.rejected.append(
                ClientFailure(cid, _clip(f"malformed reply ({type(err).__name__}: {err})"))
            )
            log.warning(
                "round %d: reply of client %d rejected: %s",
                report.round,
                cid,
                report.rejected[-1].reason,
            )
            return
        if failed:
            self._fail(report, cid, reason)
            return
        try:
            cid, arrays, num_examples, metrics, placement = self._unpack(reply, client_id, report)
            metrics["update_norm"] = self.validator(cid, arrays, num_examples)
            self.validator.check_client_clip(metrics["update_norm"], metrics)
        except UpdateRejected as err:
            reason = _clip(str(err))
        except (
            Exception
        ) as err:  # a failure nobody foresaw is still this reply's fault, not the round's
            reason = _clip(f"malformed reply ({type(err).__name__}: {err})")
        else:
            reason = ""
        if reason:
            report.rejected.append(ClientFailure(cid, reason))
            log.warning("round %d: update of client %d rejected: %s", report.round, cid, reason)
            return
        report.client_metrics[cid] = metrics
        if placement:
            report.client_placement[cid] = placement
        if client_id is None:
            report.sampled.append(cid)
        self._require_aggregation().accumulate(cid, arrays, num_examples, metrics)

    def _unpack(
        self, reply: Message, client_id: int | None, report: RoundReport
    ) -> tuple[int, dict[str, np.ndarray], Any, dict[str, float], dict[str, str]]:
        """(client id, arrays, example count, other metrics, placement) of a train reply;
        ``UpdateRejected`` when a record is missing or of another type, a metric is not a finite
        number, the reply speaks for another client, its arrays take more bytes than the global
        model's (checked before any is decoded) or one of them is not well-formed ``np.save`` bytes."""
        content = reply.content
        if not isinstance(content, RecordDict):
            raise UpdateRejected(
                f"the reply's content is a {type(content).__name__}, not a RecordDict"
            )
        for name, kind, cls in (
            ("arrays", "an ArrayRecord", ArrayRecord),
            ("metrics", "a MetricRecord", MetricRecord),
        ):
            if name not in content:
                raise UpdateRejected(f"the reply has no {name!r} record ({kind})")
            if not isinstance(content[name], cls):
                raise UpdateRejected(
                    f"the reply's {name!r} record is a {type(content[name]).__name__}, not {kind}"
                )
        record, metrics = content["arrays"], dict(content["metrics"])
        if len(metrics) > MAX_METRICS:
            raise UpdateRejected(
                f"{len(metrics)} metrics, more than the {MAX_METRICS} a reply may carry"
            )
        long = [key for key in metrics if not isinstance(key, str) or len(key) > MAX_NAME_CHARS]
        if long:
            raise UpdateRejected(
                f"metric names longer than {MAX_NAME_CHARS} characters: {_clip(repr(long))}"
            )
        claimed = metrics.pop("partition-id", client_id)
        if not isinstance(claimed, (int, np.integer)) or isinstance(claimed, bool):
            raise UpdateRejected(f"partition-id must be an integer, got {_clip(repr(claimed))}")
        if client_id is not None and claimed != client_id:
            raise UpdateRejected(f"the reply claims to come from client {claimed!r}")
        num_examples = metrics.pop("num-examples", None)
        bad = sorted(
            k for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)
        )
        if bad:
            raise UpdateRejected(f"metrics {_clip(repr(bad))} are not numbers")
        values = {}
        for key, value in metrics.items():
            number = float(value) if isinstance(value, float) or abs(value) < 2**63 else math.inf
            if not math.isfinite(number):
                raise UpdateRejected(f"metric {key!r} is not finite: {_clip(repr(value))}")
            values[key] = number
        task = values.get("task_id")  # the merging aggregators group heads by it: a whole number
        if task is not None and not (task == int(task) and abs(task) < 2**31):
            raise UpdateRejected(f"task_id must be an integer, got {task!r}")
        placement = self._placement(content)
        # The bytes are in memory already (Flower received them), but nothing is decoded or copied
        # before the reply's size is known to fit the global model.
        if len(record) > self.validator.num_arrays:  # before iterating a record of a million keys
            raise UpdateRejected(
                f"{len(record)} arrays where the global model has {self.validator.num_arrays}"
            )
        sizes = {}
        for key, array in record.items():
            if not isinstance(array, Array) or not isinstance(array.data, bytes):
                raise UpdateRejected(
                    f"{_clip(str(key))}: not a flwr Array of bytes ({type(array).__name__})"
                )
            sizes[key] = len(array.data)
        self.validator.check_size(sizes)
        report.bytes_received += sum(sizes.values())
        try:
            arrays = record_to_numpy(record)
        except ArrayFormatError as err:
            raise UpdateRejected(f"unreadable arrays: {err}") from None
        return int(claimed), arrays, num_examples, values, placement

    @staticmethod
    def _placement(content: RecordDict) -> dict[str, str]:
        """Where the client says it ran (informational, but from the network too): a ConfigRecord of
        at most ``MAX_METRICS`` short strings, or nothing."""
        if PLACEMENT_KEY not in content:
            return {}
        record = content[PLACEMENT_KEY]
        if not isinstance(record, ConfigRecord):
            raise UpdateRejected(
                f"the reply's {PLACEMENT_KEY!r} record is a {type(record).__name__}, "
                "not a ConfigRecord"
            )
        items = dict(record)
        if len(items) > MAX_METRICS or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and len(k) <= MAX_NAME_CHARS
            and len(v) <= MAX_NAME_CHARS
            for k, v in items.items()
        ):
            raise UpdateRejected(
                f"the reply's {PLACEMENT_KEY!r} record must hold at most {MAX_METRICS} strings "
                f"of at most {MAX_NAME_CHARS} characters"
            )
        return items

    @staticmethod
    def _fail(report: RoundReport, client_id: int, reason: str) -> None:
        report.failures.append(ClientFailure(client_id, reason))
        log.warning("round %d: client %d failed: %s", report.round, client_id, reason)

    def _finish_train(self, report: RoundReport) -> ArrayRecord | None:
        aggregation = self._require_aggregation()
        accepted = aggregation.num_accepted
        if accepted < self.min_train_nodes:
            aggregation.skip_round()
            report.skipped = (
                f"only {accepted} valid replies (min_train_nodes={self.min_train_nodes});"
                " global model kept"
            )
            log.warning("round %d skipped: %s", report.round, report.skipped)
            return None
        state_ref, state, report.aggregator_metrics = aggregation.finalize()
        where = getattr(aggregation, "placement", None)  # None from a stand-in without an actor
        if where:
            report.actor_placement["aggregator"] = where
        if self.evaluator is not None and (
            report.round % self.evaluate_every == 0 or report.round == self._last_round
        ):
            report.server_metrics, where = self._evaluate(report.round, state_ref)
            if where:
                report.actor_placement["evaluator"] = where
        return state_to_record(state)

    def _evaluate(
        self, server_round: int, state_ref: Any
    ) -> tuple[dict[str, float], dict[str, str]]:
        """Score the new global model on the server's held-out data, retried if the evaluator dies;
        returns the metrics and where the evaluator ran. An aggregator that serves its own model
        (SMILE, WEMoE) has that model scored instead; it goes from actor to actor through the
        object store."""
        guard = self._evaluator_guard
        assert guard is not None
        what = f"the evaluation of round {server_round}"
        served_ref = (
            self._require_aggregation().served
        )  # held by the driver: outlives an aggregator restart
        return guard.call(
            what,
            lambda: guard.get(
                self.evaluator.evaluate.remote(state_ref, served_ref, with_placement=True), what
            ),
            lambda: guard.get(self.evaluator.placement.remote(), "its restart"),
        )
