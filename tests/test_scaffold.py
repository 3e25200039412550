"""SCAFFOLD (aggregators/scaffold.py): the server update by hand, the drift it removes on a
quadratic whose optimum is known, an exact resume, hostile input, and one digits run."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.scaffold import Scaffold
from fedmerge.aggregators.terms import build_terms

from .conftest import digits_config


def ctx(round_: int, x: dict[str, torch.Tensor], n: int = 3) -> RoundContext:
    return RoundContext(round=round_, global_state=x, base_state=x, num_clients=n)


def update(cid: int, y: list[float], k: int, n_examples: int = 10, buf: int = 3) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        state={"w": torch.tensor(y), "n": torch.tensor(buf)},
        num_examples=n_examples,
        metrics={"local_steps": float(k)},
    )


def merge(agg: Scaffold, c: RoundContext, updates: list[ClientUpdate]):
    agg.begin_round(c)
    for u in updates:
        agg.accumulate(u)
    return agg.finalize()


def close(t: torch.Tensor, values: list[float]) -> bool:
    return torch.allclose(t.double(), torch.tensor(values, dtype=torch.float64), atol=1e-6)


# ---- the server update, by hand ------------------------------------------------------------------


def test_two_rounds_of_the_server_update_match_the_hand_computation() -> None:
    agg = Scaffold(server_lr=2.0, local_lr=0.5)
    assert agg.client_arrays(1, 0) is None and agg.client_config(1) == {}
    x = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(0)}
    # Round 1, N = 3: y0 − x = [−0.5, 0.5] after K = 2, y1 − x = [0.5, −1] after K = 4.
    # c0⁺ = −(y0 − x)/(2·0.5) = [0.5, −0.5], c1⁺ = −(y1 − x)/(4·0.5) = [−0.25, 0.5];
    # x ← x + 2·mean = [1, 1.5]; c ← (c0⁺ + c1⁺)/3 = [1/12, 0]; n: (3·10 + 5·30)/40 = 4.5 → 4.
    r1 = merge(agg, ctx(1, x), [update(0, [0.5, 2.5], 2, 10, 3), update(1, [1.5, 1.0], 4, 30, 5)])
    assert close(r1.state["w"], [1.0, 1.5])
    assert r1.state["n"].dtype == torch.int64 and int(r1.state["n"]) == 4
    state = agg.state_dict()
    assert close(state["c"]["w"], [1 / 12, 0.0])
    assert close(state["clients"]["0"]["w"], [0.5, -0.5])
    assert close(state["clients"]["1"]["w"], [-0.25, 0.5])
    assert set(state["c"]) == {"w"}  # no control variate for the integer buffer
    # What clients get next: c − c_i, and c itself for a client never seen.
    assert close(agg.client_arrays(2, 0)["w"], [1 / 12 - 0.5, 0.5])
    assert close(agg.client_arrays(2, 2)["w"], [1 / 12, 0.0])
    assert agg.client_config(2) == {"terms": [{"term": "scaffold_correction"}]}

    # Round 2: clients 0 and 2 reply from x = [1, 1.5]. y0 − x = [0, −0.5] (K = 1),
    # y2 − x = [1, 0] (K = 2). c0⁺ = c0 − c − (y0 − x)/0.5 = [5/12, 0.5];
    # c2⁺ = −c − (y2 − x)/1 = [−13/12, 0]; Σ (c_i⁺ − c_i) = [−14/12, 1];
    # c ← [1/12, 0] + [−14/12, 1]/3 = [−11/36, 1/3]; x ← x + 2·[0.5, −0.25] = [2, 1].
    r2 = merge(agg, ctx(2, r1.state), [update(0, [1.0, 1.0], 1), update(2, [2.0, 1.5], 2)])
    assert close(r2.state["w"], [2.0, 1.0])
    state = agg.state_dict()
    assert close(state["c"]["w"], [-11 / 36, 1 / 3])
    assert close(state["clients"]["0"]["w"], [5 / 12, 0.5])
    assert close(state["clients"]["1"]["w"], [-0.25, 0.5])  # not sampled: unchanged
    assert close(state["clients"]["2"]["w"], [-13 / 12, 0.0])
    assert r2.metrics["clients_with_control_variate"] == 3


def test_examples_weighting_weights_the_server_mean_and_not_the_control_variate() -> None:
    agg = Scaffold(server_lr=2.0, local_lr=0.5, weighting="examples")
    x = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(0)}
    r1 = merge(agg, ctx(1, x), [update(0, [0.5, 2.5], 2, 10), update(1, [1.5, 1.0], 4, 30)])
    # mean = 0.25·[−0.5, 0.5] + 0.75·[0.5, −1] = [0.25, −0.625]; x + 2·mean = [1.5, 0.75]
    assert close(r1.state["w"], [1.5, 0.75])
    assert close(agg.state_dict()["c"]["w"], [1 / 12, 0.0])


def test_a_skipped_or_rejected_reply_changes_no_control_variate() -> None:
    agg = Scaffold(local_lr=0.5)
    x = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(0)}
    agg.begin_round(ctx(1, x))
    agg.accumulate(update(0, [0.5, 2.5], 2))
    with pytest.raises(ValueError, match="client 1: metric 'local_steps'"):
        agg.accumulate(update(1, [9.0, 9.0], 0))
    result = agg.finalize()
    assert close(result.state["w"], [0.5, 2.5])  # only client 0's reply merged
    assert set(agg.state_dict()["clients"]) == {"0"}


# ---- hostile input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, 2.5, math.nan, math.inf, True, "3", None])
def test_a_bad_step_count_is_refused_naming_the_client(steps) -> None:
    agg = Scaffold(local_lr=0.5)
    agg.begin_round(ctx(1, {"w": torch.zeros(2)}))
    bad = ClientUpdate(1, {"w": torch.ones(2)}, 5, {} if steps is None else {"local_steps": steps})
    with pytest.raises(ValueError, match=r"^client 1: metric 'local_steps' must be a positive"):
        agg.accumulate(bad)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (ClientUpdate(5, {"w": torch.ones(2)}, 5, {"local_steps": 1.0}), "not one of the 3"),
        (ClientUpdate(0, {"w": torch.ones(3)}, 5, {"local_steps": 1.0}), "shape"),
        (ClientUpdate(0, {"v": torch.ones(2)}, 5, {"local_steps": 1.0}), "keys differ"),
        (ClientUpdate(0, {"w": torch.tensor([1.0, math.nan])}, 5, {"local_steps": 1.0}), "non-f"),
        (ClientUpdate(0, {"w": torch.ones(2)}, 0, {"local_steps": 1.0}), "num_examples"),
    ],
)
def test_a_bad_reply_is_refused(reply, message) -> None:
    agg = Scaffold(local_lr=0.5)
    agg.begin_round(ctx(1, {"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match=message):
        agg.accumulate(reply)


def test_a_second_reply_of_a_client_and_an_unknown_population_are_refused() -> None:
    agg = Scaffold(local_lr=0.5)
    agg.begin_round(ctx(1, {"w": torch.zeros(2)}))
    agg.accumulate(ClientUpdate(0, {"w": torch.ones(2)}, 5, {"local_steps": 1.0}))
    with pytest.raises(ValueError, match="second reply"):
        agg.accumulate(ClientUpdate(0, {"w": torch.ones(2)}, 5, {"local_steps": 1.0}))
    agg.begin_round(ctx(1, {"w": torch.zeros(2)}, n=0))
    with pytest.raises(ValueError, match="num_clients"):
        agg.accumulate(ClientUpdate(0, {"w": torch.ones(2)}, 5, {"local_steps": 1.0}))


def test_local_lr_zero_outside_a_run_is_a_clear_error() -> None:
    agg = Scaffold()
    agg.begin_round(ctx(1, {"w": torch.zeros(2)}))
    agg.accumulate(ClientUpdate(0, {"w": torch.ones(2)}, 5, {"local_steps": 1.0}))
    with pytest.raises(ValueError, match="local_lr is 0"):
        agg.finalize()


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 3))
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("count", torch.tensor(0))


def received(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"w": torch.ones(3, 2), "mean": torch.zeros(3)}, r"'w' has shape \(3, 2\)"),
        ({"w": torch.ones(2, 3)}, "missing 'mean'"),
        ({"w": torch.ones(2, 3), "mean": torch.zeros(3), "x": torch.ones(1)}, "unexpected 'x'"),
        ({"w": torch.ones(2, 3), "mean": torch.zeros(3), "count": torch.ones(1)}, "unexpected"),
        ({"w": torch.full((2, 3), math.inf), "mean": torch.zeros(3)}, "non-finite"),
        ({"w": torch.ones(2, 3, dtype=torch.int64), "mean": torch.zeros(3)}, "floating-point"),
        (None, "none came"),
    ],
)
def test_a_correction_that_does_not_fit_the_model_is_refused(arrays, message) -> None:
    model = Lin()
    specs = [{"term": "scaffold_correction"}]
    with pytest.raises(ValueError, match=message):
        build_terms(specs, model, received(model), arrays)


def test_a_spec_cannot_set_the_servers_arrays_and_other_terms_still_build() -> None:
    model = Lin()
    with pytest.raises(ValueError, match="comes from the server"):
        build_terms([{"term": "scaffold_correction", "aggregator_arrays": {}}], model, {})
    (prox,) = build_terms([{"term": "fedprox_proximal", "mu": 0.1}], model, received(model))
    assert float(prox(model)) == 0.0


def test_the_correction_term_adds_exactly_c_minus_ci_to_the_gradient() -> None:
    model = Lin()
    corr = torch.arange(6.0).reshape(2, 3)
    (term,) = build_terms(
        [{"term": "scaffold_correction"}],
        model,
        received(model),
        {"w": corr, "mean": torch.ones(3)},  # the buffer's entry is accepted and unused
    )
    with torch.no_grad():
        model.w.add_(1.0)
    value = term(model)
    assert float(value) == float(corr.sum())  # ⟨corr, θ⟩ with θ = 1
    value.backward()
    assert torch.equal(model.w.grad, corr)


# ---- the drift SCAFFOLD removes: a two-client quadratic ------------------------------------------

H = (1.0, 10.0)
A = (torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 4.0]))
OPTIMUM = (H[0] * A[0] + H[1] * A[1]) / sum(H)
K, LR = 10, 0.05


class Point(nn.Module):
    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


def local_run(i: int, x: torch.Tensor, arrays) -> ClientUpdate:
    """K plain SGD steps on f_i(θ) = ½ h_i ‖θ − a_i‖² (+ the correction term when sent)."""
    model = Point(x)
    glob = {"theta": x.clone()}
    terms = build_terms([{"term": "scaffold_correction"}], model, glob, arrays) if arrays else []
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(K):
        loss = 0.5 * H[i] * (model.theta - A[i]).square().sum()
        for term in terms:
            loss = loss + term(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ClientUpdate(i, {"theta": model.theta.detach().clone()}, 10, {"local_steps": float(K)})


def rounds(agg, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
    for r in range(first, last + 1):
        sent = [getattr(agg, "client_arrays", lambda *_: None)(r, i) for i in range(2)]
        updates = [local_run(i, x, sent[i]) for i in range(2)]
        x = merge(agg, ctx(r, {"theta": x}, n=2), updates).state["theta"]
    return x


def test_scaffold_reaches_the_optimum_where_fedavg_drifts() -> None:
    x0 = torch.zeros(2)
    scaffold = rounds(create_aggregator("scaffold", {"local_lr": LR}), x0, 1, 150)
    fedavg = rounds(create_aggregator("fedavg", {}), x0, 1, 150)
    assert torch.allclose(scaffold, OPTIMUM, atol=1e-4), (scaffold, OPTIMUM)
    # FedAvg's fixed point weights a_i by 1 − (1 − η h_i)^K (0.40 and 1.00), not by h_i.
    drift = 1 - (1 - LR * torch.tensor(H)) ** K
    fixed = (drift[0] * A[0] + drift[1] * A[1]) / drift.sum()
    assert torch.allclose(fedavg, fixed, atol=1e-4), (fedavg, fixed)
    assert (fedavg - OPTIMUM).norm() > 1.0


def test_a_run_split_and_resumed_from_the_state_dict_is_exact() -> None:
    x0 = torch.zeros(2)
    whole = rounds(Scaffold(local_lr=LR), x0, 1, 8)
    first = Scaffold(local_lr=LR)
    x = rounds(first, x0, 1, 4)
    saved = {
        "c": {k: v.numpy().copy() for k, v in first.state_dict()["c"].items()},
        "clients": first.state_dict()["clients"],
    }
    resumed = Scaffold(local_lr=LR)
    resumed.load_state_dict(
        {"c": {k: torch.from_numpy(v) for k, v in saved["c"].items()}, "clients": saved["clients"]}
    )
    assert torch.equal(rounds(resumed, x, 5, 8), whole)


def test_a_bad_state_is_refused() -> None:
    with pytest.raises(ValueError, match="expected \\['c', 'clients'\\]"):
        Scaffold().load_state_dict({"c": {}})
    with pytest.raises(ValueError, match="client id 'x'"):
        Scaffold().load_state_dict({"c": {}, "clients": {"x": {}}})
    with pytest.raises(ValueError, match="map keys to tensors"):
        Scaffold().load_state_dict({"c": {"w": 1.0}, "clients": {}})


# ---- the framework side ------------------------------------------------------------------------------


def test_a_run_fills_local_lr_with_train_lr_unless_set(tmp_path) -> None:
    from fedmerge.federation.server import build_aggregator

    agg = build_aggregator(digits_config(tmp_path, "aggregator.name='scaffold'", "train.lr=0.07"))
    assert agg.local_lr == 0.07
    agg = build_aggregator(
        digits_config(tmp_path, "aggregator.name='scaffold'", "aggregator.local_lr=0.2")
    )
    assert agg.local_lr == 0.2
    assert not hasattr(build_aggregator(digits_config(tmp_path)), "local_lr")


def test_local_training_reports_its_optimizer_steps() -> None:
    from fedmerge.clients.tasks import get_task
    from fedmerge.clients.tasks.base import ArrayData
    from fedmerge.clients.training import TrainConfig, train

    task = get_task("digits")
    model = task.build_model()
    rng = np.random.default_rng(0)
    data = ArrayData(rng.random((37, 64)).astype(np.float32), rng.integers(0, 10, 37))
    metrics = train(model, task, data, TrainConfig(local_epochs=2, batch_size=16), seed=1)
    assert metrics["local_steps"] == 2 * 3  # ceil(37 / 16) = 3 batches an epoch


def test_the_strategy_sends_each_client_its_own_correction_and_counts_its_bytes(
    monkeypatch,
) -> None:
    from flwr.app import ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fedmerge.clients.app import AGGREGATOR_ARRAYS_KEY
    from fedmerge.federation.strategy import FedMergeStrategy

    for attribute in ("_run_id", "_task_id", "_node_id"):  # as inside a Flower process
        monkeypatch.setattr(TaskIdentity, attribute, 1)

    class Aggregation:
        def client_config(self, server_round):
            return {}

        def client_arrays(self, server_round, cid):
            return None if cid == 0 else {"w": np.full(3, float(cid), np.float32)}

    s = FedMergeStrategy(aggregator=None, evaluator=None, num_clients=3, fraction_train=1.0)
    s._aggregation, s._nodes = Aggregation(), [1]
    arrays = ArrayRecord(torch_state_dict={"w": torch.zeros(3)})
    messages = list(s.configure_train(1, arrays, None, None))
    assert AGGREGATOR_ARRAYS_KEY not in messages[0].content
    for cid in (1, 2):
        got = messages[cid].content[AGGREGATOR_ARRAYS_KEY].to_torch_state_dict()
        assert torch.equal(got["w"], torch.full((3,), float(cid)))
    model_bytes = sum(len(a.data) for a in arrays.values())
    assert s._take_bytes_sent() == 5 * model_bytes  # three models and two corrections


LORA = (
    "aggregator.name='scaffold'",
    "data.task='rotten_tomatoes'",
    "data.max_train_examples=60",
    "data.max_test_examples=20",
    "data.partitioner='iid'",
    "train.local_epochs=1",
    "train.lr=0.001",
    "train.peft.method='lora'",
    "train.peft.target_modules=['query', 'value']",
)


def lora_experiment(tmp_path, monkeypatch, *overrides):
    """A MiniLM LoRA run set up as `fedmerge run` sets it up, with stand-in actors (test_lora's)."""
    from flwr.supercore.task_identity import TaskIdentity

    import fedmerge.federation.server as server
    from fedmerge.federation.results import RunDir

    from .test_callbacks import FakeActorClass

    for attribute in ("_run_id", "_task_id", "_node_id"):  # as inside a Flower process
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    monkeypatch.setattr(server, "AggregatorActor", FakeActorClass())
    monkeypatch.setattr(server, "EvaluatorActor", FakeActorClass())
    monkeypatch.setattr(server.ray, "get", lambda value, timeout=None: value)
    config = digits_config(tmp_path, *LORA, *overrides)
    experiment = server.Experiment(config, RunDir.create(config.output.root_path, config.name))
    experiment.setup()
    return experiment


def test_a_lora_client_applies_the_correction_to_its_trained_keys(tmp_path, monkeypatch):
    import json

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fedmerge.clients.app import (
        AGGREGATOR_ARRAYS_KEY,
        AGGREGATOR_CONFIG_KEY,
        RUN_CONFIG_KEY,
        train_handler,
    )
    from fedmerge.federation.arrays import state_to_record

    experiment = lora_experiment(tmp_path, monkeypatch)
    initial = experiment.initial_state
    keys = experiment.model.reply_keys

    def reply(correction):
        content = {
            "arrays": state_to_record(initial),
            "config": ConfigRecord(
                {
                    "server-round": 2,
                    "partition-id": 0,
                    "seed": 11,
                    RUN_CONFIG_KEY: json.dumps(experiment.run_config()),
                    AGGREGATOR_CONFIG_KEY: json.dumps({"terms": [{"term": "scaffold_correction"}]}),
                }
            ),
            AGGREGATOR_ARRAYS_KEY: state_to_record(correction),
        }
        message = Message(RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        return train_handler(message, context).content

    correction = {k: torch.full_like(initial[k], 0.01) for k in keys}
    metrics = reply(correction)["metrics"]
    assert metrics["aggregator_arrays"] == len(keys) and metrics["local_steps"] >= 1
    bad = dict(correction)
    bad[keys[0]] = torch.zeros(initial[keys[0]].numel() + 1)
    with pytest.raises(ValueError, match="SCAFFOLD correction of"):
        reply(bad)


def test_lora_products_refuse_scaffold_before_the_run(tmp_path, monkeypatch):
    from fedmerge.federation.config import ConfigError

    with pytest.raises(ConfigError, match='adapters = "factors"'):
        lora_experiment(tmp_path, monkeypatch, "aggregator.adapters='products'")


# ---- one real run --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_digits_run_sends_corrections_and_resumes_exactly(tmp_path, ray_address) -> None:
    from fedmerge.federation.checkpoint import load_checkpoint
    from fedmerge.federation.cli import main
    from fedmerge.federation.results import RunDir
    from fedmerge.federation.runner import run_experiment

    config = digits_config(
        tmp_path,
        "aggregator.name='scaffold'",
        "federation.num_rounds=3",
        "train.momentum=0.0",
        "checkpoint.keep=0",
        "output.plot=false",
    )
    whole = run_experiment(config, address=ray_address, progress=lambda _: None).run_dir
    rows = whole.metrics().to_pylist()
    received = {
        (r["round"], r["client_id"]): r["value"] for r in rows if r["metric"] == "aggregator_arrays"
    }
    # Round 1 has no correction yet (every control variate is 0); from round 2 on every client
    # gets one array per floating tensor of the model.
    floating = sum(
        1
        for v in load_checkpoint(whole.checkpoint_dir / "round_00001").global_state.values()
        if np.issubdtype(np.asarray(v).dtype, np.floating)
    )
    assert {v for (r, _), v in received.items() if r == 1} == {0}
    assert {v for (r, _), v in received.items() if r > 1} == {floating}
    steps = {r["value"] for r in rows if r["metric"] == "local_steps"}
    assert steps and all(s >= 1 and s == int(s) for s in steps)
    accuracy = whole.server_curve("accuracy")
    assert len(accuracy) == 3 and accuracy[-1][1] > 0.5, accuracy

    # Stopped after round 1: only its checkpoint is left, the later rounds rerun on resume.
    stopped = tmp_path / "stopped"
    shutil.copytree(whole.path, stopped)
    for name in ("round_00002", "round_00003"):
        shutil.rmtree(RunDir(stopped).checkpoint_dir / name)
    for name in ("model.safetensors", "summary.json"):
        (stopped / name).unlink(missing_ok=True)
    assert main(["resume", str(stopped), "--address", ray_address]) == 0
    assert RunDir(stopped).server_curve("accuracy") == accuracy
    resumed, reference = RunDir(stopped).load_model(), whole.load_model()
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
