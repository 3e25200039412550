"""Server actors killed for real (``ray.kill``, Ray restarts them): the round is replayed into the
new actor and the result is exactly the one of an actor never killed.

A small local Ray, no Flower: the driver side (``RoundAggregation``, ``ActorGuard``) talks to real
``AggregatorActor`` / ``EvaluatorActor`` processes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import pytest
import ray
import torch

from fedmerge.aggregators import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    create_aggregator,
)
from fedmerge.clients.tasks import get_task
from fedmerge.federation.actors import ActorStateLost, AggregatorActor, EvaluatorActor
from fedmerge.federation.recovery import ActorGuard, RoundAggregation, RoundState, ServerActorError

from .conftest import SAFETY_NET_S
from .conftest import kill_actor as kill

pytestmark = pytest.mark.slow

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

BASE = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


class DriftingMean(Aggregator):
    """The mean of the clients plus a share of the drift it accumulates across rounds: its
    result depends on state kept between rounds, which a restarted actor must get back."""

    name = "drifting_mean"

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0
        self.drift: dict[str, torch.Tensor] = {}

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        mean = {k: torch.stack([u.state[k] for u in updates]).mean(dim=0) for k in updates[0].state}
        for key, value in mean.items():
            self.drift[key] = self.drift.get(key, torch.zeros_like(value)) + (
                value - ctx.global_state[key]
            )
        self.rounds += 1
        state = {k: v + 0.1 * self.drift[k] for k, v in mean.items()}
        return AggregateResult(state=state, metrics={"rounds": self.rounds})

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "drift": dict(self.drift)}

    def load_state_dict(self, state) -> None:
        self.rounds = int(state.get("rounds", 0))
        self.drift = {k: v.clone() for k, v in state.get("drift", {}).items()}


@pytest.fixture(scope="module", autouse=True)
def _driver(attached_ray):
    """Every test here runs against the session's shared local Ray."""


def client_updates(server_round: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(server_round)
    return [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in BASE.items()} for _ in range(3)
    ]


def run_rounds(
    aggregator: Aggregator,
    rounds: int = 2,
    kill_at: tuple[int, int] | None = None,
    max_restarts: int = 2,
) -> tuple[list[dict[str, np.ndarray]], list[dict], ActorGuard]:
    """Drive ``rounds`` rounds through a fresh actor; ``kill_at = (round, reply)`` kills it right
    after that reply was accumulated (reply -1: right after the round was merged)."""
    actor = AggregatorActor.options(num_cpus=0, max_restarts=max_restarts).remote(
        aggregator, BASE, 0
    )
    guard = ActorGuard("aggregator", max_restarts=max_restarts, timeout=SAFETY_NET_S)
    aggregation = RoundAggregation(actor, RoundState(0, BASE, {}), guard)
    states, metrics = [], []
    for r in range(1, rounds + 1):
        aggregation.begin_round(r)
        for i, arrays in enumerate(client_updates(r)):
            aggregation.accumulate(i, arrays, 10 + i, {"train_loss": 0.5})
            if kill_at == (r, i):
                ray.get(aggregation._pending[-1])  # the dead actor had really folded this reply in
                kill(actor)
        _, state, round_metrics = aggregation.finalize()
        round_metrics.pop("aggregate_s")
        states.append(state)
        metrics.append(round_metrics)
        if kill_at == (r, -1):
            kill(actor, until_restarted=True)
    return states, metrics, guard


def assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def unkilled():
    return run_rounds(DriftingMean())[:2]


def test_aggregator_killed_mid_round_is_replayed_exactly(unkilled):
    # FedAvg's streaming accumulator is killed the same way in a full run (test_reliability_runs).
    states, metrics, guard = run_rounds(DriftingMean(), kill_at=(2, 1))
    assert_same(states, unkilled[0])
    assert metrics == unkilled[1]
    notes = guard.take_notes()
    assert guard.restarts == 1 and len(notes) == 1
    assert re.fullmatch(
        r"aggregator actor (died|had lost its state in a restart) during the aggregation of "
        r"round 2; restored in \d+\.\d s",
        notes[0],
    ), notes


