"""SMILE: upscale fine-tuned models of one base into a sparse mixture of low-rank experts, no data.

Every ``nn.Linear`` whose task vectors are not all zero becomes a ``SmileLinear``: the base layer
(W0, b0), one rank-k expert per fine-tuned model from the SVD of its ΔWi = Wi − W0, and a router
whose logits are the norms of the input projected on each ΔWi's first k_gate right singular
vectors. Everything else keeps the base weights (or their average); per-task heads stay per task.

The construction, usable outside federated runs (the benchmarks time it)::

    upscale_model(model, base_state, expert_states, *, k_gate=16, k=32, top_k=1,
                  svd="full", svd_niter=2, device=None, seed=0,
                  exclude=fedmerge.aggregators.merging.HEAD_PATTERN) -> UpscaleReport

``model`` holds the base weights and is modified in place (its linears are swapped);
``base_state`` is θ0 and ``expert_states`` the fine-tuned state dicts (one expert each);
``svd`` is ``"full"`` (``torch.linalg.svd``) or ``"randomized"`` (``torch.svd_lowrank`` with
``svd_niter`` power iterations and 10 oversampled columns, seeded by ``seed``); ``k = -1`` keeps
each dense ΔWi; ``k`` and ``k_gate`` are capped at min(out, in). Construction runs in float32 on
``device`` (default: where the model is). The report lists the upscaled layers, the parameter
counts before and after, and the wall time.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    StateDict,
)
from fedmerge.aggregators.fedavg import fedavg
from fedmerge.aggregators.merging import (
    GROUP_BY,
    HEAD_PATTERN,
    count_parameters,
    group_states,
    head_task,
    merged_heads,
)
from fedmerge.aggregators.params import check_value, hyperparameter
from fedmerge.aggregators.registry import register
from fedmerge.aggregators.upscaled import module_type, set_submodule

__all__ = [
    "SVD_METHODS",
    "Smile",
    "SmileLinear",
    "UpscaleReport",
    "smile_extra_parameters",
    "upscale_linear",
    "upscale_model",
]

SVD_METHODS = ("full", "randomized")
BASES = ("pretrained", "round")
NONLINEAR = ("base", "average")
OVERSAMPLE = 10


def smile_extra_parameters(
    num_experts: int, in_features: int, out_features: int, k_gate: int, k: int, bias: bool = True
) -> int:
    """Parameters one SMILE layer adds to the base linear: N·k_gate·in + N·(k·(in+out) + out)
    (k = -1: N·in·out for the dense experts; no N·out without a bias)."""
    experts = in_features * out_features if k < 0 else k * (in_features + out_features)
    return num_experts * k_gate * in_features + num_experts * (
        experts + (out_features if bias else 0)
    )


@module_type("smile_linear")
class SmileLinear(nn.Module):
    """y = W0 x + b0 + Σ_{i ∈ top_k} p̃i (Ui Si Viᵀ x + Δbi), p = softmax_i ‖Vi[:, :k_gate]ᵀ x‖.

    Routing is per token (per row of ``x``'s last dimension). All tensors are frozen parameters:
    the layer is built from task vectors, never trained.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        *,
        k_gate: int,
        k: int,
        top_k: int,
        bias: bool,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..num_experts ({num_experts})")
        self.in_features, self.out_features, self.num_experts = (
            in_features,
            out_features,
            num_experts,
        )
        self.k_gate, self.k, self.top_k = k_gate, k, top_k
        self.base = nn.Linear(in_features, out_features, bias=bias)
        self.base.requires_grad_(False)

        def frozen(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape), requires_grad=False)

        self.gate = frozen(num_experts, k_gate, in_features)
        if k > 0:
            self.expert_u = frozen(num_experts, out_features, k)  # Ui[:, :k] · diag(Si[:k])
            self.expert_v = frozen(num_experts, k, in_features)  # Vi[:, :k]ᵀ
        else:
            self.expert_w = frozen(num_experts, out_features, in_features)
        self.expert_bias = frozen(num_experts, out_features) if bias else None

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_experts": self.num_experts,
            "k_gate": self.k_gate,
            "k": self.k,
            "top_k": self.top_k,
            "bias": self.base.bias is not None,
        }

    @classmethod
    def empty(cls, config: Mapping[str, Any], shared: dict[str, Any]) -> SmileLinear:
        c = dict(config)
        return cls(c.pop("in_features"), c.pop("out_features"), c.pop("num_experts"), **c)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """softmax_i ‖Vi[:, :k_gate]ᵀ x‖ (..., N), before top-k selection."""
        proj = F.linear(x, self.gate.reshape(-1, self.in_features))
        logits = torch.linalg.vector_norm(
            proj.unflatten(-1, (self.num_experts, self.k_gate)), dim=-1
        )
        return torch.softmax(logits, dim=-1)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """p̃ (..., N): softmax of the router logits, kept on the top_k experts, renormalised."""
        probs = self._probabilities(x)
        if self.top_k < self.num_experts:
            values, index = probs.topk(self.top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, index, values)
        return probs / probs.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.base(flat)
        if self.top_k < self.num_experts:
            y = self._add_selected(y, flat)
        else:
            y = self._add_all(y, flat)
        return y.view(*x.shape[:-1], self.out_features)

    def _add_all(self, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Every expert selected (top_k = N): all experts' factors in one matmul each."""
        weights = self.routing_weights(flat)  # (T, N)
        if self.k > 0:
            hidden = F.linear(flat, self.expert_v.reshape(-1, self.in_features))
            hidden = hidden.view(-1, self.num_experts, self.k) * weights.unsqueeze(-1)
            # Σ_i (Ui Si) (p̃i Viᵀ x) over the stacked experts
            y = torch.addmm(
                y, hidden.flatten(1), self.expert_u.permute(0, 2, 1).reshape(-1, self.out_features)
            )
        else:
            out = F.linear(flat, self.expert_w.reshape(-1, self.in_features))
            y = y + torch.bmm(
                weights.unsqueeze(1), out.view(-1, self.num_experts, self.out_features)
            ).squeeze(1)
        if self.expert_bias is not None:
            y = torch.addmm(y, weights, self.expert_bias)
        return y

    def _add_selected(self, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Top-k routing: each expert runs on the tokens routed to it only (grouped by expert,
        gathered, scattered back), weighted by its renormalised probability."""
        values, index = self._probabilities(flat).topk(self.top_k, dim=-1)
        values = values / values.sum(dim=-1, keepdim=True)  # (T, top_k)
        slots = index.reshape(-1)
        order = slots.argsort(stable=True)
        tokens = order // self.top_k
        slot_weights = values.reshape(-1)[order].unsqueeze(-1)
        counts = torch.bincount(slots, minlength=self.num_experts).tolist()
        bias = self.expert_bias
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start : start + count]
            w = slot_weights[start : start + count]
            start += count
            xe = flat.index_select(0, rows)
            b = None if bias is None else bias[e]
            if self.k > 0:
                out = F.linear(F.linear(xe, self.expert_v[e]), self.expert_u[e], b)
            else:
                out = F.linear(xe, self.expert_w[e], b)
            if self.top_k > 1:  # top-1 weights are exactly 1 after renormalisation
                out = out * w
            y.index_add_(0, rows, out)
        return y


def _factors(
    delta: torch.Tensor, rank: int, svd: str, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, r), S (r,), Vᵀ (r, in) of ``delta``'s top ``rank`` singular triplets."""
    if svd == "full":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    elif svd == "randomized":
        q = min(rank + OVERSAMPLE, min(delta.shape))
        u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
        vh = v.T
    else:
        raise ValueError(f"svd={svd!r} is invalid: must be one of {', '.join(SVD_METHODS)}")
    return u[:, :rank], s[:rank], vh[:rank]


def upscale_linear(
    base: nn.Linear,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    *,
    k_gate: int,
    k: int,
    top_k: int,
    svd: str = "full",
    svd_niter: int = 2,
) -> SmileLinear:
    """A SmileLinear over ``base`` with one expert per fine-tuned (weight, bias), in float32 on
    ``base``'s device."""
    device = base.weight.device
    out_features, in_features = base.weight.shape
    rank_cap = min(out_features, in_features)
    k_eff = k if k < 0 else min(k, rank_cap)
    k_gate_eff = min(k_gate, rank_cap)
    layer = SmileLinear(
        in_features,
        out_features,
        len(weights),
        k_gate=k_gate_eff,
        k=k_eff,
        top_k=top_k,
        bias=base.bias is not None,
    ).to(device)
    w0 = base.weight.detach().float()
    with torch.no_grad():
        layer.base.weight.copy_(w0)
        if base.bias is not None:
            layer.base.bias.copy_(base.bias.detach().float())
        for i, (w, b) in enumerate(zip(weights, biases)):
            delta = w.to(device=device, dtype=torch.float32) - w0
            if base.bias is not None:
                layer.expert_bias[i] = b.to(device=device, dtype=torch.float32) - layer.base.bias
            if not bool(delta.any()):
                continue  # a zero task vector: zero expert and a zero gate (logit 0)
            u, s, vh = _factors(delta, max(k_gate_eff, k_eff), svd, svd_niter)
            layer.gate[i] = vh[:k_gate_eff]
            if k_eff > 0:
                layer.expert_u[i] = u[:, :k_eff] * s[:k_eff]
                layer.expert_v[i] = vh[:k_eff]
            else:
                layer.expert_w[i] = delta
    return layer


@dataclass
class UpscaleReport:
    """What ``upscale_model`` did."""

    layers: list[str] = field(default_factory=list)
    skipped_zero: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0


def upscale_model(
    model: nn.Module,
    base_state: Mapping[str, torch.Tensor],
    expert_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    k_gate: int = 16,
    k: int = 32,
    top_k: int = 1,
    svd: str = "full",
    svd_niter: int = 2,
    device: torch.device | str | None = None,
    seed: int = 0,
    exclude: re.Pattern[str] | None = HEAD_PATTERN,
) -> UpscaleReport:
    """Swap every nn.Linear of ``model`` with non-zero task vectors for a SmileLinear (see the
    module docstring). Linears whose names match ``exclude`` (per-task heads) are left alone."""
    if not expert_states:
        raise ValueError("upscale_model needs at least one fine-tuned state (expert)")
    for key, value in (
        ("k_gate", k_gate),
        ("k", k),
        ("top_k", top_k),
        ("svd", svd),
        ("svd_niter", svd_niter),
    ):
        check_value("upscale_model", Smile.Params, key, value)
    if not 1 <= top_k <= len(expert_states):
        raise ValueError(
            f"top_k={top_k} must be in 1..{len(expert_states)} (the number of experts)"
        )
    started = time.perf_counter()
    if device is not None:
        model.to(device)
    model.float()
    report = UpscaleReport(params_before=count_parameters(model))
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and f"{name}.weight" in base_state  # not a layer LoRA keeps frozen
        and not (exclude is not None and exclude.match(name + "."))
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, linear in linears:
            w0 = base_state[f"{name}.weight"].to(linear.weight.device, torch.float32)
            weights = [s[f"{name}.weight"] for s in expert_states]
            biases = [s.get(f"{name}.bias") for s in expert_states]
            changed = any(bool((w.to(w0.device, torch.float32) != w0).any()) for w in weights)
            if linear.bias is not None:
                # A bias the states do not carry is frozen (LoRA): the model's own, every expert's.
                frozen = linear.bias.detach().clone()
                b0 = base_state.get(f"{name}.bias", frozen).to(w0.device, torch.float32)
                biases = [frozen if b is None else b for b in biases]
                changed = changed or any(
                    bool((b.to(w0.device, torch.float32) != b0).any()) for b in biases
                )
            if not changed:
                report.skipped_zero.append(name)
                continue
            with torch.no_grad():  # the swapped layer's base is θ0, whatever the model held
                linear.weight.copy_(w0)
                if linear.bias is not None:
                    linear.bias.copy_(b0)
            set_submodule(
                model,
                name,
                upscale_linear(
                    linear,
                    weights,
                    biases,
                    k_gate=k_gate,
                    k=k,
                    top_k=top_k,
                    svd=svd,
                    svd_niter=svd_niter,
                ),
            )
            report.layers.append(name)
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - started
    return report


@register()
class Smile(Aggregator):
    """SMILE, zero-shot sparse mixture of low-rank experts, as the server's served model.

    Tang, Shen, Du, Yang, Tao, Wang, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts
    Construction From Pre-Trained Foundation Models", arXiv 2408.10174,
    https://arxiv.org/abs/2408.10174.

    Each round the clients' models (one expert per client, or per task with ``group_by = "task"``)
    are upscaled into a MoE over ``base``: ``"pretrained"`` (θ0, the paper's setting; with
    ``num_rounds = 1`` the clients fine-tune θ0) or ``"round"`` (the model broadcast this round;
    experts are the clients' local updates). The MoE is the served (evaluated, saved) model; the
    broadcast model for the next round is the FedAvg of the clients. Non-linear parameters
    (norms, embeddings, convolutions) come from ``base`` or, with ``nonlinear = "average"``, from
    that FedAvg; per-task heads are each task's clients' mean. Construction runs in float32 on the
    aggregator actor's device. Hyperparameters: ``k_gate`` (router rank), ``k`` (expert rank,
    -1 = dense), ``top_k``, ``svd`` ("full" | "randomized"), ``svd_niter``.
    """

    name = "smile"
    needs = frozenset({"base_model", "model_builder"})

    @dataclass(frozen=True)
    class Params:
        k_gate: int = hyperparameter(
            16,
            "router rank: right singular vectors per expert the router "
            "projects on (capped at min(out, in))",
            ge=1,
        )
        k: int = hyperparameter(
            32, "expert rank (capped at min(out, in)); -1 = dense experts", ge=1, also=(-1,)
        )
        top_k: int = hyperparameter(
            1, "experts each token is routed to (at most the round's experts)", ge=1
        )
        base: str = hyperparameter(
            "pretrained",
            "what the experts are task vectors from: pretrained (θ0) | "
            "round (the model broadcast this round)",
            choices=BASES,
        )
        group_by: str = hyperparameter(
            "client", "one expert per client or per task", choices=GROUP_BY
        )
        nonlinear: str = hyperparameter(
            "base",
            "norms, embeddings, convolutions: base | average (the clients' FedAvg)",
            choices=NONLINEAR,
        )
        svd: str = hyperparameter(
            "full", "full (torch.linalg.svd) | randomized (torch.svd_lowrank)", choices=SVD_METHODS
        )
        svd_niter: int = hyperparameter(2, "power iterations of the randomized SVD", ge=0)

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        if ctx.build_model is None:
            raise ValueError(
                "smile needs the run's model architecture (RoundContext.build_model), "
                "which the AggregatorActor provides"
            )
        device = ctx.device
        groups = group_states(updates, self.group_by, device)
        if self.top_k > len(groups):
            raise ValueError(f"smile: top_k={self.top_k} but only {len(groups)} experts this round")
        heads = merged_heads(ctx.base_state, updates, device)
        average = fedavg(
            [u.state for u in updates], [u.num_examples for u in updates], device=device
        )
        average.update(heads)
        base_state = ctx.base_state if self.base == "pretrained" else ctx.global_state
        model = ctx.build_model()
        linear_keys = {
            f"{name}.{p}"
            for name, m in model.named_modules()
            if type(m) is nn.Linear
            for p in ("weight", "bias")
        }
        served: StateDict = {}
        for key, value in base_state.items():
            use_average = self.nonlinear == "average" and key not in linear_keys
            served[key] = average[key] if use_average or head_task(key) is not None else value
        # Under LoRA the states hold the tensors that travel only; the rest keeps its build.
        _, unexpected = model.load_state_dict(
            {k: v.to(device) for k, v in served.items()}, strict=False
        )
        if unexpected:
            raise ValueError(f"smile: state keys the model does not have: {unexpected[:3]}")
        report = upscale_model(
            model,
            base_state,
            [g.state for g in groups],
            k_gate=self.k_gate,
            k=self.k,
            top_k=self.top_k,
            svd=self.svd,
            svd_niter=self.svd_niter,
            device=device,
            seed=ctx.seed * 1_000_003 + ctx.round,
        )
        model.eval()
        one_model = report.params_before
        metrics = {
            "num_clients": float(len(updates)),
            "num_examples": float(sum(u.num_examples for u in updates)),
            "num_experts": float(len(groups)),
            "layers_upscaled": float(len(report.layers)),
            "params_model": float(one_model),
            "params_served": float(report.params_after),
            "params_ratio": report.params_after / one_model if one_model else math.nan,
            "construct_s": report.seconds,
        }
        return AggregateResult(state=average, metrics=metrics, served_model=model)
