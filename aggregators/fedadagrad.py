"""FedAdagrad: Adagrad on FedAvg's pseudo-gradient (Reddi et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmerge.aggregators.fedopt import ServerOptimizer, adaptive_step
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["FedAdagrad"]


@register()
class FedAdagrad(ServerOptimizer):
    """FedAdagrad: m ← β₁m + (1−β₁)Δ, v ← v + Δ², θ ← θ + η m / (√v + τ).

    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
    Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295. Defaults are Flower's FedAdagrad
    (η = 0.1, β₁ = 0, τ = 1e-3; m and v start at 0).
    """

    name = "fedadagrad"
    moments = ("m", "v")

    @dataclass(frozen=True)
    class Params:
        eta: float = hyperparameter(0.1, "server learning rate η", gt=0.0)
        beta_1: float = hyperparameter(0.0, "momentum β₁ of the pseudo-gradient", ge=0.0, lt=1.0)
        tau: float = hyperparameter(1e-3, "adaptivity τ: added to √v", gt=0.0)

    def step(self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        return adaptive_step(
            delta, state, eta=self.eta, beta_1=self.beta_1, tau=self.tau, update_v="adagrad"
        )
