"""q-FedAvg, Bulyan, and the robust merges beside Flower's own implementations.

Hand computations first; then the same random inputs through fedmerge's functions and the
functions of the installed ``flwr.serverapp.strategy`` modules, which must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as flower_trim_mean
from flwr.serverapp.strategy.multikrum import compute_distances
from flwr.serverapp.strategy.qfedavg import compute_delta_and_h

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.bulyan import bulyan, bulyan_selection, closest_to_median_mean
from fedmerge.aggregators.krum import krum, krum_scores, pairwise_sq_distances
from fedmerge.aggregators.median import coordinate_median
from fedmerge.aggregators.qfedavg import INITIAL_LOSS_KEY
from fedmerge.aggregators.trimmed_mean import trimmed_mean


def _states(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(r, dtype=torch.float64)} for r in rows]


def _random_states(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "a": torch.randn(3, 4, generator=g, dtype=torch.float64),
            "b": torch.randn(5, generator=g, dtype=torch.float64),
        }
        for _ in range(n)
    ]


def _ctx(global_state, sampled=()) -> RoundContext:
    return RoundContext(
        round=1, global_state=global_state, base_state=global_state, sampled=sampled
    )


# ---- Krum's bound -------------------------------------------------------------------------------


def test_krum_refuses_f_beyond_blanchard_et_al_bound() -> None:
    """2f + 2 < n: one malicious client needs five clients, not four."""
    four = _random_states(4, 0)
    with pytest.raises(ValueError, match=r"2f \+ 2 < n"):
        krum_scores(four, num_byzantine=1)
    assert len(krum_scores(_random_states(5, 0), num_byzantine=1)) == 5
    # The aggregator lowers f to what a short round allows, and says so in its metrics.
    updates = [ClientUpdate(i, s, 10) for i, s in enumerate(four)]
    result = create_aggregator("krum", {"num_byzantine": 1}).aggregate(_ctx(four[0]), updates)
    assert result.metrics["krum_f"] == 0


@pytest.mark.parametrize(("n", "f", "multi"), [(5, 1, 1), (7, 2, 1), (7, 2, 3), (10, 3, 4)])
def test_krum_and_multikrum_select_what_flower_selects(n, f, multi) -> None:
    states = _random_states(n, n + f)
    records = [ArrayRecord(numpy_ndarrays=[s["a"].numpy(), s["b"].numpy()]) for s in states]
    ours = pairwise_sq_distances(states, "test").numpy()
    assert np.allclose(ours, compute_distances(records), atol=1e-9)
    # Flower's select_multikrum: the `multi` lowest sums over the n - f - 2 nearest.
    theirs = np.sort(compute_distances(records), axis=1)[:, 1 : max(1, n - f - 2) + 1].sum(axis=1)
    assert np.allclose(krum_scores(states, num_byzantine=f), theirs, atol=1e-9)
    _, selected = krum(states, num_byzantine=f, multi=multi)
    assert selected == sorted(np.argsort(theirs, kind="stable")[:multi].tolist())


def test_median_and_trimmed_mean_equal_flowers() -> None:
    states = _random_states(9, 3)
    stacked = np.stack([s["a"].numpy() for s in states])
    assert np.allclose(coordinate_median(states)["a"].numpy(), np.median(stacked, axis=0))
    for beta in (0.0, 0.1, 0.2, 0.3):
        assert np.allclose(
            trimmed_mean(states, beta=beta)["a"].numpy(), flower_trim_mean(stacked, beta)
        ), beta


# ---- Bulyan -------------------------------------------------------------------------------------


def test_bulyan_by_hand() -> None:
    # n = 7, f = 1: theta = 5 chosen by recursive Krum, beta = 3 nearest the median averaged.
    states = _states(
        [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.5, 0.5], [50.0, -50.0]
    )
    chosen = bulyan_selection(states, num_byzantine=1)
    assert len(chosen) == 5 and 6 not in chosen
    # Scores of the first pass (4 nearest of 6 others): (0.5, 0.5) is the most central point.
    assert chosen[0] == 5
    merged, selected = bulyan(states, num_byzantine=1)
    assert 6 not in selected and len(selected) == 5
    values = torch.stack([states[i]["w"] for i in selected])
    for coord in range(2):
        column = values[:, coord]
        median = column.median()
        nearest = column[(column - median).abs().argsort(stable=True)[:3]]
        assert float(merged["w"][coord]) == pytest.approx(float(nearest.mean()))
    with pytest.raises(ValueError, match=r"4f \+ 3"):
        bulyan(states[:6], num_byzantine=1)


def test_bulyan_coordinate_phase_equals_flowers_for_odd_theta() -> None:
    """With an odd θ both take the same median, and β nearest values by |x − median|."""
    g = torch.Generator().manual_seed(4)
    values = torch.randn(7, 6, 5, generator=g, dtype=torch.float64)
    ours = closest_to_median_mean(values, beta=3)
    median = np.median(values.numpy(), axis=0)
    theirs = aggregate_n_closest_weights([median], [[v] for v in values.numpy()], beta=3)[0]
    assert np.allclose(ours.numpy(), theirs)


def test_bulyan_resists_two_colluding_outliers_among_eleven() -> None:
    honest = _random_states(9, 5)
    updates = [ClientUpdate(i, s, 10) for i, s in enumerate(honest)]
    for j in (9, 10):
        updates.append(ClientUpdate(j, {k: v + 1e3 for k, v in honest[0].items()}, 10))
    ctx = RoundContext(
        round=1, global_state=honest[0], base_state=honest[0], malicious=frozenset({9, 10})
    )
    result = create_aggregator("bulyan", {}).aggregate(ctx, updates)  # f = (11 - 3) // 4 = 2
    # The last Krum picks score against max(1, r - f - 2) = 1 neighbour, and the two identical
    # outliers are each other's: the paper's recursion selects one of them; the trimmed mean
    # around the median is what removes it.
    assert result.metrics["bulyan_f"] == 2 and result.metrics["clients_dropped"] == 4
    mean = torch.stack([s["a"] for s in honest]).mean(0)
    assert float((result.state["a"] - mean).abs().max()) < 1.5
    plain = create_aggregator("fedavg", {}).aggregate(ctx, updates).state["a"]
    assert float((plain - mean).abs().max()) > 100


# ---- q-FedAvg -----------------------------------------------------------------------------------


def _q_updates(states, losses, key=INITIAL_LOSS_KEY):
    return [
        ClientUpdate(i, s, 100 + i, metrics={key: loss})
        for i, (s, loss) in enumerate(zip(states, losses))
    ]


def test_qfedavg_by_hand_one_coordinate() -> None:
    # w = 0, clients at 1 and 3 with losses 1 and 4; q = 1, lr 0.5 (L = 2).
    # Δw_k = L (w − w_k) = -2, -6; Δ_k = F^q Δw_k = -2, -24; h_k = q F^0 L² (w − w_k)² + L F
    #      = 4 + 2 = 6, 36 + 8 = 44; w' = 0 − (−26) / 50 = 0.52.
    w = {"w": torch.zeros(1, dtype=torch.float64)}
    agg = create_aggregator("qfedavg", {"q": 1.0, "client_lr": 0.5})
    result = agg.aggregate(_ctx(w), _q_updates(_states([1.0], [3.0]), [1.0, 4.0]))
    assert float(result.state["w"]) == pytest.approx(0.52, rel=1e-8)


def test_qfedavg_streams_to_the_same_merge_and_snapshots() -> None:
    global_state = _random_states(1, 9)[0]
    states, losses = _random_states(4, 10), [0.3, 1.2, 2.5, 0.9]
    agg = create_aggregator("qfedavg", {"q": 2.0, "client_lr": 0.1})
    once = agg.aggregate(_ctx(global_state), _q_updates(states, losses)).state
    agg.begin_round(_ctx(global_state))
    for update in _q_updates(states, losses)[:2]:
        agg.accumulate(update)
    snapshot = agg.round_state()
    other = create_aggregator("qfedavg", {"q": 2.0, "client_lr": 0.1})
    other.begin_round(_ctx(global_state))
    other.load_round_state(snapshot)
    for update in _q_updates(states, losses)[2:]:
        other.accumulate(update)
    streamed = other.finalize().state
    for key in once:
        assert torch.allclose(once[key], streamed[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", [0.0, 0.1, 1.0, 3.0])
def test_qfedavg_equals_flowers_update_with_train_losses(q) -> None:
    """loss = "train" is Flower's QFedAvg: the same step from the same replies."""
    global_state = _random_states(1, 11)[0]
    states, losses = _random_states(5, 12), [0.2, 0.7, 1.9, 0.05, 3.3]
    lr = 0.05
    agg = create_aggregator("qfedavg", {"q": q, "client_lr": lr, "loss": "train"})
    ours = agg.aggregate(_ctx(global_state), _q_updates(states, losses, key="train_loss")).state
    gw = [global_state["a"].numpy().copy(), global_state["b"].numpy().copy()]
    sum_delta, sum_h = None, 0.0
    for state, loss in zip(states, losses):
        local = [state["a"].numpy().copy(), state["b"].numpy().copy()]
        delta, h = compute_delta_and_h(gw, local, q, 1.0 / lr, loss)
        sum_delta = delta if sum_delta is None else [a + b for a, b in zip(sum_delta, delta)]
        sum_h += h
    theirs = [g - d / sum_h for g, d in zip(gw, sum_delta)]
    assert np.allclose(ours["a"].numpy(), theirs[0], rtol=1e-9, atol=1e-12)
    assert np.allclose(ours["b"].numpy(), theirs[1], rtol=1e-9, atol=1e-12)


