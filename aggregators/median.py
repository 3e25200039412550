"""Coordinate-wise median: every weight of the next global model is the median of the clients'."""

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
from fedmerge.aggregators.registry import register

__all__ = ["CoordinateMedian", "coordinate_median", "stacked"]


def stacked(states: Sequence[Mapping[str, torch.Tensor]], key: str, where: str) -> torch.Tensor:
    """The clients' tensors under ``key`` stacked on a new first axis, in float64; a ValueError
    names a client whose tensor is missing, of another shape, or not finite."""
    first = states[0][key]
    tensors = []
    for i, state in enumerate(states):
        if key not in state:
            raise ValueError(f"{where}: state {i} has no key {key!r}")
        tensor = state[key]
        if tensor.shape != first.shape:
            raise ValueError(
                f"{where}: state {i} has {key!r} of shape {tuple(tensor.shape)}, "
                f"expected {tuple(first.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: state {i} has non-finite values in {key!r}")
        tensors.append(tensor.to(device=first.device, dtype=torch.float64))
    return torch.stack(tensors)


def _cast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Back to the clients' dtype; integer buffers are rounded (ties to even)."""
    return value.to(like.dtype) if like.is_floating_point() else value.round().to(like.dtype)


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Key by key and coordinate by coordinate, the median of the states' values: the middle value
    for an odd number of states, the mean of the two middle values for an even number.

    Unweighted on purpose: example counts are what an attacker can inflate.
    """
    if not states:
        raise ValueError("coordinate_median: no states")
    n = len(states)
    out: StateDict = {}
    for key, like in states[0].items():
        values = stacked(states, key, "coordinate_median").sort(dim=0).values
        middle = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
        out[key] = _cast(middle, like)
    return out


@register()
class CoordinateMedian(Aggregator):
    """Coordinate-wise median of the client models (no hyperparameters).

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498. Robust while fewer than
    half of a round's clients are malicious; example counts are ignored.
    """

    name = "median"

    @dataclass(frozen=True)
    class Params:
        """No hyperparameters: the median needs none."""

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        state = coordinate_median([u.state for u in updates])
        return AggregateResult(state=state, metrics={"num_clients": float(len(updates))})
