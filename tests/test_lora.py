"""LoRA clients: adapters injected with peft, only trainable tensors on the wire, adapter merges."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedmerge.aggregators import create_aggregator
from fedmerge.aggregators.base import ClientUpdate, RoundContext
from fedmerge.aggregators.lora import LoraProducts, dense_view
from fedmerge.clients.adapters import (
    PeftConfig,
    adapter_layout,
    frozen_digest,
    inject,
    load_received,
    reply_state,
    trainable_keys,
)
from fedmerge.clients.training import get_state
from fedmerge.federation.config import ConfigError, parse_config
from fedmerge.federation.server import federated_model, merges_products

LORA = PeftConfig(method="lora", r=2, alpha=4.0, target_modules=("fc1", "fc2"))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny(adapted: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    return inject(model, LORA, seed=1) if adapted else model


def shared(model: nn.Module, layout=()) -> dict[str, torch.Tensor]:
    """What a run shares: the trainable tensors, plus the adapted base weights for products."""
    keep = set(trainable_keys(model)) | {m.base_key for m in layout}
    return {k: v for k, v in get_state(model).items() if k in keep}


def client_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A client's reply: its adapters and head moved away from the initial ones."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in reply_state(model).items()}


# ---- the adapted model -----------------------------------------------------------------------


def test_only_adapters_and_the_head_train_and_travel():
    model = tiny()
    keys = trainable_keys(model)
    assert keys == [
        "fc1.lora_A.default.weight",
        "fc1.lora_B.default.weight",
        "fc2.lora_A.default.weight",
        "fc2.lora_B.default.weight",
        "head.weight",
        "head.bias",
    ]
    assert set(reply_state(model)) == set(keys)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "fc1.base_layer.weight" in frozen and "fc1.base_layer.bias" in frozen
    # peft's initialisation: B = 0, so the adapted model computes what the base model does.
    x = torch.randn(4, 6)
    assert torch.equal(model(x), tiny(adapted=False)(x))


def test_the_build_is_the_same_in_every_process_and_seeded():
    a, b = tiny(), tiny()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    torch.manual_seed(0)
    other = inject(Tiny(), LORA, seed=2)
    assert not torch.equal(
        other.state_dict()["fc1.lora_A.default.weight"], a.state_dict()["fc1.lora_A.default.weight"]
    )


def test_load_received_is_strict_about_what_arrives_and_keeps_the_frozen_base():
    model = tiny()
    base = model.state_dict()["fc1.base_layer.weight"].clone()
    state = client_state(model, seed=3)
    load_received(model, state)
    assert torch.equal(model.state_dict()["head.bias"], state["head.bias"])
    assert torch.equal(model.state_dict()["fc1.base_layer.weight"], base)
    with pytest.raises(ValueError, match="missing trainable keys: head.bias"):
        load_received(model, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="keys the model does not have: fc9.weight"):
        load_received(model, {**state, "fc9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"head.bias: shape \(4,\), model has \(3,\)"):
        load_received(model, {**state, "head.bias": torch.zeros(4)})


def test_the_frozen_digest_tells_another_base_apart():
    model, keys = tiny(), trainable_keys(tiny())
    digest = frozen_digest(model, keys)
    assert frozen_digest(tiny(), keys) == digest
    load_received(model, client_state(model, seed=4))  # the shared tensors do not count
    assert frozen_digest(model, keys) == digest
    with torch.no_grad():
        model.fc1.base_layer.weight[0, 0] += 1e-3
    assert frozen_digest(model, keys) != digest

    from fedmerge.clients.app import _check_frozen_base

    with pytest.raises(ValueError, match="frozen base model .* differs from the server's"):
        _check_frozen_base(model, reply_state(model), digest)


def test_bad_peft_settings_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.peft.method='lorax' is invalid"):
        parse_config({"train": {"peft": {"method": "lorax", "target_modules": ["q"]}}})
    with pytest.raises(ConfigError, match=r"train.peft.target_modules=\(\) is invalid"):
        parse_config({"train": {"peft": {"method": "lora"}}})
    with pytest.raises(ConfigError, match=r"train.peft.r=0 is invalid"):
        parse_config({"train": {"peft": {"method": "lora", "r": 0, "target_modules": ["q"]}}})
    with pytest.raises(ConfigError, match="aggregator.adapters"):
        parse_config({"aggregator": {"name": "fedavg", "adapters": "both"}})


def test_target_modules_that_fit_nothing_name_the_layers_there_are():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"fits no module of Tiny .* fc1, fc2, head"):
        inject(Tiny(), PeftConfig(method="lora", target_modules=("query",)), seed=0)


def test_a_run_without_peft_writes_the_config_it_always_wrote():
    raw = parse_config({}).to_dict()
    assert "peft" not in raw["train"] and "adapters" not in raw["aggregator"]
    assert parse_config({}).task_spec.adapter is None


# ---- on MiniLM -------------------------------------------------------------------------------


def test_minilm_replies_are_adapters_and_head_under_five_percent_of_the_model():
    config = parse_config(
        {
            "data": {"task": "rotten_tomatoes"},
            "train": {"peft": {"method": "lora", "target_modules": ["query", "value"]}},
        }
    )
    task = config.task_spec.build()
    shared_model = federated_model(task, seed=0, products=False)
    full = get_state(task.build_model())
    assert set(shared_model.initial_state) == set(shared_model.reply_keys)
    assert all(".lora_" in k or k.startswith("head.") for k in shared_model.reply_keys)
    assert (
        len([k for k in shared_model.reply_keys if ".lora_" in k]) == 6 * 2 * 2
    )  # 6 layers, q and v
    sent = sum(v.nbytes for v in shared_model.initial_state.values())
    whole = sum(v.nbytes for v in full.values())
    assert sent < 0.05 * whole, (sent, whole)
    # Under the products merge the adapted layers' base weights go down too, never back up.
    products = federated_model(task, seed=0, products=True)
    assert products.reply_keys == shared_model.reply_keys
    assert set(products.initial_state) - set(products.reply_keys) == {
        m.base_key for m in products.layout
    }
    assert len(products.layout) == 12 and products.frozen_digest != shared_model.frozen_digest


# ---- merging adapters ------------------------------------------------------------------------


def _ctx(state, **extra) -> RoundContext:
    return RoundContext(round=1, global_state=state, base_state=state, **extra)


def test_fedit_averages_the_factors_which_is_not_the_mean_of_the_products():
    model = tiny()
    initial = shared(model)
    states = [client_state(model, seed=s) for s in (5, 6)]
    fedavg = create_aggregator("fedavg", {})
    fedavg.begin_round(_ctx(initial))
    for cid, (state, n) in enumerate(zip(states, (1, 3))):
        fedavg.accumulate(ClientUpdate(cid, state, n))
    merged = fedavg.finalize().state
    for key in initial:
        expected = 0.25 * states[0][key].double() + 0.75 * states[1][key].double()
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
    a, b = "fc1.lora_A.default.weight", "fc1.lora_B.default.weight"
    mean_of_products = 0.25 * states[0][b] @ states[0][a] + 0.75 * states[1][b] @ states[1][a]
    assert (merged[b] @ merged[a] - mean_of_products).abs().max() > 1e-2


def test_the_products_merge_is_the_weighted_mean_of_the_products_folded_into_the_base():
    model = tiny()
    layout = adapter_layout(model)
    assert [m.scaling for m in layout] == [2.0, 2.0]  # alpha / r
    initial = shared(model, layout)
    states = [client_state(model, seed=s) for s in (7, 8, 9)]
    counts = (2, 1, 1)
    merge = LoraProducts(create_aggregator("fedavg", {}), layout)
    merge.begin_round(_ctx(initial))
    for cid, (state, n) in enumerate(zip(states, counts)):
        merge.accumulate(ClientUpdate(cid, state, n))
    merged = merge.finalize().state
    assert set(merged) == set(initial)
    weights = [n / sum(counts) for n in counts]
    for m in layout:
        expected = initial[m.base_key].double() + sum(
            p * m.scaling * (s[m.b_key].double() @ s[m.a_key].double())
            for p, s in zip(weights, states)
        )
        torch.testing.assert_close(merged[m.base_key].double(), expected, rtol=0, atol=1e-5)
        assert torch.equal(merged[m.a_key], initial[m.a_key])  # adapters restart: A0, B = 0
        assert not merged[m.b_key].any()
    # The merged model computes what the base with the averaged products would.
    load_received(model, merged)
    x = torch.randn(5, 6)
    reference = tiny(adapted=False)
    with torch.no_grad():
        for m in layout:
            layer = getattr(reference, m.name)
            layer.weight.copy_(merged[m.base_key])
        reference.head.weight.copy_(sum(p * s["head.weight"] for p, s in zip(weights, states)))
        reference.head.bias.copy_(sum(p * s["head.bias"] for p, s in zip(weights, states)))
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_task_vector_methods_merge_products_by_default_and_averages_merge_factors():
    lora = {"peft": {"method": "lora", "target_modules": ["q"]}}
    for name, products in (("task_arithmetic", True), ("ties", True), ("fedavg", False)):
        config = parse_config({"train": lora, "aggregator": {"name": name}})
        assert merges_products(config, create_aggregator(name, {}).needs) is products, name
    config = parse_config({"train": lora, "aggregator": {"name": "fedavg", "adapters": "products"}})
    assert merges_products(config, create_aggregator("fedavg", {}).needs)
    plain = parse_config({"aggregator": {"name": "task_arithmetic"}})
    assert not merges_products(plain, create_aggregator("task_arithmetic", {}).needs)


def test_task_arithmetic_over_lora_adds_the_scaled_products_to_the_base():
    model = tiny()
    layout = adapter_layout(model)
    initial = shared(model, layout)
    states = [client_state(model, seed=s) for s in (10, 11)]
    merge = LoraProducts(create_aggregator("task_arithmetic", {"lam": 0.5}), layout)
    merged = merge.aggregate(
        _ctx(initial), [ClientUpdate(i, s, 1) for i, s in enumerate(states)]
    ).state
    for m in layout:
        expected = initial[m.base_key] + 0.5 * sum(
            m.scaling * s[m.b_key] @ s[m.a_key] for s in states
        )
        torch.testing.assert_close(merged[m.base_key], expected, rtol=0, atol=1e-5)


def test_smile_over_lora_deltas_equals_smile_over_the_dense_deltas_they_stand_for():
    model = tiny()
    layout = adapter_layout(model)
    initial = shared(model, layout)
    states = [client_state(model, seed=s) for s in (12, 13, 14)]
    params = {"k_gate": 2, "k": 2, "top_k": 1}

    lora_ctx = _ctx(initial, build_model=tiny)
    lora = LoraProducts(create_aggregator("smile", params), layout).aggregate(
        lora_ctx, [ClientUpdate(i, s, 1) for i, s in enumerate(states)]
    )

    dense_initial = get_state(tiny(adapted=False))
    rename = {m.base_key: f"{m.name}.weight" for m in layout}

    def dense(state):
        view = dense_view(state, layout, initial)
        return {**dense_initial, **{rename.get(k, k): v for k, v in view.items()}}

    reference = create_aggregator("smile", params).aggregate(
        _ctx(dense_initial, build_model=lambda: tiny(adapted=False)),
        [ClientUpdate(i, dense(s), 1) for i, s in enumerate(states)],
    )
    assert lora.metrics["layers_upscaled"] == reference.metrics["layers_upscaled"] == 3
    x = torch.randn(16, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            lora.served_model(x), reference.served_model(x), rtol=0, atol=1e-5
        )


def test_full_fine_tuning_settings_that_mean_nothing_under_lora_are_refused():
    with pytest.raises(ConfigError, match=r"train.trainable='\^2' is invalid with \[train.peft\]"):
        parse_config(
            {"train": {"trainable": "^2", "peft": {"method": "lora", "target_modules": ["0"]}}}
        )


def test_wemoe_says_it_cannot_merge_lora_runs():
    from fedmerge.aggregators.wemoe import upscale_mlps

    config = parse_config(
        {
            "data": {"task": "rotten_tomatoes"},
            "train": {"peft": {"method": "lora", "target_modules": ["query", "value"]}},
        }
    )
    task = config.task_spec.build()
    model = task.build_federated_model()
    state = federated_model(task, seed=0, products=True).initial_state
    with pytest.raises(ValueError, match="merge LoRA adapters with smile, task_arithmetic or ties"):
        upscale_mlps(model, state, [state])


def test_a_minilm_client_replies_with_its_adapters_and_head_only(tmp_path, monkeypatch):
    """The real ClientApp handler on a MiniLM LoRA run set up as `fedmerge run` sets it up: the
    reply's arrays are the adapters and the head, under 5 % of the model's bytes."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fedmerge.federation.server as server
    from fedmerge.clients.app import AGGREGATOR_CONFIG_KEY, RUN_CONFIG_KEY, train_handler
    from fedmerge.federation.arrays import state_to_record
    from fedmerge.federation.results import RunDir

    from .conftest import digits_config
    from .test_callbacks import FakeActorClass

    # Messages are made inside a Flower process, which knows its run: here, run 1 on node 1.
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    monkeypatch.setattr(server, "AggregatorActor", FakeActorClass())
    monkeypatch.setattr(server, "EvaluatorActor", FakeActorClass())
    monkeypatch.setattr(server.ray, "get", lambda value, timeout=None: value)
    config = digits_config(
        tmp_path,
        "data.task='rotten_tomatoes'",
        "data.max_train_examples=60",
        "data.max_test_examples=20",
        "data.partitioner='iid'",
        "train.local_epochs=1",
        "train.optimizer='adam'",
        "train.lr=0.001",
        "train.peft.method='lora'",
        "train.peft.target_modules=['query', 'value']",
    )
    experiment = server.Experiment(config, RunDir.create(config.output.root_path, config.name))
    experiment.setup()
    run_config = experiment.run_config()
    assert run_config["frozen_digest"] == experiment.model.frozen_digest
    message = Message(
        content=RecordDict(
            {
                "arrays": state_to_record(experiment.initial_state),
                "config": ConfigRecord(
                    {
                        "server-round": 1,
                        "partition-id": 0,
                        "seed": 11,
                        RUN_CONFIG_KEY: json.dumps(run_config),
                        AGGREGATOR_CONFIG_KEY: "{}",
                    }
                ),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = train_handler(message, context).content["arrays"]
    keys = list(reply.keys())
    assert keys and all(".lora_" in k or k.startswith("head.") for k in keys), keys
    assert sorted(keys) == sorted(experiment.model.reply_keys)
    sent = sum(len(a.data) for a in reply.values())
    whole = sum(v.nbytes for v in get_state(config.task_spec.build().build_model()).values())
    assert sent < 0.05 * whole, (sent, whole)
    trained = reply.to_torch_state_dict()
    assert any(not torch.equal(trained[k], experiment.initial_state[k]) for k in keys)