def test_qfedavg_q0_is_the_uniform_mean_and_asks_for_initial_losses() -> None:
    global_state = _random_states(1, 13)[0]
    states = _random_states(3, 14)
    agg = create_aggregator("qfedavg", {"q": 0.0})
    out = agg.aggregate(_ctx(global_state), _q_updates(states, [1.0, 2.0, 3.0])).state
    assert torch.allclose(out["a"], torch.stack([s["a"] for s in states]).mean(0))
    assert agg.client_config(1) == {INITIAL_LOSS_KEY: True}
    assert create_aggregator("qfedavg", {"loss": "train"}).client_config(1) == {}


@pytest.mark.parametrize("bad", [None, float("nan"), -1.0, "1.0", True])
def test_qfedavg_rejects_a_missing_or_bad_loss(bad) -> None:
    global_state = _random_states(1, 15)[0]
    agg = create_aggregator("qfedavg", {})
    agg.begin_round(_ctx(global_state))
    metrics = {} if bad is None else {INITIAL_LOSS_KEY: bad}
    with pytest.raises(ValueError, match=INITIAL_LOSS_KEY):
        agg.accumulate(ClientUpdate(3, _random_states(1, 16)[0], 10, metrics=metrics))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qfedavg", "bulyan"])
def test_a_digits_run_learns_with_qfedavg_and_bulyan(tmp_path, name) -> None:
    from fedmerge.federation.runner import run_experiment

    from .conftest import digits_config

    overrides = ["aggregator.client_lr=0.05"] if name == "qfedavg" else []
    config = digits_config(
        tmp_path, f"aggregator.name='{name}'", "federation.num_rounds=3", *overrides
    )
    run = run_experiment(config, progress=lambda _: None).run_dir
    accuracy = [a for _, a in run.server_curve("accuracy")]
    assert len(accuracy) == 3, accuracy
    rows = run.metrics().to_pylist()
    if name == "bulyan":  # three clients: f = 0, the mean of all three
        assert accuracy[-1] > 0.5, accuracy  # ten classes: chance is 0.1
    else:
        # q-FedAvg's step s = L ΣF^q / Σh is damped by q F^(q-1) L² ‖w − w_k‖², large after two
        # epochs of momentum SGD with L = 1/lr: it learns, more slowly than FedAvg.
        assert accuracy[0] < accuracy[1] < accuracy[2] and accuracy[2] > 0.15, (
            accuracy
        )  # every client measured its loss at the received model
        losses = [r for r in rows if r["metric"] == INITIAL_LOSS_KEY]
        assert losses and all(r["value"] > 0 for r in losses), rows[:5]
        steps = [r["value"] for r in rows if r["metric"] == "qfedavg_step"]
        assert len(steps) == 3 and all(s > 0 for s in steps)
