"""Round snapshots: a restarted aggregator actor resumes from a snapshot of the round instead of a
replay of every reply, so the driver's memory stays flat in the number of clients.

The in-process tests check the ``round_state`` / ``load_round_state`` contract bit for bit (FedAvg
with either accumulator, FedProx, WSA) through the same NumPy conversion and pickling the actor
and Ray apply; the slow ones run real ``AggregatorActor`` processes, kill one after a snapshot,
and count the replies the driver keeps as rounds grow. FedAvg's float32 accumulator is checked
against the float64 mean and its documented error bound.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from fedmerge.aggregators import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    create_aggregator,
)
from fedmerge.aggregators.fedavg import FedAvg
from fedmerge.federation.actors import _numpy_to_tensors, _tensors_to_numpy

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

BASE = {
    "w": np.zeros((6, 5), np.float32),
    "b": np.zeros(5, np.float32),
    "steps": np.array(0, np.int64),
}


def replies(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.normal(size=(6, 5)).astype(np.float32),
            "b": rng.normal(size=5).astype(np.float32),
            "steps": np.array(rng.integers(0, 100), np.int64),
        }
        for _ in range(count)
    ]


def torch_state(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def context() -> RoundContext:
    state = torch_state(BASE)
    return RoundContext(round=1, global_state=state, base_state=state)


def through_ray(snapshot):
    """What the driver gets back and later hands to a restarted actor: NumPy arrays, pickled."""
    return _numpy_to_tensors(pickle.loads(pickle.dumps(_tensors_to_numpy(snapshot))))


def run(
    aggregator: Aggregator, updates: Sequence[dict[str, np.ndarray]], *, cut: int | None = None
) -> AggregateResult:
    """One round; with ``cut``, a snapshot after ``cut`` replies goes to a fresh copy of the
    aggregator (as to a restarted actor), which merges the rest."""
    fresh = pickle.loads(pickle.dumps(aggregator))
    aggregator.begin_round(context())
    for i, arrays in enumerate(updates):
        if i == cut:
            snapshot = through_ray(aggregator.round_state())
            aggregator = fresh
            aggregator.begin_round(context())
            aggregator.load_round_state(snapshot)
        aggregator.accumulate(
            ClientUpdate(
                client_id=i,
                state=torch_state(arrays),
                num_examples=10 + 7 * i,
                metrics={"train_loss": 0.5},
            )
        )
    return aggregator.finalize()


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key


AGGREGATORS = [
    ("fedavg", {}),
    ("fedavg", {"accumulator": "float32"}),
    ("fedprox", {"mu": 0.1}),
    ("wsa", {"lam": 0.1}),
]


@pytest.mark.parametrize(("name", "params"), AGGREGATORS)
@pytest.mark.parametrize("cut", [1, 4, 6])
def test_a_round_resumed_from_a_snapshot_is_bit_for_bit_the_uninterrupted_one(name, params, cut):
    updates = replies(7)
    whole = run(create_aggregator(name, params), updates)
    resumed = run(create_aggregator(name, params), updates, cut=cut)
    assert_bitwise_equal(whole.state, resumed.state)
    assert whole.metrics == resumed.metrics
    assert resumed.metrics["num_clients"] == 7


def test_a_snapshot_is_a_copy_once_serialised():
    """The live sums go on changing after a snapshot; the serialised snapshot does not."""
    updates = replies(4)
    aggregator = FedAvg()
    aggregator.begin_round(context())
    for i, arrays in enumerate(updates[:2]):
        aggregator.accumulate(ClientUpdate(client_id=i, state=torch_state(arrays), num_examples=3))
    snapshot = through_ray(aggregator.round_state())
    before = {k: v.clone() for k, v in snapshot["sums"].items()}
    aggregator.accumulate(ClientUpdate(client_id=2, state=torch_state(updates[2]), num_examples=3))
    assert all(torch.equal(before[k], snapshot["sums"][k]) for k in before)
    assert snapshot["count"] == 2 and snapshot["total"] == 6


def test_a_foreign_or_broken_snapshot_is_refused_clearly():
    source = FedAvg()
    source.begin_round(context())
    source.accumulate(ClientUpdate(client_id=0, state=torch_state(replies(1)[0]), num_examples=3))
    snapshot = through_ray(source.round_state())
    other = FedAvg(accumulator="float32")
    other.begin_round(context())
    with pytest.raises(ValueError, match="summed in float64, this FedAvg sums in float32"):
        other.load_round_state(snapshot)
    target = FedAvg()
    target.begin_round(context())
    with pytest.raises(ValueError, match="round state has the keys"):
        target.load_round_state({"sums": {}})
    with pytest.raises(ValueError, match="the sum of 'w' is torch.float32, expected torch.float64"):
        target.load_round_state(
            {**snapshot, "sums": {**snapshot["sums"], "w": snapshot["sums"]["w"].float()}}
        )
    target.load_round_state(snapshot)
    with pytest.raises(RuntimeError, match="only be loaded into an empty sum"):
        target.load_round_state(snapshot)
    with pytest.raises(RuntimeError, match="before begin_round"):
        FedAvg().round_state()


class KeepAll(Aggregator):
    """Merges all replies at once (a plain mean): no round state to give."""

    name = "keep_all_mean"

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return AggregateResult(
            state={
                k: torch.stack([u.state[k].double() for u in updates])
                .mean(0)
                .to(updates[0].state[k].dtype)
                for k in updates[0].state
            }
        )


def test_an_aggregator_without_round_state_says_so():
    aggregator = KeepAll()
    aggregator.begin_round(context())
    assert aggregator.round_state() is None
    with pytest.raises(NotImplementedError, match="KeepAll gives no round state"):
        aggregator.load_round_state({})


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads' barriers made this test 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_float32_accumulation_is_within_its_error_bound_and_deterministic(one_thread):
    """FedAvg(accumulator="float32") against the exact float64 mean, on 60 replies with unequal
    counts: every element within gamma * (weighted mean of |theta|), gamma = (N+1)u / (1-(N+1)u)."""
    gen = torch.Generator().manual_seed(1)
    states = [
        {
            "w": torch.randn(50_000, generator=gen) * 3 + 1,
            "h": torch.randn(300, generator=gen).half(),
        }
        for _ in range(60)
    ]
    counts = [int(c) for c in torch.randint(1, 500, (60,), generator=gen)]

    def merged(accumulator: str) -> dict[str, torch.Tensor]:
        aggregator = FedAvg(accumulator=accumulator)
        aggregator.begin_round(RoundContext(round=1, global_state={}, base_state={}))
        for i, (state, n) in enumerate(zip(states, counts)):
            aggregator.accumulate(ClientUpdate(client_id=i, state=state, num_examples=n))
        return aggregator.finalize().state

    fast, again, exact64 = merged("float32"), merged("float32"), merged("float64")
    assert_bitwise_equal(fast, again)
    u, n, total = 2.0**-24, len(states), sum(counts)
    gamma = (n + 1) * u / (1 - (n + 1) * u)
    for key in ("w", "h"):
        exact = sum(c * s[key].double() for s, c in zip(states, counts)) / total
        scale = sum(c * s[key].double().abs() for s, c in zip(states, counts)) / total
        error = (fast[key].double() - exact).abs()
        # float16 keys: also the final cast to float16 (half a float16 unit of the result)
        cast = exact.abs() * 2.0**-11 if fast[key].dtype == torch.float16 else 0.0
        assert bool((error <= gamma * scale + cast).all()), key
        assert fast[key].dtype == exact64[key].dtype == states[0][key].dtype
    # float32 summation is measurably less exact than float64 here, or the test would prove nothing
    exact = sum(c * s["w"].double() for s, c in zip(states, counts)) / total
    assert float((fast["w"].double() - exact).abs().max()) > float(
        (exact64["w"].double() - exact).abs().max()
    )


def test_the_accumulator_parameter_is_checked():
    with pytest.raises(
        ValueError, match="accumulator='float16' is invalid: must be one of float64, float32"
    ):
        create_aggregator("fedavg", {"accumulator": "float16"})


# ---- real actors ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray(attached_ray):
    return attached_ray


def actor_rounds(
    ray,
    aggregator: Aggregator,
    rounds: Sequence[Sequence[dict[str, np.ndarray]]],
    *,
    snapshot_every: int,
    kill_after: int | None = None,
):
    """Rounds through one fresh ``AggregatorActor`` (restarts allowed): (merged states,
    RoundAggregation, per round the number of replies kept after each hand-over). ``kill_after =
    i`` kills the actor in the first round once reply ``i`` was merged, after a snapshot was taken."""
    from fedmerge.federation.actors import AggregatorActor
    from fedmerge.federation.recovery import ActorGuard, RoundAggregation, RoundState
    from tests.conftest import SAFETY_NET_S
    from tests.test_reliability_actors import kill

    actor = AggregatorActor.options(num_cpus=0, max_restarts=2).remote(aggregator, BASE, 0)
    aggregation = RoundAggregation(
        actor,
        RoundState(0, BASE, {}),
        ActorGuard("aggregator", max_restarts=2, timeout=SAFETY_NET_S),
        snapshot_every=snapshot_every,
    )
    states, kept = [], []
    for server_round, updates in enumerate(rounds, start=1):
        aggregation.begin_round(server_round)
        kept.append([])
        for i, arrays in enumerate(updates):
            killing = server_round == 1 and i == kill_after
            if killing and aggregation._asked is not None:
                ray.wait(
                    [aggregation._asked[0]], timeout=SAFETY_NET_S
                )  # so that this hand-over takes the snapshot
            aggregation.accumulate(i, arrays, 10 + 7 * i, {"train_loss": 0.5})
            kept[-1].append(aggregation.num_kept)
            if killing:
                assert aggregation.snapshots >= 1, "the test needs a snapshot before the kill"
                ray.get(aggregation._pending[-1])  # the dead actor had really merged this reply
                kill(actor)
        states.append(aggregation.finalize()[1])
    ray.kill(actor)
    return states, aggregation, kept


def assert_same_bytes(arrays: dict[str, np.ndarray], tensors: dict[str, torch.Tensor]) -> None:
    assert arrays.keys() == tensors.keys()
    for key in arrays:
        assert arrays[key].tobytes() == tensors[key].numpy().tobytes(), key


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), [("fedavg", {}), ("wsa", {"lam": 0.1})])
def test_an_actor_killed_after_a_snapshot_resumes_from_it_exactly(local_ray, name, params):
    updates = replies(11, seed=4)
    states, aggregation, _ = actor_rounds(
        local_ray, create_aggregator(name, params), [updates], snapshot_every=3, kill_after=7
    )
    assert aggregation.guard.restarts == 1
    # Only the replies after the snapshot were sent again (a snapshot covers at least 3), not all 11.
    assert 0 < aggregation.replayed <= 11 - 3
    assert_same_bytes(states[0], run(create_aggregator(name, params), updates).state)


@pytest.mark.slow
def test_the_replies_kept_stay_bounded_as_the_round_grows(local_ray):
    from fedmerge.federation.recovery import MAX_IN_FLIGHT

    bound = 2 + MAX_IN_FLIGHT + 1
    rounds = [replies(count, seed=count) for count in (6, 30)]
    states, aggregation, kept = actor_rounds(local_ray, FedAvg(), rounds, snapshot_every=2)
    assert all(max(k) <= bound for k in kept), kept
    assert (
        aggregation.snapshots >= (6 + 30 - 2 * bound) // bound
    )  # each covers at most `bound` replies
    for state, updates in zip(states, rounds):  # the snapshots changed nothing in the result
        assert_same_bytes(state, run(FedAvg(), updates).state)
    # Without round state (the fallback), the round keeps every reply, as before snapshots.
    _, _, kept = actor_rounds(local_ray, KeepAll(), [replies(12)], snapshot_every=2)
    assert kept == [list(range(1, 13))]
