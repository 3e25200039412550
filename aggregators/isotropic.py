"""Isotropic merging: Iso-C and Iso-CTS flatten the spectrum of the merged task vector."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
from fedmerge.aggregators.tsv import numerical_rank, orthogonal_factor

__all__ = ["IsoC", "IsoCTS", "iso_c_merge", "iso_cts_merge", "subspace_sizes"]


def _iso_c_matrix(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    r = numerical_rank(s, taus[0].shape)
    if r == 0:
        return torch.zeros_like(taus[0])
    return s[:r].mean() * (u[:, :r] @ vh[:r])


def subspace_sizes(k: int, num_models: int, common_fraction: float) -> tuple[int, int]:
    """(size of the common subspace, directions per task) of a layer of rank ``k`` for T models.

    As in the paper's code: the common space starts at ⌊``common_fraction`` · k⌋ and the rest is
    split evenly, n = round((k − common) / T) per task, the common space taking what rounding
    leaves (k − T · n); n is lowered to ⌊k / T⌋ where rounding up would overfill the layer.
    """
    common = int(k * common_fraction)
    per_task = round((k - common) / num_models)
    if per_task * num_models > k:
        per_task = k // num_models
    return k - per_task * num_models, per_task


def _iso_cts_matrix(taus: Sequence[torch.Tensor], common_fraction: float) -> torch.Tensor:
    total = torch.stack(taus).sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    rank = numerical_rank(s, total.shape)
    if rank == 0:
        return torch.zeros_like(total)
    common, per_task = subspace_sizes(s.numel(), len(taus), common_fraction)
    common = min(common, rank)
    u_common = u[:, :common]
    us, sigmas, vs = [u_common], [s[:common]], [vh[:common].T]
    for tau in taus:
        specific = tau - u_common @ (u_common.T @ tau)  # τ without its part in the common space
        ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
        # zero against the merged update's scale: what the common space left is rounding only
        r = min(per_task, numerical_rank(st, tau.shape, scale=s[0]))
        us.append(ut[:, :r])
        sigmas.append(st[:r])
        vs.append(vht[:r].T)
    u_perp = orthogonal_factor(torch.cat(us, dim=1))
    v_perp = orthogonal_factor(torch.cat(vs, dim=1))
    return torch.cat(sigmas).mean() * (u_perp @ v_perp.T)


def _merge(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    alpha: float,
    matrix: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    who: str,
) -> StateDict:
    if not states:
        raise ValueError(f"{who}: no fine-tuned states to merge")
    out: StateDict = {}
    for key, theta0 in base.items():
        if not theta0.is_floating_point():
            out[key] = theta0
            continue
        base32 = theta0.float()
        taus = [state[key].to(base32.device, torch.float32) - base32 for state in states]
        delta = matrix(taus) if theta0.dim() == 2 else torch.stack(taus).mean(dim=0)
        out[key] = (base32 + alpha * delta).to(theta0.dtype)
    return out


def iso_c_merge(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    alpha: float,
) -> StateDict:
    """θ0 + α Δ over the floating keys of ``base`` (computed in float32, cast back).

    On a 2-D key, Δ = σ̄ U Vᵀ from the thin SVD U Σ Vᵀ of the summed task vector Σi τi: the same
    singular vectors, every singular value replaced by their mean σ̄. Only the r non-zero ones
    count (r the sum's rank; the paper's code averages all min(m, n), the same number for the
    full-rank sums of real fine-tunes, and adds arbitrary null-space vectors otherwise). Other
    floating keys take the mean task vector, as the paper's code does; integer keys the base.
    """
    return _merge(base, states, alpha, _iso_c_matrix, "iso_c_merge")


def iso_cts_merge(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    alpha: float,
    common_fraction: float,
) -> StateDict:
    """θ0 + α Δ over the floating keys of ``base`` (computed in float32, cast back).

    On a 2-D key of rank k: the common subspace is the top singular triples of the summed task
    vector (``subspace_sizes``: about ``common_fraction`` · k of them); each task adds the top n
    singular triples of its task vector with the common left subspace projected out,
    τi − Uc Ucᵀ τi. The concatenated left and right singular vectors are replaced by their
    orthogonal polar factors U⊥, V⊥ and Δ = σ̄ U⊥ V⊥ᵀ, σ̄ the mean of all the singular values
    selected. Triples of zero singular value are left out (their vectors are arbitrary), so
    ``common_fraction`` = 1 is Iso-C. Other floating keys take the mean task vector.
    """

    def matrix(taus: Sequence[torch.Tensor]) -> torch.Tensor:
        return _iso_cts_matrix(taus, common_fraction)

    return _merge(base, states, alpha, matrix, "iso_cts_merge")


class _Isotropic(Aggregator):
    """What Iso-C and Iso-CTS share: one model per task, per-task heads, the merge's metrics."""

    needs = frozenset({"base_model"})

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def _merge_shared(
        self, shared: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]
    ) -> StateDict:
        raise NotImplementedError

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return merge_per_task(ctx, updates, self._merge_shared, group_by=self.group_by)


@register()
class IsoC(_Isotropic):
    """Iso-C: θ = θ0 + α σ̄ U Vᵀ per 2-D weight, the summed task vector made isotropic.

    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
    Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025,
    https://arxiv.org/abs/2502.04959.

    Task arithmetic's sum has a few dominant singular directions; Iso-C keeps its singular
    vectors and gives all of them the mean singular value (``iso_c_merge``). ``alpha`` = 1.0
    (the reference code's default; the paper picks α on held-out data). ``group_by = "task"``
    merges one model per task and per-task heads are each task's clients' mean. The merged model
    is both broadcast and served.
    """

    name = "iso_c"

    @dataclass(frozen=True)
    class Params:
        alpha: float = hyperparameter(1.0, "scale α of the isotropic merged task vector")
        group_by: str = hyperparameter(
            "task", "one model per task (its clients averaged) or one per client", choices=GROUP_BY
        )

    def _merge_shared(
        self, shared: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]
    ) -> StateDict:
        return iso_c_merge(shared, states, alpha=self.alpha)


@register()
class IsoCTS(_Isotropic):
    """Iso-CTS: Iso-C's common subspace plus task-specific subspaces, then isotropic.

    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
    Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025,
    https://arxiv.org/abs/2502.04959.

    Per 2-D weight, the summed task vector's top directions (``common_fraction`` = 0.8 of the
    rank, the paper's) are completed by each task's top directions outside them, the whole set
    orthogonalised and given one singular value, the mean (``iso_cts_merge``). ``alpha`` = 1.0
    (the reference code's default; the paper picks α on held-out data). ``group_by = "task"``
    merges one model per task and per-task heads are each task's clients' mean. The merged model
    is both broadcast and served.
    """

    name = "iso_cts"

    @dataclass(frozen=True)
    class Params:
        alpha: float = hyperparameter(1.0, "scale α of the isotropic merged task vector")
        common_fraction: float = hyperparameter(
            0.8, "share of each 2-D weight's rank given to the common subspace", ge=0, le=1
        )
        group_by: str = hyperparameter(
            "task", "one model per task (its clients averaged) or one per client", choices=GROUP_BY
        )

    def _merge_shared(
        self, shared: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]
    ) -> StateDict:
        return iso_cts_merge(shared, states, alpha=self.alpha, common_fraction=self.common_fraction)
