"""Hostile train replies: every one is a rejection with a reason (or a failure), never a crash.

Replies are real Flower Messages (explicit metadata, no running app) fed to
``FedMergeStrategy._submit``, the strategy's whole reply path: record types, byte bound, array
decoding, validation. The aggregator behind it is a stand-in that records what reached it. The
fuzz test at the end mutates a valid reply thousands of times (seeded) and checks each outcome
against an independent oracle built on NumPy's own ``np.load``.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Metadata

from fedmerge.federation.arrays import ArrayFormatError, array_view
from fedmerge.federation.recovery import RoundState
from fedmerge.federation.strategy import FedMergeStrategy, RoundReport
from fedmerge.federation.validation import (
    DEFAULT_MAX_UPDATE_NORM_RATIO,
    HEADER_ALLOWANCE,
    UpdateRejected,
    UpdateValidator,
)

GLOBAL = {
    "w": np.full((4, 3), 0.5, np.float32),
    "b": np.full(3, -0.25, np.float32),
    "steps": np.array(4, np.int64),
    "h": np.linspace(-1, 1, 5),
}
SHARD = 100


def honest() -> dict[str, np.ndarray]:
    return {
        "w": GLOBAL["w"] + 0.01,
        "b": GLOBAL["b"] - 0.02,
        "steps": np.array(9, np.int64),
        "h": GLOBAL["h"] * 1.01,
    }


class RecordingAggregation:
    """Stands in for RoundAggregation: keeps what reached it, merges nothing."""

    def __init__(self) -> None:
        self.state = RoundState(0, GLOBAL)
        self.accepted: list[tuple[int, dict[str, np.ndarray], int]] = []

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    def client_config(self, server_round):
        return {}

    def client_arrays(self, server_round, client_id):
        return None

    def begin_round(self, server_round, sampled=()):
        self.accepted = []

    def accumulate(self, client_id, arrays, num_examples, metrics) -> None:
        self.accepted.append((client_id, arrays, num_examples))

    def finalize(self):
        return None, dict(GLOBAL), {}


def make_strategy(**kwargs) -> FedMergeStrategy:
    s = FedMergeStrategy(
        aggregator=None,
        evaluator=None,
        num_clients=4,
        min_train_nodes=1,
        shard_sizes=[SHARD] * 4,
        **kwargs,
    )
    s._aggregation = RecordingAggregation()
    s.validator.set_global(GLOBAL)
    return s


def _metadata(reply_to: str = "q") -> Metadata:
    return Metadata(
        run_id=1,
        message_id="m",
        src_node_id=1,
        dst_node_id=0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )


def npy(value: np.ndarray) -> bytes:
    return Array.from_numpy_ndarray(value).data


def raw_array(data: object) -> Array:
    """An Array holding exactly ``data`` (Flower would deserialise any bytes the wire carried)."""
    array = Array.from_numpy_ndarray(np.zeros(1, np.float32))
    array.__dict__["data"] = data
    return array


def put(record, key, value) -> None:
    """Store a value in a Flower record without its type check: what a hostile peer's message may hold."""
    record.__dict__["_data"][key] = value


def reply_of(arrays=None, metrics=None, placement=None, reply_to: str = "q") -> Message:
    content = RecordDict()
    if arrays is not None:
        put(content, "arrays", arrays)
    if metrics is not None:
        put(content, "metrics", metrics)
    if placement is not None:
        put(content, "placement", placement)
    return Message(content=content, metadata=_metadata(reply_to))


def record_of(arrays: dict[str, np.ndarray | bytes]) -> ArrayRecord:
    record = ArrayRecord()
    for key, value in arrays.items():
        record[key] = (
            Array.from_numpy_ndarray(value) if isinstance(value, np.ndarray) else raw_array(value)
        )
    return record


def good_metrics(**changes) -> MetricRecord:
    values = {"num-examples": 40, "partition-id": 0, "train_loss": 0.5, "train_accuracy": 0.8}
    values.update(changes)
    record = MetricRecord()
    for key, value in values.items():
        if value is not None:
            put(record, key, value)
    return record


def submit(strategy, message, client_id=0) -> RoundReport:
    report = RoundReport(round=1, sampled=[client_id])
    strategy._submit(message, report, client_id)
    return report


