"""SCAFFOLD: control variates that correct the client drift of local steps on non-IID data.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, https://arxiv.org/abs/1910.06378 (Algorithm 1, option II).

The server keeps the control variate c and every seen client's c_i (all start at 0). A sampled
client gets the correction c − c_i (``client_arrays``) and adds the loss term ⟨c − c_i, θ⟩
(``scaffold_correction``), so each local SGD step is y ← y − η_l (g_i(y) − c_i + c).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    StateDict,
    checked_num_examples,
)
from fedmerge.aggregators.fedavg import _all_finite, fedavg
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register
from fedmerge.aggregators.terms import LossTerm, register_term

__all__ = ["LOCAL_STEPS_METRIC", "Scaffold", "correction_term"]

LOCAL_STEPS_METRIC = "local_steps"
"""The reply metric with the client's number of local optimizer steps K (clients/training.py)."""

WEIGHTINGS = ("uniform", "examples")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@register_term("scaffold_correction")
def correction_term(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    *,
    aggregator_arrays: Mapping[str, torch.Tensor] | None = None,
) -> LossTerm:
    """⟨c − c_i, θ⟩ summed over the model's parameters: its gradient adds exactly c − c_i.

    ``aggregator_arrays`` is the correction the server sent: it must have exactly the floating
    keys of the received state, each of the received tensor's shape, floating and finite. Keys
    that are buffers (BatchNorm statistics) are accepted and not used: no gradient reaches them.
    """
    if aggregator_arrays is None:
        raise ValueError("scaffold_correction needs the server's correction (c − c_i); none came")
    expected = {k for k, v in global_state.items() if v.is_floating_point()}
    got = set(aggregator_arrays)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ValueError(
            f"the SCAFFOLD correction does not fit the received model: {what} "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    params = dict(model.named_parameters())
    corrections = {}
    for key, value in aggregator_arrays.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"the SCAFFOLD correction of {key!r} is not a floating-point tensor")
        if value.shape != global_state[key].shape:
            raise ValueError(
                f"the SCAFFOLD correction of {key!r} has shape {tuple(value.shape)}, "
                f"the model has {tuple(global_state[key].shape)}"
            )
        if not _all_finite(value):
            raise ValueError(f"the SCAFFOLD correction of {key!r} has non-finite values")
        if key in params:
            corrections[key] = value.detach().to(params[key].dtype)

    def term(module: nn.Module) -> torch.Tensor:
        current = dict(module.named_parameters())
        return sum(
            (current[k] * c.to(current[k].device)).sum()
            for k, c in corrections.items()
            if current[k].requires_grad
        ) + torch.zeros(())

    return term


def _local_steps(update: ClientUpdate) -> int:
    """The reply's K, or ValueError naming the client when it is not a positive integer."""
    k = update.metrics.get(LOCAL_STEPS_METRIC) if isinstance(update.metrics, Mapping) else None
    if (
        isinstance(k, bool)
        or not isinstance(k, numbers.Real)
        or not math.isfinite(k)
        or k != int(k)
        or k < 1
    ):
        raise ValueError(
            f"client {update.client_id}: metric {LOCAL_STEPS_METRIC!r} must be a positive "
            f"integer (its number of local optimizer steps), got {k!r}"
        )
    return int(k)


