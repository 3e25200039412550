"""TSV-M: merge the task vectors' top singular vectors after decorrelating them across tasks."""

from __future__ import annotations

import math
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
from fedmerge.aggregators.merging import (
    GROUP_BY,
    merge_per_task,
)
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["TaskSingularVectors", "kept_rank", "numerical_rank", "orthogonal_factor", "tsv_merge"]


def numerical_rank(s: torch.Tensor, shape: Sequence[int], scale: torch.Tensor | None = None) -> int:
    """How many of the descending singular values ``s`` of a matrix of ``shape`` are not zero up
    to rounding: above max(shape) · eps · ``scale`` (default the largest of ``s``), the tolerance
    of ``torch.linalg.matrix_rank``."""
    if s.numel() == 0:
        return 0
    top = s[0] if scale is None else scale
    tol = top * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def orthogonal_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of ``a`` (m × p): the partial isometry U Vᵀ of its thin SVD,
    the matrix with orthonormal columns (rows, when p > m) nearest to ``a``.

    Only the singular triples of non-zero singular values enter, so the factor is unique even
    when ``a`` is rank-deficient (the same singular vectors taken by two tasks); a plain
    ``U @ Vh`` would add the arbitrary null-space vectors the SVD routine happens to return.
    """
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = numerical_rank(s, a.shape)
    return u[:, :r] @ vh[:r]


def kept_rank(k: int, num_models: int, share: float | None) -> int:
    """How many singular triples each task keeps of a layer of rank ``k``: ⌊``share`` · k⌋, or
    ⌊k / T⌋ for T models when ``share`` is None (the paper's 1/T), at least 1."""
    if share is None:
        return max(1, k // num_models)
    return max(1, math.floor(share * k))


def _tsv_matrix(taus: Sequence[torch.Tensor], share: float | None) -> torch.Tensor:
    us, sigmas, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        r = min(kept_rank(s.numel(), len(taus), share), numerical_rank(s, tau.shape))
        us.append(u[:, :r])
        sigmas.append(s[:r])
        vs.append(vh[:r].T)
    u_perp = orthogonal_factor(torch.cat(us, dim=1))
    v_perp = orthogonal_factor(torch.cat(vs, dim=1))
    return (u_perp * torch.cat(sigmas)) @ v_perp.T


def tsv_merge(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    alpha: float,
    share: float | None = None,
) -> StateDict:
    """θ0 + α Δ over the floating keys of ``base`` (computed in float32, cast back).

    On a 2-D key each task vector τi = θi − θ0 keeps its top r singular triples (r = ⌊k / T⌋ of
    its rank k = min(m, n) for T models, or ⌊``share`` · k⌋; triples of zero singular value are
    left out, their vectors being arbitrary); the kept U's and V's are concatenated across tasks
    and replaced by their orthogonal polar factors U⊥, V⊥ (decorrelating the tasks' subspaces), and
    Δ = U⊥ Σ V⊥ᵀ with Σ the kept singular values. Other floating keys (biases, norms, and tensors
    of more than two dimensions, such as convolution kernels) take the mean task vector, as the
    paper's code does. Integer keys keep the base value.
    """
    if not states:
        raise ValueError("tsv_merge: no fine-tuned states to merge")
    out: StateDict = {}
    for key, theta0 in base.items():
        if not theta0.is_floating_point():
            out[key] = theta0
            continue
        base32 = theta0.float()
        taus = [state[key].to(base32.device, torch.float32) - base32 for state in states]
        if theta0.dim() == 2:
            delta = _tsv_matrix(taus, share)
        else:
            delta = torch.stack(taus).mean(dim=0)
        out[key] = (base32 + alpha * delta).to(theta0.dtype)
    return out


@register()
class TaskSingularVectors(Aggregator):
    """TSV-M: θ = θ0 + α Δ, Δ the task vectors' top singular vectors decorrelated across tasks.

    Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular Vectors:
    Reducing Task Interference in Model Merging", CVPR 2025, https://arxiv.org/abs/2412.00081.

    Per 2-D weight, each model keeps ``share`` of its rank (default 1/T of T models), and the
    concatenated singular vectors are orthogonalised before Δ = U⊥ Σ V⊥ᵀ is rebuilt; biases and
    norms take the mean task vector (``tsv_merge``). ``alpha`` = 1.0 (no extra scaling, the
    reference code's default). As in task arithmetic, ``group_by = "task"`` merges one model per
    task and per-task heads are each task's clients' mean. The merged model is both broadcast and
    served.
    """

    name = "tsv_m"
    needs = frozenset({"base_model"})

    @dataclass(frozen=True)
    class Params:
        alpha: float = hyperparameter(1.0, "scale α of the merged task vector, θ0 + α Δ")
        share: float | None = hyperparameter(
            None, "share of each task vector's rank kept per 2-D weight; None = 1/T", gt=0, le=1
        )
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
            lambda shared, states: tsv_merge(shared, states, alpha=self.alpha, share=self.share),
            group_by=self.group_by,
        )
