"""FedDRL's per-model features: what the agents see of each client model in a round.

Every feature is relative to the round's median (accuracy, update norm and direction, example
count), so it means the same in every round whatever the model's scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedmerge.aggregators.base import ClientUpdate, checked_num_examples
from fedmerge.aggregators.median import coordinate_median

__all__ = ["FEATURES", "LOG_CLIP", "client_features"]

FEATURES = (
    "val_accuracy",
    "val_accuracy_vs_median",
    "log_val_loss",
    "log_update_norm_ratio",
    "cosine_to_median_update",
    "log_count_ratio",
)
LOG_CLIP = 5.0  # log-ratio features are clipped to [-5, 5]: e^5 = 148 times the median is "huge"


def _delta(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return torch.cat(
        [
            (state[k].detach().double().cpu() - reference[k].detach().double().cpu()).reshape(-1)
            for k in reference
            if reference[k].is_floating_point()
        ]
    )


def client_features(
    updates: Sequence[ClientUpdate],
    global_state: Mapping[str, torch.Tensor],
    scores: Sequence[Mapping[str, float]],
) -> torch.Tensor:
    """One row of ``FEATURES`` per update (float32, shape N × 6).

    ``scores`` are the models' validation metrics (``accuracy``, ``loss``). Norms, similarities
    and counts are relative to the round's median, so the features mean the same in every round
    whatever the model's scale: accuracy and accuracy minus the round's median accuracy;
    log(1 + loss); log(‖θi − θt‖ / median norm); cosine of θi − θt with the coordinate-wise
    median update; log(ni / median n).
    """
    if len(scores) != len(updates):
        raise ValueError(f"client_features: {len(updates)} updates but {len(scores)} scores")
    deltas = [_delta(u.state, global_state) for u in updates]
    median_delta = torch.cat(
        [v.reshape(-1) for v in coordinate_median([{"d": d} for d in deltas]).values()]
    )
    norms = torch.stack([d.norm() for d in deltas])
    median_norm = float(norms.median()) or 1e-12
    counts = torch.tensor([float(checked_num_examples(u)) for u in updates], dtype=torch.float64)
    median_count = float(counts.median())
    accuracy = torch.tensor([float(s["accuracy"]) for s in scores], dtype=torch.float64)
    loss = torch.tensor([float(s["loss"]) for s in scores], dtype=torch.float64)
    median_norm_d = float(median_delta.norm())
    cosines = torch.stack(
        [
            torch.dot(d, median_delta) / (d.norm() * median_norm_d)
            if float(d.norm()) > 0 and median_norm_d > 0
            else torch.zeros((), dtype=torch.float64)
            for d in deltas
        ]
    )
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, 1e6))
    rows = torch.stack(
        [
            accuracy,
            accuracy - accuracy.median(),
            torch.log1p(loss.clamp(min=0, max=1e6)),
            torch.log(norms.clamp(min=1e-12) / median_norm).clamp(-LOG_CLIP, LOG_CLIP),
            cosines,
            torch.log(counts / median_count).clamp(-LOG_CLIP, LOG_CLIP),
        ],
        dim=1,
    )
    return rows.float()