@register()
class Scaffold(Aggregator):
    """SCAFFOLD (option II): server and client control variates c, c_i correct local drift.

    Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
    for Federated Learning", ICML 2020, https://arxiv.org/abs/1910.06378, Algorithm 1.
    A reply y_i after K local steps (its ``local_steps`` metric) gives
    c_i⁺ = c_i − c + (x − y_i)/(K η_l); then x ← x + η_g Σ w_i (y_i − x) and
    c ← c + (1/N) Σ (c_i⁺ − c_i), N = ``RoundContext.num_clients``. w_i is 1/|S| (``uniform``,
    the paper's) or n_i / Σ n (``examples``). Non-floating tensors (BatchNorm counters) take
    FedAvg's mean and have no control variate.

    The paper assumes plain SGD: with momentum or Adam the term still adds c − c_i to every
    gradient, but the optimizer reshapes it, and (x − y)/(K η_l) is no longer the mean gradient.
    State: c and one c_i per client seen so far (one model's worth each), checkpointed.
    """

    name = "scaffold"

    @dataclass(frozen=True)
    class Params:
        server_lr: float = hyperparameter(
            1.0, "global step size η_g of x ← x + η_g · mean(y_i − x)", gt=0.0
        )
        local_lr: float = hyperparameter(
            0.0, "clients' learning rate η_l in c_i⁺; 0 = the run's [train] lr", ge=0.0
        )
        weighting: str = hyperparameter(
            "uniform",
            "weights of the server mean: uniform 1/|S| (the paper) or by examples",
            choices=WEIGHTINGS,
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)
        self._c: dict[str, torch.Tensor] = {}
        self._ci: dict[int, dict[str, torch.Tensor]] = {}

    # ---- client side -------------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Any]:
        """The correction term, from the first merge on (until then every c, c_i is 0)."""
        return {"terms": [{"term": "scaffold_correction"}]} if self._c else {}

    def client_arrays(self, server_round: int, client_id: int) -> dict[str, torch.Tensor] | None:
        """c − c_i; None before the first merge (every control variate is still 0)."""
        if not self._c:
            return None
        own = self._ci.get(int(client_id), {})
        return {k: c - own[k] if k in own else c.clone() for k, c in self._c.items()}

    # ---- server side -------------------------------------------------------------------
    def accumulate(self, update: ClientUpdate) -> None:
        """Check the reply before it is kept, so a bad one touches nothing."""
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("Scaffold.accumulate() called before begin_round()")
        self._check(ctx, update, [u.client_id for u in self._updates])
        super().accumulate(update)

    def _check(self, ctx: RoundContext, update: ClientUpdate, seen: Sequence[int]) -> None:
        who = f"client {update.client_id}"
        n = ctx.num_clients
        if n < 1:
            raise ValueError(
                "SCAFFOLD needs the population N (RoundContext.num_clients), which is 0"
            )
        if not 0 <= update.client_id < n:
            raise ValueError(f"{who}: not one of the {n} clients of the federation")
        if update.client_id in seen:
            raise ValueError(f"{who}: a second reply in the same round")
        checked_num_examples(update)
        _local_steps(update)
        if set(update.state) != set(ctx.global_state):
            raise ValueError(f"{who}: its keys differ from the global model's")
        for key, value in update.state.items():
            ref = ctx.global_state[key]
            if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
                raise ValueError(f"{who}: {key!r} does not have the global model's shape")
            if value.is_floating_point() != ref.is_floating_point():
                raise ValueError(f"{who}: {key!r} has dtype {value.dtype}, expected {ref.dtype}")
            if value.is_floating_point() and not _all_finite(value):
                raise ValueError(f"{who}: {key!r} has non-finite values (NaN or inf)")

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """One server step; commits the round's c_i⁺ and c."""
        if self.local_lr <= 0:
            raise ValueError(
                "SCAFFOLD's local_lr is 0: set [aggregator.params] local_lr or run through "
                "the framework, which fills in [train] lr"
            )
        for i, update in enumerate(updates):
            self._check(ctx, update, [u.client_id for u in updates[:i]])
        if self.weighting == "examples":
            counts = [checked_num_examples(u) for u in updates]
            weights = [n / sum(counts) for n in counts]
        else:
            weights = [1.0 / len(updates)] * len(updates)
        inv_n = 1.0 / ctx.num_clients
        out: StateDict = {}
        new_c: dict[str, torch.Tensor] = {}
        new_ci = {u.client_id: dict(self._ci.get(u.client_id, {})) for u in updates}
        delta_sq = corr_sq = 0.0
        ints = [k for k, v in ctx.global_state.items() if not v.is_floating_point()]
        for key, x in ctx.global_state.items():
            if not x.is_floating_point():
                continue
            work = _work_dtype(x.dtype)
            xw = x.to(ctx.device, work)
            c = self._c.get(key)
            c = torch.zeros_like(xw) if c is None else c.to(ctx.device, work)
            step = torch.zeros_like(xw)
            dc = torch.zeros_like(xw)
            for update, w in zip(updates, weights):
                delta = update.state[key].to(ctx.device, work) - xw  # y_i − x
                step.add_(delta, alpha=w)
                k = _local_steps(update)
                # c_i⁺ − c_i = −c − (y_i − x)/(K η_l)
                change = -c - delta / (k * self.local_lr)
                dc.add_(change)
                old = new_ci[update.client_id].get(key)
                old = torch.zeros_like(xw) if old is None else old.to(ctx.device, work)
                new_ci[update.client_id][key] = (old + change).cpu()
            out[key] = (xw + self.server_lr * step).to(x.dtype)
            new_c[key] = (c + inv_n * dc).cpu()
            delta_sq += float(step.double().square().sum())
            corr_sq += float(new_c[key].double().square().sum())
        if ints:
            means = fedavg(
                [{k: u.state[k] for k in ints} for u in updates],
                [checked_num_examples(u) for u in updates],
                device=ctx.device,
            )
            out.update(means)
        out = {k: out[k] for k in ctx.global_state}
        self._c = new_c
        self._ci.update(new_ci)
        metrics = {
            "num_clients": float(len(updates)),
            "num_examples": float(sum(checked_num_examples(u) for u in updates)),
            "mean_update_norm": math.sqrt(delta_sq),
            "control_variate_norm": math.sqrt(corr_sq),
            "clients_with_control_variate": float(len(self._ci)),
        }
        return AggregateResult(state=out, metrics=metrics)

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "c": dict(self._c),
            "clients": {str(cid): dict(ci) for cid, ci in sorted(self._ci.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:  # a fresh run
            self._c, self._ci = {}, {}
            return
        if set(state) != {"c", "clients"}:
            raise ValueError(f"Scaffold state has keys {sorted(state)}, expected ['c', 'clients']")

        def tensors(value: Any, where: str) -> dict[str, torch.Tensor]:
            if not isinstance(value, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in value.values()
            ):
                raise ValueError(f"Scaffold state: {where} must map keys to tensors")
            return {k: v.clone() for k, v in value.items()}

        c = tensors(state["c"], "'c'")
        clients = state["clients"]
        if not isinstance(clients, Mapping):
            raise ValueError("Scaffold state: 'clients' must map client ids to tensors")
        ci = {}
        for cid, value in clients.items():
            if not str(cid).isdigit():
                raise ValueError(f"Scaffold state: client id {cid!r} is not an integer")
            ci[int(cid)] = tensors(value, f"client {cid}")
        self._c, self._ci = c, ci
