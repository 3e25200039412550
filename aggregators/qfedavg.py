"""q-FedAvg: a merge that weights the clients with high loss more, for a fairer accuracy spread."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmerge.aggregators.base import AggregateResult, ClientUpdate, RoundContext, StateDict
from fedmerge.aggregators.fedavg import FedAvg, _WeightedSum
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["QFedAvg", "INITIAL_LOSS_KEY"]

INITIAL_LOSS_KEY = "initial_loss"
"""The reply metric with the client's mean loss of the received model on its training shard,
measured before local training (sent when the aggregator's client config asks for it)."""

_EPS = 1e-10  # keeps F^(q-1) finite at a loss of 0


@register()
class QFedAvg(FedAvg):
    """q-FedAvg: minimises Σ_k F_k^(q+1) / (q+1), so clients with high loss pull harder.

    Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020,
    https://arxiv.org/abs/1905.10497 (Algorithm 2). With L = 1 / ``client_lr`` (the Lipschitz
    estimate), Δw_k = L (w^t − w_k), Δ_k = F_k^q Δw_k, h_k = q F_k^(q−1) ‖Δw_k‖² + L F_k^q and
    w^(t+1) = w^t − Σ Δ_k / Σ h_k. That step equals w^t + s (w̄ − w^t), where w̄ is the mean of the
    client models weighted by F_k^q and s = L Σ F_k^q / Σ h_k, so the merge streams through
    FedAvg's accumulator with weights F_k^q (example counts are not used, as in the paper) and
    keeps two scalars besides. q = 0 is the uniform mean of the client models.

    F_k is client k's loss at the received model w^t. ``loss = "initial"`` (the paper) asks each
    client to measure it on its training shard before training (one forward pass) and report it as
    ``initial_loss``; ``loss = "train"`` uses the mean training loss the client reports anyway, as
    Flower's QFedAvg does (cheaper, and biased low: it is measured while the model improves).
    Integer buffers take the F^q-weighted mean. No state across rounds.
    """

    name = "qfedavg"

    @dataclass(frozen=True)
    class Params:
        q: float = hyperparameter(
            0.1, "fairness q: 0 = the uniform mean, larger weights high-loss clients more", ge=0.0
        )
        client_lr: float = hyperparameter(
            0.01,
            "the clients' learning rate η, so L = 1/η estimates the loss's Lipschitz constant "
            "(set it to [train] lr)",
            gt=0.0,
        )
        loss: str = hyperparameter(
            "initial",
            "F_k: the client's loss at the received model (initial, the paper) or its mean "
            "training loss (train, Flower's QFedAvg)",
            choices=("initial", "train"),
        )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._sums: dict[str, float] = {}

    def client_config(self, server_round: int) -> dict[str, Any]:
        return {INITIAL_LOSS_KEY: True} if self.loss == "initial" else {}

    def begin_round(self, ctx: RoundContext) -> None:
        super().begin_round(ctx)
        self._sums = {"fq": 0.0, "h": 0.0}

    def accumulate(self, update: ClientUpdate) -> None:
        if self._sum is None or self._ctx is None:
            raise RuntimeError("QFedAvg.accumulate() called before begin_round()")
        self._fold_q(self._sum, self._sums, self._ctx.global_state, update)

    def finalize(self) -> AggregateResult:
        if self._sum is None or self._ctx is None:
            raise RuntimeError("QFedAvg.finalize() called before begin_round()")
        acc, self._sum = self._sum, None
        return self._step(self._ctx.global_state, acc, self._sums)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        acc, sums = _WeightedSum(ctx.device, self.accumulator), {"fq": 0.0, "h": 0.0}
        for update in updates:
            self._fold_q(acc, sums, ctx.global_state, update)
        return self._step(ctx.global_state, acc, sums)

    def round_state(self) -> dict[str, Any]:
        return {**super().round_state(), "qfedavg_sums": dict(self._sums)}

    def load_round_state(self, state: Mapping[str, Any]) -> None:
        sums = state.get("qfedavg_sums")
        if not isinstance(sums, Mapping) or set(sums) != {"fq", "h"}:
            raise ValueError("QFedAvg round state has no valid 'qfedavg_sums'")
        super().load_round_state({k: v for k, v in state.items() if k != "qfedavg_sums"})
        self._sums = {k: float(v) for k, v in sums.items()}

    def _client_loss(self, update: ClientUpdate) -> float:
        key = INITIAL_LOSS_KEY if self.loss == "initial" else "train_loss"
        value = update.metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            hint = " (does the client app send it? it must see this aggregator's client config)"
            raise ValueError(
                f"client {update.client_id}: q-FedAvg needs the metric {key!r}, got {value!r}"
                + (hint if key == INITIAL_LOSS_KEY else "")
            )
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"client {update.client_id}: {key} must be a finite loss >= 0, got {value!r}"
            )
        return float(value)

    def _fold_q(
        self,
        acc: _WeightedSum,
        sums: dict[str, float],
        global_state: Mapping[str, torch.Tensor],
        update: ClientUpdate,
    ) -> None:
        loss = self._client_loss(update) + _EPS
        fq = loss**self.q
        acc.add(update.state, fq, source=f"client {update.client_id}")  # checks keys and values
        lipschitz = 1.0 / self.client_lr
        dist_sq = sum(
            float((update.state[k].to(torch.float64) - v.to(torch.float64)).square().sum())
            for k, v in global_state.items()
            if v.is_floating_point()
        )
        sums["fq"] += fq
        sums["h"] += self.q * loss ** (self.q - 1) * lipschitz**2 * dist_sq + lipschitz * fq

    def _step(
        self, global_state: Mapping[str, torch.Tensor], acc: _WeightedSum, sums: dict[str, float]
    ) -> AggregateResult:
        result = self._result(acc)
        scale = (1.0 / self.client_lr) * sums["fq"] / sums["h"]
        out: StateDict = {}
        for key, theta in global_state.items():
            mean = result.state[key]
            if not theta.is_floating_point():
                out[key] = mean
                continue
            current = theta.to(mean.device, torch.float64)
            out[key] = (current + scale * (mean.to(torch.float64) - current)).to(theta.dtype)
        return AggregateResult(
            state=out, metrics={"num_clients": result.metrics["num_clients"], "qfedavg_step": scale}
        )
