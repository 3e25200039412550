"""Detection metrics of robust aggregators: which clients a round dropped, against the ground truth.

A robust aggregator that keeps some of a round's clients and drops the others (Krum, FedDRL)
reports how well its drops match the simulated attack's malicious clients
(``RoundContext.malicious``). The ground truth is used here, for metrics only.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

__all__ = ["detection_metrics", "weight_entropy"]


def detection_metrics(
    client_ids: Sequence[int], kept: Collection[int], malicious: Collection[int]
) -> dict[str, float]:
    """``clients_dropped``, ``malicious_sampled``, ``malicious_dropped`` and, when defined,
    ``detection_precision`` (dropped clients that are malicious / dropped; needs a drop) and
    ``detection_recall`` (malicious clients dropped / malicious sampled; needs one sampled)."""
    ids = list(client_ids)
    unknown = sorted(set(kept) - set(ids))
    if unknown:
        raise ValueError(f"kept client {unknown[0]} is not one of the round's clients {ids}")
    dropped = [i for i in ids if i not in set(kept)]
    bad = [i for i in ids if i in set(malicious)]
    caught = [i for i in dropped if i in set(malicious)]
    out = {
        "clients_dropped": float(len(dropped)),
        "malicious_sampled": float(len(bad)),
        "malicious_dropped": float(len(caught)),
    }
    if dropped:
        out["detection_precision"] = len(caught) / len(dropped)
    if bad:
        out["detection_recall"] = len(caught) / len(bad)
    return out


def weight_entropy(weights: Sequence[float]) -> float:
    """Shannon entropy (nats) of the normalised weights; log(n) for n equal weights, 0 for one."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return max(0.0, -sum((w / total) * math.log(w / total) for w in weights if w > 0))
