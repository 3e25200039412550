"""FedDRL: per-model features, the A2C and TD3 agents on toy problems, dropping malicious clients,
and exact restoration of the agents from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.feddrl import (
    FEATURES,
    A2CAgent,
    A2CConfig,
    TD3Agent,
    TD3Config,
    client_features,
)
from fedmerge.clients.attacks import AttackConfig, attack_state
from fedmerge.clients.tasks import get_task
from fedmerge.clients.training import TrainConfig, get_state, set_state, train
from fedmerge.federation.checkpoint import load_checkpoint, save_checkpoint
from fedmerge.federation.scoring import ValidationScorer, hold_out

SMALL = {
    "a2c_hidden": 16,
    "a2c_candidates": 4,
    "a2c_iterations": 2,
    "a2c_warmup_iterations": 2,
    "td3_hidden": 32,
    "td3_steps": 4,
    "td3_updates": 8,
    "td3_batch_size": 8,
}
MALICIOUS = frozenset({1, 4})


@pytest.fixture(autouse=True)
def _one_thread():
    """Small networks: one thread is much faster than two on this shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_rounds():
    """Three rounds' worth of client updates on digits (6 clients, 1 and 4 send noise), each round
    trained from the FedAvg of the previous one's honest models, and a validation scorer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    task = get_task("digits")
    rest, val = hold_out(task.load("train"), 300, seed=0)
    parts = np.array_split(np.random.default_rng(0).permutation(len(rest)), 6)
    torch.manual_seed(0)
    global_state = get_state(task.build_model())
    attack = AttackConfig(kind="noise", fraction=1.0, noise_std=0.5)
    rounds = []
    for rnd in (1, 2, 3):
        updates = []
        for cid, part in enumerate(parts):
            model = task.build_model()
            set_state(model, global_state)
            train(
                model,
                task,
                rest.subset(part),
                TrainConfig(lr=0.05, local_epochs=2),
                seed=100 * rnd + cid,
            )
            state = get_state(model)
            if cid in MALICIOUS:
                state = attack_state(attack, state, global_state, seed=100 * rnd + cid)
            updates.append(ClientUpdate(cid, state, len(part)))
        rounds.append((global_state, updates))
        honest = [u.state for u in updates if u.client_id not in MALICIOUS]
        global_state = {k: torch.stack([s[k] for s in honest]).mean(0) for k in honest[0]}
    torch.set_num_threads(before)
    return rounds, ValidationScorer("digits", val.x, val.y)


def _ctx(rnd: int, global_state, scorer: ValidationScorer) -> RoundContext:
    return RoundContext(
        round=rnd,
        global_state=global_state,
        base_state=global_state,
        seed=5,
        evaluate=scorer.evaluate,
        evaluate_many=scorer.evaluate_many,
        malicious=MALICIOUS,
    )


def test_features_single_out_noise_models(digits_rounds) -> None:
    rounds, scorer = digits_rounds
    global_state, updates = rounds[1]
    feats = client_features(updates, global_state, scorer.evaluate_many([u.state for u in updates]))
    assert feats.shape == (6, len(FEATURES)) and feats.dtype == torch.float32
    bad, good = feats[sorted(MALICIOUS)], feats[[i for i in range(6) if i not in MALICIOUS]]
    assert bad[:, 0].max() < good[:, 0].min()  # validation accuracy
    assert bad[:, 3].min() > good[:, 3].max()  # update norm relative to the median
    assert bad[:, 4].max() < good[:, 4].min()  # cosine to the median update
    assert torch.allclose(feats[:, 5], torch.zeros(6), atol=0.1)  # similar shard sizes


def test_a2c_update_reduces_its_losses_on_a_toy_problem() -> None:
    """Clients with feature 0 = 1 are bad: the reward of a mask is the share of kept clients that
    are good (0 when none is kept). The critic's error and the policy's loss on a fixed batch fall."""
    g = torch.Generator().manual_seed(0)
    features = torch.cat(
        [torch.tensor([[1.0]] * 3 + [[0.0]] * 5), torch.randn(8, 5, generator=g) * 0.1], dim=1
    )
    bad = features[:, 0] == 1

    def reward(masks: torch.Tensor) -> torch.Tensor:
        kept = masks.sum(1)
        return torch.where(
            kept > 0, (masks * (~bad).float()).sum(1) / kept.clamp(min=1), torch.zeros(len(masks))
        )

    agent = A2CAgent(6, A2CConfig(hidden=16, lr=1e-2, entropy_coef=0.0), seed=0)
    fixed = agent.sample(features, 64, torch.Generator().manual_seed(1))
    first = agent.update(features, fixed, reward(fixed))
    for _ in range(150):
        masks = agent.sample(features, 16, g)
        agent.update(features, masks, reward(masks))
    probe = A2CAgent(6, A2CConfig(hidden=16, lr=1e-12), seed=0)  # only to measure the losses
    probe.policy.load_state_dict(agent.policy.state_dict())
    probe.critic.load_state_dict(agent.critic.state_dict())
    last = probe.update(features, fixed, reward(fixed))
    assert last["critic_loss"] < 0.5 * first["critic_loss"]
    probs = agent.keep_probs(features)
    assert probs[bad].max() < 0.2 < 0.8 < probs[~bad].min()
    sampled = agent.sample(features, 256, g)
    assert reward(sampled).mean() > 0.9


def test_td3_update_reduces_its_losses_on_a_toy_problem() -> None:
    """One-step episodes whose reward is −mean((a − x0)²): the critics' error falls and the actor
    learns a ≈ x0."""
    g = torch.Generator().manual_seed(0)
    agent = TD3Agent(
        6,
        TD3Config(
            hidden=32,
            updates=1,
            batch_size=32,
            exploration_noise=0.5,
            actor_lr=3e-3,
            critic_lr=3e-3,
        ),
        seed=0,
    )

    def episode() -> None:
        k = int(torch.randint(2, 6, (1,), generator=g))
        s = torch.cat(
            [torch.rand(k, 1, generator=g) * 1.6 - 0.8, torch.randn(k, 5, generator=g) * 0.1], dim=1
        )
        a = agent.act(s, g)
        agent.buffer.add(s, a, float(-((a - s[:, 0]) ** 2).mean()), s, done=True)

    for _ in range(64):
        episode()
    fixed = agent.buffer.sample(64, torch.Generator().manual_seed(1))
    before = agent.update(fixed, torch.Generator().manual_seed(2))["critic_loss"]
    for _ in range(300):
        episode()
        agent.train(g)
    after = agent.update(fixed, torch.Generator().manual_seed(2))["critic_loss"]
    assert after < 0.5 * before
    probe = torch.cat([torch.linspace(-0.7, 0.7, 5).unsqueeze(1), torch.zeros(5, 5)], dim=1)
    assert float((agent.act(probe) - probe[:, 0]).abs().max()) < 0.25
    assert len(agent.buffer) == 364 and agent.updates == 302


def test_feddrl_drops_the_noise_clients(digits_rounds) -> None:
    rounds, scorer = digits_rounds
    agg = create_aggregator("feddrl", SMALL)
    for rnd, (global_state, updates) in enumerate(rounds, start=1):
        result = agg.aggregate(_ctx(rnd, global_state, scorer), updates)
        m = result.metrics
        assert m["malicious_dropped"] == 2 and m["detection_recall"] == 1.0, (rnd, m)
        assert m["val_accuracy"] == pytest.approx(scorer.evaluate(result.state)["accuracy"])
        assert m["validation_reward"] >= 0 and 0 <= m["weight_entropy"] <= np.log(6)
        assert m["evaluations"] >= 6 + 1
    assert m["val_accuracy"] > 0.6


def _support_scored_round(n: int, malicious: frozenset[int]):
    """A round of ``n`` one-hot client "models" whose FedAvg reveals the kept set, scored by a
    fake validation set: any malicious client kept -> 0.30; else 0.80 + 0.002 per client dropped,
    so smaller honest sets score slightly better (what validation noise does to a real round)."""
    updates = [
        ClientUpdate(i, {"w": torch.nn.functional.one_hot(torch.tensor(i), n).double()}, 10)
        for i in range(n)
    ]

    def score(states):
        out = []
        for state in states:
            kept = {int(i) for i in torch.nonzero(state["w"] > 0)}
            accuracy = 0.30 if kept & malicious else 0.80 + 0.002 * (n - len(kept))
            out.append({"accuracy": accuracy, "loss": 1.0 - accuracy})
        return out

    global_state = {"w": torch.zeros(n, dtype=torch.float64)}
    ctx = RoundContext(
        round=1,
        global_state=global_state,
        base_state=global_state,
        seed=3,
        evaluate=lambda s: score([s])[0],
        evaluate_many=score,
        malicious=malicious,
    )
    return ctx, updates


def test_stage1_tolerance_keeps_the_largest_set_within_it_of_the_best() -> None:
    params = {**SMALL, "stage2": False}
    ctx, updates = _support_scored_round(6, frozenset())
    best = (
        create_aggregator("feddrl", {**params, "stage1_tolerance": 0.0})
        .aggregate(ctx, updates)
        .metrics
    )
    assert best["clients_kept"] < 6 and best["stage1_reward"] > best[
        "fedavg_val_accuracy"
    ] == pytest.approx(0.80)
    # Every client is honest and FedAvg of all of them is within 0.012 of the best subset: keep all.
    tolerant = (
        create_aggregator("feddrl", {**params, "stage1_tolerance": 0.012})
        .aggregate(ctx, updates)
        .metrics
    )
    assert tolerant["clients_kept"] == 6 and tolerant["stage1_reward"] == pytest.approx(0.80)
    # A malicious client costs 0.5: no tolerance below that lets it in.
    ctx, updates = _support_scored_round(6, frozenset({1, 4}))
    attacked = (
        create_aggregator("feddrl", {**params, "stage1_tolerance": 0.012})
        .aggregate(ctx, updates)
        .metrics
    )
    assert attacked["detection_recall"] == 1.0 and attacked["stage1_reward"] >= 0.80
    assert attacked["fedavg_val_accuracy"] == pytest.approx(0.30)


def test_stage1_prefixes_recover_the_trusted_set_from_a_right_but_timid_ranking() -> None:
    """Keep probabilities all below 0.5 (honest 0.3, malicious 0.1): sampled masks are small and
    the greedy mask keeps one client, but the ranked prefix of size 4 is the whole honest set."""
    malicious = frozenset({1, 4})
    ctx, updates = _support_scored_round(6, malicious)

    def larger_is_better(states):
        kept = [{int(i) for i in torch.nonzero(s["w"] > 0)} for s in states]
        return [
            {"accuracy": 0.30 if k & malicious else 0.80 + 0.01 * len(k), "loss": 0.5} for k in kept
        ]

    ctx = RoundContext(
        round=1,
        global_state=ctx.global_state,
        base_state=ctx.base_state,
        seed=3,
        evaluate=lambda s: larger_is_better([s])[0],
        evaluate_many=larger_is_better,
        malicious=malicious,
    )
    kept = {}
    for prefixes in (False, True):
        agg = create_aggregator("feddrl", {**SMALL, "stage2": False, "stage1_prefixes": prefixes})
        a2c, _ = agg._agents(3)
        a2c.keep_probs = lambda features: torch.tensor(
            [0.1 if i in malicious else 0.3 for i in range(6)]
        )
        kept[prefixes] = agg.aggregate(ctx, updates).metrics
    assert kept[True]["clients_kept"] == 4 and kept[True]["detection_precision"] == 1.0
    assert kept[True]["detection_recall"] == 1.0 and kept[True]["stage1_reward"] == pytest.approx(
        0.84
    )
    assert kept[False]["clients_kept"] < 4


def test_resumed_agents_continue_exactly(digits_rounds, tmp_path) -> None:
    rounds, scorer = digits_rounds
    first = create_aggregator("feddrl", SMALL)
    for rnd, (global_state, updates) in enumerate(rounds[:2], start=1):
        first.aggregate(_ctx(rnd, global_state, scorer), updates)
    path = save_checkpoint(tmp_path, 2, 5, {"x": np.zeros(1, dtype=np.float32)}, first.state_dict())
    restored = create_aggregator("feddrl", SMALL)
    restored.load_state_dict(load_checkpoint(path).aggregator_state)
    assert len(restored.td3.buffer) == len(first.td3.buffer) > 0 and restored.pending
    global_state, updates = rounds[2]
    a = first.aggregate(_ctx(3, global_state, scorer), updates)
    b = restored.aggregate(_ctx(3, global_state, scorer), updates)
    assert a.metrics == b.metrics
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    for net in ("policy", "critic"):
        for (k, v), w in zip(
            getattr(first.a2c, net).state_dict().items(),
            getattr(restored.a2c, net).state_dict().values(),
        ):
            assert torch.equal(v, w), (net, k)
    for net in TD3Agent._NETS:
        for v, w in zip(
            getattr(first.td3, net).state_dict().values(),
            getattr(restored.td3, net).state_dict().values(),
        ):
            assert torch.equal(v, w), net
    with pytest.raises(ValueError, match="other hyperparameters"):
        create_aggregator("feddrl", {**SMALL, "temperature": 2.0}).load_state_dict(
            first.state_dict()
        )


def test_feddrl_needs_a_validation_set_and_checks_its_parameters(digits_rounds) -> None:
    rounds, _ = digits_rounds
    global_state, updates = rounds[0]
    ctx = RoundContext(round=1, global_state=global_state, base_state=global_state)
    with pytest.raises(ValueError, match="server_val_size"):
        create_aggregator("feddrl", {}).aggregate(ctx, updates)
    for params, name in [
        ({"td3_tau": 0}, "td3_tau"),
        ({"a2c_candidates": 0}, "a2c_candidates"),
        ({"stage1_select": "x"}, "stage1_select"),
        ({"td3_horizon": "x"}, "td3_horizon"),
        ({"stage1_tolerance": -0.1}, "stage1_tolerance"),
        ({"stage1_prefixes": 1}, "stage1_prefixes"),
    ]:
        with pytest.raises(ValueError, match=name):
            create_aggregator("feddrl", params)