def rejected_reason(strategy, message) -> str:
    report = submit(strategy, message)
    assert not strategy._aggregation.accepted, "a bad reply reached the aggregator"
    assert len(report.rejected) == 1 and report.rejected[0].reason, report
    return report.rejected[0].reason


def with_header(value: np.ndarray, header: str, version: int = 1) -> bytes:
    """``np.save`` bytes of ``value`` under a hand-written header."""
    text = header.encode("latin1")
    size = len(text).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + text + np.ascontiguousarray(value).tobytes()


# ---- each fault of issue 19, item 2 ------------------------------------------------------------


def test_a_valid_reply_is_accepted():
    strategy = make_strategy()
    report = submit(
        strategy, reply_of(record_of(honest()), good_metrics(), ConfigRecord({"hostname": "h"}))
    )
    assert not report.rejected and [c for c, _, _ in strategy._aggregation.accepted] == [0]
    assert report.client_placement == {0: {"hostname": "h"}}


@pytest.mark.parametrize(
    "record", [MetricRecord({"w": 1.0}), ConfigRecord({"w": "x"}), "arrays", None.__class__]
)
def test_arrays_of_another_record_type_are_rejected(record):
    # On main: AttributeError ('MetricRecord' object has no attribute 'data') out of federation/arrays.py.
    reason = rejected_reason(make_strategy(), reply_of(record, good_metrics()))
    assert "'arrays' record is a" in reason and "not an ArrayRecord" in reason


@pytest.mark.parametrize("record", [ArrayRecord(), ConfigRecord({"num-examples": 4})])
def test_metrics_of_another_record_type_are_rejected(record):
    reason = rejected_reason(make_strategy(), reply_of(record_of(honest()), record))
    assert "'metrics' record is a" in reason and "not a MetricRecord" in reason


@pytest.mark.parametrize(
    "header, reason",
    [
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': ((4, 3), }",
            "not a Python literal",
        ),  # TokenError on main
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3)]}", "not a Python literal"),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), 'x': 1}",
            "must be a dict of descr",
        ),
        ("[1, 2]", "must be a dict of descr"),
        ("{'descr': '|O', 'fortran_order': False, 'shape': (4, 3)}", "only plain numeric dtypes"),
        (
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4, 3)}",
            "only plain numeric dtypes",
        ),
        (
            "{'descr': '(3,)<f4', 'fortran_order': False, 'shape': (4,)}",
            "only plain numeric dtypes",
        ),
        ("{'descr': '|V4', 'fortran_order': False, 'shape': (4, 3)}", "only plain numeric dtypes"),
        ("{'descr': 'nope', 'fortran_order': False, 'shape': (4, 3)}", "unknown dtype"),
        (
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (4, 3)}",
            "fortran_order must be True or False",
        ),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, -3)}", "shape must be a tuple"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': [4, 3]}", "shape must be a tuple"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, True)}", "shape must be a tuple"),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904)}",
            "needs",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2)}",
            "buffer of 48 bytes where float32[4, 2] needs 32",
        ),
    ],
)
def test_mangled_npy_headers_are_rejected_with_the_problem(header, reason):
    data = with_header(honest()["w"], header)
    with pytest.raises(ArrayFormatError, match=reason.replace("[", r"\[").replace("(", r"\(")):
        array_view(raw_array(data))
    got = rejected_reason(
        make_strategy(), reply_of(record_of({**honest(), "w": data}), good_metrics())
    )
    assert got.startswith("unreadable arrays: w: ") and reason.split("(")[0] in got


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "no NUMPY magic"),
        (b"PK\x03\x04" + bytes(60), "no NUMPY magic"),
        (b"\x93NUMPY\x09\x00" + bytes(60), "unsupported .npy format version 9.0"),
        (b"\x93NUMPY\x01\x00\xff\xff" + bytes(60), "exceeds 4096"),
        (b"\x93NUMPY\x01\x00\x80\x00{'descr'", "truncated .npy header"),
    ],
)
def test_bytes_that_are_not_npy_are_rejected(data, reason):
    with pytest.raises(ArrayFormatError, match=reason):
        array_view(raw_array(data))


