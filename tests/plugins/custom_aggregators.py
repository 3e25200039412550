"""Aggregators defined outside fedmerge and selected by import path, no registration needed.

An experiment names one by its path, e.g.
``[aggregator] name = "tests.plugins.custom_aggregators:MedianOfClients"`` (the repository root
must be importable); the tests use them for the registry's path route and end to end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmerge.aggregators import AggregateResult, Aggregator, ClientUpdate, RoundContext

__all__ = ["KeepBestByMetric", "MedianOfClients"]


class MedianOfClients(Aggregator):
    """Coordinate-wise median of the clients' weights (the lower median for an even count).

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498. Ignores example counts.
    """

    name = "median_of_clients"

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        state = {
            key: torch.stack([u.state[key].to(ctx.device) for u in updates]).median(dim=0).values
            for key in updates[0].state
        }
        return AggregateResult(state=state, metrics={"num_clients": len(updates)})


class KeepBestByMetric(Aggregator):
    """The next global model is the one client model with the highest reported ``metric``.

    A deliberately simple selection rule with a hyperparameter, for tests; ties go to the
    earliest reply. A client that did not report the metric is never chosen unless none did.
    """

    name = "keep_best_by_metric"

    def __init__(self, metric: str = "train_accuracy") -> None:
        super().__init__()
        if not metric:
            raise ValueError("metric must be a non-empty metric name")
        self.metric = metric

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        scores = [u.metrics.get(self.metric, float("-inf")) for u in updates]
        best = max(range(len(updates)), key=scores.__getitem__)
        state = {k: v.to(ctx.device, copy=True) for k, v in updates[best].state.items()}
        return AggregateResult(
            state=state,
            metrics={
                "num_clients": len(updates),
                "best_client": updates[best].client_id,
                f"best_{self.metric}": scores[best],
            },
        )
