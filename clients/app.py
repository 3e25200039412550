"""The Flower ClientApp: what a federated node does with a train or evaluate message.

Everything a client needs arrives in the message: the global arrays, the partition (virtual
client) to act as, a per-round seed, the run's static settings (task, shard directory, local
training config) and the aggregator's client-side settings. Nodes therefore keep no state across
rounds, and any node can serve any virtual client.

Replies follow Flower's own convention (an ArrayRecord "arrays", a MetricRecord "metrics" with
``num-examples``), so Flower's built-in strategies can drive this ClientApp too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.aggregators.dp import CLIENT_CLIP_KEY, UNCLIPPED_METRIC, clip_update
from fedmerge.aggregators.qfedavg import INITIAL_LOSS_KEY
from fedmerge.aggregators.terms import build_terms
from fedmerge.clients.attacks import attack_data, attack_state, client_attack, reported_count
from fedmerge.clients.partition import open_shard
from fedmerge.clients.tasks import TaskSpec
from fedmerge.clients.tasks.base import ArrayData
from fedmerge.clients.training import TrainConfig, evaluate, train

__all__ = ["app", "local_split", "where_am_i"]

RUN_CONFIG_KEY = "fedmerge.run"
AGGREGATOR_CONFIG_KEY = "fedmerge.aggregator"
AGGREGATOR_ARRAYS_KEY = "aggregator_arrays"
"""The train message's second ArrayRecord: the aggregator's tensors for this client
(``Aggregator.client_arrays``, e.g. SCAFFOLD's correction), absent when there are none."""
PLACEMENT_KEY = "placement"
"""The train reply's ConfigRecord saying where the client ran (``where_am_i``)."""

app = ClientApp()


@lru_cache(maxsize=64)
def _shard(path: str) -> ArrayData:
    return open_shard(Path(path))


def where_am_i() -> dict[str, str]:
    """Host, process and, inside a Ray worker (simulation), the Ray node that runs this client."""
    node_id = ""
    ray = sys.modules.get("ray")  # never import Ray here: a deployed SuperNode may not have it
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
    return {"node_id": node_id, "hostname": socket.gethostname(), "pid": str(os.getpid())}


def local_split(data: ArrayData, test_fraction: float, seed: int) -> tuple[ArrayData, ArrayData]:
    """A client's fixed train / local-test split (the same every round for a given seed)."""
    if test_fraction <= 0:
        return data, data.subset(np.arange(0))
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(len(data) * test_fraction))
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def _setup(
    msg: Message, context: Context
) -> tuple[dict[str, Any], int, Any, torch.nn.Module, ArrayData, ArrayData]:
    config = msg.content["config"]
    run = json.loads(str(config[RUN_CONFIG_KEY]))
    partition = (
        int(config["partition-id"])
        if "partition-id" in config
        else int(context.node_config["partition-id"])
    )
    torch.set_num_threads(max(1, int(run.get("num_threads", 1))))
    task = TaskSpec.from_dict(run["task"]).build()
    shard = _shard(str(Path(run["shard_dir"]) / f"client_{partition:05d}.arrow"))
    train_part, test_part = local_split(
        shard,
        float(run.get("local_test_fraction", 0.0)),
        seed=int(run["seed"]) * 1_000_003 + partition,
    )
    model = task.build_federated_model()
    received = msg.content["arrays"].to_torch_state_dict()
    task.load_weights(model, received)
    if task.adapter is not None:
        _check_frozen_base(model, received, str(run.get("frozen_digest", "")))
    return run, partition, task, model, train_part, test_part


def _check_frozen_base(model: torch.nn.Module, received: dict, expected: str) -> None:
    """A LoRA client trains against the base it built itself: it must be the server's."""
    from fedmerge.clients.adapters import frozen_digest

    found = frozen_digest(model, received)
    if expected and found != expected:
        raise ValueError(
            f"this client's frozen base model (digest {found}) differs from the server's "
            f"({expected}): the node builds the task's model from other weights or another "
            "library version; install the same model files and versions on every node"
        )


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    run, partition, task, model, train_part, _ = _setup(msg, context)
    config = msg.content["config"]
    seed = int(config["seed"])
    torch.manual_seed(seed)
    received = task.shared_state(model)
    # A simulated malicious client (robustness experiments): poisoned data before training.
    attack = client_attack(run, partition)
    if attack is not None:
        train_part = attack_data(
            attack, train_part, num_classes=task.num_classes, client_id=partition
        )
    # The aggregator's client-side loss terms (FedProx's proximal term, WSA's scope regulariser),
    # anchored at the model just received, with the aggregator's tensors for this client.
    asked = json.loads(str(config.get(AGGREGATOR_CONFIG_KEY, "{}")))
    specs = asked.get("terms", [])
    extra = None
    if AGGREGATOR_ARRAYS_KEY in msg.content:
        record = msg.content[AGGREGATOR_ARRAYS_KEY]
        if not isinstance(record, ArrayRecord):
            raise ValueError(f"the message's {AGGREGATOR_ARRAYS_KEY!r} is not an ArrayRecord")
        extra = record.to_torch_state_dict()
    terms = build_terms(specs, model, received, extra) if specs else []
    # q-FedAvg weights each client by its loss at the received model, measured before training.
    before = (
        {INITIAL_LOSS_KEY: evaluate(model, task, train_part)["loss"]}
        if asked.get(INITIAL_LOSS_KEY)
        else {}
    )
    metrics = train(
        model, task, train_part, TrainConfig(**run["train"]), seed=seed, loss_terms=terms
    )
    state, num_examples = task.shared_state(model), len(train_part)
    dp_metrics: dict[str, float] = {}
    clip = asked.get(CLIENT_CLIP_KEY)
    if clip is not None:  # client-side DP clipping: the server never sees the unclipped update
        state, unclipped = clip_update(state, received, float(clip["norm"]))
        dp_metrics[UNCLIPPED_METRIC] = float(unclipped)
    if attack is not None:  # ... and a poisoned reply after it
        state = attack_state(attack, state, received, seed=seed)
        num_examples = reported_count(attack, num_examples)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord(
                {
                    "train_loss": float(metrics["train_loss"]),
                    "train_accuracy": float(metrics["train_accuracy"]),
                    "num-examples": num_examples,
                    "partition-id": partition,
                    **before,
                    **dp_metrics,
                    "local_steps": int(metrics["local_steps"]),
                    "aggregator_arrays": 0 if extra is None else len(extra),
                    # A multi-task client names its task, so merges keep each task's head per task.
                    **({"task_id": task.client_task_id(train_part)} if task.is_multi_task else {}),
                }
            ),
            PLACEMENT_KEY: ConfigRecord({**where_am_i(), "flower_node_id": str(context.node_id)}),
        }
    )
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    _, partition, task, model, _, test_part = _setup(msg, context)
    if len(test_part) == 0:
        raise ValueError(
            f"client {partition} has no local test split (data.local_test_fraction = 0)"
        )
    metrics = evaluate(model, task, test_part)
    reply = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "loss": float(metrics["loss"]),
                    "accuracy": float(metrics["accuracy"]),
                    "num-examples": len(test_part),
                    "partition-id": partition,
                }
            )
        }
    )
    return Message(content=reply, reply_to=msg)
