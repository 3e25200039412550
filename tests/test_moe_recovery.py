"""The served (upscaled) model survives a real ``ray.kill`` of the aggregator actor.

SMILE on the digits MLP through real ``AggregatorActor`` processes and the driver's
``RoundAggregation``: the actor is killed mid-round, between rounds and after the last round, and
the served model the evaluator would score and the run would save must be, weight for weight,
the one of an actor never killed. (Before the served model was kept by the driver, a restarted
actor answered None and the evaluator silently scored the broadcast weights instead.)
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch

from fedmerge.aggregators import create_aggregator
from fedmerge.clients.tasks import get_task
from fedmerge.federation.actors import AggregatorActor
from fedmerge.federation.recovery import ActorGuard, RoundAggregation, RoundState

from .conftest import SAFETY_NET_S
from .conftest import kill_actor as kill

pytestmark = pytest.mark.slow

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

SMILE = {"k_gate": 4, "k": 8, "top_k": 2, "base": "round"}


@pytest.fixture(scope="module", autouse=True)
def _driver(attached_ray):
    """Every test here runs against the session's shared local Ray."""


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: v.numpy().copy() for k, v in get_task("digits").build_model().state_dict().items()}


def run_rounds(
    base: dict[str, np.ndarray], kill_at: frozenset[tuple[int, int]] = frozenset(), rounds: int = 2
):
    """Each round's served model (spec, weights) as the driver holds it after the round and
    after any kill; ``kill_at`` holds (round, reply): kill after that reply, reply -1 after the merge."""
    actor = AggregatorActor.options(num_cpus=0, max_restarts=2).remote(
        create_aggregator("smile", SMILE), base, 0, task_name="digits"
    )
    guard = ActorGuard("aggregator", max_restarts=2, timeout=SAFETY_NET_S)
    aggregation = RoundAggregation(actor, RoundState(0, base, {}), guard)
    served = []
    for r in range(1, rounds + 1):
        aggregation.begin_round(r)
        rng = np.random.default_rng(r)
        for i in range(3):
            arrays = {
                k: (v + 0.1 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()
            }
            aggregation.accumulate(i, arrays, 10 + i, {})
            if (r, i) in kill_at:
                ray.get(aggregation._pending[-1])
                kill(actor)
        aggregation.finalize()
        if (r, -1) in kill_at:
            kill(actor, until_restarted=True)
        served.append(ray.get(aggregation.served, timeout=SAFETY_NET_S))
    ray.kill(actor, no_restart=True)
    return served, guard.restarts


def assert_same_served(a, b) -> None:
    assert a is not None and b is not None
    assert a[0] == b[0]  # structure, task, parameter count
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert np.array_equal(a[1][key], b[1][key]), key


@pytest.fixture(scope="module")
def unkilled(base):
    served, restarts = run_rounds(base)
    assert restarts == 0 and all(s is not None for s in served)
    assert any(
        not np.array_equal(served[0][1][k], served[1][1][k]) for k in served[0][1]
    )  # rounds differ
    return served


@pytest.mark.parametrize(
    "kill_at, restarts",
    [({(2, 1)}, 1), ({(1, -1), (2, -1)}, 1)],
    ids=["mid-round", "between rounds and after the last"],
)
def test_served_model_survives_an_aggregator_restart(base, unkilled, kill_at, restarts):
    served, seen = run_rounds(base, kill_at=frozenset(kill_at))
    for got, expected in zip(served, unkilled):
        assert_same_served(got, expected)
    # The kill after the last round meets no further call to the actor (no restart is seen), yet
    # the served model still comes back: the driver holds it.
    assert seen == restarts
