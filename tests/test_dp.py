"""Central differential privacy (aggregators/dp.py): clipping, noise, accounting, budget, resume."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.dp import (
    UNCLIPPED_METRIC,
    PrivacyBudgetExceeded,
    clip_update,
    update_norm,
)
from fedmerge.federation.validation import UpdateRejected, UpdateValidator

ZERO = {"w": torch.zeros(2, dtype=torch.float32), "n": torch.tensor(3)}


def ctx(round_=1, state=None, sampled=(0, 1), num_clients=4, num_rounds=3, seed=5):
    return RoundContext(
        round=round_,
        global_state=state or ZERO,
        base_state=ZERO,
        seed=seed,
        num_clients=num_clients,
        sampled=tuple(sampled),
        num_rounds=num_rounds,
    )


def upd(cid, w, n=7, **metrics):
    return ClientUpdate(
        cid, {"w": torch.tensor(w, dtype=torch.float32), "n": torch.tensor(n)}, 10 + cid, metrics
    )


def run(agg, context, updates):
    agg.begin_round(context)
    for u in updates:
        agg.accumulate(u)
    return agg.finalize()


def test_clipping_bounds_every_contribution_and_noise_zero_is_the_clipped_uniform_mean():
    agg = create_aggregator("dp", {"noise_multiplier": 0.0, "clipping_norm": 1.0})
    # Δ1 = (6, 8), norm 10 -> (0.6, 0.8); Δ2 = (0.3, 0.4), norm 0.5, unchanged. Mean over m = 2
    # sampled, uniform (the example counts 10 and 11 are ignored): (0.45, 0.6).
    result = run(agg, ctx(), [upd(0, [6.0, 8.0]), upd(1, [0.3, 0.4])])
    assert torch.allclose(result.state["w"], torch.tensor([0.45, 0.6]), atol=1e-7)
    assert result.state["n"].item() == 3  # integer buffers keep θt's value, not the clients'
    assert result.metrics["dp_clipped_fraction"] == 0.5
    assert result.metrics["dp_epsilon"] == math.inf
    # A dropout: m = 3 sampled, 2 replied: the sum is still divided by 3.
    result = run(agg, ctx(sampled=(0, 1, 2)), [upd(0, [6.0, 8.0]), upd(1, [0.3, 0.4])])
    assert torch.allclose(result.state["w"], torch.tensor([0.3, 0.4]), atol=1e-7)


def test_clip_update_clips_and_says_whether_it_had_to():
    state = {"w": torch.tensor([6.0, 8.0]), "n": torch.tensor(9)}
    clipped, unclipped = clip_update(state, ZERO, 1.0)
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.8])) and not unclipped
    assert clipped["n"].item() == 9
    assert update_norm(clipped, ZERO) == pytest.approx(1.0, rel=1e-6)
    same, unclipped = clip_update({"w": torch.tensor([0.3, 0.4])}, ZERO, 1.0)
    assert unclipped and torch.equal(same["w"], torch.tensor([0.3, 0.4]))
    with pytest.raises(ValueError, match="positive"):
        clip_update(state, ZERO, 0.0)


def test_noise_std_is_z_c_over_m():
    n = 200_000
    zero = {"w": torch.zeros(n)}
    agg = create_aggregator("dp", {"noise_multiplier": 1.5, "clipping_norm": 2.0})
    updates = [ClientUpdate(i, {"w": torch.zeros(n)}, 1) for i in range(4)]
    result = run(agg, ctx(state=zero, sampled=range(4), num_clients=10), updates)
    expected = 1.5 * 2.0 / 4
    assert result.metrics["dp_noise_std"] == pytest.approx(expected)
    std = float(result.state["w"].double().std())
    # The sample std of n normals has std σ/√(2n) (0.16% here): 5 of those is 0.8%.
    assert abs(std - expected) < 5 * expected / math.sqrt(2 * n)
    assert abs(float(result.state["w"].double().mean())) < 5 * expected / math.sqrt(n)


def _direct_epsilon(n, m, z, rounds, delta):
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                n, m, dp_accounting.GaussianDpEvent(z / 2)
            ),
            rounds,
        )
    )
    return acc.get_epsilon(delta)


def test_epsilon_metric_is_dp_accountings_for_the_same_rounds():
    agg = create_aggregator("dp", {"noise_multiplier": 1.2, "delta": 1e-4})
    state = ZERO
    for r in (1, 2):
        result = run(
            agg, ctx(r, state, sampled=(0, 2), num_clients=5), [upd(0, [0.1, 0]), upd(2, [0, 0.1])]
        )
        state = result.state
        assert result.metrics["dp_epsilon"] == pytest.approx(_direct_epsilon(5, 2, 1.2, r, 1e-4))
    poisson = create_aggregator("dp", {"noise_multiplier": 1.2, "accountant": "poisson"})
    result = run(poisson, ctx(sampled=(0, 2), num_clients=5), [upd(0, [0.1, 0])])
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.4, dp_accounting.GaussianDpEvent(1.2)))
    assert result.metrics["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5))


def test_target_epsilon_calibrates_z_just_under_the_target():
    agg = create_aggregator("dp", {"target_epsilon": 3.0})
    agg.plan_run(num_rounds=20, num_clients=50, clients_per_round=10)
    z = agg.state_dict()["noise_multiplier"]
    spent = _direct_epsilon(50, 10, z, 20, 1e-5)
    assert spent <= 3.0 and spent > 2.99
    assert _direct_epsilon(50, 10, z * 0.99, 20, 1e-5) > 3.0


def test_a_run_over_the_budget_fails_before_training_naming_the_numbers():
    agg = create_aggregator("dp", {"noise_multiplier": 0.5, "max_epsilon": 1.0})
    with pytest.raises(
        PrivacyBudgetExceeded,
        match=r"10 rounds with noise_multiplier 0.5.*delta 1e-05.*max_epsilon = 1",
    ):
        agg.plan_run(num_rounds=10, num_clients=4, clients_per_round=2)
    with pytest.raises(PrivacyBudgetExceeded):  # an executor that never called plan_run
        agg.begin_round(ctx(num_rounds=10))


def test_adaptive_clipping_moves_c_by_the_geometric_rule():
    agg = create_aggregator(
        "dp",
        {
            "noise_multiplier": 0.0,
            "adaptive": True,
            "clipped_count_stddev": 0.0,
            "clipping_norm": 1.0,
            "target_quantile": 0.5,
            "clip_lr": 0.2,
        },
    )
    # 3 of 3 updates are unclipped (norms 0.1): b̄ = 1, C ← exp(−0.2 (1 − 0.5)) ≈ 0.9048.
    updates = [upd(i, [0.1, 0.0]) for i in range(3)]
    r1 = run(agg, ctx(sampled=range(3)), updates)
    assert r1.metrics["dp_clipping_norm"] == 1.0
    assert agg.state_dict()["clipping_norm"] == pytest.approx(math.exp(-0.1))
    # All clipped (norm 5): b̄ = 0, C ← C exp(+0.1): back to 1.
    run(agg, ctx(2, sampled=range(3)), [upd(i, [5.0, 0.0]) for i in range(3)])
    assert agg.state_dict()["clipping_norm"] == pytest.approx(1.0)


def test_adaptive_update_noise_keeps_the_total_multiplier():
    agg = create_aggregator(
        "dp", {"noise_multiplier": 1.0, "adaptive": True, "clipped_count_stddev": 1.0}
    )
    result = run(agg, ctx(sampled=(0, 1)), [upd(0, [0.1, 0]), upd(1, [0.1, 0])])
    z_delta = (1.0 - 0.25) ** -0.5
    assert result.metrics["dp_noise_std"] == pytest.approx(z_delta * 1.0 / 2)
    assert result.metrics["dp_epsilon"] == pytest.approx(_direct_epsilon(4, 2, 1.0, 1, 1e-5))
    with pytest.raises(ValueError, match="clipped_count_stddev > z/2"):
        create_aggregator(
            "dp", {"noise_multiplier": 2.0, "adaptive": True, "clipped_count_stddev": 0.5}
        ).begin_round(ctx())


def test_three_rounds_equal_one_round_a_state_round_trip_and_two_more():
    params = {
        "inner": "fedadam",
        "inner_params": {"eta": 0.05},
        "adaptive": True,
        "clipped_count_stddev": 2.0,
        "noise_multiplier": 0.7,
    }

    def rounds(agg, first, last, state):
        for r in range(first, last + 1):
            updates = [
                upd(i, (state["w"] + torch.tensor([0.3 * i, -0.2 * r])).tolist()) for i in range(3)
            ]
            result = run(agg, ctx(r, state, sampled=range(3)), updates)
            state = result.state
        return state, result.metrics

    straight, m1 = rounds(create_aggregator("dp", params), 1, 3, ZERO)
    first = create_aggregator("dp", params)
    state, _ = rounds(first, 1, 1, ZERO)
    resumed = create_aggregator("dp", params)
    resumed.load_state_dict(first.state_dict())
    again, m2 = rounds(resumed, 2, 3, state)
    assert torch.equal(straight["w"], again["w"])
    assert m1 == m2


def test_client_side_rejects_an_update_over_c_and_a_bad_indicator():
    agg = create_aggregator(
        "dp", {"clipping": "client", "clipping_norm": 1.0, "noise_multiplier": 0.0}
    )
    assert agg.client_config(1)["dp_clip"] == {"norm": 1.0, "report": True}
    agg.begin_round(ctx())
    with pytest.raises(ValueError, match="update norm 10 exceeds the clipping norm 1"):
        agg.accumulate(upd(0, [6.0, 8.0], **{UNCLIPPED_METRIC: 1.0}))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        agg.accumulate(upd(0, [0.6, 0.8], **{UNCLIPPED_METRIC: 0.5}))
    agg.accumulate(upd(0, [0.6, 0.8], **{UNCLIPPED_METRIC: 0.0}))
    assert agg.finalize().metrics["dp_clipped_fraction"] == 1.0
    # The driver's check rejects the reply itself, before the aggregator sees it.
    validator = UpdateValidator()
    validator.set_client_clip(agg.client_config(2))
    with pytest.raises(UpdateRejected, match="exceeds the differential-privacy clipping norm"):
        validator.check_client_clip(10.0, {UNCLIPPED_METRIC: 1.0})
    with pytest.raises(UpdateRejected, match="must be 0 or 1"):
        validator.check_client_clip(0.5, {})
    validator.check_client_clip(1.0, {UNCLIPPED_METRIC: 1.0})


@pytest.mark.parametrize("inner", ["krum", "median", "smile", "wemoe", "dp"])
def test_a_non_incremental_inner_is_refused(inner):
    with pytest.raises(ValueError, match=f"inner='{inner}' is invalid: must be an incremental"):
        create_aggregator("dp", {"inner": inner})


def test_bad_inner_params_name_the_inner():
    with pytest.raises(ValueError, match="inner_params=.*keywords of 'fedadam'.*etta"):
        create_aggregator("dp", {"inner": "fedadam", "inner_params": {"etta": 1}})
    with pytest.raises(ValueError, match="not both"):
        create_aggregator("dp", {"noise_multiplier": 1.0, "target_epsilon": 1.0})


def test_noise_is_seeded_by_round_and_secure_noise_is_not():
    a = create_aggregator("dp", {})
    r1 = run(a, ctx(), [upd(0, [0.1, 0.1])]).state["w"]
    r1b = run(create_aggregator("dp", {}), ctx(), [upd(0, [0.1, 0.1])]).state["w"]
    r2 = run(create_aggregator("dp", {}), ctx(2), [upd(0, [0.1, 0.1])]).state["w"]
    assert torch.equal(r1, r1b) and not torch.equal(r1, r2)
    s = [
        run(create_aggregator("dp", {"secure_noise": True}), ctx(), [upd(0, [0.1, 0.1])]).state["w"]
        for _ in range(2)
    ]
    assert not torch.equal(s[0], s[1])


@pytest.mark.slow
def test_a_digits_run_reports_epsilon_every_round(tmp_path):
    from fedmerge.federation.runner import run_experiment

    from .conftest import digits_config

    config = digits_config(
        tmp_path,
        "aggregator.name='dp'",
        "aggregator.noise_multiplier=0.3",
        "aggregator.clipping_norm=5.0",
        "aggregator.clipping='client'",
        "federation.num_rounds=3",
    )
    run = run_experiment(config, progress=lambda _: None).run_dir
    rows = run.metrics().to_pylist()
    eps = [r["value"] for r in rows if r["scope"] == "aggregator" and r["metric"] == "dp_epsilon"]
    expected = [_direct_epsilon(3, 3, 0.3, t, 1e-5) for t in (1, 2, 3)]
    assert eps == pytest.approx(expected)
    accuracy = [a for _, a in run.server_curve("accuracy")]
    assert len(accuracy) == 3 and np.isfinite(accuracy).all()


def test_a_run_over_budget_is_a_config_error_before_any_client_trains(tmp_path):
    from fedmerge.federation.config import ConfigError
    from fedmerge.federation.runner import run_experiment

    from .conftest import digits_config

    config = digits_config(
        tmp_path,
        "aggregator.name='dp'",
        "aggregator.noise_multiplier=0.3",
        "aggregator.max_epsilon=1.0",
    )
    with pytest.raises(ConfigError, match="would spend epsilon .* over the budget"):
        run_experiment(config, progress=lambda _: None)
