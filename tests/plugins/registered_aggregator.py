"""A user's aggregator registered by name: importing this module makes "mean_of_two_best" known."""

from __future__ import annotations

from collections.abc import Sequence

from fedmerge.aggregators import AggregateResult, ClientUpdate, RoundContext, register
from fedmerge.aggregators.base import Aggregator
from fedmerge.aggregators.fedavg import fedavg


@register("mean_of_two_best")
class MeanOfTwoBest(Aggregator):
    """Example-weighted average of the two clients with the lowest reported train loss."""

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        ranked = sorted(updates, key=lambda u: u.metrics.get("train_loss", float("inf")))[:2]
        state = fedavg(
            [u.state for u in ranked], [u.num_examples for u in ranked], device=ctx.device
        )
        return AggregateResult(
            state=state,
            metrics={"num_clients": len(ranked), "dropped_clients": len(updates) - len(ranked)},
        )
