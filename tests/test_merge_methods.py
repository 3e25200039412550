"""DARE, TSV-M, Iso-C and Iso-CTS on hand-made inputs with known results; one real run of each."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.merging import dare_generator, dare_states, drop_and_rescale, group_states
from fedmerge.aggregators.task_arithmetic import task_arithmetic
from fedmerge.aggregators.ties import ties_merge

CPU = torch.device("cpu")


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def _heads_state(shared: float, head0: float, head1: float) -> dict[str, torch.Tensor]:
    return {
        "body.weight": torch.full((2, 2), shared),
        "body.bias": torch.full((2,), shared),
        "heads.0.weight": torch.full((3, 2), head0),
        "heads.1.weight": torch.full((2, 2), head1),
    }


def _updates() -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    base = _heads_state(0.0, 0.0, 0.0)
    # two clients of task 0 (different sizes), one of task 1; each trained only its own head
    updates = [
        ClientUpdate(0, _heads_state(1.0, 2.0, 0.0), 10, {"task_id": 0.0}),
        ClientUpdate(1, _heads_state(4.0, 5.0, 0.0), 30, {"task_id": 0.0}),
        ClientUpdate(2, _heads_state(-2.0, 0.0, 8.0), 20, {"task_id": 1.0}),
    ]
    return base, updates


# ---- DARE ---------------------------------------------------------------------------------------


def test_dare_at_zero_is_the_identity_and_leaves_merges_bit_for_bit() -> None:
    tau = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert drop_and_rescale(tau, 0.0, dare_generator(1, 1, (0,))) is tau
    base, updates = _updates()
    groups = group_states(updates, "task", CPU)
    states, metrics = dare_states(base, groups, 0.0, seed=3, round_=1)
    assert metrics == {} and all(s is g.state for s, g in zip(states, groups))
    ctx = RoundContext(round=1, global_state=base, base_state=base, seed=3)
    for name in ("task_arithmetic", "ties"):
        plain = create_aggregator(name, {}).aggregate(ctx, updates)
        off = create_aggregator(name, {"dare": 0.0}).aggregate(ctx, updates)
        assert plain.metrics == off.metrics and "dare_kept" not in off.metrics
        assert all(torch.equal(plain.state[k], off.state[k]) for k in base)


def test_dare_keeps_each_entry_rescaled_and_its_mean_over_seeds_is_the_input() -> None:
    tau = torch.linspace(-2.0, 3.0, 60).reshape(6, 10)
    p, draws = 0.6, 3000
    total = torch.zeros_like(tau)
    kept = 0
    for seed in range(draws):
        out = drop_and_rescale(tau, p, dare_generator(seed, 1, (0,)))
        dropped = out == 0
        # every entry is either dropped or the input over 1 - p, exactly
        torch.testing.assert_close(out[~dropped], tau[~dropped] / (1 - p), rtol=0, atol=0)
        kept += int((~dropped).sum())
        total += out
    assert abs(kept / (draws * tau.numel()) - (1 - p)) < 0.01
    # per entry, std of the mean = |τ| sqrt(p / (1 - p) / draws) < 0.023 |τ|: 5 sigma
    assert ((total / draws - tau).abs() <= 0.12 * tau.abs() + 1e-6).all()


def test_dare_masks_follow_the_seed_the_round_and_the_model() -> None:
    tau = torch.ones(40, 40)

    def mask(seed: int, round_: int, clients: tuple[int, ...]) -> torch.Tensor:
        return drop_and_rescale(tau, 0.5, dare_generator(seed, round_, clients)) != 0

    assert torch.equal(mask(3, 2, (0, 1)), mask(3, 2, (0, 1)))
    for other in [(4, 2, (0, 1)), (3, 1, (0, 1)), (3, 2, (0,)), (3, 2, (1, 0)), (3, 2, (0, 1, 0))]:
        assert not torch.equal(mask(3, 2, (0, 1)), mask(*other)), other


def test_dare_in_a_round_is_reproducible_and_spares_heads_and_integer_keys() -> None:
    base, updates = _updates()
    base = {**base, "steps": torch.tensor(3)}
    updates = [
        ClientUpdate(u.client_id, {**u.state, "steps": torch.tensor(9)}, u.num_examples, u.metrics)
        for u in updates
    ]
    agg = create_aggregator("task_arithmetic", {"lam": 1.0, "dare": 0.5})
    ctx = RoundContext(round=2, global_state=base, base_state=base, seed=5)
    a, b = agg.aggregate(ctx, updates), agg.aggregate(ctx, updates)
    assert all(torch.equal(a.state[k], b.state[k]) for k in base)
    other = agg.aggregate(
        RoundContext(round=3, global_state=base, base_state=base, seed=5), updates
    )
    assert not torch.equal(a.state["body.weight"], other.state["body.weight"])
    assert 0 < a.metrics["dare_kept"] < 1
    # the task models' body entries are 3.25 (task 0) and -2; kept ones doubled, summed (λ = 1)
    allowed = {0.0, 6.5, -4.0, 2.5}
    assert {float(v) for v in a.state["body.weight"].flatten()} <= allowed
    torch.testing.assert_close(a.state["heads.0.weight"], torch.full((3, 2), 4.25))
    torch.testing.assert_close(a.state["heads.1.weight"], torch.full((2, 2), 8.0))
    assert a.state["steps"].item() == 3


def test_dare_ties_with_one_untrimmed_model_is_dare_task_arithmetic() -> None:
    """The same model, seed and round give the same mask in both methods; with nothing trimmed
    and one model TIES's merged vector is that model's (dropped) task vector."""
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}
    update = ClientUpdate(4, {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, 5)
    ctx = RoundContext(round=1, global_state=base, base_state=base, seed=11)
    ta = create_aggregator("task_arithmetic", {"lam": 0.7, "dare": 0.3}).aggregate(ctx, [update])
    ties = create_aggregator("ties", {"lam": 0.7, "keep": 1.0, "dare": 0.3}).aggregate(
        ctx, [update]
    )
    for key in base:
        torch.testing.assert_close(ta.state[key], ties.state[key])
    assert ta.metrics["dare_kept"] == ties.metrics["dare_kept"]
    assert not torch.equal(ta.state["w"], task_arithmetic(base, [update.state], lam=0.7)["w"])
    assert not torch.equal(ties.state["w"], ties_merge(base, [update.state], lam=0.7, keep=1)["w"])


@pytest.mark.parametrize("name", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("value", [1.0, -0.1])
def test_a_drop_rate_outside_its_range_is_named(name: str, value: float) -> None:
    with pytest.raises(
        ValueError, match=f"dare={value!r} is invalid: must be a number in \\[0, 1\\)"
    ):
        create_aggregator(name, {"dare": value})
    with pytest.raises(ValueError, match="dare: drop rate p=1.0"):
        drop_and_rescale(torch.ones(3), 1.0, dare_generator(0, 0, (0,)))
