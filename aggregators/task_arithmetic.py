"""Task arithmetic: add the scaled sum of the task vectors to the base model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    StateDict,
)
from fedmerge.aggregators.merging import (
    GROUP_BY,
    merge_per_task,
)
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["TaskArithmetic", "task_arithmetic"]


def task_arithmetic(
    base: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]], *, lam: float
) -> StateDict:
    """θ0 + λ Σi (θi − θ0) on every floating key of ``base`` (computed in float32, cast back);
    other keys (integer buffers) keep the base value."""
    if not states:
        raise ValueError("task_arithmetic: no fine-tuned states to merge")
    out: StateDict = {}
    for key, theta0 in base.items():
        if not theta0.is_floating_point():
            out[key] = theta0
            continue
        base32 = theta0.float()
        total = torch.zeros_like(base32)
        for state in states:
            total += state[key].to(base32.device, torch.float32) - base32
        out[key] = (base32 + lam * total).to(theta0.dtype)
    return out


@register()
class TaskArithmetic(Aggregator):
    """Task arithmetic: θ = θ0 + λ Σi τi, with τi = θi − θ0 the task vectors.

    Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing Models with
    Task Arithmetic", ICLR 2023, https://arxiv.org/abs/2212.04089.

    θ0 is the run's initial (pretrained) model. With ``group_by = "task"`` the clients of one task
    are averaged into one task model first (several clients of a task count once); per-task heads
    are each task's clients' mean. The merged model is both broadcast and served. ``lam`` = 0.3.
    ``dare`` = p > 0 first drops each task vector's entries with probability p and rescales the
    kept ones (DARE, ``merging.dare_states``; masks seeded by the run's seed, the round and the
    model's clients).
    """

    name = "task_arithmetic"
    needs = frozenset({"base_model"})

    @dataclass(frozen=True)
    class Params:
        lam: float = hyperparameter(0.3, "scale λ of the summed task vectors, θ0 + λ Σi τi")
        group_by: str = hyperparameter(
            "task", "one model per task (its clients averaged) or one per client", choices=GROUP_BY
        )
        dare: float = hyperparameter(
            0.0,
            "DARE drop rate p of each task vector's entries (kept ones x 1/(1-p)); 0 = off",
            ge=0,
            lt=1,
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return merge_per_task(
            ctx,
            updates,
            lambda shared, states: task_arithmetic(shared, states, lam=self.lam),
            group_by=self.group_by,
            dare=self.dare,
        )
