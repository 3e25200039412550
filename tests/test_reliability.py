"""Reliability without a cluster: malformed replies, skipped rounds, events, checkpoints.

Replies are real Flower Messages (with explicit metadata, so no running app is needed) fed to the
strategy's own reply handling; the aggregator behind it is a stand-in that records what reached it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from fedmerge.federation.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fedmerge.federation.cli import main
from fedmerge.federation.recovery import RoundState
from fedmerge.federation.results import RunDir, RunFileError
from fedmerge.federation.server import checkpoint_due, report_events, report_rows
from fedmerge.federation.strategy import FedMergeStrategy, RoundReport
from fedmerge.federation.validation import (
    UpdateRejected,
    UpdateValidator,
    check_num_examples,
    reference_of,
    update_norm,
    validate_update,
)

from .conftest import digits_config

GLOBAL = {
    "w": np.zeros((2, 3), np.float32),
    "b": np.zeros(3, np.float32),
    "steps": np.array(4, np.int64),
}


def update(**changes) -> dict[str, np.ndarray]:
    arrays = {
        "w": np.full((2, 3), 0.5, np.float32),
        "b": np.ones(3, np.float32),
        "steps": np.array(9, np.int64),
    }
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


# ---- validation of crafted arrays -------------------------------------------------------------


@pytest.mark.parametrize(
    "arrays, num_examples, reason",
    [
        (update(b=None), 10, r"missing \['b'\]"),
        (update(extra=np.zeros(1, np.float32)), 10, r"unexpected \['extra'\]"),
        (
            update(w=np.zeros((3, 2), np.float32)),
            10,
            r"w: expected float32\[2, 3\], got float32\[3, 2\]",
        ),
        (update(w=np.zeros((2, 3), np.float64)), 10, r"w: expected float32\[2, 3\], got float64"),
        (update(steps=np.array(4.0, np.float32)), 10, "steps: expected int64"),
        (update(b=np.array([0, np.nan, 0], np.float32)), 10, "b: contains NaN or Inf"),
        (update(b=np.array([0, np.inf, 0], np.float32)), 10, "b: contains NaN or Inf"),
        (update(), 0, "positive integer, got 0"),
        (update(), -3, "positive integer, got -3"),
        (update(), 2.5, "positive integer, got 2.5"),
        (update(), True, "positive integer, got True"),
        (update(), None, "positive integer, got None"),
    ],
)
def test_malformed_updates_are_rejected_with_the_reason(arrays, num_examples, reason):
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(arrays, reference_of(GLOBAL), num_examples)


def test_update_norm_is_the_l2_distance_over_float_weights():
    # w moves by 0.5 in 6 places, b by 1 in 3; the integer step counter is not a weight.
    assert update_norm(update(), GLOBAL) == pytest.approx(math.sqrt(6 * 0.25 + 3 * 1.0))
    assert update_norm(GLOBAL, GLOBAL) == 0.0


def test_validator_bounds_the_norm_and_the_example_count():
    validator = UpdateValidator(max_update_norm=3.0, shard_sizes=[100, 50])
    validator.set_global(GLOBAL)
    assert validator(0, update(), 100) == pytest.approx(math.sqrt(4.5))
    small = update(w=np.full((2, 3), 0.1, np.float32), b=np.full(3, 0.1, np.float32))
    assert validator(1, small, 50) == pytest.approx(0.3, rel=1e-6)
    with pytest.raises(
        UpdateRejected, match=r"num-examples 51 exceeds the 50 examples of the client's shard"
    ):
        validator(1, small, 51)
    with pytest.raises(UpdateRejected, match="client id 2 is not one of the 2 clients"):
        validator(2, small, 1)


def test_validator_rejects_updates_beyond_max_update_norm():
    validator = UpdateValidator(max_update_norm=1.0)
    validator.set_global(GLOBAL)
    with pytest.raises(
        UpdateRejected, match=r"update norm 2\.121 exceeds federation.max_update_norm = 1"
    ):
        validator(0, update(), 10)
    unbounded = UpdateValidator(max_update_norm_ratio=0)
    unbounded.set_global(GLOBAL)
    assert unbounded(0, update(b=np.full(3, 1e30, np.float32)), 10) > 1e30  # 0 = no bound
    with pytest.raises(
        UpdateRejected, match="max_update_norm_ratio = 100"
    ):  # the relative bound's default
        _default_bounded()(0, update(b=np.full(3, 1e30, np.float32)), 10)
    with pytest.raises(ValueError):
        UpdateValidator(max_update_norm=-1)
    check_num_examples(5, None)


def _default_bounded() -> UpdateValidator:
    validator = UpdateValidator()
    validator.set_global(GLOBAL)
    return validator


# ---- the strategy's reply handling ---------------------------------------------------------------


class RecordingAggregation:
    """Stands in for RoundAggregation: keeps what reached it, merges nothing."""

    def __init__(self) -> None:
        self.state = RoundState(0, GLOBAL)
        self.accepted: list[tuple[int, int]] = []
        self.skipped = False

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    def accumulate(self, client_id, arrays, num_examples, metrics) -> None:
        self.accepted.append((client_id, num_examples))

    def skip_round(self) -> None:
        self.skipped = True

    def finalize(self):
        raise AssertionError("a round below min_train_nodes must not be merged")


def _metadata() -> Metadata:
    return Metadata(
        run_id=1,
        message_id="m",
        src_node_id=1,
        dst_node_id=0,
        reply_to_message_id="q",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )


def reply(arrays: dict[str, np.ndarray] | None = None, **metrics) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            array_dict={k: Array.from_numpy_ndarray(v) for k, v in arrays.items()}
        )
    return Message(content=content, metadata=_metadata())


def error_reply(reason: str) -> Message:
    return Message(error=Error(code=2, reason=reason), metadata=_metadata())


@pytest.fixture
def strategy():
    s = FedMergeStrategy(
        aggregator=None,
        evaluator=None,
        num_clients=4,
        min_train_nodes=2,
        max_update_norm=100.0,
        shard_sizes=[100, 100, 100, 100],
    )
    s._aggregation = RecordingAggregation()
    s.validator.set_global(GLOBAL)
    return s


def test_bad_replies_are_rejected_and_the_round_goes_on(strategy):
    report = RoundReport(round=3, sampled=[0, 1, 2, 3])
    strategy._submit(
        reply(update(), **{"num-examples": 40, "partition-id": 0, "train_loss": 0.5}), report, 0
    )
    strategy._submit(
        reply(update(b=np.array([np.nan, 0, 0], np.float32)), **{"num-examples": 40}), report, 1
    )
    strategy._submit(reply(update(), **{"num-examples": 4000, "partition-id": 2}), report, 2)
    strategy._submit(error_reply("ClientAppException: shard is corrupt"), report, 3)
    assert strategy._aggregation.accepted == [(0, 40)]
    assert [(r.client_id, r.reason) for r in report.rejected] == [
        (1, "b: contains NaN or Inf"),
        (2, "num-examples 4000 exceeds the 100 examples of the client's shard"),
    ]
    assert [(f.client_id, f.reason) for f in report.failures] == [
        (3, "ClientAppException: shard is corrupt")
    ]
    assert report.client_metrics[0]["update_norm"] == pytest.approx(math.sqrt(4.5))
    # Numbers go to metrics.parquet, reasons to events.jsonl.
    rows = report_rows(report)
    assert ("system", 1, "rejected", 1.0) in rows and ("system", 3, "failed", 1.0) in rows
    assert ("system", None, "clients_rejected", 2.0) in rows
    assert report_events(report)[0] == (3, "failed", "ClientAppException: shard is corrupt")


@pytest.mark.parametrize(
    "message, reason",
    [
        (reply(None, **{"num-examples": 4}), "no 'arrays' record"),
        (Message(content=RecordDict({}), metadata=_metadata()), "no 'arrays' record"),
        (reply(update(), **{"num-examples": 4, "partition-id": 3}), "claims to come from client 3"),
        (
            reply(update(), **{"num-examples": 4, "loss": [1.0, 2.0]}),
            r"metrics \['loss'\] are not numbers",
        ),
        (
            reply(update(w=np.full((2, 3), 1e3, np.float32)), **{"num-examples": 4}),
            "exceeds federation.max_update_norm",
        ),
    ],
)
def test_malformed_messages_are_rejected(strategy, message, reason):
    report = RoundReport(round=1, sampled=[0])
    strategy._submit(message, report, 0)
    assert not strategy._aggregation.accepted
    assert len(report.rejected) == 1 and report.rejected[0].client_id == 0
    assert re.search(reason, report.rejected[0].reason), report.rejected[0].reason


def test_round_below_min_train_nodes_is_skipped_and_keeps_the_model(strategy):
    report = RoundReport(round=2, sampled=[0, 1])
    strategy._submit(reply(update(), **{"num-examples": 40}), report, 0)
    strategy._submit(error_reply("timeout"), report, 1)
    assert strategy._finish_train(report) is None  # no new global model: the old one stays
    assert strategy._aggregation.skipped
    assert report.skipped == "only 1 valid replies (min_train_nodes=2); global model kept"
    assert (None, "skipped", report.skipped) in report_events(report)
    assert ("system", None, "round_skipped", 1.0) in report_rows(report)


def test_client_seeds_and_samples_are_pure_functions_of_seed_and_round():
    a = FedMergeStrategy(aggregator=None, evaluator=None, num_clients=10, seed=5)
    b = FedMergeStrategy(aggregator=None, evaluator=None, num_clients=10, seed=5)
    for r in (1, 7):
        b.sample(r + 1, 0.5, 2, stream=0)  # drawing other rounds first changes nothing
        assert a.sample(r, 0.5, 2, stream=0) == b.sample(r, 0.5, 2, stream=0)
        assert a.client_seed(r, 3) == b.client_seed(r, 3)
    assert a.client_seed(1, 3) != a.client_seed(2, 3)


# ---- events and truncation in the run directory ----------------------------------------------


def test_events_are_logged_read_back_and_truncated_with_the_metrics(tmp_path):
    run = RunDir.create(tmp_path, "exp")
    for r in (1, 2, 3):
        run.log_round(r, [("server", None, "accuracy", r / 10)])
    run.log_events(1, [(2, "failed", "ValueError: boom")])
    run.log_events(
        3, [(None, "skipped", "only 1 valid replies"), (0, "rejected", "w: contains NaN or Inf")]
    )
    assert [e["kind"] for e in RunDir(run.path).events()] == ["failed", "skipped", "rejected"]
    run.truncate_after(2)
    reopened = RunDir(run.path)
    assert reopened.server_curve() == [(1, 0.1), (2, 0.2)]
    assert reopened.events() == [
        {"round": 1, "client_id": 2, "kind": "failed", "reason": "ValueError: boom"}
    ]
    with pytest.raises(ValueError, match="kind"):
        run.log_events(1, [(None, "exploded", "?")])
    run.events_path.write_text('{"round": 1, "client_id": null, "kind": "failed"\n')
    with pytest.raises(RunFileError, match="events.jsonl, line 1"):
        run.events()


@pytest.mark.parametrize("every, due", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [])])
def test_checkpoint_schedule(every, due):
    assert [r for r in range(1, 6) if checkpoint_due(r, every, last_round=5)] == due


# ---- checkpoints: round trip, atomicity, pruning, and corrupt files named ----------------------

AGGREGATOR_STATE = {
    "rounds": 3,
    "scope": {"name": "fc", "lam": 0.25, "layers": ["fc.weight", "fc.bias"], "pair": (1, 2)},
    "momentum": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "history": [torch.ones(2, dtype=torch.int64), np.array([0.5, 1.5])],
    "odd": {"__tensor__": "not a tensor"},
    "nothing": None,
}


def test_checkpoint_round_trip(tmp_path):
    path = save_checkpoint(
        tmp_path, 3, seed=7, global_state=GLOBAL, aggregator_state=AGGREGATOR_STATE
    )
    ckpt = load_checkpoint(path)
    assert (ckpt.round, ckpt.seed, ckpt.path) == (3, 7, path)
    for key, value in GLOBAL.items():
        assert ckpt.global_state[key].dtype == value.dtype and np.array_equal(
            ckpt.global_state[key], value
        )
    state = ckpt.aggregator_state
    assert (
        state["rounds"] == 3
        and state["nothing"] is None
        and state["odd"] == {"__tensor__": "not a tensor"}
    )
    assert state["scope"] == {
        "name": "fc",
        "lam": 0.25,
        "layers": ["fc.weight", "fc.bias"],
        "pair": [1, 2],
    }
    assert torch.equal(state["momentum"], AGGREGATOR_STATE["momentum"])
    assert torch.equal(state["history"][0], torch.ones(2, dtype=torch.int64))
    assert isinstance(state["history"][1], np.ndarray) and np.array_equal(
        state["history"][1], [0.5, 1.5]
    )
    assert not any(p.suffix in {".pkl", ".pt", ".pickle"} for p in path.iterdir())


def test_checkpoints_are_pruned_and_leftovers_removed(tmp_path):
    (tmp_path / ".round_00009.tmp-dead").mkdir()  # what a write killed half-way leaves
    for r in (1, 2, 3, 4):
        save_checkpoint(tmp_path, r, seed=0, global_state=GLOBAL, aggregator_state={}, keep=2)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path).round == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00003", "round_00004"]
    assert latest_checkpoint(tmp_path / "none") is None


def test_unsupported_aggregator_state_is_refused_by_key(tmp_path):
    with pytest.raises(CheckpointError, match="aggregator state agent/policy is a object"):
        save_checkpoint(tmp_path, 1, 0, GLOBAL, {"agent": {"policy": object()}})
    assert not list_checkpoints(tmp_path) and not list(tmp_path.glob(".round_*"))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("global.safetensors", "truncate"),
        ("aggregator.safetensors", "truncate"),
        ("aggregator.json", "garble"),
        ("checkpoint.json", "truncate"),
        ("global.safetensors", "delete"),
        ("checkpoint.json", "delete"),
    ],
)
def test_damaged_checkpoint_files_are_named(tmp_path, name, damage):
    path = save_checkpoint(tmp_path, 2, 0, GLOBAL, {"momentum": torch.ones(3)})
    file = path / name
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    elif damage == "garble":
        file.write_text("{not json")
    else:
        file.unlink()
    with pytest.raises(CheckpointError) as info:
        latest_checkpoint(tmp_path)
    assert str(file) in str(info.value)


def test_safetensors_header_lies_are_errors_not_crashes(tmp_path):
    path = save_checkpoint(tmp_path, 1, 0, GLOBAL, {})
    bogus = path / "global.safetensors"
    bogus.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["files"]["global.safetensors"] = hashlib.sha256(bogus.read_bytes()).hexdigest()
    (path / "checkpoint.json").write_text(
        json.dumps(meta)
    )  # the hash agrees: only the reader can tell
    with pytest.raises(CheckpointError, match=f"{bogus} cannot be read"):
        load_checkpoint(path)


def test_resume_of_a_truncated_checkpoint_names_the_file(tmp_path, capsys):
    run = RunDir.create(tmp_path, "exp")
    run.write_config(digits_config(tmp_path).to_toml())
    path = save_checkpoint(run.checkpoint_dir, 1, 7, GLOBAL, {})
    weights = path / "global.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "corrupt or truncated" in err and "Traceback" not in err


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 2  # a folder without config.toml
    assert "config.toml" in capsys.readouterr().err


def test_no_pickle_loading_anywhere():
    """Checkpoints and models load through safetensors and JSON; nothing calls torch.load or pickle."""
    root = Path(__file__).resolve().parents[1]
    for path in [
        *root.glob("federation/*.py"),
        *root.glob("clients/**/*.py"),
        *root.glob("aggregators/*.py"),
    ]:
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path


def test_zero_dim_buffers_keep_their_shape_on_the_wire_and_on_disk(tmp_path):
    """BatchNorm's num_batches_tracked is a 0-d tensor: np.ascontiguousarray would make it 1-d, and
    every client reply (0-d again after training) would then be rejected as a shape mismatch."""
    from fedmerge.federation.arrays import record_to_numpy, state_to_record

    state = {"bn.num_batches_tracked": torch.tensor(5), "w": torch.ones(2, 3).t()}
    arrays = record_to_numpy(state_to_record(state))
    assert arrays["bn.num_batches_tracked"].shape == () and arrays["w"].shape == (3, 2)
    ckpt = load_checkpoint(save_checkpoint(tmp_path, 1, 0, arrays, {}))
    assert ckpt.global_state["bn.num_batches_tracked"].shape == ()


def test_a_failed_client_is_reported_by_its_own_error_message():
    from fedmerge.federation.strategy import client_error_text

    wrapped = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
        '\x1b[39m (pid=1)\n  File "clients/app.py", line 73, in _setup\nDataError: shard s.arrow is '
        "corrupt\n\nThe above exception was the direct cause of the following exception:\n\n"
        "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
        "Message: shard s.arrow is corrupt'>"
    )
    assert client_error_text(wrapped) == "shard s.arrow is corrupt"
    assert client_error_text("no reply within 3 s") == "no reply within 3 s"
    assert client_error_text("\x1b[31mboom\x1b[0m\n") == "boom"