def test_a_buffer_longer_than_its_header_says_is_rejected():
    """On main, trailing bytes were ignored (``np.frombuffer`` with a count): the data length must
    equal the declared array's size exactly."""
    data = npy(honest()["w"])
    for extra in (b"\x00", b"\x00" * 4, bytes(1000)):
        reason = rejected_reason(
            make_strategy(), reply_of(record_of({**honest(), "w": data + extra}), good_metrics())
        )
        assert f"buffer of {48 + len(extra)} bytes where float32[4, 3] needs 48" in reason
    reason = rejected_reason(
        make_strategy(), reply_of(record_of({**honest(), "w": data[:-1]}), good_metrics())
    )
    assert "buffer of 47 bytes" in reason


def test_array_data_of_another_type_is_rejected():
    for data in ("not bytes", 7, bytearray(npy(honest()["w"]))):
        reason = rejected_reason(
            make_strategy(), reply_of(record_of({**honest(), "w": data}), good_metrics())
        )
        assert "w: not a flwr Array of bytes" in reason
    record = record_of(honest())
    put(record, "w", MetricRecord({"x": 1.0}))
    reason = rejected_reason(make_strategy(), reply_of(record, good_metrics()))
    assert "w: not a flwr Array of bytes (MetricRecord)" in reason


@pytest.mark.parametrize(
    "metrics, reason",
    [
        (good_metrics(train_loss=math.nan), "metric 'train_loss' is not finite"),
        (good_metrics(train_loss=-math.inf), "metric 'train_loss' is not finite"),
        (good_metrics(train_loss=1e308 * 10), "not finite"),
        (good_metrics(**{"partition-id": 0.0}), "partition-id must be an integer, got 0.0"),
        (good_metrics(**{"partition-id": "0"}), "partition-id must be an integer"),
        (good_metrics(**{"partition-id": [0]}), "partition-id must be an integer"),
        (good_metrics(**{"partition-id": True}), "partition-id must be an integer"),
        (good_metrics(**{"num-examples": 10**30}), "num-examples"),
        (good_metrics(**{f"m{i}": 1.0 for i in range(40)}), "more than the 32"),
        (good_metrics(**{"x" * 300: 1.0}), "metric names longer than 200"),
        (
            good_metrics(task_id=2.5),
            "task_id must be an integer, got 2.5",
        ),  # on main it reached merging.task_id: ValueError
        (good_metrics(task_id=1e300), "task_id must be an integer"),
    ],
)
def test_hostile_metrics_are_rejected(metrics, reason):
    assert reason in rejected_reason(make_strategy(), reply_of(record_of(honest()), metrics))


@pytest.mark.parametrize(
    "placement, reason",
    [
        (ArrayRecord(), "'placement' record is a ArrayRecord, not a ConfigRecord"),
        (MetricRecord({"x": 1.0}), "not a ConfigRecord"),
        (ConfigRecord({"hostname": "h" * 10_000}), "at most 32 strings of at most 200 characters"),
        (ConfigRecord({"pid": 5}), "at most 32 strings"),
    ],
)
def test_a_hostile_placement_record_is_rejected(placement, reason):
    assert reason in rejected_reason(
        make_strategy(), reply_of(record_of(honest()), good_metrics(), placement)
    )


def test_any_unforeseen_exception_rejects_that_reply_only(monkeypatch):
    strategy = make_strategy()

    def explode(*args):
        raise RuntimeError("nobody saw this coming")

    monkeypatch.setattr(UpdateValidator, "__call__", explode)
    reason = rejected_reason(strategy, reply_of(record_of(honest()), good_metrics()))
    assert reason == "malformed reply (RuntimeError: nobody saw this coming)"


@pytest.mark.parametrize(
    "code, reason, expected",
    [
        (2, "boom", "boom"),
        (2, None, "error code 2"),
        (2, 12345, "error code 2"),
        ("x", b"bytes", "error code 'x'"),
        (2, "\x1b[31m" + "y" * 100_000, "characters)"),
    ],
)
def test_error_replies_with_odd_reasons_are_failures(code, reason, expected):
    strategy = make_strategy()
    message = Message(error=Error(code=0), metadata=_metadata())
    message.error.__dict__.update(_code=code, _reason=reason)
    report = submit(strategy, message)
    assert len(report.failures) == 1 and expected in report.failures[0].reason
    assert len(report.failures[0].reason) <= 600


