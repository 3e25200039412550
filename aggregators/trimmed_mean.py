"""Coordinate-wise trimmed mean: drop the largest and smallest values of every weight, average the rest."""

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
from fedmerge.aggregators.median import _cast, stacked
from fedmerge.aggregators.params import check_value, hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["TrimmedMean", "trimmed_count", "trimmed_mean"]


def trimmed_count(n: int, beta: float) -> int:
    """How many values are dropped at each end: floor(beta · n)."""
    return int(math.floor(check_value("trimmed_mean", TrimmedMean.Params, "beta", beta) * n + 1e-9))


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], *, beta: float = 0.1) -> StateDict:
    """Key by key and coordinate by coordinate, the mean of the states' values after dropping the
    k = floor(beta · n) largest and k smallest. Unweighted (example counts can be inflated)."""
    if not states:
        raise ValueError("trimmed_mean: no states")
    n = len(states)
    k = trimmed_count(n, beta)
    if n - 2 * k < 1:  # cannot happen for beta < 0.5; kept as a guard for the arithmetic
        raise ValueError(f"trimmed_mean: trimming {k} of {n} values at each end leaves none")
    out: StateDict = {}
    for key, like in states[0].items():
        values = stacked(states, key, "trimmed_mean").sort(dim=0).values
        out[key] = _cast(values[k : n - k].mean(dim=0), like)
    return out


@register()
class TrimmedMean(Aggregator):
    """Coordinate-wise β-trimmed mean of the client models.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498. ``beta`` (default 0.1) is
    the share trimmed at each end, floor(beta · n) values; robust while the malicious clients of a
    round are at most that many.
    """

    name = "trimmed_mean"

    @dataclass(frozen=True)
    class Params:
        beta: float = hyperparameter(
            0.1, "share of the values trimmed at each end, floor(beta * n)", ge=0, lt=0.5
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        state = trimmed_mean([u.state for u in updates], beta=self.beta)
        k = trimmed_count(len(updates), self.beta)
        return AggregateResult(
            state=state, metrics={"num_clients": float(len(updates)), "trimmed_per_side": float(k)}
        )
