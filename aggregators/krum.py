"""Krum and multi-Krum: keep the client models closest to their neighbours, drop the outliers."""

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
from fedmerge.aggregators.fedavg import fedavg
from fedmerge.aggregators.params import check_value, hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["Krum", "krum", "krum_scores", "pairwise_sq_distances", "scores_from_distances"]


def _flat(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in keys])


def pairwise_sq_distances(states: Sequence[Mapping[str, torch.Tensor]], who: str) -> torch.Tensor:
    """The n × n matrix of squared L2 distances between the states (floating tensors only, in
    float64), after checking that every state has the same keys and sizes and finite weights."""
    if not states:
        raise ValueError(f"{who}: no states")
    keys = [k for k, v in states[0].items() if v.is_floating_point()]
    for i, state in enumerate(states):
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"{who}: state {i} has no key {missing[0]!r}")
    flat = [_flat(s, keys) for s in states]
    for i, vector in enumerate(flat):
        if vector.shape != flat[0].shape:
            raise ValueError(
                f"{who}: state {i} has {vector.numel()} weights, state 0 has {flat[0].numel()}"
            )
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(f"{who}: state {i} has non-finite weights")
    n = len(flat)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = torch.sum((flat[i] - flat[j]) ** 2)
    return dist


def scores_from_distances(
    dist: torch.Tensor, members: Sequence[int], neighbours: int
) -> list[float]:
    """Each member's Krum score within ``members``: the sum of its ``neighbours`` smallest squared
    distances to the other members (all of them when there are fewer)."""
    scores = []
    for i in members:
        others = torch.stack([dist[i, j] for j in members if j != i]) if len(members) > 1 else None
        scores.append(0.0 if others is None else float(others.sort().values[:neighbours].sum()))
    return scores


def krum_scores(states: Sequence[Mapping[str, torch.Tensor]], num_byzantine: int) -> list[float]:
    """Each state's Krum score: the sum of its squared L2 distances to its n − f − 2 nearest other
    states (floating tensors only), f = ``num_byzantine``. Blanchard et al. require 2f + 2 < n;
    f = 0 scores against at least one neighbour."""
    n = len(states)
    if n < 1:
        raise ValueError("krum: no states")
    if num_byzantine < 0 or (num_byzantine > 0 and 2 * num_byzantine + 2 >= n):
        raise ValueError(
            f"krum: num_byzantine={num_byzantine} with {n} clients; Krum tolerates f malicious "
            f"clients only when 2f + 2 < n, so at most {default_byzantine(n)} here"
        )
    dist = pairwise_sq_distances(states, "krum")
    return scores_from_distances(dist, range(n), max(1, n - num_byzantine - 2))


def default_byzantine(n: int) -> int:
    """The most malicious clients Krum tolerates among n: the largest f with 2f + 2 < n."""
    return max(0, (n - 3) // 2)


def krum(
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    num_byzantine: int | None = None,
    multi: int = 1,
) -> tuple[StateDict, list[int]]:
    """(merged state, indices of the selected states). The ``multi`` states with the lowest Krum
    scores are selected (ties: the earlier state first) and averaged uniformly; ``multi = 1`` is
    Krum, which returns the selected state itself. ``num_byzantine`` None = ``default_byzantine``."""
    n = len(states)
    f = default_byzantine(n) if num_byzantine is None else num_byzantine
    multi = check_value("krum", Krum.Params, "multi", multi)
    scores = krum_scores(states, f)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    selected = sorted(order[: min(multi, n)])
    if len(selected) == 1:
        return {k: v.clone() for k, v in states[selected[0]].items()}, selected
    return fedavg([states[i] for i in selected], [1.0] * len(selected)), selected


@register()
class Krum(Aggregator):
    """Krum / multi-Krum: the next global model is the client model (or the uniform mean of the
    ``multi`` client models) with the smallest summed squared distance to its n − f − 2 nearest
    neighbours.

    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017,
    https://papers.nips.cc/paper/6617-machine-learning-with-adversaries-byzantine-tolerant-gradient-descent.
    ``num_byzantine`` f: the malicious clients assumed per round (default: the most Krum
    tolerates, floor((n − 3) / 2)); ``multi`` m: how many models are kept (1 = Krum). The
    clients not selected count as dropped in the detection metrics.
    """

    name = "krum"

    @dataclass(frozen=True)
    class Params:
        num_byzantine: int | None = hyperparameter(
            None,
            "malicious clients f assumed per round; unset = the most Krum tolerates, "
            "floor((n - 3) / 2)",
            ge=0,
        )
        multi: int = hyperparameter(
            1, "models kept and averaged (1 = Krum, more = multi-Krum)", ge=1
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        n = len(updates)
        f = self.num_byzantine if self.num_byzantine is not None else default_byzantine(n)
        # A round with fewer replies than planned still gets a merge, with the f that n allows
        # (krum_f in the metrics shows it).
        f = min(f, default_byzantine(n))
        state, selected = krum([u.state for u in updates], num_byzantine=f, multi=self.multi)
        ids = [u.client_id for u in updates]
        metrics = {"num_clients": float(n), "krum_f": float(f)}
        metrics.update(detection_metrics(ids, [ids[i] for i in selected], ctx.malicious))
        return AggregateResult(state=state, metrics=metrics)