def test_malformed_evaluate_replies_are_left_out():
    strategy = make_strategy()
    good = Message(
        content=RecordDict(
            {"metrics": MetricRecord({"num-examples": 10, "loss": 1.0, "accuracy": 0.5})}
        ),
        metadata=_metadata(),
    )
    bad = [
        reply_of(metrics=good_metrics(loss=math.nan, accuracy=0.5)),
        reply_of(metrics=good_metrics(**{"num-examples": -1}, loss=1.0, accuracy=0.5)),
        reply_of(arrays=ArrayRecord()),
        reply_of(metrics=ConfigRecord({"num-examples": 5})),
    ]
    result = strategy.aggregate_evaluate(1, [*bad, good])
    assert dict(result) == {"loss": 1.0, "accuracy": 0.5, "num-examples": 10}


# ---- duplicated replies and replies to unknown messages (the streaming round loop) --------------


class ReplayingGrid:
    """A grid that answers every message twice and adds a reply to a message it never got."""

    def __init__(self) -> None:
        self.pushed: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self):
        return [1]

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = mid = f"m{len(self.pushed)}"
            self.pushed[mid] = message
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        out = [
            self._answer(mid) for mid in sorted(self.pushed)
        ] * 2  # every answer twice, every pull
        out.append(reply_of(record_of(honest()), good_metrics(), reply_to="never-sent"))
        return out if self.pulls <= 3 else []

    def _answer(self, mid: str) -> Message:
        client = int(self.pushed[mid].content["config"]["partition-id"])
        return reply_of(record_of(honest()), good_metrics(**{"partition-id": client}), reply_to=mid)


