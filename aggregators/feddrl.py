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

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

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
from fedmerge.aggregators.median import coordinate_median
from fedmerge.aggregators.registry import register

__all__ = [
    "A2CAgent",
    "A2CConfig",
    "FEATURES",
    "FedDRL",
    "ReplayBuffer",
    "TD3Agent",
    "TD3Config",
    "client_features",
]

FEATURES = ("val_accuracy", "val_accuracy_vs_median", "log_val_loss", "log_update_norm_ratio",
            "cosine_to_median_update", "log_count_ratio")
LOG_CLIP = 5.0  # log-ratio features are clipped to [-5, 5]: e^5 = 148 times the median is "huge"
_STREAMS = {"init": 1, "a2c": 2, "td3": 3}


# ---------------------------------------------------------------------------------------------
# Per-model features
# ---------------------------------------------------------------------------------------------

def _delta(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k].detach().double().cpu() - reference[k].detach().double().cpu()).reshape(-1)
                      for k in reference if reference[k].is_floating_point()])


def client_features(updates: Sequence[ClientUpdate], global_state: Mapping[str, torch.Tensor],
                    scores: Sequence[Mapping[str, float]]) -> torch.Tensor:
    """One row of ``FEATURES`` per update (float32, shape N × 6).

    ``scores`` are the models' validation metrics (``accuracy``, ``loss``). Norms, similarities
    and counts are relative to the round's median, so the features mean the same in every round
    whatever the model's scale: accuracy and accuracy minus the round's median accuracy;
    log(1 + loss); log(‖θi − θt‖ / median norm); cosine of θi − θt with the coordinate-wise
    median update; log(ni / median n).
    """
    if len(scores) != len(updates):
        raise ValueError(f"client_features: {len(updates)} updates but {len(scores)} scores")
    deltas = [_delta(u.state, global_state) for u in updates]
    median_delta = torch.cat([v.reshape(-1) for v in coordinate_median(
        [{"d": d} for d in deltas]).values()])
    norms = torch.stack([d.norm() for d in deltas])
    median_norm = float(norms.median()) or 1e-12
    counts = torch.tensor([float(checked_num_examples(u)) for u in updates], dtype=torch.float64)
    median_count = float(counts.median())
    accuracy = torch.tensor([float(s["accuracy"]) for s in scores], dtype=torch.float64)
    loss = torch.tensor([float(s["loss"]) for s in scores], dtype=torch.float64)
    median_norm_d = float(median_delta.norm())
    cosines = torch.stack([
        torch.dot(d, median_delta) / (d.norm() * median_norm_d) if float(d.norm()) > 0 and median_norm_d > 0
        else torch.zeros((), dtype=torch.float64) for d in deltas])
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, 1e6))
    rows = torch.stack([
        accuracy,
        accuracy - accuracy.median(),
        torch.log1p(loss.clamp(min=0, max=1e6)),
        torch.log(norms.clamp(min=1e-12) / median_norm).clamp(-LOG_CLIP, LOG_CLIP),
        cosines,
        torch.log(counts / median_count).clamp(-LOG_CLIP, LOG_CLIP),
    ], dim=1)
    return rows.float()


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SetCritic(nn.Module):
    """A value over a set of clients (any number): rho(mean over i of phi(input_i)), masked."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.phi = _mlp([in_features, hidden, hidden])
        self.rho = _mlp([hidden, hidden, 1])

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``inputs`` B × N × F, ``mask`` B × N (1 = a client, 0 = padding) -> B values."""
        h = torch.relu(self.phi(inputs)) * mask.unsqueeze(-1)
        pooled = h.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return self.rho(pooled).squeeze(-1)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimiser's state_dict with string keys (checkpoints take JSON keys only)."""
    raw = optimizer.state_dict()
    return {"state": {str(k): dict(v) for k, v in raw["state"].items()},
            "param_groups": [dict(g) for g in raw["param_groups"]]}


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], where: str) -> None:
    try:
        groups = [dict(g) for g in state["param_groups"]]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": {int(k): dict(v) for k, v in state["state"].items()},
                                   "param_groups": groups})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"FedDRL state {where}: not an optimiser state ({exc})") from exc


