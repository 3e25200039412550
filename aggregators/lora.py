"""Merging LoRA adapters: by their factors, or by the weight updates B·A they stand for.

A LoRA client sends its adapters' factors A (r × in) and B (out × r); the layer computes
W x + s·B A x with s = alpha / r. Averaging A and B separately (FedIT: Zhang et al. 2024,
"Towards Building the Federated GPT: Federated Instruction Tuning",
https://arxiv.org/abs/2305.05644) is what any aggregator does with the factors as plain tensors;
it is cheap, but the mean of the factors' product is not the mean of the products:
(Σ pᵢ Bᵢ)(Σ pᵢ Aᵢ) ≠ Σ pᵢ Bᵢ Aᵢ.

``LoraProducts`` wraps any aggregator so that it merges the products instead. Each reply is seen
in its *dense view*: the adapted layer's effective weight W + s·Bᵢ Aᵢ under the base weight's
key, the factors gone. The wrapped method (FedAvg, task arithmetic, TIES, SMILE...) merges those
like any full fine-tune, and the merged weight is folded into the base: the next global model
keeps W' = merge(...) as the layer's base weight and restarts the adapters at A₀ (the run's seeded
initial A) and B = 0, so the next round starts from exactly the merged model. This is the merge
of FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", https://arxiv.org/abs/2409.05976): stacking the clients'
factors, B = [p₁B₁ … pₙBₙ] and A = [A₁; …; Aₙ], gives B A = Σ pᵢ Bᵢ Aᵢ exactly, folded into the
base each round with fresh adapters.

Cost: one dense out × in tensor per adapted layer per reply the method keeps (an incremental
FedAvg keeps one sum), the products themselves (out·in·r multiply-adds each), and on the wire the
adapted layers' base weights go to the clients every round (they changed); replies stay adapters.
No full-size model is ever materialised: only the adapted layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    Scalar,
    StateDict,
)

__all__ = ["ADAPTER_MERGES", "LoraModule", "LoraProducts", "dense_view", "folded"]

ADAPTER_MERGES = ("auto", "factors", "products")
"""``[aggregator] adapters``: how a LoRA run merges adapters. ``factors`` merges A and B as plain
tensors (FedIT with FedAvg), ``products`` the B·A they stand for (``LoraProducts``), ``auto``
products for the task-vector methods (which declare the ``base_model`` need) and factors for the
others."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: its factor and base weight keys in the model's state, and s."""

    name: str
    a_key: str
    b_key: str
    base_key: str
    scaling: float


def delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·B A, in float32 at least (the factors may be half precision)."""
    work = torch.promote_types(a.dtype, torch.float32)
    return (b.to(work) @ a.to(work)) * scaling


def dense_view(
    state: Mapping[str, torch.Tensor],
    layout: Sequence[LoraModule],
    base: Mapping[str, torch.Tensor],
) -> StateDict:
    """``state`` with each adapted layer's factors replaced by its effective weight
    base[base_key] + s·B A under ``base_key`` (the other keys as they are)."""
    factor_keys = {k for m in layout for k in (m.a_key, m.b_key)}
    out: StateDict = {k: v for k, v in state.items() if k not in factor_keys}
    for m in layout:
        w = base[m.base_key]
        out[m.base_key] = (
            w.to(torch.promote_types(w.dtype, torch.float32))
            + delta(state[m.a_key], state[m.b_key], m.scaling).to(w.device)
        ).to(w.dtype)
    return out


def folded(
    dense: Mapping[str, torch.Tensor],
    layout: Sequence[LoraModule],
    initial: Mapping[str, torch.Tensor],
) -> StateDict:
    """A merged dense state back in the run's layout: the merged weights as the adapted layers'
    base weights, the adapters restarted at A = ``initial`` A, B = 0 (they add nothing)."""
    out: StateDict = dict(dense)
    for m in layout:
        out[m.a_key] = initial[m.a_key].clone()
        out[m.b_key] = torch.zeros_like(initial[m.b_key])
    return out


class LoraProducts(Aggregator):
    """Any aggregator, run on the weight updates B·A that LoRA adapters stand for (see the
    module docstring; FLoRA's exact merge when the wrapped method is FedAvg).

    ``layout`` lists the adapted layers; the global state must hold their base weights. Round
    state, checkpointed state and client config are the wrapped aggregator's.
    """

    name = "lora_products"

    def __init__(self, inner: Aggregator, layout: Sequence[LoraModule]) -> None:
        super().__init__()
        if not layout:
            raise ValueError("LoraProducts needs at least one adapted layer")
        self.inner = inner
        self.layout = tuple(layout)
        self._initial: Mapping[str, torch.Tensor] | None = None
        self._global: Mapping[str, torch.Tensor] = {}

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(getattr(self.inner, "needs", frozenset()))

    def client_config(self, server_round: int) -> dict[str, Scalar]:
        return self.inner.client_config(server_round)

    def plan_run(self, *, num_rounds: int, num_clients: int, clients_per_round: int) -> None:
        self.inner.plan_run(
            num_rounds=num_rounds, num_clients=num_clients, clients_per_round=clients_per_round
        )

    def begin_round(self, ctx: RoundContext) -> None:
        missing = [m.base_key for m in self.layout if m.base_key not in ctx.global_state]
        if missing:
            raise ValueError(
                f"the products merge needs the adapted layers' base weights in the global "
                f"state; missing {missing[:3]}"
            )
        self._initial = ctx.base_state
        self._global = ctx.global_state
        self.inner.begin_round(
            replace(
                ctx,
                global_state=dense_view(ctx.global_state, self.layout, ctx.global_state),
                base_state=dense_view(ctx.base_state, self.layout, ctx.base_state),
            )
        )

    def accumulate(self, update: ClientUpdate) -> None:
        self.inner.accumulate(
            replace(update, state=dense_view(update.state, self.layout, self._global))
        )

    def finalize(self) -> AggregateResult:
        if self._initial is None:
            raise RuntimeError("LoraProducts.finalize() called before begin_round()")
        result = self.inner.finalize()
        return AggregateResult(
            state=folded(result.state, self.layout, self._initial),
            metrics=result.metrics,
            served_model=result.served_model,
        )

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        self.begin_round(ctx)
        for update in updates:
            self.accumulate(update)
        return self.finalize()

    def round_state(self) -> dict[str, Any] | None:
        return self.inner.round_state()

    def load_round_state(self, state: Mapping[str, Any]) -> None:
        self.inner.load_round_state(state)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
