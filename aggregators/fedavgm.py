"""FedAvgM: FedAvg with server momentum."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmerge.aggregators.fedopt import ServerOptimizer
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["FedAvgM"]


@register()
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum: v ← β v + Δ, θ ← θ + η v, Δ the clients' mean minus θ.

    Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", 2019, https://arxiv.org/abs/1909.06335. ``server_learning_rate`` η
    and ``server_momentum`` β as in Flower's FedAvgM (β = 0, η = 1 is FedAvg).
    """

    name = "fedavgm"
    moments = ("momentum",)

    @dataclass(frozen=True)
    class Params:
        server_learning_rate: float = hyperparameter(1.0, "server step size η", gt=0.0)
        server_momentum: float = hyperparameter(
            0.0, "server momentum β (0 = FedAvg when η = 1)", ge=0.0, lt=1.0
        )

    def step(self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        momentum = state["momentum"]
        momentum.mul_(self.server_momentum).add_(delta)
        return self.server_learning_rate * momentum
