"""FedAdam: Adam on FedAvg's pseudo-gradient (Reddi et al. 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedmerge.aggregators.fedopt import ServerOptimizer, adaptive_step
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["FedAdam"]


@register()
class FedAdam(ServerOptimizer):
    """FedAdam: m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ², θ ← θ + η m / (√v + τ).

    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
    Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295 (Algorithm 2, no bias
    correction). ``bias_correction`` scales η by √(1−β₂ᵗ)/(1−β₁ᵗ) at server step t, as Adam
    does (Kingma & Ba 2015); Flower's FedAdam always applies it, with t = round + 1. Other
    defaults are Flower's (η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-3; m and v start at 0).
    """

    name = "fedadam"
    moments = ("m", "v")

    @dataclass(frozen=True)
    class Params:
        eta: float = hyperparameter(0.1, "server learning rate η", gt=0.0)
        beta_1: float = hyperparameter(0.9, "first-moment decay β₁", ge=0.0, lt=1.0)
        beta_2: float = hyperparameter(0.99, "second-moment decay β₂", ge=0.0, lt=1.0)
        tau: float = hyperparameter(1e-3, "adaptivity τ: added to √v", gt=0.0)
        bias_correction: bool = hyperparameter(
            False, "scale η by √(1−β₂ᵗ)/(1−β₁ᵗ) (Adam's; Flower's FedAdam does)"
        )

    def step(self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        eta = self.eta
        if self.bias_correction:
            eta *= math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
        return adaptive_step(
            delta,
            state,
            eta=eta,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
            update_v="adam",
        )
