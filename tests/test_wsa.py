"""WSA as plain computations: scopes, the regulariser, scope fusion and the aggregator. No Ray."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.fedavg import fedavg
from fedmerge.aggregators.terms import build_terms
from fedmerge.aggregators.wsa import (
    WSA,
    ScopeTracker,
    fuse_scopes,
    gaussian_kl,
    layer_scopes,
    scope_layers,
    scope_term,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hand_scope(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = w.sum() / w.numel()
    return mu, torch.sqrt(((w - mu) ** 2).sum() / w.numel() + 1e-8)


# ---- the regulariser ---------------------------------------------------------------------------


def test_regulariser_is_the_closed_form_gaussian_kl_and_torchs() -> None:
    model = mlp()
    targets = {"0.weight": [0.05, 0.3], "2.weight": [-0.1, 0.2]}
    term = scope_term(model, state_of(model), lam=0.5, targets=targets)
    value = term(model)

    closed, torch_kl = [], []
    for name, (mu_t, sigma_t) in targets.items():
        mu, sigma = hand_scope(model.get_parameter(name))
        closed.append(
            math.log(sigma_t / sigma.item())
            + (sigma.item() ** 2 + (mu.item() - mu_t) ** 2) / (2 * sigma_t**2)
            - 0.5
        )
        torch_kl.append(
            kl_divergence(
                Normal(mu, sigma),
                Normal(
                    torch.tensor(mu_t, dtype=torch.float64),
                    torch.tensor(sigma_t, dtype=torch.float64),
                ),
            )
        )
    assert value.item() == pytest.approx(0.5 * sum(closed) / 2, rel=1e-12)
    assert value.item() == pytest.approx(0.5 * torch.stack(torch_kl).mean().item(), rel=1e-12)
    assert value.requires_grad


def test_gaussian_kl_floats_tensors_and_zero_at_the_target() -> None:
    assert gaussian_kl(0.3, 0.2, 0.3, 0.2) == 0.0
    as_float = gaussian_kl(0.1, 0.5, -0.2, 0.25)
    as_tensor = gaussian_kl(
        torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), -0.2, 0.25
    )
    assert isinstance(as_float, float) and as_tensor.item() == pytest.approx(as_float, rel=1e-15)
    assert as_float == pytest.approx(math.log(0.5) + (0.25 + 0.09) / (2 * 0.0625) - 0.5)


@pytest.mark.parametrize(
    ("mean", "std", "target"),
    [
        (0.3, 0.5, (0.0, 0.1)),  # shift down, shrink
        (-0.2, 0.05, (0.1, 0.4)),  # shift up, widen
    ],
)
def test_gradient_pulls_mean_and_std_toward_the_target(mean, std, target) -> None:
    layer = nn.Linear(40, 30, bias=False).double()
    with torch.no_grad():
        w = torch.randn(30, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        layer.weight.copy_((w - w.mean()) / w.std(correction=0) * std + mean)
    term = scope_term(layer, state_of(layer), lam=1.0, targets={"weight": list(target)})
    mu0, sigma0 = hand_scope(layer.weight.detach())
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    optimizer.zero_grad()
    term(layer).backward()
    optimizer.step()
    mu1, sigma1 = hand_scope(layer.weight.detach())
    assert abs(mu1 - target[0]) < abs(mu0 - target[0])
    assert abs(sigma1 - target[1]) < abs(sigma0 - target[1])


def test_term_without_targets_aims_at_the_received_model_or_a_prior() -> None:
    model = mlp()
    own = scope_term(model, state_of(model), lam=1.0)
    assert own(model).item() == pytest.approx(0.0, abs=1e-12)  # KL of each layer to itself
    prior = scope_term(model, state_of(model), lam=1.0, prior_sigma=0.05)
    expected = scope_term(
        model, state_of(model), lam=1.0, targets={"0.weight": [0.0, 0.05], "2.weight": [0.0, 0.05]}
    )
    assert prior(model).item() == pytest.approx(expected(model).item(), rel=1e-12)


def test_term_rejects_targets_that_do_not_fit() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"missing \['2.weight'\], unexpected \['3.weight'\]"):
        scope_term(
            model, state_of(model), lam=1.0, targets={"0.weight": [0, 1], "3.weight": [0, 1]}
        )
    with pytest.raises(ValueError, match="target of layer '2.weight' must be \\[mu, sigma\\]"):
        scope_term(
            model, state_of(model), lam=1.0, targets={"0.weight": [0, 1], "2.weight": [0, 0]}
        )
    with pytest.raises(ValueError, match="either targets or prior_sigma"):
        scope_term(
            model,
            state_of(model),
            lam=1.0,
            prior_sigma=0.1,
            targets={"0.weight": [0, 1], "2.weight": [0, 1]},
        )
    with pytest.raises(ValueError, match="lam=-1"):
        scope_term(model, state_of(model), lam=-1)


# ---- layers and scopes ---------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 2)


def test_scope_layers_selects_weight_matrices_and_optionally_their_biases() -> None:
    state = ConvNet().state_dict()
    assert scope_layers(state) == ["conv.weight", "fc.weight"]
    assert scope_layers(state, include_bias=True) == [
        "conv.weight",
        "conv.bias",
        "fc.weight",
        "fc.bias",
    ]


def test_layer_scopes_are_population_mean_and_std() -> None:
    state = {"w": torch.tensor([[1.0, 3.0], [1.0, 3.0]]), "c": torch.full((2, 2), 5.0)}
    scopes = layer_scopes(state, ["w", "c"])
    assert scopes["w"] == pytest.approx((2.0, math.sqrt(1.0 + 1e-8)), rel=1e-15)
    assert scopes["c"] == pytest.approx((5.0, 1e-4), rel=1e-12)  # sqrt(0 + 1e-8)
    with pytest.raises(ValueError, match="layer 'x' is not in the state dict"):
        layer_scopes(state, ["x"])


# ---- fusion ----------------------------------------------------------------------------------------

CLIENT_SCOPES = [{"a": (0.0, 1.0), "b": (1.0, 2.0)}, {"a": (2.0, 1.0), "b": (1.0, 4.0)}]


def test_moment_fusion_by_hand() -> None:
    # p = (1/4, 3/4). a: mu* = 1.5, sigma*^2 = 1/4 (1 + 0) + 3/4 (1 + 4) - 1.5^2 = 1.75
    #                 b: mu* = 1,   sigma*^2 = 1/4 (4 + 1) + 3/4 (16 + 1) - 1   = 13
    fused = fuse_scopes(CLIENT_SCOPES, [10, 30], fusion="moment")
    assert fused["a"] == pytest.approx((1.5, math.sqrt(1.75)))
    assert fused["b"] == pytest.approx((1.0, math.sqrt(13.0)))


def test_mean_fusion_by_hand() -> None:
    # a: sigma* = 1/4 * 1 + 3/4 * 1 = 1;  b: sigma* = 1/4 * 2 + 3/4 * 4 = 3.5
    fused = fuse_scopes(CLIENT_SCOPES, [0.25, 0.75], fusion="mean")
    assert fused["a"] == pytest.approx((1.5, 1.0))
    assert fused["b"] == pytest.approx((1.0, 3.5))


def test_fusion_errors() -> None:
    with pytest.raises(ValueError, match="fusion='median'"):
        fuse_scopes(CLIENT_SCOPES, [1, 1], fusion="median")
    with pytest.raises(ValueError, match="2 clients but 1 weights"):
        fuse_scopes(CLIENT_SCOPES, [1])
    with pytest.raises(ValueError, match="client 1 has other layers than client 0 \\('b'\\)"):
        fuse_scopes([CLIENT_SCOPES[0], {"a": (0.0, 1.0)}], [1, 1])
    with pytest.raises(ValueError, match="weight 0 must be a non-negative number"):
        fuse_scopes(CLIENT_SCOPES, [-1, 2])


# ---- the aggregator --------------------------------------------------------------------------------


def client_updates(base: dict[str, torch.Tensor], counts=(10, 30, 60)) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(3)
    updates = []
    for i, n in enumerate(counts):
        state = {
            k: v + (i + 1) * 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            for k, v in base.items()
        }
        updates.append(ClientUpdate(client_id=i, state=state, num_examples=n))
    return updates


def round_of(agg, base, updates, round_=1):
    agg.begin_round(RoundContext(round=round_, global_state=base, base_state=base))
    for update in updates:
        agg.accumulate(update)
    return agg.finalize()


def test_wsa_weights_are_fedavg_and_target_is_the_fused_client_scopes() -> None:
    base = state_of(mlp())
    updates = client_updates(base)
    agg = WSA(fusion="moment")
    result = round_of(agg, base, updates)

    expected = fedavg([u.state for u in updates], [u.num_examples for u in updates])
    assert result.state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(result.state[key], value), key

    layers = ["0.weight", "2.weight"]
    scopes = [layer_scopes(u.state, layers) for u in updates]
    assert agg.target == fuse_scopes(scopes, [10, 30, 60], fusion="moment")

    # Metrics against the round-1 target, the initial model's scopes.
    initial = layer_scopes(base, layers)
    kl = [gaussian_kl(*s[name], *initial[name]) for s in scopes for name in layers]
    assert result.metrics["scope_kl_to_target"] == pytest.approx(sum(kl) / len(kl), rel=1e-12)
    assert result.metrics["num_clients"] == 3 and result.metrics["num_examples"] == 100
    assert result.metrics["scope_sigma_spread"] > 0 and result.metrics["scope_mu_spread"] > 0

    # Round 2 measures the clients against the target fused in round 1, and fuses a new one.
    first_target = agg.target
    result2 = round_of(agg, result.state, client_updates(result.state), round_=2)
    scopes2 = [layer_scopes(u.state, layers) for u in client_updates(result.state)]
    kl2 = [gaussian_kl(*s[name], *first_target[name]) for s in scopes2 for name in layers]
    assert result2.metrics["scope_kl_to_target"] == pytest.approx(sum(kl2) / len(kl2), rel=1e-12)
    assert agg.target != first_target


def test_scope_spread_metrics_by_hand() -> None:
    # One layer; client 0 constant (mu 1, sigma 1e-4), client 1 [0, 2] repeated (mu 1, sigma ~1).
    tracker = ScopeTracker()
    tracker.add({"w": torch.ones(2, 2), "b": torch.zeros(2)}, 1)
    tracker.add({"w": torch.tensor([[0.0, 2.0], [0.0, 2.0]]), "b": torch.ones(2)}, 1)
    metrics = tracker.metrics({"w": (1.0, 1.0)})
    assert metrics["scope_mu_spread"] == 0.0
    assert metrics["scope_sigma_spread"] == pytest.approx((math.sqrt(1 + 1e-8) - 1e-4) / 2)
    # KL(N(1, 1e-8) || N(1, 1)) = log(1e4) + 1e-8/2 - 1/2;  KL(N(1, 1+1e-8) || N(1, 1)) ~ 0
    assert metrics["scope_kl_to_target"] == pytest.approx((math.log(1e4) - 0.5) / 2, rel=1e-6)


def test_fusion_mean_and_prior_target_options() -> None:
    base = state_of(mlp())
    updates = client_updates(base)
    agg = WSA(fusion="mean", initial_target="prior", prior_sigma=0.2)
    assert agg.client_config(1)["terms"][0]["prior_sigma"] == 0.2
    result = round_of(agg, base, updates)
    layers = ["0.weight", "2.weight"]
    scopes = [layer_scopes(u.state, layers) for u in updates]
    assert agg.target == fuse_scopes(scopes, [10, 30, 60], fusion="mean")
    kl = [gaussian_kl(*s[name], 0.0, 0.2) for s in scopes for name in layers]
    assert result.metrics["scope_kl_to_target"] == pytest.approx(sum(kl) / len(kl), rel=1e-12)


def test_aggregate_is_a_whole_round() -> None:
    base = state_of(mlp())
    streamed, at_once = WSA(), WSA()
    expected = round_of(streamed, base, client_updates(base))
    result = at_once.aggregate(
        RoundContext(round=1, global_state=base, base_state=base), client_updates(base)
    )
    assert result.metrics == expected.metrics and at_once.target == streamed.target
    assert all(torch.equal(result.state[k], v) for k, v in expected.state.items())


def test_state_dict_round_trip_and_client_config_builds_a_term() -> None:
    model = mlp()
    base = state_of(model)
    agg = WSA(lam=0.3, include_bias=True)
    assert agg.state_dict() == {"target": None}
    round_one = json.loads(json.dumps(agg.client_config(1)))
    assert round_one == {"terms": [{"term": "wsa_scope", "lam": 0.3, "include_bias": True}]}
    (term,) = build_terms(round_one["terms"], model, base)
    assert term(model).item() == pytest.approx(0.0, abs=1e-12)

    round_of(agg, base, client_updates(base))
    restored = WSA(lam=0.3, include_bias=True)
    restored.load_state_dict(json.loads(json.dumps(agg.state_dict())))
    assert restored.target == agg.target
    config = json.loads(json.dumps(restored.client_config(2)))
    assert config == json.loads(json.dumps(agg.client_config(2)))
    spec = config["terms"][0]
    assert set(spec["targets"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    (term,) = build_terms(config["terms"], model, base)
    value = term(model)
    assert value.item() > 0 and math.isfinite(value.item())
    value.backward()
    assert model.get_parameter("0.weight").grad is not None


def test_lam_zero_sends_no_term() -> None:
    assert WSA(lam=0).client_config(1) == {}


def test_wsa_rejects_bad_hyperparameters_and_state() -> None:
    for params, pattern in [
        ({"fusion": "max"}, "fusion='max'"),
        ({"lam": -0.1}, "lam=-0.1"),
        ({"initial_target": "zero"}, "initial_target='zero'"),
        ({"prior_sigma": 0}, "prior_sigma=0"),
        ({"lamda": 1}, "'lamda'"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            create_aggregator("wsa", params)
    with pytest.raises(ValueError, match="unexpected key 'targets'"):
        WSA().load_state_dict({"targets": {}})
    with pytest.raises(ValueError, match="target of layer 'w'"):
        WSA().load_state_dict({"target": {"w": [0.0, -1.0]}})


def test_wsa_round_protocol_errors() -> None:
    agg = WSA()
    with pytest.raises(RuntimeError, match="before begin_round"):
        agg.accumulate(ClientUpdate(client_id=0, state={"w": torch.ones(2, 2)}, num_examples=1))
    base = {"w": torch.ones(2, 2)}
    agg.begin_round(RoundContext(round=1, global_state=base, base_state=base))
    with pytest.raises(ValueError, match="client 4: num_examples"):
        agg.accumulate(ClientUpdate(client_id=4, state={"w": torch.ones(2, 2)}, num_examples=0))
    with pytest.raises(ValueError, match="WSA: no client updates"):
        agg.finalize()