def test_duplicated_and_unknown_replies_are_ignored(monkeypatch):
    """On main: the unknown reply was a KeyError ending the round, and a duplicate was merged twice."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(
        TaskIdentity, "_run_id", 1
    )  # what a running ServerApp sets; new Messages need it
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    strategy = FedMergeStrategy(
        aggregator=None,
        evaluator=None,
        num_clients=4,
        fraction_train=0.5,
        min_train_nodes=2,
        shard_sizes=[SHARD] * 4,
    )
    strategy._aggregation = RecordingAggregation()
    strategy._nodes = [1]
    report, new_arrays = strategy._train_round(ReplayingGrid(), 1, record_of(GLOBAL), timeout=60)
    accepted = [c for c, _, _ in strategy._aggregation.accepted]
    assert accepted == report.sampled and len(accepted) == 2 and new_arrays is not None
    assert not report.rejected and not report.failures


# ---- the byte bound before decoding (item 3) ---------------------------------------------------------


def test_a_reply_bigger_than_the_model_is_rejected_before_decoding(monkeypatch):
    strategy = make_strategy()
    bound = sum(v.nbytes for v in GLOBAL.values()) + len(GLOBAL) * HEADER_ALLOWANCE
    assert strategy.validator.max_reply_bytes == bound

    def no_decoding(record):
        raise AssertionError("an oversized reply was decoded")

    monkeypatch.setattr("fedmerge.federation.strategy.record_to_numpy", no_decoding)
    junk = {**honest(), "w": npy(np.zeros(bound, np.uint8))}  # a well-formed array, far too big
    reason = rejected_reason(strategy, reply_of(record_of(junk), good_metrics()))
    assert f"exceed the {bound} bytes the global model's arrays take" in reason
    many = {**honest(), **{f"x{i}": np.zeros(1, np.float32) for i in range(5)}}
    reason = rejected_reason(strategy, reply_of(record_of(many), good_metrics()))
    assert reason == "9 arrays where the global model has 4"


# ---- the default bound on an update's norm (item 4) --------------------------------------------------


def test_an_absurd_update_is_rejected_by_default():
    """On main the default (max_update_norm = 0) let 3e38 weights through and the model was lost."""
    strategy = make_strategy()
    assert strategy.validator.max_update_norm_ratio == DEFAULT_MAX_UPDATE_NORM_RATIO == 100
    absurd = {
        **honest(),
        "w": np.full((4, 3), 3e38, np.float32),
    }  # finite, but overflows float32 sums
    reason = rejected_reason(strategy, reply_of(record_of(absurd), good_metrics()))
    assert reason.startswith(
        "update norm 1.039e+39 exceeds federation.max_update_norm_ratio = 100 times"
    )
    norm = math.sqrt(
        sum(float(np.sum(v.astype(np.float64) ** 2)) for k, v in GLOBAL.items() if k != "steps")
    )
    assert f"the global model's norm {norm:.4g}" in reason
    # An honest update, and one just inside the bound, pass; 0 disables the bound.
    assert not submit(strategy, reply_of(record_of(honest()), good_metrics())).rejected
    inside = {**honest(), "w": GLOBAL["w"] + np.float32(99 * norm / math.sqrt(12))}
    assert not submit(strategy, reply_of(record_of(inside), good_metrics())).rejected
    off = make_strategy(max_update_norm_ratio=0)
    assert not submit(off, reply_of(record_of(absurd), good_metrics())).rejected


def test_the_ratio_bound_uses_a_floor_for_a_model_at_zero():
    validator = UpdateValidator()
    validator.set_global({"w": np.zeros(4, np.float32)})
    assert validator.norm_bound == 100.0
    assert validator(0, {"w": np.full(4, 49.0, np.float32)}, 1) == pytest.approx(98.0)
    with pytest.raises(UpdateRejected, match="times the global model's norm 1"):
        validator(0, {"w": np.full(4, 51.0, np.float32)}, 1)
    big = UpdateValidator(max_update_norm_ratio=0)
    big.set_global({"w": np.zeros(2)})
    with pytest.raises(UpdateRejected, match="overflows float64"):
        big(0, {"w": np.array([1e200, 1e200])}, 1)
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_update_norm_ratio"):
            UpdateValidator(max_update_norm_ratio=bad)


def test_the_config_default_turns_the_ratio_bound_on():
    from fedmerge.federation.config import ConfigError, FederationConfig

    assert FederationConfig().max_update_norm_ratio == DEFAULT_MAX_UPDATE_NORM_RATIO
    with pytest.raises(ConfigError, match="federation.max_update_norm_ratio"):
        FederationConfig(max_update_norm_ratio=-1.0).validate()


# ---- the fuzz test ------------------------------------------------------------------------------

FUZZ_CASES = 3000
DTYPES = [
    "<f4",
    ">f4",
    "<f8",
    "<f2",
    "<i8",
    "<i4",
    "|u1",
    "|b1",
    "<c8",
    "|O",
    "|V4",
    "<U3",
    "|S2",
    "<M8[s]",
    "(2,)<f4",
    "[('a', '<f4')]",
    "'<f4'",
    "float32",
    "nope",
]


def _fuzz_reply(rng: np.random.Generator) -> tuple[Message, list[str]]:
    """A valid reply with 1-3 random mutations; returns it and the mutations' names."""
    arrays: dict[str, object] = {k: npy(v) for k, v in honest().items()}
    metrics: dict[str, object] = {
        "num-examples": 40,
        "partition-id": 0,
        "train_loss": 0.5,
        "train_accuracy": 0.8,
    }
    records = {
        "arrays": None,
        "metrics": None,
        "placement": ConfigRecord({"hostname": "h", "pid": "1"}),
    }
    applied = []
    keys = list(GLOBAL)
    for _ in range(int(rng.integers(1, 4))):
        kind = str(
            rng.choice(
                [
                    "header_bytes",
                    "header_text",
                    "resize",
                    "array_swap",
                    "record_type",
                    "keys",
                    "metrics",
                    "scale",
                    "raw_value",
                ]
            )
        )
        applied.append(kind)
        key = keys[int(rng.integers(len(keys)))]
        data = arrays.get(key)
        if kind == "header_bytes" and isinstance(data, bytes) and data:
            buf = bytearray(data)
            for _ in range(int(rng.integers(1, 6))):
                pos = int(rng.integers(0, min(len(buf), 128)))
                op = int(rng.integers(3))
                if op == 0:
                    buf[pos] = int(rng.integers(256))
                elif op == 1:
                    buf.insert(pos, int(rng.choice(list(b"()[]{},:' 0123456789-eL\n\x00"))))
                elif len(buf) > 1:
                    del buf[pos]
            arrays[key] = bytes(buf)
        elif kind == "header_text":
            value = GLOBAL[key]
            descr = str(rng.choice(DTYPES)) if rng.random() < 0.5 else value.dtype.str
            shape = (
                tuple(int(n) for n in value.shape)
                if rng.random() < 0.5
                else tuple(int(n) for n in rng.integers(-2, 6, size=int(rng.integers(0, 4))))
            )
            fortran = rng.choice(["False", "True", "0", "None", "'no'"])
            extra = rng.choice(["", "", " 'x': 1,", " 'shape': (1,),"])
            descr_text = descr if descr.startswith(("[", "'")) else repr(descr)
            header = f"{{'descr': {descr_text}, 'fortran_order': {fortran}, 'shape': {shape!r},{extra} }}"
            if rng.random() < 0.2:
                header = header.replace(")", "", 1) if rng.random() < 0.5 else header + ")"
            header = header + " " * int(rng.integers(0, 40)) + "\n"
            arrays[key] = with_header(value, header, version=int(rng.choice([1, 2])))
        elif kind == "resize" and isinstance(data, bytes):
            cut = int(rng.integers(-64, 65))
            arrays[key] = data[:cut] if cut < 0 else data + rng.bytes(cut)
        elif kind == "array_swap":
            dtype = rng.choice([np.float32, np.float64, np.int64, np.float16, np.uint8])
            shape = (
                GLOBAL[key].shape
                if rng.random() < 0.5
                else tuple(int(n) for n in rng.integers(0, 5, size=2))
            )
            arrays[key] = npy(rng.normal(size=shape).astype(dtype))
        elif kind == "record_type":
            name = str(rng.choice(["arrays", "metrics", "placement"]))
            records[name] = [
                ArrayRecord(),
                MetricRecord({"x": 1.0}),
                ConfigRecord({"x": "y"}),
                "text",
                3,
            ][int(rng.integers(5))]
            if name == "arrays" and rng.random() < 0.3:
                records[name] = "missing"
        elif kind == "keys":
            if rng.random() < 0.5:
                arrays.pop(key, None)
            else:
                arrays[f"extra{int(rng.integers(10))}"] = npy(np.zeros(2, np.float32))
        elif kind == "metrics":
            name = str(rng.choice(["num-examples", "partition-id", "train_loss", "new"]))
            metrics[name] = [
                0,
                -1,
                1,
                SHARD,
                SHARD + 1,
                2**62,
                0.0,
                3.5,
                math.nan,
                math.inf,
                1e300,
                True,
                "7",
                [1, 2],
                None,
            ][int(rng.integers(15))]
        elif kind == "scale" and key in ("w", "b", "h"):
            factor = float(rng.choice([3e38, 1e30, 1e6, 150.0, 50.0, 1.5, -1.0, 0.0, math.nan]))
            with np.errstate(over="ignore", invalid="ignore"):
                arrays[key] = npy((honest()[key] * factor).astype(GLOBAL[key].dtype))
        elif kind == "raw_value":
            arrays[key] = [b"", "text", 5, bytearray(b"\x93NUMPY"), MetricRecord({"x": 1.0})][
                int(rng.integers(5))
            ]
    array_record = ArrayRecord()
    for key, value in arrays.items():
        put(
            array_record,
            key,
            raw_array(value) if isinstance(value, (bytes, bytearray, str, int)) else value,
        )
    metric_record = MetricRecord()
    for key, value in metrics.items():
        if value is not None:
            put(metric_record, key, value)
    content = {
        "arrays": array_record if records["arrays"] is None else records["arrays"],
        "metrics": metric_record if records["metrics"] is None else records["metrics"],
        "placement": records["placement"],
    }
    if content["arrays"] == "missing":
        del content["arrays"]
    return reply_of(**content), applied


