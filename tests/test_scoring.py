"""The validation scorer: scores from its Ray actors equal in-process scores, in the order given,
and its actor pool is built once and survives a killed actor."""

from __future__ import annotations

import torch

from fedmerge.clients.tasks import get_task
from fedmerge.clients.training import get_state
from fedmerge.federation.scoring import ValidationScorer, hold_out


def _states(task, n: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = get_state(task.build_model())
    return [{k: v + 0.05 * i * torch.randn_like(v) for k, v in base.items()} for i in range(n)]


def test_ray_scores_equal_local_scores_in_order_and_survive_a_killed_actor(attached_ray) -> None:
    ray = attached_ray
    task = get_task("digits")
    _, val = hold_out(task.load("train"), 200, seed=0)
    scorer = ValidationScorer("digits", val.x, val.y, parallel=2)
    states = _states(task, 7)
    local = [scorer.evaluate(s) for s in states]
    assert len({round(m["loss"], 6) for m in local}) == 7  # different models, so order matters
    assert scorer.evaluate_many(states) == local
    pool = list(scorer._pool)
    assert len(pool) == 2
    ray.kill(pool[0], no_restart=False)  # Ray restarts it and retries the calls it missed
    assert scorer.evaluate_many(states[::-1]) == local[::-1]
    assert scorer._pool == pool
