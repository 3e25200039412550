"""DARE, TSV-M, Iso-C and Iso-CTS on hand-made inputs with known results; one real run of each."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.isotropic import iso_c_merge, iso_cts_merge, subspace_sizes
from fedmerge.aggregators.merging import dare_generator, dare_states, drop_and_rescale, group_states
from fedmerge.aggregators.task_arithmetic import task_arithmetic
from fedmerge.aggregators.ties import ties_merge
from fedmerge.aggregators.tsv import kept_rank, orthogonal_factor, tsv_merge

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


# ---- TSV-M --------------------------------------------------------------------------------------


def _low_rank(u: torch.Tensor, sigma: list[float], v: torch.Tensor) -> torch.Tensor:
    return (u * torch.tensor(sigma)) @ v.T


def _orthogonal_tasks() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Three rank-2 task vectors on an 8 × 6 weight whose left and right singular subspaces are
    mutually orthogonal (disjoint columns of two orthonormal bases), plus a bias and a counter."""
    u, v = _orthonormal(8, 0), _orthonormal(6, 1)
    base = {"w": torch.randn(8, 6, generator=torch.Generator().manual_seed(2)), "b": torch.zeros(3)}
    base["steps"] = torch.tensor(4)
    sigmas = [[3.0, 1.0], [2.0, 0.5], [4.0, 0.25]]
    states = []
    for i, sigma in enumerate(sigmas):
        tau = _low_rank(u[:, 2 * i : 2 * i + 2], sigma, v[:, 2 * i : 2 * i + 2])
        states.append(
            {"w": base["w"] + tau, "b": torch.full((3,), float(i)), "steps": torch.tensor(9)}
        )
    return base, states


@pytest.mark.parametrize("share", [1.0, None])
def test_tsv_of_task_vectors_in_orthogonal_subspaces_is_their_sum(share) -> None:
    """Nothing to decorrelate: with each task's whole rank kept (share 1, or the default 1/3 of
    rank 6, which is 2) Δ = Σi τi; the bias takes the mean task vector; α scales both."""
    base, states = _orthogonal_tasks()
    total = sum(s["w"] - base["w"] for s in states)
    out = tsv_merge(base, states, alpha=1.0, share=share)
    torch.testing.assert_close(out["w"], base["w"] + total, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["b"], torch.full((3,), 1.0))
    assert out["steps"].item() == 4
    half = tsv_merge(base, states, alpha=0.5, share=share)
    torch.testing.assert_close(half["w"], base["w"] + 0.5 * total, rtol=0, atol=1e-5)
    torch.testing.assert_close(half["b"], torch.full((3,), 0.5))


