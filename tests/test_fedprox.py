"""FedProx and the client-term registry as plain computations. No Ray, no Flower."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.fedavg import fedavg
from fedmerge.aggregators.fedprox import FedProx, proximal_term
from fedmerge.aggregators.terms import available_terms, build_terms, register_term


def model_and_anchor() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the proximal term -----------------------------------------------------------------------------


def test_proximal_term_is_zero_at_the_global_model() -> None:
    model, anchor = model_and_anchor()
    assert proximal_term(model, anchor, mu=0.5)(model).item() == 0.0


def test_proximal_term_value_and_gradient() -> None:
    model, anchor = model_and_anchor()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    mu = 0.3
    value = proximal_term(model, anchor, mu=mu)(model)
    deltas = {name: p.detach() - anchor[name] for name, p in model.named_parameters()}
    assert value.item() == pytest.approx(
        mu / 2 * sum(d.pow(2).sum().item() for d in deltas.values()), rel=1e-12
    )
    value.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, mu * deltas[name], rtol=1e-12, atol=1e-12)


def test_proximal_term_skips_frozen_parameters() -> None:
    model, anchor = model_and_anchor()
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert proximal_term(model, anchor, mu=1.0)(model).item() == 0.0


def test_proximal_term_errors() -> None:
    model, anchor = model_and_anchor()
    with pytest.raises(ValueError, match="mu=-1"):
        proximal_term(model, anchor, mu=-1)
    del anchor["2.bias"]
    with pytest.raises(ValueError, match="parameter '2.bias' is not in the received global state"):
        proximal_term(model, anchor, mu=0.1)


# ---- the aggregator ----------------------------------------------------------------------------------


def updates_from(base: dict[str, torch.Tensor]) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(2)
    return [
        ClientUpdate(
            client_id=i,
            num_examples=n,
            state={
                k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.1
                for k, v in base.items()
            },
        )
        for i, n in enumerate([5, 15])
    ]


def test_fedprox_server_is_fedavg_plus_scope_metrics() -> None:
    _, base = model_and_anchor()
    updates = updates_from(base)
    agg = FedProx(mu=0.1)
    agg.begin_round(RoundContext(round=1, global_state=base, base_state=base))
    for update in updates:
        agg.accumulate(update)
    result = agg.finalize()
    expected = fedavg([u.state for u in updates], [5, 15])
    assert all(torch.equal(result.state[k], v) for k, v in expected.items())
    assert {"num_clients", "num_examples", "scope_mu_spread", "scope_sigma_spread"} == set(
        result.metrics
    )
    assert result.metrics["num_clients"] == 2 and result.metrics["num_examples"] == 20

    at_once = FedProx(mu=0.1).aggregate(
        RoundContext(round=1, global_state=base, base_state=base), updates
    )
    assert at_once.metrics == result.metrics
    assert all(torch.equal(at_once.state[k], v) for k, v in expected.items())


def test_fedprox_client_config_builds_its_term() -> None:
    model, anchor = model_and_anchor()
    config = json.loads(json.dumps(create_aggregator("fedprox", {"mu": 0.25}).client_config(3)))
    assert config == {"terms": [{"term": "fedprox_proximal", "mu": 0.25}]}
    (term,) = build_terms(config["terms"], model, anchor)
    with torch.no_grad():
        model[2].bias.add_(2.0)  # two entries moved by 2: mu/2 * 8
    assert term(model).item() == pytest.approx(0.25 / 2 * 8)
    assert FedProx(mu=0).client_config(1) == {}
    assert FedProx().mu == 0.01


def test_fedprox_rejects_bad_mu() -> None:
    with pytest.raises(ValueError, match="mu=nan"):
        create_aggregator("fedprox", {"mu": float("nan")})
    with pytest.raises(ValueError, match="has no parameter 'lam'"):
        create_aggregator("fedprox", {"lam": 0.1})


# ---- the term registry -------------------------------------------------------------------------------


def test_build_terms_names_what_is_wrong() -> None:
    model, anchor = model_and_anchor()
    assert build_terms([], model, anchor) == []
    assert {"fedprox_proximal", "wsa_scope"} <= set(available_terms())
    cases = [
        (
            [{"term": "fedprox_proximall", "mu": 0.1}],
            r"client term 0: unknown client term 'fedprox_proximall'\. Did you mean 'fedprox_proximal'\?",
        ),
        (
            [{"term": "fedprox_proximal", "mu": 0.1}, {"term": "fedprox_proximal", "nu": 0.1}],
            r"client term 1 \('fedprox_proximal'\) has no parameter 'nu'; it accepts: mu",
        ),
        (
            [{"term": "fedprox_proximal"}],
            r"client term 0 \('fedprox_proximal'\) is missing parameter 'mu'",
        ),
        ([{"term": "fedprox_proximal", "mu": -2}], r"client term 0 \('fedprox_proximal'\): mu=-2"),
        ([{"mu": 0.1}], r"client term 0: a spec is a mapping"),
    ]
    for specs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            build_terms(specs, model, anchor)
    with pytest.raises(ValueError, match="must be a list of specs, got dict"):
        build_terms({"term": "fedprox_proximal", "mu": 0.1}, model, anchor)


def test_register_term_rejects_a_taken_name_and_a_bad_signature() -> None:
    with pytest.raises(
        ValueError, match="'fedprox_proximal' is already registered by fedmerge.aggregators.fedprox"
    ):

        @register_term("fedprox_proximal")
        def other(model, global_state, *, mu):  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(TypeError, match="must take \\(model, global_state\\)"):

        @register_term("no_state")
        def no_state(*, mu):  # pragma: no cover - never called
            raise AssertionError
