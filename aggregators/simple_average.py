"""Simple averaging of fine-tuned models, one vote per model, heads kept per task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedmerge.aggregators.base import AggregateResult, Aggregator, ClientUpdate, RoundContext
from fedmerge.aggregators.merging import (
    GROUP_BY,
    merge_per_task,
)
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register
from fedmerge.aggregators.task_arithmetic import task_arithmetic

__all__ = ["SimpleAverage"]


@register()
class SimpleAverage(Aggregator):
    """The uniform mean of the fine-tuned models, θ = (1/N) Σi θi = θ0 + (1/N) Σi τi.

    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482
    (the uniform soup), the usual merging baseline. Unlike FedAvg it gives each model (each task,
    with ``group_by = "task"``) one vote whatever its example count, and it keeps per-task heads
    per task (each task's clients' mean) instead of averaging them with other tasks' heads.
    """

    name = "simple_average"
    needs = frozenset({"base_model"})

    @dataclass(frozen=True)
    class Params:
        group_by: str = hyperparameter(
            "task", "one model per task (its clients averaged) or one per client", choices=GROUP_BY
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return merge_per_task(
            ctx,
            updates,
            lambda shared, states: task_arithmetic(shared, states, lam=1.0 / len(states)),
            group_by=self.group_by,
        )
