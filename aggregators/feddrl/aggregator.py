"""FedDRL: staged reinforcement-learning fusion of client models against malicious clients.

Stage 1 keeps or drops each client with an advantage actor-critic (A2C) policy over per-model
features; stage 2 weights the kept models with a TD3 agent. Both agents learn online, across
rounds, from rewards measured on the server's validation set (``RoundContext.evaluate_many``:
Ray workers in a run). Everything the agents learned (networks, optimisers, replay buffer) is in
``state_dict`` as tensors and JSON, so a resumed run restores them exactly.

Pure torch: no flwr or ray. The paper's full text was not available to us; this follows the
reconstruction in docs ALGORITHMS.md ("FedDRL") and every open choice is a hyperparameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    StateDict,
    checked_num_examples,
)
from fedmerge.aggregators.detection import detection_metrics, weight_entropy
from fedmerge.aggregators.fedavg import fedavg
from fedmerge.aggregators.feddrl.agents import (
    _STREAMS,
    A2CAgent,
    A2CConfig,
    TD3Agent,
    TD3Config,
    _one_thread,
    _seeded,
)
from fedmerge.aggregators.feddrl.features import FEATURES, client_features
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register

__all__ = ["HORIZONS", "SELECT_STAGE1", "SELECT_STAGE2", "FedDRL"]

SELECT_STAGE1 = ("best", "greedy")
SELECT_STAGE2 = ("best", "actor")
HORIZONS = ("round", "step")


@register()
class FedDRL(Aggregator):
    """FedDRL: A2C keeps or drops each client (stage 1), TD3 weights the kept ones (stage 2).

    Chen et al., "FedDRL: A Trustworthy Federated Learning Model Fusion Method Based on Staged
    Reinforcement Learning", Computing and Informatics 43(1), 2024, https://arxiv.org/abs/2307.13716.
    The paper's full text was not available to us: this is the reconstruction of docs
    ALGORITHMS.md ("FedDRL"); each open choice is a hyperparameter.

    Needs the server validation set (``data.server_val_size`` > 0), reached through
    ``RoundContext.evaluate_many``. Each round:

    1. Features (``client_features``): every client model is scored on the validation set.
    2. Stage 1 (A2C, ``a2c_*``): ``a2c_iterations`` times (plus ``a2c_warmup_iterations`` the
       first round the agent sees), ``a2c_candidates`` keep/drop masks are sampled from the
       policy, the FedAvg of each kept set is scored in parallel (reward = its validation
       accuracy; keeping nobody scores 0) and the agent takes one A2C step. The greedy mask
       (p ≥ 0.5) and the mask keeping every client (the round's FedAvg) are scored too, and with
       ``stage1_prefixes`` every prefix of the clients ranked by keep probability (the k most
       trusted, k = 1 … N − 1): a policy that ranks the clients right before its probabilities are
       calibrated then still yields the whole trusted set as a candidate. The kept
       set T is, with ``stage1_select = "best"``, the mask with most clients among those scoring
       within ``stage1_tolerance`` of the round's best (0: the best itself); with ``"greedy"``,
       the greedy mask. A tolerance of about the validation set's sampling error (the default
       0.01, for 1,000 examples) stops the selection from dropping honest clients for differences
       the validation set cannot resolve; a harmful client costs far more than that. Tolerance 0
       without prefixes is the plain reconstruction; docs/results/feddrl.md measures both.
    3. Stage 2 (TD3, ``td3_*``): ``td3_steps`` exploration actions a ∈ [−1, 1]^|T| (actor + N(0,
       ``td3_exploration_noise``²)) become weights w = softmax(a / ``temperature``); each fused
       model Σ wi θi is scored, reward = its validation accuracy minus that of FedAvg over T. The
       transitions go to the replay buffer and the agent trains ``td3_updates`` steps.
       ``td3_horizon = "round"``: a round's transitions lead to the next round's kept set (s'),
       discounted by ``td3_gamma``, and are stored once that state is known; ``"step"``: each is
       a one-step episode (done). The round's weights are those of the best-scoring of FedAvg
       over T, the actor's own action and the exploration actions (``stage2_select = "best"``,
       never below FedAvg over T on the validation set), or the actor's (``"actor"``).
       ``stage2 = false`` skips stage 2 (FedAvg over T).

    Randomness comes from generators seeded by (run seed, round), so a run and its resumed copy
    make the same draws. Metrics per round: ``clients_dropped``, ``detection_precision`` /
    ``detection_recall`` (against the simulated attack's ground truth), ``weight_entropy`` of the
    final weights over all of the round's clients, ``validation_reward`` (stage-2 reward of the
    chosen weights), ``val_accuracy`` of the merged model, ``stage1_reward``, the agents' losses,
    ``fedavg_val_accuracy`` (the round's FedAvg of all clients), ``keep_prob_mean`` and
    ``evaluations`` (models scored this round).
    """

    name = "feddrl"
    needs = frozenset({"validation"})

    @dataclass(frozen=True)
    class Params:
        a2c_hidden: int = hyperparameter(64, "A2C: hidden units of the policy and critic", ge=1)
        a2c_lr: float = hyperparameter(3e-3, "A2C: Adam learning rate", gt=0)
        a2c_entropy_coef: float = hyperparameter(0.01, "A2C: entropy bonus weight β", ge=0)
        a2c_candidates: int = hyperparameter(8, "A2C: keep/drop masks sampled per iteration", ge=1)
        a2c_iterations: int = hyperparameter(2, "A2C: policy steps per round", ge=1)
        a2c_warmup_iterations: int = hyperparameter(
            4, "A2C: extra steps the first round the agent sees", ge=0
        )
        stage1_select: str = hyperparameter(
            "best",
            "kept set: best (most clients within stage1_tolerance "
            "of the best score) | greedy (keep prob >= 0.5)",
            choices=SELECT_STAGE1,
        )
        stage1_tolerance: float = hyperparameter(
            0.01, "stage 1: validation accuracy a larger kept set may lose to the best", ge=0, le=1
        )
        stage1_prefixes: bool = hyperparameter(
            True, "stage 1: also score the k most trusted clients, k = 1 … N − 1"
        )
        stage2: bool = hyperparameter(
            True, "run stage 2 (TD3 weights); false = FedAvg over the kept set"
        )
        td3_hidden: int = hyperparameter(256, "TD3: hidden units of the actor and critics", ge=1)
        td3_actor_lr: float = hyperparameter(3e-4, "TD3: actor learning rate", gt=0)
        td3_critic_lr: float = hyperparameter(3e-4, "TD3: critic learning rate", gt=0)
        td3_gamma: float = hyperparameter(0.99, "TD3: discount γ (td3_horizon = round)", ge=0, le=1)
        td3_tau: float = hyperparameter(0.005, "TD3: target-network step τ", gt=0, le=1)
        td3_policy_noise: float = hyperparameter(
            0.2, "TD3: target policy smoothing noise std", ge=0
        )
        td3_noise_clip: float = hyperparameter(0.5, "TD3: clip of the smoothing noise", ge=0)
        td3_policy_delay: int = hyperparameter(2, "TD3: critic steps per actor step", ge=1)
        td3_exploration_noise: float = hyperparameter(
            0.1, "TD3: std of the exploration actions' noise", ge=0
        )
        td3_steps: int = hyperparameter(8, "TD3: exploration actions scored per round", ge=1)
        td3_updates: int = hyperparameter(32, "TD3: training steps per round", ge=1)
        td3_batch_size: int = hyperparameter(32, "TD3: transitions per training step", ge=1)
        td3_buffer_size: int = hyperparameter(10_000, "TD3: replay buffer capacity", ge=1)
        td3_horizon: str = hyperparameter(
            "round",
            "round (transitions lead to the next round's kept set) | step (one-step episodes)",
            choices=HORIZONS,
        )
        temperature: float = hyperparameter(0.5, "weights = softmax(action / temperature)", gt=0)
        stage2_select: str = hyperparameter(
            "best",
            "round weights: best (best-scoring candidate, never below "
            "FedAvg over the kept set) | actor (the actor's)",
            choices=SELECT_STAGE2,
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        p = self.set_hyperparameters(params)
        self.a2c_config = A2CConfig(
            hidden=p.a2c_hidden,
            lr=p.a2c_lr,
            entropy_coef=p.a2c_entropy_coef,
            num_candidates=p.a2c_candidates,
            iterations=p.a2c_iterations,
            warmup_iterations=p.a2c_warmup_iterations,
        )
        self.td3_config = TD3Config(
            hidden=p.td3_hidden,
            actor_lr=p.td3_actor_lr,
            critic_lr=p.td3_critic_lr,
            gamma=p.td3_gamma,
            tau=p.td3_tau,
            policy_noise=p.td3_policy_noise,
            noise_clip=p.td3_noise_clip,
            policy_delay=p.td3_policy_delay,
            exploration_noise=p.td3_exploration_noise,
            steps=p.td3_steps,
            updates=p.td3_updates,
            batch_size=p.td3_batch_size,
            buffer_size=p.td3_buffer_size,
            horizon=p.td3_horizon,
        )
        self.seed: int | None = None
        self.a2c: A2CAgent | None = None
        self.td3: TD3Agent | None = None
        self.rounds_seen = 0
        # Stage-2 transitions of the last round, waiting for the next round's state (horizon "round").
        self.pending: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    # ---- agents -----------------------------------------------------------------------
    def _agents(self, seed: int) -> tuple[A2CAgent, TD3Agent]:
        if self.a2c is None or self.td3 is None:
            self.seed = seed
            self.a2c = A2CAgent(len(FEATURES), self.a2c_config, seed)
            self.td3 = TD3Agent(len(FEATURES), self.td3_config, seed)
        return self.a2c, self.td3

    # ---- one round --------------------------------------------------------------------
    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        if ctx.evaluate_many is None:
            raise ValueError(
                "feddrl scores models on the server validation set, but this run has none: "
                "set data.server_val_size > 0 (e.g. 1000)"
            )
        a2c, td3 = self._agents(ctx.seed if self.seed is None else self.seed)
        evaluations = 0

        def score(states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, float]]:
            nonlocal evaluations
            evaluations += len(states)
            return ctx.evaluate_many(list(states)) if states else []

        ids = [u.client_id for u in updates]
        counts = [float(checked_num_examples(u)) for u in updates]
        states = [u.state for u in updates]
        features = client_features(updates, ctx.global_state, score(states))

        def merge(weights: Sequence[float]) -> StateDict:
            keep = [i for i, w in enumerate(weights) if w > 0]
            return fedavg([states[i] for i in keep], [weights[i] for i in keep], device=ctx.device)

        # Stage 1: A2C keep/drop.
        gen1 = _seeded(self.seed or 0, _STREAMS["a2c"], ctx.round)
        metrics: dict[str, float] = {}
        iterations = self.a2c_config.iterations + (
            self.a2c_config.warmup_iterations if self.rounds_seen == 0 else 0
        )
        scored: dict[tuple[int, ...], float] = {}
        losses: list[dict[str, float]] = []
        for _ in range(iterations):
            masks = a2c.sample(features, self.a2c_config.num_candidates, gen1)
            keys = [tuple(int(v) for v in m) for m in masks]
            todo = [k for k in dict.fromkeys(keys) if k not in scored and any(k)]
            for key, result in zip(
                todo, score([merge([c * m for c, m in zip(counts, key)]) for key in todo])
            ):
                scored[key] = float(result["accuracy"])
            rewards = torch.tensor([scored.get(k, 0.0) for k in keys])
            with _one_thread():
                losses.append(a2c.update(features, masks, rewards))
        probs = a2c.keep_probs(features)
        greedy = tuple(int(p >= 0.5) for p in probs)
        if not any(greedy):
            greedy = tuple(int(i == int(probs.argmax())) for i in range(len(ids)))
        everyone = (1,) * len(ids)
        extra = [greedy, everyone]
        if self.stage1_prefixes:
            ranked = sorted(range(len(ids)), key=lambda i: (-float(probs[i]), i))
            extra += [
                tuple(int(i in ranked[:k]) for i in range(len(ids))) for k in range(1, len(ids))
            ]
        todo = [k for k in dict.fromkeys(extra) if k not in scored]
        for key, result in zip(
            todo, score([merge([c * m for c, m in zip(counts, key)]) for key in todo])
        ):
            scored[key] = float(result["accuracy"])
        if self.stage1_select == "greedy":
            kept_mask = greedy
        else:
            floor = (
                max(scored.values()) - self.stage1_tolerance - 1e-9
            )  # accuracies are k / n: no float slack
            kept_mask = max(
                (k for k in scored if scored[k] >= floor),
                key=lambda k: (sum(k), scored[k], k == greedy),
            )
        kept = [i for i, m in enumerate(kept_mask) if m]
        stage1_reward = scored[kept_mask]
        metrics.update(
            stage1_reward=stage1_reward,
            fedavg_val_accuracy=scored[everyone],
            keep_prob_mean=float(probs.mean()),
            a2c_actor_loss=losses[-1]["actor_loss"],
            a2c_critic_loss=losses[-1]["critic_loss"],
            a2c_entropy=losses[-1]["entropy"],
        )

        # Stage 2: TD3 weights over the kept clients.
        kept_features = features[kept]
        gen2 = _seeded(self.seed or 0, _STREAMS["td3"], ctx.round)
        if self.pending:
            for s, a, r in self.pending:
                td3.buffer.add(s, a, r, kept_features, done=False)
            self.pending = []
        base_counts = [counts[i] if i in kept else 0.0 for i in range(len(ids))]
        weights = [c / sum(base_counts) for c in base_counts]
        reward = 0.0
        final_accuracy = stage1_reward
        if self.stage2 and len(kept) > 1:
            actions = [td3.act(kept_features)] + [
                td3.act(kept_features, gen2) for _ in range(self.td3_config.steps)
            ]
            candidate_weights = [torch.softmax(a / self.temperature, dim=0) for a in actions]
            results = score([merge(self._spread(w, kept, len(ids))) for w in candidate_weights])
            rewards = [float(r["accuracy"]) - stage1_reward for r in results]
            for a, r in zip(actions[1:], rewards[1:]):
                if self.td3_config.horizon == "round":
                    self.pending.append((kept_features.clone(), a.clone(), r))
                else:
                    td3.buffer.add(kept_features, a, r, kept_features, done=True)
            with _one_thread():
                metrics.update({f"td3_{k}": v for k, v in td3.train(gen2).items()})
            if self.stage2_select == "actor":
                choice = 0
            else:
                best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
                choice = best if rewards[best] > 0 else -1
            if choice >= 0:
                weights = self._spread(candidate_weights[choice], kept, len(ids))
                reward = rewards[choice]
                final_accuracy = float(results[choice]["accuracy"])
        state = merge(weights)
        self.rounds_seen += 1
        metrics.update(
            num_clients=float(len(ids)),
            clients_kept=float(len(kept)),
            validation_reward=reward,
            val_accuracy=final_accuracy,
            weight_entropy=weight_entropy(weights),
            evaluations=float(evaluations),
            replay_size=float(len(td3.buffer)),
        )
        metrics.update(detection_metrics(ids, [ids[i] for i in kept], ctx.malicious))
        return AggregateResult(state=state, metrics=metrics)

    @staticmethod
    def _spread(weights: torch.Tensor, kept: Sequence[int], n: int) -> list[float]:
        out = [0.0] * n
        for w, i in zip(weights.tolist(), kept):
            out[i] = float(w)
        return out

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters (checked on load), the agents, the replay buffer and pending transitions."""
        config = {
            "a2c": asdict(self.a2c_config),
            "td3": asdict(self.td3_config),
            "temperature": self.temperature,
            "stage1_select": self.stage1_select,
            "stage1_tolerance": self.stage1_tolerance,
            "stage1_prefixes": self.stage1_prefixes,
            "stage2_select": self.stage2_select,
            "stage2": self.stage2,
        }
        if self.a2c is None or self.td3 is None:
            return {"config": config, "agents": None}
        return {
            "config": config,
            "seed": self.seed,
            "rounds_seen": self.rounds_seen,
            "agents": {"a2c": self.a2c.state_dict(), "td3": self.td3.state_dict()},
            "pending": {
                "states": [s for s, _, _ in self.pending],
                "actions": [a for _, a, _ in self.pending],
                "rewards": [r for _, _, r in self.pending],
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        mine = self.state_dict()["config"]
        theirs = _plain(state.get("config"))
        if theirs != _plain(mine):
            raise ValueError(
                f"FedDRL state was saved with other hyperparameters: {theirs} != {mine}"
            )
        if state.get("agents") is None:
            self.a2c = self.td3 = None
            self.seed, self.rounds_seen, self.pending = None, 0, []
            return
        self.seed = int(state["seed"])
        self.a2c = self.td3 = None
        a2c, td3 = self._agents(self.seed)
        a2c.load_state_dict(state["agents"]["a2c"])
        td3.load_state_dict(state["agents"]["td3"])
        self.rounds_seen = int(state["rounds_seen"])
        pending = state["pending"]
        self.pending = [
            (torch.as_tensor(s).clone(), torch.as_tensor(a).clone(), float(r))
            for s, a, r in zip(pending["states"], pending["actions"], pending["rewards"])
        ]


def _plain(value: Any) -> Any:
    """JSON-shaped data as a checkpoint gives it back (tuples as lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