def _oracle(message: Message, bound: float) -> str:
    """Why this reply is valid ("" when it is not), judged independently of the product's code:
    NumPy's own ``np.load`` must read every array, to the global model's layout, with nothing left
    over; weights finite and within the bound; counts and metrics well-formed."""
    content = message.content
    record, metrics, placement = (
        content.__dict__["_data"].get(k) for k in ("arrays", "metrics", "placement")
    )
    if type(record) is not ArrayRecord or type(metrics) is not MetricRecord:
        return ""
    if placement is not None and not (
        type(placement) is ConfigRecord
        and all(isinstance(v, str) and len(v) <= 200 for v in placement.values())
    ):
        return ""
    values = dict(metrics)
    n = values.pop("num-examples", None)
    if (
        type(n) is not int
        or not 0 < n <= SHARD
        or values.pop("partition-id", 0) != 0
        or any(type(v) not in (int, float) or not math.isfinite(v) for v in values.values())
    ):
        return ""
    if set(record) != set(GLOBAL):
        return ""
    squared = 0.0
    for key, array in record.items():
        if type(array) is not Array:
            return ""
        data = array.data
        if type(data) is not bytes:
            return ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "error"
                )  # NumPy's Python 2 header fix-ups: no header np.save writes today
                stream = io.BytesIO(data)
                major, _ = np.lib.format.read_magic(stream)
                read = (
                    np.lib.format.read_array_header_1_0
                    if major == 1
                    else np.lib.format.read_array_header_2_0
                )
                read(stream)
                stream.seek(0)
                value = np.load(stream, allow_pickle=False)
        except Exception:
            return ""
        ref = GLOBAL[key]
        if value.dtype != ref.dtype or value.shape != ref.shape or len(data) != stream.tell():
            return ""
        if ref.dtype.kind == "f":
            if not np.isfinite(value).all():
                return ""
            squared += float(np.sum((value.astype(np.float64) - ref) ** 2))
    if not math.sqrt(squared) <= bound:
        return ""
    return "decodes with np.load to the global model's layout; finite, within the norm bound; valid count and metrics"


