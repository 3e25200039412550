"""WEMoE on a tiny BERT with two task heads: construction, routers, E-WEMoE, rebuild."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.merging import count_parameters
from fedmerge.aggregators.task_arithmetic import task_arithmetic
from fedmerge.aggregators.upscaled import Removed, describe, rebuild
from fedmerge.aggregators.wemoe import WEMoEMLP, _entropy, find_mlps, prune_magnitude, upscale_mlps
from fedmerge.clients.tasks.text import MultiTaskTextClassifier

VOCAB = 40


def tiny_model(seed: int = 0) -> MultiTaskTextClassifier:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
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
        states.append(
            {
                k: v + 0.05 * torch.randn(v.shape, generator=g)
                if v.is_floating_point()
                else v.clone()
                for k, v in base.state_dict().items()
            }
        )
    return states


@pytest.fixture(scope="module")
def setting():
    base = tiny_model()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    states = finetuned_states(base, 2)
    updates = [
        ClientUpdate(client_id=i, state=s, num_examples=20, metrics={"task_id": float(i)})
        for i, s in enumerate(states)
    ]
    proxy = {0: tiny_inputs(32, 0, 1), 1: tiny_inputs(32, 1, 2)}
    ctx = RoundContext(
        round=1,
        global_state=base_state,
        base_state=base_state,
        seed=3,
        build_model=lambda: tiny_model(7),
        proxy_inputs=proxy,
    )
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
    assert [s.install for s in sites] == [
        "encoder.encoder.layer.0.intermediate",
        "encoder.encoder.layer.1.intermediate",
    ]
    assert {s.activation for s in sites} == {"gelu"}
    with pytest.raises(ValueError, match="no transformer MLP"):
        find_mlps(nn.Sequential(nn.Linear(2, 2)))


def test_before_router_training_wemoe_equals_task_arithmetic(setting) -> None:
    base_state, states, updates, ctx = setting
    expected = _task_arithmetic_model(base_state, states)(_both_tasks())
    exact = (
        create_aggregator("wemoe", {"steps": 0, "router_std": 0.0})
        .aggregate(ctx, updates)
        .served_model
    )
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
        result.served_model.encoder.embeddings(x[:, 1:])
    )
    assert lam.shape == (4, 2)


def test_e_wemoe_prunes_task_vectors_and_shares_one_router(setting) -> None:
    _, _, updates, ctx = setting
    served = (
        create_aggregator("wemoe", {"steps": 2, "efficient": True, "keep": 0.1})
        .aggregate(ctx, updates)
        .served_model
    )
    modules = [m for m in served.modules() if isinstance(m, WEMoEMLP)]
    assert len(modules) == 2 and modules[0].router is modules[1].router
    for m in modules:
        for name in ("w1", "w2"):
            tau = m.tau(name)
            for i in range(tau.shape[0]):
                share = (tau[i] != 0).float().mean().item()
                assert 0.09 <= share <= 0.11, (name, share)


def test_e_wemoe_stores_only_the_kept_entries_and_counts_them_honestly(setting) -> None:
    """Sparse storage serves the very model dense storage does, and the size report counts the
    kept values (worked out here from the task vectors), their positions and bytes apart."""
    base_state, states, updates, ctx = setting
    result = create_aggregator("wemoe", {"steps": 0, "efficient": True, "keep": 0.1}).aggregate(
        ctx, updates
    )
    served, metrics = result.served_model, result.metrics
    sites = find_mlps(tiny_model())
    kept = sum(
        int(torch.count_nonzero(prune_magnitude(state[key] - base_state[key], 0.1)))
        for site in sites
        for key in site.keys
        for state in states
    )
    dense_taus = sum(len(states) * base_state[key].numel() for site in sites for key in site.keys)
    router = 16 * 16 + 16 + 2 * 16 + 2  # one shared router: W1 d×d, b1, W2 N×d, b2
    assert metrics["params_model"] == sum(
        v.numel() for v in base_state.values() if v.is_floating_point()
    )
    assert metrics["params_served"] == metrics["params_model"] + kept + router
    assert (
        metrics["task_vector_nonzero"]
        == metrics["sparse_index_entries"]
        == kept
        < 0.11 * dense_taus
    )
    other_ints = sum(
        b.numel() * b.element_size()
        for n, b in served.named_buffers()
        if not b.is_floating_point() and not n.endswith("_index")
    )  # BERT's position ids
    assert (
        metrics["bytes_served"] == 4 * metrics["params_served"] + 4 * kept + other_ints
    )  # int32 positions
    assert not any(n.endswith(("tau_w1", "tau_w2")) for n, _ in served.named_parameters())

    modules = [m for m in served.modules() if isinstance(m, WEMoEMLP)]
    for site, m in zip(sites, modules):
        for name, key in zip(("w1", "b1", "w2", "b2"), site.keys):
            for i, state in enumerate(states):
                assert torch.equal(
                    m.tau(name)[i], prune_magnitude(state[key] - base_state[key], 0.1)
                )

    # The same model with its task vectors stored densely: identical outputs, the zeros counted.
    dense = tiny_model(7)
    dense.load_state_dict(served.state_dict(), strict=False)  # everything outside the MLPs
    upscale_mlps(dense, base_state, states, shared_router=True, keep=0.1, storage="dense")
    dense.load_state_dict(
        {k: v for k, v in served.state_dict().items() if ".router." in k}, strict=False
    )
    dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(_both_tasks()), served(_both_tasks()), rtol=0, atol=0)
    assert count_parameters(dense) == metrics["params_served"] - kept + dense_taus


def test_prune_magnitude_keeps_the_largest_entries() -> None:
    t = torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.3, 0.05]])
    torch.testing.assert_close(
        prune_magnitude(t, 0.33), torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]])
    )


@pytest.mark.parametrize("efficient", [False, True])
def test_describe_and_rebuild_give_identical_outputs(setting, efficient: bool) -> None:
    _, _, updates, ctx = setting
    served = (
        create_aggregator("wemoe", {"steps": 3, "lr": 1e-2, "efficient": efficient})
        .aggregate(ctx, updates)
        .served_model
    )
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
    ctx = RoundContext(
        round=1, global_state=base_state, base_state=base_state, build_model=lambda: tiny_model(7)
    )
    with pytest.raises(ValueError, match="proxy inputs"):
        create_aggregator("wemoe", {"steps": 1}).aggregate(ctx, updates)


def _route_and_predict(
    model: nn.Module, x: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(λ of every WEMoE module, as it routed ``x``; the model's logits)."""
    weights: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(
            lambda m, args, out: weights.append(m.expert_weights(args[0]).detach())
        )
        for m in model.modules()
        if isinstance(m, WEMoEMLP)
    ]
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return weights, logits


