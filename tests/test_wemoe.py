"""WEMoE on a tiny BERT with two task heads: construction, routers, E-WEMoE, rebuild."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aggregators import ClientUpdate, RoundContext, create_aggregator
from aggregators.task_arithmetic import task_arithmetic
from aggregators.upscaled import Removed, describe, rebuild
from aggregators.wemoe import WEMoEMLP, find_mlps, prune_magnitude
from clients.tasks.text import MultiTaskTextClassifier

VOCAB = 40


def tiny_model(seed: int = 0) -> MultiTaskTextClassifier:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return MultiTaskTextClassifier(BertModel(config), [3, 2])


def tiny_inputs(n: int, task: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids[torch.arange(8).expand(n, 8) >= lengths.unsqueeze(1)] = 0
    return torch.cat([torch.full((n, 1), task), ids], dim=1)


def finetuned_states(base: nn.Module, n: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        states.append({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                       for k, v in base.state_dict().items()})
    return states


@pytest.fixture(scope="module")
def setting():
    base = tiny_model()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    states = finetuned_states(base, 2)
    updates = [ClientUpdate(client_id=i, state=s, num_examples=20, metrics={"task_id": float(i)})
               for i, s in enumerate(states)]
    proxy = {0: tiny_inputs(32, 0, 1), 1: tiny_inputs(32, 1, 2)}
    ctx = RoundContext(round=1, global_state=base_state, base_state=base_state, seed=3,
                       build_model=lambda: tiny_model(7), proxy_inputs=proxy)
    return base_state, states, updates, ctx


def _task_arithmetic_model(base_state, states) -> MultiTaskTextClassifier:
    merged = task_arithmetic(base_state, states, lam=0.3)
    for t in (0, 1):  # heads per task: client t's own head
        for p in ("weight", "bias"):
            merged[f"heads.{t}.{p}"] = states[t][f"heads.{t}.{p}"]
    model = tiny_model(9)
    model.load_state_dict(merged)
    return model.eval()


def _both_tasks() -> torch.Tensor:
    return torch.cat([tiny_inputs(6, 0, 11), tiny_inputs(6, 1, 12)])


def test_finds_one_mlp_per_block_and_refuses_other_models() -> None:
    sites = find_mlps(tiny_model())
    assert [s.install for s in sites] == ["encoder.encoder.layer.0.intermediate", "encoder.encoder.layer.1.intermediate"]
    assert {s.activation for s in sites} == {"gelu"}
    with pytest.raises(ValueError, match="no transformer MLP"):
        find_mlps(nn.Sequential(nn.Linear(2, 2)))


def test_before_router_training_wemoe_equals_task_arithmetic(setting) -> None:
    base_state, states, updates, ctx = setting
    expected = _task_arithmetic_model(base_state, states)(_both_tasks())
    exact = create_aggregator("wemoe", {"steps": 0, "router_std": 0.0}).aggregate(ctx, updates).served_model
    torch.testing.assert_close(exact(_both_tasks()), expected, rtol=1e-5, atol=1e-5)
    # with the paper's N(0, 0.01²) router weights it is task arithmetic up to a tiny deviation
    paper = create_aggregator("wemoe", {"steps": 0}).aggregate(ctx, updates).served_model
    assert (paper(_both_tasks()) - expected).abs().max() < 1e-3


def test_router_training_lowers_entropy_and_touches_only_routers(setting) -> None:
    _, _, updates, ctx = setting
    agg = create_aggregator("wemoe", {"steps": 30, "lr": 1e-2, "batch_size": 8})
    untrained, _ = agg.build(ctx, updates)
    before = {k: v.clone() for k, v in untrained.state_dict().items()}
    result = agg.aggregate(ctx, updates)
    after = result.served_model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(".router." in k for k in changed)
    assert result.metrics["router_entropy_last"] < result.metrics["router_entropy_first"]
    assert result.metrics["num_experts"] == 2 and result.metrics["params_ratio"] > 1
    x = tiny_inputs(4, 0, 5)
    lam = result.served_model.encoder.encoder.layer[0].intermediate.expert_weights(
        result.served_model.encoder.embeddings(x[:, 1:]))
    assert lam.shape == (4, 2)


def test_e_wemoe_prunes_task_vectors_and_shares_one_router(setting) -> None:
    _, _, updates, ctx = setting
    served = create_aggregator("wemoe", {"steps": 2, "efficient": True, "keep": 0.1}).aggregate(ctx, updates).served_model
    modules = [m for m in served.modules() if isinstance(m, WEMoEMLP)]
    assert len(modules) == 2 and modules[0].router is modules[1].router
    for m in modules:
        for name in ("tau_w1", "tau_w2"):
            tau = getattr(m, name)
            for i in range(tau.shape[0]):
                share = (tau[i] != 0).float().mean().item()
                assert 0.09 <= share <= 0.11, (name, share)


def test_prune_magnitude_keeps_the_largest_entries() -> None:
    t = torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.3, 0.05]])
    torch.testing.assert_close(prune_magnitude(t, 0.33), torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]))


@pytest.mark.parametrize("efficient", [False, True])
def test_describe_and_rebuild_give_identical_outputs(setting, efficient: bool) -> None:
    _, _, updates, ctx = setting
    served = create_aggregator("wemoe", {"steps": 3, "lr": 1e-2, "efficient": efficient}).aggregate(ctx, updates).served_model
    structure = describe(served)
    assert sum(e["type"] == "wemoe_mlp" for e in structure) == 2
    assert sum(e["type"] == "removed" for e in structure) == 2
    again = rebuild(tiny_model(4), structure)
    assert isinstance(again.encoder.encoder.layer[0].output.dense, Removed)
    again.load_state_dict(served.state_dict())
    again.eval()
    torch.testing.assert_close(again(_both_tasks()), served(_both_tasks()), rtol=0, atol=0)


def test_wemoe_needs_proxy_inputs_to_train(setting) -> None:
    base_state, _, updates, _ = setting
    ctx = RoundContext(round=1, global_state=base_state, base_state=base_state, build_model=lambda: tiny_model(7))
    with pytest.raises(ValueError, match="proxy inputs"):
        create_aggregator("wemoe", {"steps": 1}).aggregate(ctx, updates)
