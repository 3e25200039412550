"""TIES merging: trim each task vector, elect a sign per entry, average the agreeing entries."""

from __future__ import annotations

import math
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
from fedmerge.aggregators.params import check_value, hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["Ties", "ties_merge"]


def ties_merge(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    lam: float,
    keep: float,
) -> StateDict:
    """θ0 + λ · disjoint-mean(trimmed, elected τ) over the floating keys of ``base``.

    1. Trim: each model's task vector, flattened over all those keys, keeps its ``keep`` share of
       entries of largest magnitude (ties at the threshold are kept); the rest become 0.
    2. Elect: the sign of each entry is the sign of the sum of the trimmed vectors.
    3. Disjoint mean: per entry, the mean over the models whose trimmed entry is non-zero and has
       the elected sign (0 where none has).
    Integer keys keep the base value. Computed in float32 on the base tensors' device.
    """
    if not states:
        raise ValueError("ties_merge: no fine-tuned states to merge")
    keep = check_value("ties", Ties.Params, "keep", keep)
    keys = [k for k, v in base.items() if v.is_floating_point()]
    if not keys:
        return dict(base)
    flat0 = torch.cat([base[k].float().reshape(-1) for k in keys])
    trimmed = []
    for state in states:
        tau = (
            torch.cat([state[k].to(flat0.device, torch.float32).reshape(-1) for k in keys]) - flat0
        )
        n_keep = max(1, math.ceil(keep * tau.numel()))
        magnitude = tau.abs()
        threshold = magnitude.kthvalue(tau.numel() - n_keep + 1).values
        trimmed.append(torch.where(magnitude >= threshold, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(dim=0))
    agree = (stacked != 0) & (torch.sign(stacked) == elected)
    merged = (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)
    flat = flat0 + lam * merged
    out: StateDict = dict(base)
    offset = 0
    for k in keys:
        n = base[k].numel()
        out[k] = flat[offset : offset + n].reshape(base[k].shape).to(base[k].dtype)
        offset += n
    return out


@register()
class Ties(Aggregator):
    """TIES merging: trim, elect sign, disjoint merge, then θ = θ0 + λ · merged.

    Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
    Models", NeurIPS 2023, https://arxiv.org/abs/2306.01708.

    ``keep`` = 0.2 (top 20 % of |τ| per model, over the whole model), ``lam`` = 0.3. As in
    task arithmetic, ``group_by = "task"`` merges one model per task and per-task heads are each
    task's clients' mean. The merged model is both broadcast and served.
    ``dare`` = p > 0 applies DARE to each task vector before the trim (DARE-TIES; see
    ``merging.dare_states``).
    """

    name = "ties"
    needs = frozenset({"base_model"})

    @dataclass(frozen=True)
    class Params:
        lam: float = hyperparameter(0.3, "scale λ of the merged task vector, θ0 + λ · merged")
        keep: float = hyperparameter(
            0.2, "share of each task vector's largest-magnitude entries kept", gt=0, le=1
        )
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
            lambda shared, states: ties_merge(shared, states, lam=self.lam, keep=self.keep),
            group_by=self.group_by,
            dare=self.dare,
        )