@pytest.mark.parametrize("efficient", [False, True])
def test_padding_changes_neither_the_routing_nor_the_entropy_loss(setting, efficient: bool) -> None:
    """A row routes and predicts alike alone (no padding: the model trims it to its length) and in
    a batch padded to a longer row; so the routers' entropy objective of the batch is the mean of
    the rows' own."""
    _, _, updates, ctx = setting
    served = (
        create_aggregator("wemoe", {"steps": 3, "lr": 1e-2, "efficient": efficient})
        .aggregate(ctx, updates)
        .served_model
    )
    x = _both_tasks()
    lengths = (x[:, 1:] != 0).sum(dim=1)
    assert len(set(lengths.tolist())) > 2 and int(lengths.min()) < x.shape[1] - 1  # really padded
    with torch.no_grad():
        batch_weights, batch_logits = _route_and_predict(served, x)
        alone = [_route_and_predict(served, x[i : i + 1]) for i in range(len(x))]
        batch_loss = _entropy(batch_logits)
    assert len(batch_weights) == 2
    for i, (weights, logits) in enumerate(alone):
        for layer, lam in enumerate(weights):
            torch.testing.assert_close(batch_weights[layer][i : i + 1], lam, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch_logits[i : i + 1], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        batch_loss,
        torch.stack([_entropy(logits) for _, logits in alone]).mean(),
        rtol=1e-5,
        atol=1e-6,
    )
