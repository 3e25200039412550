"""FedProx: FedAvg on the server, a proximal term μ/2 ‖θ − θt‖² in every client's local loss."""

from __future__ import annotations

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
from fedmerge.aggregators.scope import ScopeTrackedRounds, ScopeTracker
from fedmerge.aggregators.terms import LossTerm, register_term

__all__ = ["FedProx", "proximal_term"]


@register_term("fedprox_proximal")
def proximal_term(
    model: nn.Module, global_state: Mapping[str, torch.Tensor], *, mu: float
) -> LossTerm:
    """μ/2 · Σ ‖θ − θt‖² over the model's trainable parameters, θt = ``global_state`` (constant).

    Its gradient is μ(θ − θt): it pulls the local model back toward the round's global model.
    """
    mu = check_value("", FedProx.Params, "mu", mu)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    absent = [name for name in names if name not in global_state]
    if absent:
        raise ValueError(f"parameter {absent[0]!r} is not in the received global state")
    anchors = {name: global_state[name].detach() for name in names}

    def term(module: nn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        total = sum(
            (params[name] - anchor.to(params[name].device)).pow(2).sum()
            for name, anchor in anchors.items()
        )
        return mu / 2 * total

    return term


@register()
class FedProx(ScopeTrackedRounds, Aggregator):
    """FedProx: clients minimise their loss + μ/2 ‖θ − θt‖²; the server averages as FedAvg.

    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020, https://arxiv.org/abs/1812.06127. ``mu`` is the proximal weight μ
    (default 0.01); μ = 0 sends no term, which is FedAvg. The paper's tolerance on partial local
    work (γ-inexact solutions) is not modelled: every client runs its configured local epochs.

    The server side is a FedAvg instance (incremental). Metrics: FedAvg's plus the scope-drift
    metrics ``scope_mu_spread`` / ``scope_sigma_spread`` of ``fedmerge.aggregators.scope.ScopeTracker``, so
    that runs compare with WSA's. No state across rounds.
    """

    name = "fedprox"

    @dataclass(frozen=True)
    class Params:
        mu: float = hyperparameter(
            0.01, "proximal weight μ of μ/2 ‖θ − θt‖² in the client loss; 0 = FedAvg", ge=0
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)
        self._fedavg = FedAvg()
        self._tracker: ScopeTracker | None = None

    def client_config(self, server_round: int) -> dict[str, Any]:
        if self.mu == 0:
            return {}
        return {"terms": [{"term": "fedprox_proximal", "mu": self.mu}]}

    def begin_round(self, ctx: RoundContext) -> None:
        super().begin_round(ctx)
        self._fedavg.begin_round(ctx)
        self._tracker = ScopeTracker()

    def accumulate(self, update: ClientUpdate) -> None:
        if self._tracker is None:
            raise RuntimeError("FedProx.accumulate() called before begin_round()")
        self._fedavg.accumulate(update)  # validates the reply; a rejected one touches nothing
        self._tracker.add(update.state, checked_num_examples(update))

    def finalize(self) -> AggregateResult:
        if self._tracker is None:
            raise RuntimeError("FedProx.finalize() called before begin_round()")
        tracker, self._tracker = self._tracker, None
        result = self._fedavg.finalize()
        result.metrics.update(tracker.metrics())
        return result

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """All of a round's updates at once, as FedAvg.aggregate; round state untouched."""
        result = self._fedavg.aggregate(ctx, updates)
        tracker = ScopeTracker()
        for update in updates:
            tracker.add(update.state, checked_num_examples(update))
        result.metrics.update(tracker.metrics())
        return result
