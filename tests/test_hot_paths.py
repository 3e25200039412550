"""The hot paths made fast by profiling must give the results of the plain computations.

FedAvg folds float32 replies into its float64 sums a cache-sized chunk at a time and checks them
for NaN/Inf with ``aminmax``; the reply validator computes the update norm in chunks and finds
NaN/Inf on the way; a round without actor restarts lets each reply go once merged; partitions of
flwr-datasets partitioners are read in one pass instead of one ``load_partition`` per client.
Chunk sizes are shrunk here so that small tensors cross many chunk boundaries, remainders included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedmerge.aggregators.fedavg as fedavg_module
import fedmerge.federation.validation as validation
from fedmerge.aggregators import ClientUpdate, RoundContext
from fedmerge.aggregators.fedavg import FedAvg, _all_finite
from fedmerge.federation.validation import (
    UpdateRejected,
    UpdateValidator,
    squared_distance,
    update_norm,
)

from .conftest import SAFETY_NET_S


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(fedavg_module, "_CHUNK", 7)
    monkeypatch.setattr(validation, "_CHUNK", 7)


def reference_mean(states, weights):
    """sum_i w_i x_i / sum_i w_i in float64, the textbook way."""
    total = sum(weights)
    return {
        k: sum(w * s[k].to(torch.float64) for s, w in zip(states, weights)) / total
        for k in states[0]
    }


def random_states(num: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(num):
        states.append(
            {
                "w32": torch.randn(5, 9, generator=gen),  # 45 values: 6 chunks + 3
                "t32": torch.randn(9, 5, generator=gen).t(),  # not contiguous
                "h16": torch.randn(23, generator=gen).to(torch.float16),
                "b16": torch.randn(16, generator=gen).to(torch.bfloat16),
                "w64": torch.randn(11, generator=gen, dtype=torch.float64),
                "steps": torch.randint(0, 1000, (13,), generator=gen),
                "mask": torch.rand(10, generator=gen) > 0.5,
                "scalar": torch.randn((), generator=gen),
            }
        )
    return states


def test_chunked_fedavg_equals_the_float64_mean(small_chunks):
    states = random_states(4)
    weights = [3, 1, 7, 2]
    agg = FedAvg()
    agg.begin_round(RoundContext(round=1, global_state={}, base_state={}))
    for i, (state, n) in enumerate(zip(states, weights)):
        agg.accumulate(ClientUpdate(client_id=i, state=state, num_examples=n))
    result = agg.finalize().state
    expected = reference_mean(states, weights)
    for key, value in result.items():
        assert value.dtype == states[0][key].dtype, key
        assert value.shape == states[0][key].shape, key
        if value.dtype == torch.float64:  # a fused multiply-add may round the last bit differently
            torch.testing.assert_close(value, expected[key], rtol=1e-14, atol=0, msg=key)
        elif value.is_floating_point():  # float64 rounding differences vanish in the cast
            torch.testing.assert_close(
                value, expected[key].to(value.dtype), rtol=0, atol=0, msg=key
            )
        else:  # integer and bool buffers: the weighted mean rounded half to even
            assert torch.equal(value, expected[key].round().to(value.dtype)), key


@pytest.mark.parametrize("position", [0, 1, 6, 7, 8, 44])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_anywhere_is_rejected_and_nothing_is_added(small_chunks, position, bad):
    good = random_states(2, seed=1)
    agg = FedAvg()
    agg.begin_round(RoundContext(round=1, global_state={}, base_state={}))
    agg.accumulate(ClientUpdate(client_id=0, state=good[0], num_examples=2))
    poisoned = dict(good[1])
    poisoned["w32"] = good[1]["w32"].clone().view(-1)
    poisoned["w32"][position] = bad
    poisoned["w32"] = poisoned["w32"].view(5, 9)
    with pytest.raises(ValueError, match="client 1: 'w32' has non-finite values"):
        agg.accumulate(ClientUpdate(client_id=1, state=poisoned, num_examples=5))
    result = agg.finalize().state
    torch.testing.assert_close(result["w32"], good[0]["w32"], rtol=0, atol=0)


def test_all_finite_reads_every_value():
    assert _all_finite(torch.empty(0))
    assert _all_finite(torch.randn(1000))
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for position in (0, 500, 999):
            for bad in (math.nan, math.inf, -math.inf):
                x = torch.randn(1000).to(dtype)
                x[position] = bad
                assert not _all_finite(x), (dtype, position, bad)


def test_squared_distance_matches_float64_and_survives_overflow(small_chunks):
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64, np.float16):
        value = rng.normal(size=(6, 7)).astype(dtype)
        reference = rng.normal(size=(6, 7)).astype(dtype)
        exact = float(np.sum((value.astype(np.float64) - reference.astype(np.float64)) ** 2))
        assert squared_distance(value, reference) == pytest.approx(exact, rel=1e-6), dtype
    # Differences whose float32 squares overflow: the chunk is redone in float64.
    huge = np.full(20, 1e30, np.float32)
    assert squared_distance(huge, np.zeros(20, np.float32)) == pytest.approx(20 * 1e60, rel=1e-6)
    assert squared_distance(
        np.full(3, 3e38, np.float32), np.full(3, -3e38, np.float32)
    ) == pytest.approx(3 * 6e38**2, rel=1e-6)
    nan = np.zeros(20, np.float32)
    nan[13] = np.nan
    assert math.isnan(squared_distance(nan, np.zeros(20, np.float32)))
    assert squared_distance(np.zeros(0, np.float32), np.zeros(0, np.float32)) == 0.0


def test_validator_finds_nan_and_inf_while_computing_the_norm(small_chunks):
    global_state = {
        "w": np.zeros((4, 5), np.float32),
        "z": np.zeros(3, np.complex64),
        "n": np.array(3, np.int64),
    }
    validator = UpdateValidator(max_update_norm_ratio=0)  # no bound: the norm itself is under test
    validator.set_global(global_state)
    ok = {
        "w": np.full((4, 5), 0.5, np.float32),
        "z": np.ones(3, np.complex64),
        "n": np.array(4, np.int64),
    }
    assert (
        validator(0, ok, 10)
        == pytest.approx(update_norm(ok, global_state))
        == pytest.approx(math.sqrt(5))
    )
    for key, position, bad in (
        ("w", 0, np.nan),
        ("w", 19, np.inf),
        ("w", 8, -np.inf),
        ("z", 2, np.nan),
    ):
        arrays = {k: v.copy() for k, v in ok.items()}
        arrays[key].reshape(-1)[position] = bad
        with pytest.raises(UpdateRejected, match=f"{key}: contains NaN or Inf"):
            validator(0, arrays, 10)
    # A finite update whose float32 squares overflow is not mistaken for NaN/Inf.
    assert validator(0, {**ok, "w": np.full((4, 5), 1e30, np.float32)}, 10) > 1e30


class SlowMean(FedAvg):
    """FedAvg that takes its time over each reply: replies arrive faster than it merges."""

    name = "slow_mean"

    def accumulate(self, update: ClientUpdate) -> None:
        import time

        time.sleep(0.05)
        super().accumulate(update)


@pytest.mark.slow
def test_a_round_without_restarts_keeps_no_reply_and_merges_the_same(attached_ray):
    """With ``max_restarts = 0`` a reply leaves the driver once handed over (no replay is possible
    anyway), the driver never lets more than MAX_IN_FLIGHT replies queue up at a slow actor, and
    the merged model is the one of a round that keeps them for a replay."""
    import ray

    from fedmerge.federation.actors import AggregatorActor
    from fedmerge.federation.recovery import MAX_IN_FLIGHT, ActorGuard, RoundAggregation, RoundState

    base = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    rng = np.random.default_rng(3)
    replies = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(12)
    ]
    states = {}
    for restarts in (0, 2):
        actor = AggregatorActor.options(num_cpus=0, max_restarts=restarts).remote(
            SlowMean(), base, 0
        )
        aggregation = RoundAggregation(
            actor,
            RoundState(0, base, {}),
            ActorGuard("aggregator", max_restarts=restarts, timeout=SAFETY_NET_S),
        )
        assert aggregation.holds_replies == (restarts > 0)
        aggregation.begin_round(1)
        for i, arrays in enumerate(replies):
            aggregation.accumulate(i, arrays, 10 + i, {})
            _, unmerged = ray.wait(
                aggregation._pending, num_returns=len(aggregation._pending), timeout=0
            )
            assert len(unmerged) <= MAX_IN_FLIGHT  # the driver waits for a slow actor
        assert aggregation.num_accepted == len(replies)
        # With restarts, replies are kept for a replay until a snapshot covers them
        # (tests/test_round_snapshots.py); without, none is kept.
        assert (aggregation.num_kept > 0) == (restarts > 0)
        _, states[restarts], _ = aggregation.finalize()
        ray.kill(actor)
    for key in base:
        assert np.array_equal(states[0][key], states[2][key]), key


def flwr_partitioner(scheme: str, num_clients: int, seed: int):
    from flwr_datasets import partitioner

    if scheme == "iid":
        return partitioner.IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return partitioner.DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=0.3,
            min_partition_size=2,
            self_balancing=True,
            seed=seed,
        )
    return partitioner.PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=2,
        class_assignment_mode="deterministic",
        seed=seed,
    )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
@pytest.mark.parametrize("num_clients", [1, 7, 13])
def test_partitions_read_in_one_pass_equal_load_partition(scheme, num_clients):
    """The one-pass reading of a flwr-datasets partitioner gives exactly its load_partition(i)."""
    from fedmerge.clients.partition import _label_dataset, _run_flwr_partitioner

    labels = np.random.default_rng(5).integers(0, 10, 503)
    fast = _run_flwr_partitioner(
        flwr_partitioner(scheme, num_clients, 3), _label_dataset(labels, 3), num_clients
    )
    reference = flwr_partitioner(scheme, num_clients, 3)
    reference.dataset = _label_dataset(labels, 3)
    slow = [
        np.asarray(reference.load_partition(i).with_format("numpy")[:]["idx"])
        for i in range(num_clients)
    ]
    assert len(fast) == len(slow) == num_clients
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert np.array_equal(a, b), (scheme, i)
