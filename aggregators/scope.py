"""Weight scopes: the mean and std of a layer's weights, and how far a round's models drift apart.

A layer's *scope* is (μ, σ) of its weights. WSA regularises clients toward a target scope and
fuses theirs (``fedmerge.aggregators.wsa``); ``ScopeTracker`` records a round's client scopes
and their spread, which both WSA and FedProx report so that their runs compare.
``ScopeTrackedRounds`` is the round state of an aggregator that pairs an inner FedAvg with a
tracker. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedmerge.aggregators.fedavg import FedAvg

__all__ = [
    "SIGMA_EPS",
    "Scope",
    "ScopeTrackedRounds",
    "ScopeTracker",
    "gaussian_kl",
    "layer_scopes",
    "scope",
    "scope_layers",
]

Scope = tuple[float, float]  # (mu, sigma) of one layer's weights
SIGMA_EPS = 1e-8  # sigma = sqrt(var + SIGMA_EPS): finite log and gradient for a constant layer


def scope(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ) of a tensor's entries, differentiable: σ = sqrt(population variance + 1e-8).

    Population variance (divide by n, not n - 1): the layer *is* the distribution whose moments
    the regulariser and the moment fusion use, not a sample of it; both halves call this function,
    so the client's regulariser and the server's scopes agree exactly.
    """
    var, mu = torch.var_mean(weights, correction=0)
    return mu, torch.sqrt(var + SIGMA_EPS)


def scope_layers(state: Mapping[str, torch.Tensor], include_bias: bool = False) -> list[str]:
    """The layers WSA aligns, in ``state``'s order: floating tensors with two or more dimensions.

    Normalisation parameters, biases and buffers are 1-D or integer and so left out. With
    ``include_bias`` a 1-D ``<prefix>.bias`` is added when ``<prefix>.weight`` is selected, which
    keeps a norm layer's bias out (its weight is 1-D) while a linear or conv bias comes in.
    """

    def selected(key: str) -> bool:
        tensor = state.get(key)
        return isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() >= 2

    layers = []
    for key, tensor in state.items():
        if selected(key):
            layers.append(key)
        elif (
            include_bias
            and key.endswith("bias")
            and tensor.is_floating_point()
            and tensor.dim() == 1
            and selected(key[: -len("bias")] + "weight")
        ):
            layers.append(key)
    return layers


def layer_scopes(state: Mapping[str, torch.Tensor], layers: Sequence[str]) -> dict[str, Scope]:
    """{layer: (μ, σ)} as Python floats, computed in float64 (see ``scope``)."""
    out = {}
    with torch.no_grad():
        for name in layers:
            if name not in state:
                raise ValueError(f"layer {name!r} is not in the state dict")
            mu, sigma = scope(state[name].detach().to(torch.float64))
            out[name] = (mu.item(), sigma.item())
    return out


def gaussian_kl(mu: Any, sigma: Any, mu_t: Any, sigma_t: Any) -> Any:
    """KL(N(μ, σ²) ‖ N(μ*, σ*²)) = log(σ*/σ) + (σ² + (μ − μ*)²)/(2σ*²) − 1/2.

    Takes tensors (differentiable, broadcasting) or Python floats (returns a float).
    """
    ratio = sigma_t / sigma
    log_ratio = torch.log(ratio) if isinstance(ratio, torch.Tensor) else math.log(ratio)
    return log_ratio + (sigma * sigma + (mu - mu_t) ** 2) / (2 * sigma_t * sigma_t) - 0.5


class ScopeTracker:
    """The layer scopes of a round's client models, two floats a layer, and their spread.

    ``add`` computes a client's scopes from its weights and keeps only those, so a round holds
    2 floats a layer per client. The layers are those of the first state added
    (``scope_layers(state, include_bias)``).
    """

    def __init__(self, *, include_bias: bool = False) -> None:
        self.include_bias = include_bias
        self.layers: list[str] = []
        self.scopes: list[dict[str, Scope]] = []
        self.weights: list[float] = []

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> dict[str, Scope]:
        if not self.scopes:
            self.layers = scope_layers(state, self.include_bias)
        scopes = layer_scopes(state, self.layers)
        self.scopes.append(scopes)
        self.weights.append(weight)
        return scopes

    def state(self) -> dict[str, Any]:
        """What has been added so far, as plain data (a round-state snapshot)."""
        return {
            "layers": list(self.layers),
            "scopes": [dict(s) for s in self.scopes],
            "weights": list(self.weights),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state()``; only into an empty tracker."""
        if self.scopes:
            raise RuntimeError("a scope snapshot can only be loaded into an empty tracker")
        if not isinstance(state, Mapping) or set(state) != {"layers", "scopes", "weights"}:
            raise ValueError("a scope snapshot has the keys 'layers', 'scopes' and 'weights'")
        if len(state["scopes"]) != len(state["weights"]):
            raise ValueError(
                f"a scope snapshot has {len(state['scopes'])} clients' scopes but "
                f"{len(state['weights'])} weights"
            )
        self.layers = [str(name) for name in state["layers"]]
        self.scopes = [
            {str(k): (float(v[0]), float(v[1])) for k, v in s.items()} for s in state["scopes"]
        ]
        self.weights = list(state["weights"])

    def metrics(self, target: Mapping[str, Scope] | None = None) -> dict[str, float]:
        """``scope_mu_spread`` / ``scope_sigma_spread``: mean over layers of the population std
        of μ / σ across the clients (unweighted: drift between models, whatever their sizes);
        with ``target``, ``scope_kl_to_target``: mean over clients and layers of
        KL(client scope ‖ target)."""
        if not self.scopes or not self.layers:
            return {}

        def spread(index: int) -> float:
            stds = []
            for name in self.layers:
                values = [scopes[name][index] for scopes in self.scopes]
                mean = sum(values) / len(values)
                stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
            return sum(stds) / len(stds)

        out = {"scope_mu_spread": spread(0), "scope_sigma_spread": spread(1)}
        if target is not None:
            kls = [
                gaussian_kl(*scopes[name], *target[name])
                for scopes in self.scopes
                for name in self.layers
            ]
            out["scope_kl_to_target"] = sum(kls) / len(kls)
        return out


class ScopeTrackedRounds:
    """The round state of an aggregator that merges with an inner ``FedAvg`` (``self._fedavg``)
    and tracks the replies' scopes (``self._tracker``, set by ``begin_round``): both together, so
    a restarted actor resumes the round exactly (``Aggregator.round_state``)."""

    _fedavg: FedAvg
    _tracker: ScopeTracker | None

    def round_state(self) -> dict[str, Any]:
        if self._tracker is None:
            raise RuntimeError(f"{type(self).__name__}.round_state() called before begin_round()")
        return {"fedavg": self._fedavg.round_state(), "scopes": self._tracker.state()}

    def load_round_state(self, state: Mapping[str, Any]) -> None:
        if self._tracker is None:
            raise RuntimeError(
                f"{type(self).__name__}.load_round_state() called before begin_round()"
            )
        self._fedavg.load_round_state(state["fedavg"])
        self._tracker.load_state(state["scopes"])
