"""Server optimisers: FedAvg's mean read as a pseudo-gradient and applied by an optimiser.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295 (Algorithm 2). Each round the
clients' example-weighted mean θ̄ (FedAvg, streamed: one accumulator, replies dropped as they
arrive) gives the pseudo-gradient Δ = θ̄ − θt, and the server takes a step θt+1 = θt + step(Δ)
with state that lives across rounds (momentum, second moments). With step(Δ) = Δ this is FedAvg.

The moments and the step count are the aggregator's state: checkpointed with the run and put
back into a restarted actor, so a resumed or replayed round steps exactly as the first attempt
did. Integer buffers (step counters) take FedAvg's value; the moments are kept in float32 at
least (the dtype of each weight, promoted).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmerge.aggregators.base import AggregateResult, ClientUpdate, RoundContext, StateDict
from fedmerge.aggregators.fedavg import FedAvg

__all__ = ["ServerOptimizer"]


class ServerOptimizer(FedAvg):
    """FedAvg whose mean is a pseudo-gradient for ``step``; subclasses name their moments."""

    moments: tuple[str, ...] = ()
    """The per-weight state tensors ``step`` reads and updates, by name (e.g. ("m", "v"))."""

    def _state(self) -> dict[str, dict[str, torch.Tensor]]:
        if "_moments" not in self.__dict__:
            self._moments: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.moments}
            self._steps = 0
        return self._moments

    def finalize(self) -> AggregateResult:
        ctx = self._ctx
        result = super().finalize()
        return self._apply(ctx, result)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return self._apply(ctx, super().aggregate(ctx, updates))

    def _apply(self, ctx: RoundContext | None, result: AggregateResult) -> AggregateResult:
        if ctx is None:
            raise RuntimeError(f"{type(self).__name__}.finalize() called before begin_round()")
        moments = self._state()
        self._steps += 1
        out: StateDict = {}
        delta_sq = step_sq = 0.0
        for key, theta in ctx.global_state.items():
            mean = result.state[key]
            if not theta.is_floating_point():
                out[key] = mean
                continue
            work = torch.promote_types(theta.dtype, torch.float32)
            current = theta.to(mean.device, work)
            delta = mean.to(work) - current
            state = {}
            for name in self.moments:
                if key not in moments[name]:
                    moments[name][key] = torch.zeros_like(delta)
                state[name] = moments[name][key]
            step = self.step(delta, state, self._steps)
            out[key] = (current + step).to(theta.dtype)
            delta_sq += float(delta.double().square().sum())
            step_sq += float(step.double().square().sum())
        metrics = {
            **result.metrics,
            "pseudo_gradient_norm": math.sqrt(delta_sq),
            "server_step_norm": math.sqrt(step_sq),
        }
        return AggregateResult(state=out, metrics=metrics)

    @abstractmethod
    def step(self, delta: torch.Tensor, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        """The update added to θt from the pseudo-gradient ``delta`` at server step ``t`` (1 in
        the first merged round); updates the tensors of ``state`` (named by ``moments``) in place."""

    def state_dict(self) -> dict[str, Any]:
        moments = self._state()
        return {"steps": self._steps, **{name: dict(moments[name]) for name in self.moments}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:  # a fresh run
            self.__dict__.pop("_moments", None)
            return
        expected = {"steps", *self.moments}
        if set(state) != expected:
            raise ValueError(
                f"{type(self).__name__} state has keys {sorted(state)}, expected {sorted(expected)}"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{type(self).__name__} state: steps must be an integer >= 0")
        moments = {}
        for name in self.moments:
            tensors = state[name]
            if not isinstance(tensors, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in tensors.values()
            ):
                raise ValueError(f"{type(self).__name__} state: {name!r} must map keys to tensors")
            moments[name] = {k: v.clone() for k, v in tensors.items()}
        self._moments, self._steps = moments, steps


def adaptive_step(
    delta: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    eta: float,
    beta_1: float,
    tau: float,
    update_v: str,
    beta_2: float = 0.0,
) -> torch.Tensor:
    """Reddi et al.'s Algorithm 2 after Δ: m ← β₁m + (1−β₁)Δ; v by ``update_v`` ("adagrad":
    v + Δ², "adam": β₂v + (1−β₂)Δ², "yogi": v − (1−β₂)Δ² sign(v − Δ²)); the step η m / (√v + τ).
    ``state``'s m and v are updated in place (both start at 0, as in Flower's FedOpt)."""
    m, v = state["m"], state["v"]
    m.mul_(beta_1).add_(delta, alpha=1.0 - beta_1)
    square = delta.square()
    if update_v == "adagrad":
        v.add_(square)
    elif update_v == "adam":
        v.mul_(beta_2).add_(square, alpha=1.0 - beta_2)
    elif update_v == "yogi":
        v.sub_((1.0 - beta_2) * square * torch.sign(v - square))
    else:  # pragma: no cover - the three subclasses name their rule
        raise ValueError(f"unknown second-moment rule {update_v!r}")
    return eta * m / (v.sqrt() + tau)