def _load_module(module: nn.Module, state: Mapping[str, Any], where: str) -> None:
    try:
        module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"FedDRL state {where}: does not fit the network ({exc})") from exc


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _one_thread:
    """Run the agents' small matrix products on one thread: on a busy machine torch's thread pool
    makes them an order of magnitude slower, and one thread keeps them bit-reproducible."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)


def _seeded(seed: int, *stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, *stream]).integers(2**63)))


def _init_seed(seed: int, *stream: int) -> int:
    return int(np.random.default_rng([seed, *stream]).integers(2**63))


# ---------------------------------------------------------------------------------------------
# Stage 1: A2C keep/drop policy
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class A2CConfig:
    """Stage 1 hyperparameters (see FedDRL's docstring)."""

    hidden: int = 64
    lr: float = 3e-3
    entropy_coef: float = 0.01
    num_candidates: int = 8
    iterations: int = 2
    warmup_iterations: int = 4


class A2CAgent:
    """Independent Bernoulli keep/drop per client from a shared MLP over its features; a set
    critic estimates the expected reward of the round's state (the baseline of the advantage)."""

    def __init__(self, num_features: int, config: A2CConfig, seed: int) -> None:
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_init_seed(seed, _STREAMS["init"], 1))
            self.policy = _mlp([num_features, config.hidden, config.hidden, 1])
            self.critic = SetCritic(num_features, config.hidden)
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.lr)
        self.updates = 0

    def keep_probs(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(self.policy(features).squeeze(-1))

    def sample(self, features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """k keep/drop masks (k × N, float 0/1) drawn from the policy."""
        probs = self.keep_probs(features)
        return (torch.rand((k, len(probs)), generator=generator) < probs).float()

    def update(self, features: torch.Tensor, masks: torch.Tensor, rewards: torch.Tensor) -> dict[str, float]:
        """One advantage actor-critic step on the round's sampled masks and their rewards.

        Actor loss = −mean_k A_k Σ_i log π(m_ki | x_i) − β · mean_i H(π(· | x_i)) with
        A_k = R_k − V(x) (V detached); critic loss = mean_k (R_k − V(x))². Returns both losses
        (before the step) and the mean entropy.
        """
        logits = self.policy(features).squeeze(-1)
        log_keep, log_drop = nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits)
        log_prob = (masks * log_keep + (1 - masks) * log_drop).sum(dim=1)
        probs = torch.sigmoid(logits)
        entropy = -(probs * log_keep + (1 - probs) * log_drop).mean()
        value = self.critic(features.unsqueeze(0), torch.ones(1, len(features))).squeeze(0)
        advantage = rewards - value.detach()
        actor_loss = -(advantage * log_prob).mean() - self.config.entropy_coef * entropy
        critic_loss = ((rewards - value) ** 2).mean()
        self.policy_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.policy_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.updates += 1
        return {"actor_loss": actor_loss.item(), "critic_loss": critic_loss.item(), "entropy": entropy.item()}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": _module_state(self.policy), "critic": _module_state(self.critic),
                "policy_opt": _optimizer_state(self.policy_opt), "critic_opt": _optimizer_state(self.critic_opt),
                "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _load_module(self.policy, state["policy"], "a2c/policy")
        _load_module(self.critic, state["critic"], "a2c/critic")
        _load_optimizer(self.policy_opt, state["policy_opt"], "a2c/policy_opt")
        _load_optimizer(self.critic_opt, state["critic_opt"], "a2c/critic_opt")
        self.updates = int(state["updates"])


# ---------------------------------------------------------------------------------------------
# Stage 2: TD3 weights
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TD3Config:
    """Stage 2 hyperparameters (see FedDRL's docstring)."""

    hidden: int = 256
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_delay: int = 2
    exploration_noise: float = 0.1
    steps: int = 8
    updates: int = 32
    batch_size: int = 32
    buffer_size: int = 10_000
    horizon: str = "round"


class ReplayBuffer:
    """Transitions (s, a, r, s', done) over client sets of any size, oldest dropped first.

    Stored ragged: every s is k × F and its action k values, s' is k' × F; ``sample`` pads a
    batch to its largest set and returns masks.
    """

    def __init__(self, capacity: int, num_features: int) -> None:
        self.capacity = capacity
        self.num_features = num_features
        self.items: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, float]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, state: torch.Tensor, action: torch.Tensor, reward: float, next_state: torch.Tensor,
            done: bool) -> None:
        self.items.append((state.detach().float().clone(), action.detach().float().clone(), float(reward),
                           next_state.detach().float().clone(), float(done)))
        if len(self.items) > self.capacity:
            del self.items[: len(self.items) - self.capacity]

    @staticmethod
    def _pad(rows: Sequence[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = max(len(r) for r in rows)
        out = torch.zeros(len(rows), size, width)
        mask = torch.zeros(len(rows), size)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r.reshape(len(r), width)
            mask[i, : len(r)] = 1
        return out, mask

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        index = torch.randint(len(self.items), (batch_size,), generator=generator).tolist()
        batch = [self.items[i] for i in index]
        s, mask = self._pad([b[0] for b in batch], self.num_features)
        a, _ = self._pad([b[1] for b in batch], 1)
        s2, mask2 = self._pad([b[3] for b in batch], self.num_features)
        return {"s": s, "mask": mask, "a": a.squeeze(-1), "r": torch.tensor([b[2] for b in batch]),
                "s2": s2, "mask2": mask2, "done": torch.tensor([b[4] for b in batch])}

    def state_dict(self) -> dict[str, Any]:
        def cat(rows: list[torch.Tensor], width: int) -> torch.Tensor:
            return torch.cat([r.reshape(-1, width) for r in rows]) if rows else torch.zeros(0, width)

        return {
            "capacity": self.capacity,
            "states": cat([i[0] for i in self.items], self.num_features),
            "state_sizes": torch.tensor([len(i[0]) for i in self.items], dtype=torch.int64),
            "actions": cat([i[1] for i in self.items], 1).reshape(-1),
            "rewards": torch.tensor([i[2] for i in self.items], dtype=torch.float32),
            "next_states": cat([i[3] for i in self.items], self.num_features),
            "next_sizes": torch.tensor([len(i[3]) for i in self.items], dtype=torch.int64),
            "dones": torch.tensor([i[4] for i in self.items], dtype=torch.float32),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sizes = [int(n) for n in torch.as_tensor(state["state_sizes"])]
        next_sizes = [int(n) for n in torch.as_tensor(state["next_sizes"])]
        states = torch.as_tensor(state["states"]).split(sizes) if sizes else []
        actions = torch.as_tensor(state["actions"]).split(sizes) if sizes else []
        next_states = torch.as_tensor(state["next_states"]).split(next_sizes) if next_sizes else []
        rewards, dones = torch.as_tensor(state["rewards"]), torch.as_tensor(state["dones"])
        if not (len(sizes) == len(next_sizes) == len(rewards) == len(dones)):
            raise ValueError("FedDRL state td3/buffer: its arrays disagree on the number of transitions")
        self.capacity = int(state["capacity"])
        self.items = [(states[i].clone(), actions[i].clone(), float(rewards[i]), next_states[i].clone(),
                       float(dones[i])) for i in range(len(sizes))]


class TD3Agent:
    """Twin-delayed DDPG over client sets: a per-client actor maps features to a ∈ [−1, 1], twin
    set critics score (features, actions); target networks, target policy smoothing and delayed
    actor updates as in Fujimoto et al. 2018 (https://arxiv.org/abs/1802.09477)."""

    def __init__(self, num_features: int, config: TD3Config, seed: int) -> None:
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_init_seed(seed, _STREAMS["init"], 2))
            self.actor = _mlp([num_features, config.hidden, config.hidden, 1])
            self.critic1 = SetCritic(num_features + 1, config.hidden)
            self.critic2 = SetCritic(num_features + 1, config.hidden)
        self.actor_target = _copy(self.actor)
        self.critic1_target = _copy(self.critic1)
        self.critic2_target = _copy(self.critic2)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam([*self.critic1.parameters(), *self.critic2.parameters()],
                                           lr=config.critic_lr)
        self.buffer = ReplayBuffer(config.buffer_size, num_features)
        self.updates = 0

    def act(self, features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The actor's action for a client set; with ``generator``, plus exploration noise."""
        with torch.no_grad():
            action = torch.tanh(self.actor(features).squeeze(-1))
            if generator is not None:
                noise = torch.randn(action.shape, generator=generator) * self.config.exploration_noise
                action = (action + noise).clamp(-1.0, 1.0)
        return action

    def _q(self, critic: nn.Module, s: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return critic(torch.cat([s, a.unsqueeze(-1)], dim=-1), mask)

    def update(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, float]:
        """One TD3 step on a batch: both critics regress on r + γ(1 − done) min Q'(s', ã'), and
        every ``policy_delay`` steps the actor ascends Q1 and the targets move by τ."""
        cfg = self.config
        s, a, mask, r = batch["s"], batch["a"], batch["mask"], batch["r"]
        with torch.no_grad():
            s2, mask2 = batch["s2"], batch["mask2"]
            noise = (torch.randn(mask2.shape, generator=generator) * cfg.policy_noise).clamp(
                -cfg.noise_clip, cfg.noise_clip)
            a2 = (torch.tanh(self.actor_target(s2).squeeze(-1)) + noise).clamp(-1.0, 1.0) * mask2
            q_next = torch.min(self._q(self.critic1_target, s2, a2, mask2),
                               self._q(self.critic2_target, s2, a2, mask2))
            target = r + cfg.gamma * (1 - batch["done"]) * q_next
        critic_loss = (nn.functional.mse_loss(self._q(self.critic1, s, a, mask), target)
                       + nn.functional.mse_loss(self._q(self.critic2, s, a, mask), target))
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.updates += 1
        out = {"critic_loss": critic_loss.item()}
        if self.updates % cfg.policy_delay == 0:
            actor_action = torch.tanh(self.actor(s).squeeze(-1)) * mask
            actor_loss = -self._q(self.critic1, s, actor_action, mask).mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            out["actor_loss"] = actor_loss.item()
            for net, target_net in ((self.actor, self.actor_target), (self.critic1, self.critic1_target),
                                    (self.critic2, self.critic2_target)):
                with torch.no_grad():
                    for p, tp in zip(net.parameters(), target_net.parameters()):
                        tp.mul_(1 - cfg.tau).add_(p, alpha=cfg.tau)
        return out

    def train(self, generator: torch.Generator) -> dict[str, float]:
        """``updates`` steps on batches from the replay buffer; mean losses (empty: no data yet)."""
        if len(self.buffer) == 0:
            return {}
        sums: dict[str, list[float]] = {}
        for _ in range(self.config.updates):
            for key, value in self.update(self.buffer.sample(self.config.batch_size, generator), generator).items():
                sums.setdefault(key, []).append(value)
        return {key: sum(values) / len(values) for key, values in sums.items()}

    _NETS = ("actor", "critic1", "critic2", "actor_target", "critic1_target", "critic2_target")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: _module_state(getattr(self, name)) for name in self._NETS}
        out.update(actor_opt=_optimizer_state(self.actor_opt), critic_opt=_optimizer_state(self.critic_opt),
                   buffer=self.buffer.state_dict(), updates=self.updates)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in self._NETS:
            _load_module(getattr(self, name), state[name], f"td3/{name}")
        _load_optimizer(self.actor_opt, state["actor_opt"], "td3/actor_opt")
        _load_optimizer(self.critic_opt, state["critic_opt"], "td3/critic_opt")
        self.buffer.load_state_dict(state["buffer"])
        self.updates = int(state["updates"])


def _copy(module: nn.Module) -> nn.Module:
    """A frozen copy (a target network)."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


# ---------------------------------------------------------------------------------------------
# The aggregator
# ---------------------------------------------------------------------------------------------

SELECT_STAGE1 = ("best", "greedy")
SELECT_STAGE2 = ("best", "actor")
HORIZONS = ("round", "step")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
    return value


def _number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
        raise ValueError(f"{name}={value!r} is invalid: must be a number {bound}")
    return float(value)


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

    def __init__(self, *, a2c_hidden: int = 64, a2c_lr: float = 3e-3, a2c_entropy_coef: float = 0.01,
                 a2c_candidates: int = 8, a2c_iterations: int = 2, a2c_warmup_iterations: int = 4,
                 stage1_select: str = "best", stage1_tolerance: float = 0.01, stage1_prefixes: bool = True,
                 stage2: bool = True,
                 td3_hidden: int = 256,
                 td3_actor_lr: float = 3e-4, td3_critic_lr: float = 3e-4, td3_gamma: float = 0.99,
                 td3_tau: float = 0.005, td3_policy_noise: float = 0.2, td3_noise_clip: float = 0.5,
                 td3_policy_delay: int = 2, td3_exploration_noise: float = 0.1, td3_steps: int = 8,
                 td3_updates: int = 32, td3_batch_size: int = 32, td3_buffer_size: int = 10_000,
                 td3_horizon: str = "round", temperature: float = 0.5, stage2_select: str = "best") -> None:
        super().__init__()
        if stage1_select not in SELECT_STAGE1:
            raise ValueError(f"stage1_select={stage1_select!r} is invalid: must be one of {', '.join(SELECT_STAGE1)}")
        if stage2_select not in SELECT_STAGE2:
            raise ValueError(f"stage2_select={stage2_select!r} is invalid: must be one of {', '.join(SELECT_STAGE2)}")
        if td3_horizon not in HORIZONS:
            raise ValueError(f"td3_horizon={td3_horizon!r} is invalid: must be one of {', '.join(HORIZONS)}")
        if not isinstance(stage1_prefixes, bool):
            raise ValueError(f"stage1_prefixes={stage1_prefixes!r} is invalid: must be true or false")
        if not isinstance(stage2, bool):
            raise ValueError(f"stage2={stage2!r} is invalid: must be true or false")
        if isinstance(a2c_warmup_iterations, bool) or not isinstance(a2c_warmup_iterations, int) \
                or a2c_warmup_iterations < 0:
            raise ValueError(f"a2c_warmup_iterations={a2c_warmup_iterations!r} is invalid: must be an integer >= 0")
        self.a2c_config = A2CConfig(
            hidden=_positive_int("a2c_hidden", a2c_hidden), lr=_number("a2c_lr", a2c_lr, 0, low_open=True),
            entropy_coef=_number("a2c_entropy_coef", a2c_entropy_coef, 0),
            num_candidates=_positive_int("a2c_candidates", a2c_candidates),
            iterations=_positive_int("a2c_iterations", a2c_iterations), warmup_iterations=a2c_warmup_iterations)
        self.td3_config = TD3Config(
            hidden=_positive_int("td3_hidden", td3_hidden),
            actor_lr=_number("td3_actor_lr", td3_actor_lr, 0, low_open=True),
            critic_lr=_number("td3_critic_lr", td3_critic_lr, 0, low_open=True),
            gamma=_number("td3_gamma", td3_gamma, 0, 1), tau=_number("td3_tau", td3_tau, 0, 1, low_open=True),
            policy_noise=_number("td3_policy_noise", td3_policy_noise, 0),
            noise_clip=_number("td3_noise_clip", td3_noise_clip, 0),
            policy_delay=_positive_int("td3_policy_delay", td3_policy_delay),
            exploration_noise=_number("td3_exploration_noise", td3_exploration_noise, 0),
            steps=_positive_int("td3_steps", td3_steps), updates=_positive_int("td3_updates", td3_updates),
            batch_size=_positive_int("td3_batch_size", td3_batch_size),
            buffer_size=_positive_int("td3_buffer_size", td3_buffer_size), horizon=td3_horizon)
        self.temperature = _number("temperature", temperature, 0, low_open=True)
        self.stage1_select = stage1_select
        self.stage1_tolerance = _number("stage1_tolerance", stage1_tolerance, 0, 1)
        self.stage1_prefixes = stage1_prefixes
        self.stage2_select = stage2_select
        self.stage2 = stage2
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
            raise ValueError("feddrl scores models on the server validation set, but this run has none: "
                             "set data.server_val_size > 0 (e.g. 1000)")
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
        iterations = self.a2c_config.iterations + (self.a2c_config.warmup_iterations if self.rounds_seen == 0 else 0)
        scored: dict[tuple[int, ...], float] = {}
        losses: list[dict[str, float]] = []
        for _ in range(iterations):
            masks = a2c.sample(features, self.a2c_config.num_candidates, gen1)
            keys = [tuple(int(v) for v in m) for m in masks]
            todo = [k for k in dict.fromkeys(keys) if k not in scored and any(k)]
            for key, result in zip(todo, score([merge([c * m for c, m in zip(counts, key)]) for key in todo])):
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
            extra += [tuple(int(i in ranked[:k]) for i in range(len(ids))) for k in range(1, len(ids))]
        todo = [k for k in dict.fromkeys(extra) if k not in scored]
        for key, result in zip(todo, score([merge([c * m for c, m in zip(counts, key)]) for key in todo])):
            scored[key] = float(result["accuracy"])
        if self.stage1_select == "greedy":
            kept_mask = greedy
        else:
            floor = max(scored.values()) - self.stage1_tolerance - 1e-9  # accuracies are k / n: no float slack
            kept_mask = max((k for k in scored if scored[k] >= floor), key=lambda k: (sum(k), scored[k], k == greedy))
        kept = [i for i, m in enumerate(kept_mask) if m]
        stage1_reward = scored[kept_mask]
        metrics.update(stage1_reward=stage1_reward, fedavg_val_accuracy=scored[everyone],
                       keep_prob_mean=float(probs.mean()),
                       a2c_actor_loss=losses[-1]["actor_loss"], a2c_critic_loss=losses[-1]["critic_loss"],
                       a2c_entropy=losses[-1]["entropy"])

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
            actions = [td3.act(kept_features)] + [td3.act(kept_features, gen2) for _ in range(self.td3_config.steps)]
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
            num_clients=float(len(ids)), clients_kept=float(len(kept)), validation_reward=reward,
            val_accuracy=final_accuracy, weight_entropy=weight_entropy(weights), evaluations=float(evaluations),
            replay_size=float(len(td3.buffer)))
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
        config = {"a2c": asdict(self.a2c_config), "td3": asdict(self.td3_config), "temperature": self.temperature,
                  "stage1_select": self.stage1_select, "stage1_tolerance": self.stage1_tolerance,
                  "stage1_prefixes": self.stage1_prefixes,
                  "stage2_select": self.stage2_select, "stage2": self.stage2}
        if self.a2c is None or self.td3 is None:
            return {"config": config, "agents": None}
        return {
            "config": config, "seed": self.seed, "rounds_seen": self.rounds_seen,
            "agents": {"a2c": self.a2c.state_dict(), "td3": self.td3.state_dict()},
            "pending": {"states": [s for s, _, _ in self.pending], "actions": [a for _, a, _ in self.pending],
                        "rewards": [r for _, _, r in self.pending]},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        mine = self.state_dict()["config"]
        theirs = _plain(state.get("config"))
        if theirs != _plain(mine):
            raise ValueError(f"FedDRL state was saved with other hyperparameters: {theirs} != {mine}")
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
        self.pending = [(torch.as_tensor(s).clone(), torch.as_tensor(a).clone(), float(r))
                        for s, a, r in zip(pending["states"], pending["actions"], pending["rewards"])]


def _plain(value: Any) -> Any:
    """JSON-shaped data as a checkpoint gives it back (tuples as lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