def test_aggregator_killed_between_rounds_gets_its_state_back(unkilled):
    states, metrics, guard = run_rounds(DriftingMean(), rounds=2, kill_at=(1, -1))
    assert_same(states, unkilled[0])
    assert [m["rounds"] for m in metrics] == [1, 2]  # the counter survived the restart
    assert guard.restarts == 1
    # No call failed: the new actor was caught holding the initial state instead of round 1's.
    assert guard.take_notes()[0].startswith(
        "aggregator actor had lost its state in a restart during the start of round 2"
    )


def test_stale_calls_never_reach_the_aggregator():
    actor = AggregatorActor.options(num_cpus=0).remote(create_aggregator("fedavg", {}), BASE, 0)
    ray.get(actor.begin_round.remote(1, 5, 0))
    with pytest.raises(ActorStateLost, match="attempt 4, but the open one is 5"):
        ray.get(actor.accumulate.remote(4, 0, BASE, 1, {}))
    with pytest.raises(
        ActorStateLost, match="state after round 3"
    ):  # a restarted actor holds round 0
        ray.get(actor.begin_round.remote(4, 6, 3))
    ray.kill(actor)


def test_an_actor_without_restarts_fails_the_run_clearly():
    with pytest.raises(ServerActorError, match=r"ray.aggregator.max_restarts = 0"):
        run_rounds(create_aggregator("fedavg", {}), rounds=1, kill_at=(1, 0), max_restarts=0)


def plain_class(actor_class):
    """The class a ``@ray.remote`` decorated, so that a test can subclass it (Ray keeps it as the
    ``__ray_actor_class__`` of the class it derived from it)."""
    return actor_class.__ray_metadata__.modified_class.__ray_actor_class__


class DiesInItsFirstEvaluation(plain_class(EvaluatorActor)):
    """An EvaluatorActor whose process exits in the middle of the first ``evaluate`` call it is
    ever given (across restarts: ``marker`` is created once, by that call, with its pid in it).
    The call under test is then always the one that sees the death, whatever Ray's timing, where
    a ``ray.kill`` between calls may be over, and the actor restarted, before any call notices."""

    def __init__(self, marker: str, *args) -> None:
        super().__init__(*args)
        self.marker = marker

    def evaluate(self, *args, **kwargs):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # a later call, or the restarted process: evaluate for real
            return super().evaluate(*args, **kwargs)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)  # the process dies during the call, as on a crash or an OOM kill


def test_evaluator_killed_is_restarted_and_the_evaluation_retried(tmp_path):
    task = get_task("digits")
    test = task.load("test")
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in task.build_model().state_dict().items()}
    threads = torch.get_num_threads()
    try:  # the same evaluation in this process: what the retried call must return
        expected = plain_class(EvaluatorActor)("digits", test.x, test.y, 512, 1).evaluate(state)
    finally:
        torch.set_num_threads(threads)
    expected.pop("evaluate_s")
    marker = tmp_path / "died"
    evaluator = (
        ray.remote(DiesInItsFirstEvaluation)
        .options(num_cpus=0, max_restarts=4)
        .remote(str(marker), "digits", test.x, test.y, 512, 1)
    )
    guard = ActorGuard("evaluator", max_restarts=4, timeout=SAFETY_NET_S)
    first_pid = ray.get(evaluator.placement.remote(), timeout=SAFETY_NET_S)["pid"]
    state_ref = ray.put(state)

    got = guard.call(
        "an evaluation",
        lambda: guard.get(evaluator.evaluate.remote(state_ref), "it"),
        lambda: guard.get(evaluator.placement.remote(), "its restart"),
    )
    got.pop("evaluate_s")
    assert marker.read_text() == first_pid  # the first process died inside the call
    assert got == expected
    assert guard.restarts == 1
    (note,) = guard.take_notes()
    assert re.fullmatch(
        r"evaluator actor died during an evaluation; restored in \d+\.\d s", note
    ), note
    assert ray.get(evaluator.placement.remote(), timeout=SAFETY_NET_S)["pid"] != first_pid
    ray.kill(evaluator, no_restart=True)
