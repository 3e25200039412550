"""Server optimisers (FedAvgM, FedAdagrad, FedAdam, FedYogi) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.aggregators import create_aggregator
from fedmerge.aggregators.base import ClientUpdate, RoundContext
from fedmerge.federation.checkpoint import load_checkpoint, save_checkpoint

THETA0 = {"w": torch.tensor([[0.5, -1.0], [2.0, 0.0]]), "steps": torch.tensor(3)}
# Two rounds of two clients each: (client states, example counts) per round.
ROUNDS = [
    ([[[1.0, -0.5], [1.5, 0.25]], [[0.0, -2.0], [2.5, 1.0]]], (1, 3)),
    ([[[0.9, -1.1], [1.0, 0.5]], [[0.2, -0.2], [2.2, -0.4]]], (2, 2)),
]


def _run(aggregator, rounds=ROUNDS, theta=THETA0, first=1):
    """The global weights after each round, driven as the aggregator actor drives it."""
    out = []
    for r, (states, counts) in enumerate(rounds, start=first):
        aggregator.begin_round(RoundContext(round=r, global_state=theta, base_state=THETA0))
        for cid, (w, n) in enumerate(zip(states, counts)):
            state = {"w": torch.tensor(w), "steps": torch.tensor(3 + r)}
            aggregator.accumulate(ClientUpdate(cid, state, n))
        theta = aggregator.finalize().state
        out.append(theta)
    return out


def _by_hand(step):
    """θ after each round of ``step(delta, t)`` applied to FedAvg's mean, in float64."""
    theta, out = THETA0["w"].double().numpy(), []
    for t, (states, counts) in enumerate(ROUNDS, start=1):
        mean = sum(n * np.array(w) for w, n in zip(states, counts)) / sum(counts)
        theta = theta + step(mean - theta, t)
        out.append(theta)
    return out


def _adaptive(eta, beta_1, beta_2, tau, rule, correct=False):
    m = v = 0.0

    def step(delta, t):
        nonlocal m, v
        m = beta_1 * m + (1 - beta_1) * delta
        if rule == "adagrad":
            v = v + delta**2
        elif rule == "adam":
            v = beta_2 * v + (1 - beta_2) * delta**2
        else:
            v = v - (1 - beta_2) * delta**2 * np.sign(v - delta**2)
        lr = eta * np.sqrt(1 - beta_2**t) / (1 - beta_1**t) if correct else eta
        return lr * m / (np.sqrt(v) + tau)

    return step


def _momentum(eta, beta):
    v = 0.0

    def step(delta, t):
        nonlocal v
        v = beta * v + delta
        return eta * v

    return step


CASES = [
    ("fedavgm", {"server_learning_rate": 0.7, "server_momentum": 0.9}, _momentum(0.7, 0.9)),
    ("fedadagrad", {}, _adaptive(0.1, 0.0, 0.0, 1e-3, "adagrad")),
    ("fedadagrad", {"beta_1": 0.5, "eta": 0.3}, _adaptive(0.3, 0.5, 0.0, 1e-3, "adagrad")),
    ("fedadam", {}, _adaptive(0.1, 0.9, 0.99, 1e-3, "adam")),
    (
        "fedadam",
        {"bias_correction": True, "tau": 0.01},
        _adaptive(0.1, 0.9, 0.99, 0.01, "adam", correct=True),
    ),
    ("fedyogi", {}, _adaptive(0.01, 0.9, 0.99, 1e-3, "yogi")),
]


@pytest.mark.parametrize(("name", "params", "step"), CASES)
def test_two_rounds_match_the_hand_computation(name, params, step):
    got = _run(create_aggregator(name, params))
    for theta, expected in zip(got, _by_hand(step)):
        assert theta["w"].dtype == torch.float32
        np.testing.assert_allclose(theta["w"].double().numpy(), expected, rtol=0, atol=1e-6)
        assert theta["steps"].item() in (4, 5)  # integer buffers: FedAvg's value


def test_fedavgm_with_its_defaults_is_fedavg():
    """θt + (θ̄ − θt) is θ̄ up to one float32 rounding; integer buffers are FedAvg's exactly."""
    plain = _run(create_aggregator("fedavg", {}))
    momentum = _run(create_aggregator("fedavgm", {}))
    for a, b in zip(plain, momentum):
        torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=1e-6)
        assert torch.equal(a["steps"], b["steps"])


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_the_moments_survive_a_checkpoint_and_the_next_round_is_exact(tmp_path, name):
    params = {"server_momentum": 0.5} if name == "fedavgm" else {}
    uninterrupted = _run(create_aggregator(name, params))

    first = create_aggregator(name, params)
    (after_one,) = _run(first, ROUNDS[:1])
    path = save_checkpoint(
        tmp_path, 1, 0, {k: v.numpy() for k, v in after_one.items()}, first.state_dict()
    )
    restored = load_checkpoint(path)
    second = create_aggregator(name, params)
    second.load_state_dict(restored.aggregator_state)
    theta = {k: torch.from_numpy(np.array(v)) for k, v in restored.global_state.items()}
    (after_two,) = _run(second, ROUNDS[1:2], theta=theta, first=2)
    assert all(torch.equal(after_two[k], uninterrupted[1][k]) for k in after_two)


def test_a_fresh_instance_starts_from_zero_moments_and_bad_state_is_refused():
    adam = create_aggregator("fedadam", {})
    assert adam.state_dict() == {"steps": 0, "m": {}, "v": {}}
    with pytest.raises(ValueError, match=r"FedAdam state has keys \['m', 'steps'\]"):
        adam.load_state_dict({"steps": 1, "m": {}})
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        adam.load_state_dict({"steps": -1, "m": {}, "v": {}})
    with pytest.raises(ValueError, match="server_momentum"):
        create_aggregator("fedavgm", {"server_momentum": 1.0})


def test_metrics_report_the_pseudo_gradient_and_the_step():
    aggregator = create_aggregator("fedavgm", {"server_learning_rate": 2.0})
    aggregator.begin_round(RoundContext(round=1, global_state=THETA0, base_state=THETA0))
    states, counts = ROUNDS[0]
    for cid, (w, n) in enumerate(zip(states, counts)):
        aggregator.accumulate(
            ClientUpdate(cid, {"w": torch.tensor(w), "steps": THETA0["steps"]}, n)
        )
    metrics = aggregator.finalize().metrics
    assert metrics["server_step_norm"] == pytest.approx(2.0 * metrics["pseudo_gradient_norm"])
    assert metrics["num_clients"] == 2


E2E = [
    ("fedavgm", ["aggregator.server_momentum=0.5"]),
    ("fedadagrad", []),
    ("fedadam", ["aggregator.eta=0.01"]),
    ("fedyogi", []),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "overrides"), E2E)
def test_a_digits_run_learns_with_each_server_optimizer(tmp_path, name, overrides):
    from fedmerge.federation.runner import run_experiment

    from .conftest import digits_config

    config = digits_config(
        tmp_path, f"aggregator.name='{name}'", "federation.num_rounds=3", *overrides
    )
    run = run_experiment(config, progress=lambda _: None).run_dir
    accuracy = [a for _, a in run.server_curve("accuracy")]
    assert len(accuracy) == 3 and accuracy[-1] > 0.5, accuracy  # ten classes: chance is 0.1
    norms = [
        r["value"]
        for r in run.metrics().to_pylist()
        if r["scope"] == "aggregator" and r["metric"] == "pseudo_gradient_norm"
    ]
    assert len(norms) == 3 and all(n > 0 for n in norms), norms
