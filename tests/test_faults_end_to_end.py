"""Faults in real runs: a client that crashes, a client that never answers, a server killed with
SIGKILL and resumed.

The crash and the kill go through the whole stack (Flower simulation, Ray actors, run directory);
the silent client is played by a grid that never delivers one reply, driving the strategy's own
round loop, because a real client cannot be made to hang on cue without a hook in the product.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedmerge.clients.partition import materialize_shards, shard_path
from fedmerge.clients.tasks import get_task
from fedmerge.federation.cli import main
from fedmerge.federation.recovery import RoundState
from fedmerge.federation.results import RunDir
from fedmerge.federation.runner import run_experiment
from fedmerge.federation.server import partition_params
from fedmerge.federation.strategy import FedMergeStrategy

from .conftest import DEFAULT_EXPERIMENT, ROOT, digits_config, digits_overrides

pytestmark = pytest.mark.slow


def _comparable(run: RunDir) -> dict[tuple[int, str, int, str], float]:
    """Every metric of a run except wall-clock timings, keyed by (round, scope, client, metric)."""
    table = run.metrics().to_pylist()
    return {
        (r["round"], r["scope"], -1 if r["client_id"] is None else r["client_id"], r["metric"]): r[
            "value"
        ]
        for r in table
        if not r["metric"].endswith("_s")
    }  # seconds differ run to run


def test_a_crashing_client_is_a_failure_with_its_error_and_the_rounds_go_on(tmp_path, ray_address):
    config = digits_config(tmp_path, "data.num_clients=4", "federation.num_rounds=2")
    task = get_task("digits")
    train = task.load("train", None)
    shard_dir = materialize_shards(
        task,
        train,
        4,
        config.data.partitioner,
        config.seed,
        partition_params(config.data),
        Path(config.data.cache_dir).resolve(),
    )
    broken = shard_path(shard_dir, 1)
    broken.write_bytes(broken.read_bytes()[:100])  # a damaged disk at one site

    run = run_experiment(config, address=ray_address, progress=lambda _: None).run_dir

    events = run.events()
    failed = [e for e in events if e["kind"] == "failed"]
    assert [(e["round"], e["client_id"]) for e in failed] == [(1, 1), (2, 1)]
    for event in failed:  # the client's own message, not Ray's remote traceback
        assert (
            event["reason"].startswith("shard ")
            and "client_00001.arrow is corrupt" in event["reason"]
        )
        assert "Traceback" not in event["reason"] and "\x1b" not in event["reason"]
    metrics = run.metrics()
    for round in (1, 2):
        rows = metrics.filter(pc.equal(metrics["round"], round)).to_pylist()
        by_name = {(r["scope"], r["metric"], r["client_id"]): r["value"] for r in rows}
        assert by_name[("system", "failed", 1)] == 1.0
        assert {r["client_id"] for r in rows if r["metric"] == "train_loss"} == {0, 2, 3}
    assert run.server_curve("accuracy")[-1][1] > 0.5  # 10 classes: chance is 0.1


def _reply(reply_to: Message, client: int) -> Message:
    arrays = ArrayRecord(array_dict={"w": Array.from_numpy_ndarray(np.ones(3, np.float32))})
    metrics = MetricRecord({"num-examples": 10, "partition-id": client, "train_loss": 0.1})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=reply_to)


class SilentClientGrid:
    """A grid whose messages to one client are delivered but never answered."""

    def __init__(self, silent: int) -> None:
        self.silent = silent
        self.pushed: dict[str, Message] = {}

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = mid = f"m{len(self.pushed) + i}"
            ids.append(mid)
        for mid, message in zip(ids, messages):
            self.pushed[mid] = message
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            message = self.pushed[mid]
            client = int(message.content["config"]["partition-id"])
            if client != self.silent:
                out.append(_reply(message, client))
        return out


class Recording:
    def __init__(self) -> None:
        self.state = RoundState(0, {"w": np.zeros(3, np.float32)})
        self.accepted: list[int] = []

    num_accepted = property(lambda self: len(self.accepted))

    def client_config(self, server_round):
        return {}

    def client_arrays(self, server_round, client_id):
        return None

    def begin_round(self, server_round, sampled=()):
        self.accepted = []

    def accumulate(self, client_id, arrays, num_examples, metrics):
        self.accepted.append(client_id)

    def finalize(self):
        return None, {"w": np.ones(3, np.float32)}, {}


def test_a_client_that_never_answers_times_out_and_the_round_completes():
    strategy = FedMergeStrategy(
        aggregator=None, evaluator=None, num_clients=3, fraction_train=1.0, min_train_nodes=2
    )
    strategy._aggregation = Recording()
    strategy._nodes = [1, 2]
    grid = SilentClientGrid(silent=2)
    initial = ArrayRecord(array_dict={"w": Array.from_numpy_ndarray(np.zeros(3, np.float32))})
    # The silent client never answers, so returning at all shows the round timed out; how fast is
    # not asserted (a loaded machine may take its time), what the round reports is.
    report, new_arrays = strategy._train_round(grid, 1, initial, timeout=0.5)
    assert [(f.client_id, f.reason) for f in report.failures] == [(2, "no reply within 0.5 s")]
    assert strategy._aggregation.accepted == [0, 1]
    assert new_arrays is not None and not report.skipped


def test_a_run_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path, ray_address):
    overrides = digits_overrides(
        tmp_path / "killed", "federation.num_rounds=4", "checkpoint.keep=0"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "fedmerge", "run", str(DEFAULT_EXPERIMENT)]
    for item in overrides:
        args += ["--set", item]
    log = tmp_path / "killed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    runs = tmp_path / "killed" / "runs"
    try:
        deadline = time.monotonic() + 300
        while not list(runs.glob("*/checkpoints/round_00002")):
            assert process.poll() is None, (
                f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no checkpoint of round 2 within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, mid round 3
        process.wait()
    (run_path,) = runs.iterdir()
    killed = RunDir(run_path)
    assert max(r for r, _ in killed.server_curve("accuracy")) < 4

    # The killed run had a Ray of its own, gone with it; the resumed and the reference runs attach to one.
    assert main(["resume", str(run_path), "--address", ray_address]) == 0
    reference = run_experiment(
        digits_config(tmp_path / "whole", "federation.num_rounds=4"),
        address=ray_address,
        progress=lambda _: None,
    ).run_dir

    resumed, whole = _comparable(killed), _comparable(reference)
    assert {key[0] for key in resumed} == {1, 2, 3, 4}
    assert resumed == whole
    assert any(e["kind"] == "resumed" for e in killed.events())
    assert killed.read_summary()["resumed_from_round"] >= 2
