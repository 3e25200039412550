"""SMILE on tiny models: the layer, the routing, the parameter count, the aggregator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.smile import (
    SmileLinear,
    smile_extra_parameters,
    upscale_linear,
    upscale_model,
)
from fedmerge.aggregators.upscaled import describe, rebuild


def _linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def _finetuned(base: nn.Linear, seed: int, scale: float = 0.5) -> nn.Linear:
    torch.manual_seed(seed)
    tuned = nn.Linear(base.in_features, base.out_features)
    with torch.no_grad():
        tuned.weight.copy_(base.weight + scale * torch.randn_like(base.weight))
        tuned.bias.copy_(base.bias + scale * torch.randn_like(base.bias))
    return tuned


@pytest.mark.parametrize("svd", ["full", "randomized"])
@pytest.mark.parametrize("k", [6, -1])
def test_one_full_rank_expert_reproduces_the_finetuned_layer(svd: str, k: int) -> None:
    base = _linear(8, 6, 0)
    tuned = _finetuned(base, 1)
    layer = upscale_linear(
        base, [tuned.weight], [tuned.bias], k_gate=4, k=k, top_k=1, svd=svd, svd_niter=6
    )
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(layer(x), tuned(x), rtol=1e-4, atol=1e-4)


def test_low_rank_expert_is_the_truncated_svd() -> None:
    base = _linear(10, 7, 0)
    tuned = _finetuned(base, 1)
    layer = upscale_linear(base, [tuned.weight], [tuned.bias], k_gate=2, k=3, top_k=1)
    delta = (tuned.weight - base.weight).detach()
    u, s, vh = torch.linalg.svd(delta)
    expected_delta = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    x = torch.randn(4, 10)
    expected = base(x) + x @ expected_delta.T + (tuned.bias - base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer(x), tuned(x), atol=1e-3)  # rank 3 of 7 loses something


def _rank_r_delta(out_features: int, in_features: int, basis: torch.Tensor) -> torch.Tensor:
    """A ΔW whose row space is spanned by the rows of ``basis`` (r, in)."""
    return torch.randn(out_features, basis.shape[0]) @ basis


def test_an_input_in_an_experts_right_singular_subspace_is_routed_to_it() -> None:
    torch.manual_seed(3)
    in_features, out_features, r, n = 24, 12, 3, 4
    q, _ = torch.linalg.qr(
        torch.randn(in_features, n * r)
    )  # orthonormal columns: disjoint subspaces
    base = _linear(in_features, out_features, 0)
    weights = [
        base.weight.detach() + _rank_r_delta(out_features, in_features, q[:, i * r : (i + 1) * r].T)
        for i in range(n)
    ]
    biases = [base.bias.detach().clone() for _ in range(n)]
    layer = upscale_linear(base, weights, biases, k_gate=r, k=r, top_k=1)
    for i in range(n):
        coeffs = torch.randn(5, r)
        x = coeffs @ q[:, i * r : (i + 1) * r].T  # five inputs inside expert i's subspace
        routed = layer.routing_weights(x)
        assert routed.argmax(dim=-1).tolist() == [i] * 5
        torch.testing.assert_close(routed.sum(dim=-1), torch.ones(5))
        # top-1: the output is the base plus expert i's (exact, rank-r) update alone
        torch.testing.assert_close(layer(x), x @ weights[i].T + base.bias, rtol=1e-4, atol=1e-4)


def test_top_k_keeps_k_renormalised_weights() -> None:
    base = _linear(16, 8, 0)
    experts = [_finetuned(base, s) for s in range(1, 6)]
    layer = upscale_linear(
        base, [e.weight for e in experts], [e.bias for e in experts], k_gate=4, k=4, top_k=2
    )
    w = layer.routing_weights(torch.randn(7, 16))
    assert ((w > 0).sum(dim=-1) == 2).all()
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(7))


@pytest.mark.parametrize(("n", "k_gate", "k"), [(3, 4, 8), (2, 16, 32), (5, 1, 1), (3, 4, -1)])
def test_parameter_count_matches_the_formula(n: int, k_gate: int, k: int) -> None:
    in_features, out_features = 40, 48
    base = _linear(in_features, out_features, 0)
    experts = [_finetuned(base, s) for s in range(1, n + 1)]
    layer = upscale_linear(
        base, [e.weight for e in experts], [e.bias for e in experts], k_gate=k_gate, k=k, top_k=1
    )
    extra = sum(p.numel() for p in layer.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == smile_extra_parameters(n, in_features, out_features, k_gate, k)
    if k > 0:
        assert extra == n * k_gate * in_features + n * (
            k * (in_features + out_features) + out_features
        )


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def _states_touching(base: nn.Module, layers: list[str], n: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for i in range(n):
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for layer in layers:
            state[f"{layer}.weight"] += 0.3 * torch.randn_like(state[f"{layer}.weight"]) * (i + 1)
        states.append(state)
    return states


def test_layers_with_all_zero_task_vectors_are_left_alone() -> None:
    base = _mlp(0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    states = _states_touching(base, ["0", "4"], n=3)  # layer "2" never changes
    model = _mlp(0)
    report = upscale_model(model, base_state, states, k_gate=2, k=4)
    assert report.layers == ["0", "4"] and report.skipped_zero == ["2"]
    assert (
        type(model[2]) is nn.Linear
        and isinstance(model[0], SmileLinear)
        and isinstance(model[4], SmileLinear)
    )
    torch.testing.assert_close(model[2].weight, base_state["2.weight"], rtol=0, atol=0)


def test_excluded_heads_are_not_upscaled() -> None:
    class WithHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])

    torch.manual_seed(0)
    model = WithHeads()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    states = [{k: v + 0.1 * (i + 1) for k, v in base_state.items()} for i in range(2)]
    report = upscale_model(model, base_state, states, k_gate=2, k=2)
    assert report.layers == ["body"]
    assert all(type(h) is nn.Linear for h in model.heads)


def test_bad_settings_are_named() -> None:
    base = _mlp(0)
    state = dict(base.state_dict())
    with pytest.raises(ValueError, match="svd"):
        upscale_model(_mlp(0), state, [state], svd="qr")
    with pytest.raises(ValueError, match="top_k"):
        upscale_model(_mlp(0), state, [state], top_k=2)
    with pytest.raises(ValueError, match="k_gate"):
        create_aggregator("smile", {"k_gate": 0})
    with pytest.raises(ValueError, match="base"):
        create_aggregator("smile", {"base": "initial"})


def test_describe_and_rebuild_round_trip() -> None:
    base = _mlp(0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = _mlp(0)
    upscale_model(
        model, base_state, _states_touching(base, ["0", "2", "4"], n=3), k_gate=2, k=3, top_k=2
    )
    structure = describe(model)
    assert [e["path"] for e in structure] == ["0", "2", "4"]
    again = rebuild(_mlp(5), structure)
    again.load_state_dict(model.state_dict())
    x = torch.randn(9, 6)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_smile_aggregator_serves_a_moe_and_broadcasts_the_average() -> None:
    base = _mlp(0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    states = _states_touching(base, ["0", "2", "4"], n=3)
    updates = [
        ClientUpdate(client_id=i, state=s, num_examples=10 * (i + 1)) for i, s in enumerate(states)
    ]
    ctx = RoundContext(
        round=1, global_state=base_state, base_state=base_state, build_model=lambda: _mlp(9)
    )
    agg = create_aggregator("smile", {"k_gate": 2, "k": 10, "top_k": 1})
    result = agg.aggregate(ctx, updates)
    expected_avg = sum(s["2.weight"] * (10 * (i + 1)) for i, s in enumerate(states)) / 60
    torch.testing.assert_close(result.state["2.weight"], expected_avg)
    served = result.served_model
    assert served is not None and all(isinstance(served[i], SmileLinear) for i in (0, 2, 4))
    assert result.metrics["num_experts"] == 3 and result.metrics["layers_upscaled"] == 3
    assert (
        result.metrics["params_ratio"]
        == result.metrics["params_served"] / result.metrics["params_model"]
        > 1
    )
    # full-rank experts, top-1: every layer computes base + one client's exact update
    x = torch.randn(4, 6)
    assert torch.isfinite(served(x)).all()


def test_smile_aggregator_needs_the_architecture() -> None:
    base = _mlp(0)
    state = dict(base.state_dict())
    ctx = RoundContext(round=1, global_state=state, base_state=state)
    with pytest.raises(ValueError, match="build_model"):
        create_aggregator("smile", {}).aggregate(ctx, [ClientUpdate(0, state, 1)])


def test_smile_on_the_fashion_mnist_cnn_experts_per_client() -> None:
    """One task, label-skewed clients: one expert per client in both linears, convolutions averaged."""
    from fedmerge.clients.tasks import get_task

    task = get_task("fashion_mnist")
    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    updates = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        updates.append(
            ClientUpdate(
                i,
                {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_state.items()},
                100 + i,
            )
        )
    ctx = RoundContext(
        round=3, global_state=base_state, base_state=base_state, build_model=task.build_model
    )
    agg = create_aggregator(
        "smile", {"k_gate": 8, "k": 16, "base": "round", "nonlinear": "average"}
    )
    result = agg.aggregate(ctx, updates)
    served = result.served_model
    assert [type(m).__name__ for m in served if isinstance(m, (nn.Conv2d, SmileLinear))] == [
        "Conv2d",
        "Conv2d",
        "SmileLinear",
        "SmileLinear",
    ]
    assert result.metrics["num_experts"] == 4
    torch.testing.assert_close(
        served[0].weight, result.state["0.weight"]
    )  # the FedAvg of the clients
    assert served[9].k_gate == 8 and served[9].k == 10  # ranks capped at min(out, in) = 10
    assert served(torch.randn(2, 1, 28, 28)).shape == (2, 10)
