"""An aggregator shipped by another package: fedmerge finds it through its entry point.

``pyproject.toml`` declares it under the ``fedmerge.aggregators`` group as ``example_plugin``, so
an experiment selects it with ``[aggregator] name = "example_plugin"`` (and ``beta = 0.2``)
once this package is installed; nothing in fedmerge imports or registers it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedmerge.aggregators import AggregateResult, Aggregator, ClientUpdate, RoundContext

__all__ = ["TrimmedMean"]


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean: drop the floor(beta*k) largest and smallest values per entry.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498. Robust to up to a beta
    fraction of arbitrary clients per coordinate; example counts are ignored on purpose, since
    a malicious client can inflate its own. Integer buffers are rounded back to their dtype.
    """

    name = "example_plugin"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = beta

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        k = len(updates)
        trim = math.floor(self.beta * k)
        state = {}
        for key, first in updates[0].state.items():
            stacked = torch.stack([u.state[key].to(ctx.device, torch.float64) for u in updates])
            kept = stacked.sort(dim=0).values[trim : k - trim]
            mean = kept.mean(dim=0)
            state[key] = (mean if first.is_floating_point() else mean.round()).to(first.dtype)
        return AggregateResult(state=state, metrics={"num_clients": k, "trimmed_each_side": trim})
