"""FedYogi: Yogi on FedAvg's pseudo-gradient (Reddi et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmerge.aggregators.fedopt import ServerOptimizer, adaptive_step
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["FedYogi"]


@register()
class FedYogi(ServerOptimizer):
    """FedYogi: m ← β₁m + (1−β₁)Δ, v ← v − (1−β₂)Δ² sign(v − Δ²), θ ← θ + η m / (√v + τ).

    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
    Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295; Yogi's second moment grows
    additively, so it forgets a large past Δ² more slowly than Adam's. Defaults are Flower's
    FedYogi (η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3; m and v start at 0).
    """

    name = "fedyogi"
    moments = ("m", "v")

    @dataclass(frozen=True)
    class Params:
        eta: float = hyperparameter(0.01, "server learning rate η", gt=0.0)
        beta_1: float = hyperparameter(0.9, "first-moment decay β₁", ge=0.0, lt=1.0)
        beta_2: float = hyperparameter(0.99, "second-moment decay β₂", ge=0.0, lt=1.0)
        tau: float = hyperparameter(1e-3, "adaptivity τ: added to √v", gt=0.0)

    def step(self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        return adaptive_step(
            delta,
            state,
            eta=self.eta,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
            update_v="yogi",
        )