def _gist(reason: str) -> str:
    """A rejection reason without its particulars (key, names, numbers), to count reasons by kind."""
    text = re.sub(r"^(unreadable arrays: )?(w|b|h|steps|extra\d): ", r"\1<key>: ", reason)
    text = re.sub(r"'[^']*'|\[[^\]]*\]|\([^)]*\)", "...", text)
    text = re.sub(r"-?\d[\w.+-]*", "N", text)
    return text[:90]


def test_fuzzed_replies_never_crash_and_each_outcome_has_a_reason():
    rng = np.random.default_rng(19)
    strategy = make_strategy()
    bound = strategy.validator.norm_bound
    outcomes: Counter[str] = Counter()
    for case in range(FUZZ_CASES):
        message, applied = _fuzz_reply(rng)
        strategy._aggregation.accepted = []
        report = RoundReport(round=1, sampled=[0])
        strategy._submit(message, report, 0)  # must not raise, whatever the mutation
        accepted = bool(strategy._aggregation.accepted)
        assert accepted != bool(report.rejected) and not report.failures, (case, applied, report)
        why = _oracle(message, bound)
        if accepted:
            assert why, f"case {case} ({applied}) accepted, but the oracle finds it invalid"
            ((_, arrays, _),) = strategy._aggregation.accepted
            for key, array in message.content[
                "arrays"
            ].items():  # what reached the aggregator is what NumPy reads
                assert np.array_equal(arrays[key], np.load(io.BytesIO(array.data)), equal_nan=True)
            outcomes["accepted: " + why] += 1
        else:
            reason = report.rejected[0].reason
            assert reason and not why, (
                f"case {case} ({applied}) rejected ({reason}), but the oracle finds it valid"
            )
            outcomes["rejected: " + _gist(reason)] += 1
    accepted = sum(v for k, v in outcomes.items() if k.startswith("accepted"))
    print(f"\n{FUZZ_CASES} mutated replies: {accepted} accepted, {FUZZ_CASES - accepted} rejected")
    for outcome, count in outcomes.most_common():
        print(f"  {count:5d}  {outcome}")
    assert 0 < accepted < FUZZ_CASES // 2  # both outcomes are exercised