def test_tsv_keeps_each_tasks_top_singular_triples() -> None:
    """One model, half its rank kept: Δ is the task vector's best rank-3 approximation."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(6, 9)}
    tau = torch.randn(6, 9, generator=g)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    out = tsv_merge(base, [{"w": tau}], alpha=1.0, share=0.5)
    torch.testing.assert_close(out["w"], (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-5)
    assert kept_rank(6, 1, 0.5) == 3 and kept_rank(6, 4, None) == 1 and kept_rank(6, 9, None) == 1
    assert kept_rank(384, 6, None) == 64 and kept_rank(16, 3, 0.3) == 4


def test_tsv_of_tasks_sharing_one_direction_averages_them() -> None:
    """τ1 = 3 u vᵀ and τ2 = u vᵀ: the concatenation [u, u] has the polar factor [u, u] / √2, so
    Δ = (3 + 1) / 2 · u vᵀ, the tasks' mean along the direction they share, where their sum
    would count it twice."""
    u, v = _orthonormal(5, 4)[:, :1], _orthonormal(4, 5)[:, :1]
    base = {"w": torch.zeros(5, 4)}
    states = [{"w": 3.0 * u @ v.T}, {"w": u @ v.T}]
    out = tsv_merge(base, states, alpha=1.0)
    torch.testing.assert_close(out["w"], 2.0 * u @ v.T, rtol=0, atol=1e-5)


def test_orthogonal_factor_is_the_nearest_partial_isometry() -> None:
    g = torch.Generator().manual_seed(6)
    a = torch.randn(7, 4, generator=g)
    q = orthogonal_factor(a)
    torch.testing.assert_close(q.T @ q, torch.eye(4), rtol=0, atol=1e-5)
    # a = Q H with H symmetric positive definite (the polar decomposition)
    h = q.T @ a
    torch.testing.assert_close(h, h.T, rtol=0, atol=1e-5)
    assert torch.linalg.eigvalsh(h).min() > 0
    assert torch.equal(orthogonal_factor(torch.zeros(3, 2)), torch.zeros(3, 2))


# ---- Iso-C and Iso-CTS --------------------------------------------------------------------------


def test_iso_c_of_one_rank_one_task_vector_is_that_vector() -> None:
    """Its one non-zero singular value is its own mean: nothing changes (α = 1)."""
    u, v = _orthonormal(6, 7)[:, :1], _orthonormal(4, 8)[:, :1]
    base = {"w": torch.ones(6, 4), "b": torch.zeros(2)}
    state = {"w": base["w"] + 2.5 * u @ v.T, "b": torch.tensor([1.0, -1.0])}
    out = iso_c_merge(base, [state], alpha=1.0)
    torch.testing.assert_close(out["w"], state["w"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["b"], state["b"])
    torch.testing.assert_close(iso_c_merge(base, [state], alpha=0.4)["b"], 0.4 * state["b"])


def test_iso_c_gives_the_summed_task_vector_one_singular_value_its_mean() -> None:
    g = torch.Generator().manual_seed(9)
    base = {"w": torch.randn(7, 5, generator=g)}
    taus = [torch.randn(7, 5, generator=g) * scale for scale in (1.0, 0.3, 2.0)]
    out = iso_c_merge(base, [{"w": base["w"] + t} for t in taus], alpha=1.0)
    delta = out["w"] - base["w"]
    total = sum(taus)
    s = torch.linalg.svdvals(total)
    torch.testing.assert_close(torch.linalg.svdvals(delta), torch.full((5,), float(s.mean())))
    # the sum's singular vectors: Δ = σ̄ U Vᵀ, so Δ Σᵀ = σ̄ U Σ Uᵀ is symmetric positive
    sym = delta @ total.T
    torch.testing.assert_close(sym, sym.T, rtol=0, atol=1e-4)
    assert torch.linalg.eigvalsh(delta.T @ total).min() > 0


def test_iso_cts_with_all_the_rank_common_is_iso_c() -> None:
    g = torch.Generator().manual_seed(10)
    base = {"w": torch.randn(6, 8, generator=g), "b": torch.randn(3, generator=g)}
    states = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    cts = iso_cts_merge(base, states, alpha=0.7, common_fraction=1.0)
    c = iso_c_merge(base, states, alpha=0.7)
    for key in base:
        torch.testing.assert_close(cts[key], c[key], rtol=0, atol=1e-5)


def test_iso_cts_swaps_the_weakest_common_directions_for_task_specific_ones() -> None:
    """Task 1 lives on e1..e3 (σ 5, 4, 3), task 2 on e4..e6 (σ 0.5, 0.4, 0.3), the right vectors
    likewise. On rank 6 with two tasks and a common fraction of 1/2 the common space is the sum's
    top 2 (e1, e2) and each task adds its top 2 outside it: task 1 only e3 (nothing else is left),
    task 2 e4 and e5. So e6 is dropped and Δ = mean(5, 4, 3, 0.5, 0.4) · Σ_{i ≤ 5} ei fiᵀ."""
    e, f = _orthonormal(6, 11), _orthonormal(6, 12)
    assert subspace_sizes(6, 2, 0.5) == (2, 2)
    base = {"w": torch.zeros(6, 6)}
    tau1 = _low_rank(e[:, :3], [5.0, 4.0, 3.0], f[:, :3])
    tau2 = _low_rank(e[:, 3:], [0.5, 0.4, 0.3], f[:, 3:])
    out = iso_cts_merge(base, [{"w": tau1}, {"w": tau2}], alpha=1.0, common_fraction=0.5)
    expected = (12.9 / 5) * e[:, :5] @ f[:, :5].T
    torch.testing.assert_close(out["w"], expected, rtol=0, atol=1e-5)
    iso_c = iso_c_merge(base, [{"w": tau1}, {"w": tau2}], alpha=1.0)["w"]
    torch.testing.assert_close(iso_c, (13.2 / 6) * e @ f.T, rtol=0, atol=1e-5)


def test_iso_cts_result_is_isotropic_on_real_looking_task_vectors() -> None:
    g = torch.Generator().manual_seed(13)
    base = {"w": torch.zeros(12, 10)}
    states = [{"w": torch.randn(12, 10, generator=g)} for _ in range(3)]
    delta = iso_cts_merge(base, states, alpha=1.0, common_fraction=0.8)["w"]
    s = torch.linalg.svdvals(delta)
    torch.testing.assert_close(s, torch.full_like(s, float(s[0])), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("k", "tasks", "fraction", "sizes"),
    [
        (384, 6, 0.8, (306, 13)),  # all-MiniLM-L6-v2's attention weights, six tasks
        (16, 4, 0.8, (12, 1)),
        (16, 32, 0.8, (16, 0)),  # more tasks than directions left: Iso-C
        (3, 2, 0.0, (1, 1)),  # rounding up would overfill the layer
        (10, 3, 1.0, (10, 0)),
    ],
)
def test_subspace_sizes(k, tasks, fraction, sizes) -> None:
    assert subspace_sizes(k, tasks, fraction) == sizes


# ---- per-task heads -----------------------------------------------------------------------------

# Task 0's model body is 3.25 everywhere (its clients' weighted mean), task 1's -2: constant 2 × 2
# task vectors, all along the one direction J = 1 1ᵀ. TSV-M takes their mean along a shared
# direction, 0.625; Iso-C and Iso-CTS keep the sum's one singular value, 2 · 0.625; the bias
# is the mean task vector in every method.
HEADS_CASES = [
    ("tsv_m", {}, 0.625, 0.625, 2),
    ("iso_c", {}, 1.25, 0.625, 2),
    ("iso_cts", {}, 1.25, 0.625, 2),
    ("iso_c", {"alpha": 0.5}, 0.625, 0.3125, 2),
    ("tsv_m", {"group_by": "client"}, (1 + 4 - 2) / 3, (1 + 4 - 2) / 3, 3),
]


@pytest.mark.parametrize(("name", "params", "weight", "bias", "models"), HEADS_CASES)
def test_new_merges_keep_heads_per_task(name, params, weight, bias, models) -> None:
    base, updates = _updates()
    ctx = RoundContext(round=1, global_state=base, base_state=base)
    result = create_aggregator(name, params).aggregate(ctx, updates)
    torch.testing.assert_close(result.state["body.weight"], torch.full((2, 2), weight))
    torch.testing.assert_close(result.state["body.bias"], torch.full((2,), bias))
    torch.testing.assert_close(result.state["heads.0.weight"], torch.full((3, 2), 4.25))
    torch.testing.assert_close(result.state["heads.1.weight"], torch.full((2, 2), 8.0))
    assert list(result.state) == list(base) and result.served_model is None
    assert result.metrics == {"num_clients": 3.0, "num_models": float(models), "num_examples": 60.0}


# ---- real runs ----------------------------------------------------------------------------------

# digits: 3 clients, 2 rounds, one model per client (no task ids). Task arithmetic and TSV-M add
# each reply's task vector in full, so λ = α = 1/3 makes them average-like; Iso-C and Iso-CTS
# run at their defaults (α = 1: the flattened spectrum has a smaller norm than the sum's).
REAL_RUNS = {
    "tsv_m": ["aggregator.name=tsv_m", "aggregator.alpha=0.3333"],
    "iso_c": ["aggregator.name=iso_c"],
    "iso_cts": ["aggregator.name=iso_cts"],
    "dare": ["aggregator.name=task_arithmetic", "aggregator.lam=0.3333", "aggregator.dare=0.3"],
}


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(REAL_RUNS))
def test_a_real_run_merges_every_round_and_learns(label, tmp_path, ray_address) -> None:
    from fedmerge.federation.runner import run_experiment

    from .conftest import digits_config

    config = digits_config(tmp_path, *REAL_RUNS[label])
    run = run_experiment(config, address=ray_address, progress=lambda _: None).run_dir
    curve = run.server_curve("accuracy")
    assert [r for r, _ in curve] == [1, 2]
    assert curve[-1][1] > 0.6, f"final accuracy {curve[-1][1]} is not well above chance (0.1)"
    rows = [r for r in run.metrics().to_pylist() if r["scope"] == "aggregator"]
    models = {r["round"]: r["value"] for r in rows if r["metric"] == "num_models"}
    assert models == {1: 3.0, 2: 3.0}
    kept = {r["round"]: r["value"] for r in rows if r["metric"] == "dare_kept"}
    if label == "dare":  # about 70 % of some 4,000 entries per model kept, every round
        assert sorted(kept) == [1, 2] and all(abs(v - 0.7) < 0.02 for v in kept.values()), kept
    else:
        assert kept == {}
