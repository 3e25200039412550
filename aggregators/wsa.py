"""WSA, weight scope alignment: a client regulariser toward per-layer weight scopes, server fusion.

A layer's *scope* is the mean and standard deviation of its weights, (μ, σ). Models trained on
different non-IID data drift to different scopes, which hurts averaging. WSA adds to each
client's loss λ times the mean over layers of KL(N(μl, σl²) ‖ N(μ*l, σ*l²)), pulling every layer
toward a shared target scope, and the server fuses the clients' scopes into the next target.

This module holds both halves: the client term ``"wsa_scope"``, the fusion of client scopes and
the ``WSA`` aggregator. The scope computations and ``ScopeTracker`` (which also gives FedProx its
scope-drift metrics) live in ``fedmerge.aggregators.scope`` and are re-exported here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    checked_num_examples,
)
from fedmerge.aggregators.fedavg import FedAvg
from fedmerge.aggregators.params import check_value, hyperparameter
from fedmerge.aggregators.registry import register
from fedmerge.aggregators.scope import (
    SIGMA_EPS,
    Scope,
    ScopeTrackedRounds,
    ScopeTracker,
    gaussian_kl,
    layer_scopes,
    scope,
    scope_layers,
)
from fedmerge.aggregators.terms import LossTerm, register_term

__all__ = [
    "FUSIONS",
    "INITIAL_TARGETS",
    "SIGMA_EPS",
    "WSA",
    "Scope",
    "ScopeTrackedRounds",
    "ScopeTracker",
    "fuse_scopes",
    "gaussian_kl",
    "layer_scopes",
    "scope",
    "scope_layers",
    "scope_term",
]

FUSIONS = ("moment", "mean")
INITIAL_TARGETS = ("model", "prior")


def _normalised(weights: Sequence[float], n: int, where: str) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"{where}: {n} clients but {len(weights)} weights")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}: weight {i} must be a non-negative number, got {w!r}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{where}: the weights sum to zero")
    return [w / total for w in weights]


def fuse_scopes(
    scopes_per_client: Sequence[Mapping[str, Scope]],
    weights: Sequence[float],
    fusion: str = "moment",
) -> dict[str, Scope]:
    """The next target scope of every layer, fusing the clients' scopes with weights pi.

    ``"moment"``: μ* = Σ pi μi and σ*² = Σ pi (σi² + μi²) − μ*², the mean and variance of the
    pi-mixture of the clients' weight distributions, computed as Σ pi (σi² + (μi − μ*)²) (equal,
    and never negative in floating point). ``"mean"``: μ* = Σ pi μi, σ* = Σ pi σi. ``weights``
    (example counts work as they are) are normalised here.
    """
    fusion = check_value("fuse_scopes", WSA.Params, "fusion", fusion)
    if not scopes_per_client:
        raise ValueError("fuse_scopes: no client scopes to fuse")
    p = _normalised(weights, len(scopes_per_client), "fuse_scopes")
    layers = list(scopes_per_client[0])
    for i, scopes in enumerate(scopes_per_client[1:], start=1):
        if set(scopes) != set(layers):
            diff = sorted(set(scopes) ^ set(layers))
            raise ValueError(
                f"fuse_scopes: client {i} has other layers than client 0 ({diff[0]!r})"
            )
    fused = {}
    for name in layers:
        mus = [scopes[name][0] for scopes in scopes_per_client]
        sigmas = [scopes[name][1] for scopes in scopes_per_client]
        mu = sum(pi * m for pi, m in zip(p, mus))
        if fusion == "moment":
            sigma = math.sqrt(sum(pi * (s * s + (m - mu) ** 2) for pi, m, s in zip(p, mus, sigmas)))
        else:
            sigma = sum(pi * s for pi, s in zip(p, sigmas))
        fused[name] = (mu, sigma)
    return fused


def _checked_target(name: str, value: Any) -> Scope:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
        or value[1] <= 0
    ):
        raise ValueError(
            f"target of layer {name!r} must be [mu, sigma] with sigma > 0, got {value!r}"
        )
    return float(value[0]), float(value[1])


@register_term("wsa_scope")
def scope_term(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    *,
    lam: float,
    include_bias: bool = False,
    targets: Mapping[str, Sequence[float]] | None = None,
    prior_sigma: float | None = None,
) -> LossTerm:
    """λ · mean over layers l of KL(N(μl, σl²) ‖ N(μ*l, σ*l²)), μl and σl of the live weights.

    The layers are ``scope_layers(global_state, include_bias)``. ``targets`` gives every one of
    them as [μ*, σ*]; without it the target is the received model's own scopes (WSA's round 1,
    when the server has not fused any yet), or N(0, prior_sigma) per layer when that is given.
    """
    lam = check_value("", WSA.Params, "lam", lam)
    layers = scope_layers(global_state, include_bias)
    if not layers:
        raise ValueError("the model has no layer to align (no floating tensor with dim >= 2)")
    if targets is not None:
        if prior_sigma is not None:
            raise ValueError("give either targets or prior_sigma, not both")
        if not isinstance(targets, Mapping):
            raise ValueError(f"targets must map layer names to [mu, sigma], got {targets!r}")
        missing = [name for name in layers if name not in targets]
        unexpected = [name for name in targets if name not in layers]
        if missing or unexpected:
            raise ValueError(
                f"targets do not match the aligned layers: missing {missing}, "
                f"unexpected {unexpected}"
            )
        target = {name: _checked_target(name, targets[name]) for name in layers}
    elif prior_sigma is not None:
        sigma = check_value("", WSA.Params, "prior_sigma", prior_sigma)
        target = {name: (0.0, sigma) for name in layers}
    else:
        target = layer_scopes(global_state, layers)
    parameters = dict(model.named_parameters())
    absent = [name for name in layers if name not in parameters]
    if absent:
        raise ValueError(f"layer {absent[0]!r} is not a parameter of {type(model).__name__}")

    def term(module: nn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        kls = [gaussian_kl(*scope(params[name]), *target[name]) for name in layers]
        return lam * torch.stack(kls).mean()

    return term


@register()
class WSA(ScopeTrackedRounds, Aggregator):
    """Weight Scope Alignment: clients add λ·KL to a target layer scope; the server fuses scopes.

    Xu, Li, Gan, Zhan, "Weight Scope Alignment: A Frustratingly Easy Method for Model Merging",
    https://arxiv.org/abs/2408.12237. The paper's full text was not available to us: this is the
    reconstruction of docs ALGORITHMS.md ("WSA"), and each open choice is a hyperparameter:
    ``lam`` the regulariser weight λ (0 sends no term: FedAvg plus the scope metrics);
    ``fusion`` "moment" (the pi-mixture's mean and std) or "mean" (pi-average of μ and σ);
    ``include_bias`` also aligns linear/conv biases; ``initial_target`` the round-1 target,
    "model" (the broadcast initial model's own scopes) or "prior" (N(0, ``prior_sigma``) a layer).
    Further choices, fixed here: σ uses the population variance plus 1e-8, the regulariser
    averages (not sums) over layers, and the client scopes are fused weighted by example counts.

    Server side: the weights are plain FedAvg (a FedAvg instance, incremental); each reply's
    per-layer scopes are computed on arrival and only they are kept; ``finalize`` fuses them into
    the next round's target, which ``client_config`` sends as the ``"wsa_scope"`` term. In round
    1 no target is fused yet: the clients derive it from the model they receive (see
    ``scope_term``) and the server derives the same from ``ctx.global_state`` (θ0) for its
    metrics. The target is the state in ``state_dict`` / ``load_state_dict``.
    Metrics: FedAvg's plus ``scope_mu_spread``, ``scope_sigma_spread`` and ``scope_kl_to_target``
    (see ``ScopeTracker.metrics``), against the target the clients were trained toward.
    """

    name = "wsa"

    @dataclass(frozen=True)
    class Params:
        lam: float = hyperparameter(
            0.1,
            "weight λ of the clients' scope regulariser; 0 = FedAvg plus the scope metrics",
            ge=0,
        )
        fusion: str = hyperparameter(
            "moment",
            "how client scopes become the next target: moment (the "
            "mixture's mean and std) | mean (average of mu and sigma)",
            choices=FUSIONS,
        )
        include_bias: bool = hyperparameter(False, "also align linear/conv biases")
        initial_target: str = hyperparameter(
            "model",
            "round-1 target: model (the initial model's own "
            "scopes) | prior (N(0, prior_sigma) a layer)",
            choices=INITIAL_TARGETS,
        )
        prior_sigma: float = hyperparameter(
            0.05, "sigma of the prior target (initial_target = prior)", gt=0
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)
        self.target: dict[str, Scope] | None = None  # fused by the last round; None before round 1
        self._fedavg = FedAvg()
        self._tracker: ScopeTracker | None = None
        self._round_target: dict[str, Scope] = {}

    # ---- client side -------------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Any]:
        if self.lam == 0:
            return {}
        spec: dict[str, Any] = {
            "term": "wsa_scope",
            "lam": self.lam,
            "include_bias": self.include_bias,
        }
        if self.target is not None:
            spec["targets"] = {name: [mu, sigma] for name, (mu, sigma) in self.target.items()}
        elif self.initial_target == "prior":
            spec["prior_sigma"] = self.prior_sigma
        return {"terms": [spec]}

    # ---- server side -------------------------------------------------------------------
    def begin_round(self, ctx: RoundContext) -> None:
        super().begin_round(ctx)
        self._fedavg.begin_round(ctx)
        self._tracker = ScopeTracker(include_bias=self.include_bias)
        self._round_target = self.target if self.target is not None else self._initial(ctx)

    def _initial(self, ctx: RoundContext) -> dict[str, Scope]:
        """What the round-1 clients computed from the model they received, ctx.global_state."""
        layers = scope_layers(ctx.global_state, self.include_bias)
        if self.initial_target == "prior":
            return {name: (0.0, self.prior_sigma) for name in layers}
        return layer_scopes(ctx.global_state, layers)

    def accumulate(self, update: ClientUpdate) -> None:
        if self._tracker is None:
            raise RuntimeError("WSA.accumulate() called before begin_round()")
        self._fedavg.accumulate(update)  # validates the reply; a rejected one touches nothing
        self._tracker.add(update.state, checked_num_examples(update))

    def finalize(self) -> AggregateResult:
        if self._tracker is None:
            raise RuntimeError("WSA.finalize() called before begin_round()")
        tracker, self._tracker = self._tracker, None
        if not tracker.scopes:
            raise ValueError("WSA: no client updates to aggregate this round")
        result = self._fedavg.finalize()
        self.target = fuse_scopes(tracker.scopes, tracker.weights, self.fusion)
        result.metrics.update(tracker.metrics(self._round_target))
        return result

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """A whole round at once: begin_round, accumulate each update, finalize (sets the target)."""
        self.begin_round(ctx)
        for update in updates:
            self.accumulate(update)
        return self.finalize()

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"target": {layer: [mu, sigma]}} once a round has fused one, else {"target": None}."""
        if self.target is None:
            return {"target": None}
        return {"target": {name: [mu, sigma] for name, (mu, sigma) in self.target.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        extra = sorted(set(state) - {"target"})
        if extra:
            raise ValueError(f"WSA state has unexpected key {extra[0]!r} (expected 'target')")
        target = state.get("target")
        if target is not None and not isinstance(target, Mapping):
            raise ValueError(
                f"WSA state 'target' must be a mapping layer -> [mu, sigma], got {target!r}"
            )
        self.target = (
            None
            if target is None
            else {name: _checked_target(name, value) for name, value in target.items()}
        )
