"""Bulyan: Krum picks a candidate set, then a trimmed mean around the median, coordinate-wise."""

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
from fedmerge.aggregators.detection import detection_metrics
from fedmerge.aggregators.krum import pairwise_sq_distances, scores_from_distances
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["Bulyan", "bulyan", "bulyan_selection", "closest_to_median_mean"]


def bulyan_byzantine(n: int) -> int:
    """The most malicious clients Bulyan tolerates among n: the largest f with 4f + 3 <= n."""
    return max(0, (n - 3) // 4)


def _check_f(n: int, f: int) -> None:
    if f < 0 or 4 * f + 3 > n:
        raise ValueError(
            f"bulyan: num_byzantine={f} with {n} clients; Bulyan needs n >= 4f + 3, "
            f"so at most {bulyan_byzantine(n)} here"
        )


def bulyan_selection(states: Sequence[Mapping[str, torch.Tensor]], num_byzantine: int) -> list[int]:
    """The θ = n − 2f states Bulyan's first phase keeps, in the order chosen: Krum is applied
    again and again to the states not yet chosen (each time scoring against the
    max(1, r − f − 2) nearest of the r left), and its pick moves to the selection."""
    n, f = len(states), num_byzantine
    _check_f(n, f)
    dist = pairwise_sq_distances(states, "bulyan")
    left, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        scores = scores_from_distances(dist, left, max(1, len(left) - f - 2))
        pick = left[min(range(len(left)), key=lambda i: (scores[i], left[i]))]
        chosen.append(pick)
        left.remove(pick)
    return chosen


def closest_to_median_mean(values: torch.Tensor, beta: int) -> torch.Tensor:
    """Coordinate-wise over dim 0 of ``values`` (θ × ...): the mean of the ``beta`` values closest
    to the coordinate's median (the mean of the two middle values when θ is even); ties go to the
    earlier row."""
    rows = values.shape[0]
    ordered = values.sort(dim=0).values
    median = (ordered[(rows - 1) // 2] + ordered[rows // 2]) / 2
    closeness = (values - median).abs().argsort(dim=0, stable=True)[:beta]
    return values.gather(0, closeness).mean(dim=0)


def bulyan(
    states: Sequence[Mapping[str, torch.Tensor]], *, num_byzantine: int | None = None
) -> tuple[StateDict, list[int]]:
    """(merged state, indices of the states Krum selected). Every floating key is the mean of the
    β = θ − 2f selected values nearest the median, coordinate by coordinate (in float64, cast
    back); integer buffers take the selected states' median (lower middle). f None = the most
    Bulyan tolerates, floor((n − 3) / 4)."""
    n = len(states)
    f = bulyan_byzantine(n) if num_byzantine is None else num_byzantine
    selected = sorted(bulyan_selection(states, f))  # ties in the trimmed mean: the lower index
    beta = len(selected) - 2 * f
    out: StateDict = {}
    for key, ref in states[0].items():
        stack = torch.stack([states[i][key] for i in selected])
        if ref.is_floating_point():
            out[key] = closest_to_median_mean(stack.to(torch.float64), beta).to(ref.dtype)
        else:
            out[key] = stack.sort(dim=0).values[(len(selected) - 1) // 2].clone()
    return out, selected


@register()
class Bulyan(Aggregator):
    """Bulyan: recursive Krum keeps θ = n − 2f client models; each weight of the next global model
    is the mean of the β = θ − 2f kept values closest to their median.

    El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
    Byzantium", ICML 2018, https://arxiv.org/abs/1802.07927. Needs n >= 4f + 3 replies; a round
    with fewer than planned uses the largest f they allow (``bulyan_f`` in the metrics). The
    selection is the paper's recursion (Krum on the models not yet chosen, one pick at a time);
    Flower's Bulyan selects with one pass of Multi-Krum by default, which can pick another set.
    Unselected clients count as dropped in the detection metrics. No state across rounds.
    """

    name = "bulyan"

    @dataclass(frozen=True)
    class Params:
        num_byzantine: int | None = hyperparameter(
            None,
            "malicious clients f assumed per round; unset = the most Bulyan tolerates, "
            "floor((n - 3) / 4)",
            ge=0,
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        n = len(updates)
        allowed = bulyan_byzantine(n)
        f = allowed if self.num_byzantine is None else min(self.num_byzantine, allowed)
        state, selected = bulyan([u.state for u in updates], num_byzantine=f)
        ids = [u.client_id for u in updates]
        metrics = {"num_clients": float(n), "bulyan_f": float(f)}
        metrics.update(detection_metrics(ids, [ids[i] for i in selected], ctx.malicious))
        return AggregateResult(state=state, metrics=metrics)
