"""FedDRL's agents: the A2C keep/drop policy (stage 1) and the TD3 weighting agent (stage 2).

Both are small MLPs over per-client features, with set critics that pool over a round's clients
(any number of them). Their weights, optimisers and (TD3) replay buffer are plain tensors and
JSON in ``state_dict``. Initial weights and every draw come from generators seeded by the run
seed and a stream number (``_STREAMS``), so a resumed run makes the same draws.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmerge.aggregators.feddrl.replay import ReplayBuffer

__all__ = ["A2CAgent", "A2CConfig", "SetCritic", "TD3Agent", "TD3Config"]

_STREAMS = {"init": 1, "a2c": 2, "td3": 3}


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
    """An optimiser's state_dict with string keys (checkpoints take JSON keys only), its tensors
    copied: torch's own shares the live moments, and an optimiser loaded from it (which keeps
    tensors of the right dtype and device as they are) would then step the same tensors."""
    raw = optimizer.state_dict()
    return {
        "state": {
            str(k): {
                name: value.detach().clone() if isinstance(value, torch.Tensor) else value
                for name, value in v.items()
            }
            for k, v in raw["state"].items()
        },
        "param_groups": [dict(g) for g in raw["param_groups"]],
    }


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], where: str) -> None:
    try:
        groups = [dict(g) for g in state["param_groups"]]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict(
            {"state": {int(k): dict(v) for k, v in state["state"].items()}, "param_groups": groups}
        )
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
    return torch.Generator().manual_seed(
        int(np.random.default_rng([seed, *stream]).integers(2**63))
    )


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

    def update(
        self, features: torch.Tensor, masks: torch.Tensor, rewards: torch.Tensor
    ) -> dict[str, float]:
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
        return {
            "actor_loss": actor_loss.item(),
            "critic_loss": critic_loss.item(),
            "entropy": entropy.item(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": _module_state(self.policy),
            "critic": _module_state(self.critic),
            "policy_opt": _optimizer_state(self.policy_opt),
            "critic_opt": _optimizer_state(self.critic_opt),
            "updates": self.updates,
        }

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
        self.critic_opt = torch.optim.Adam(
            [*self.critic1.parameters(), *self.critic2.parameters()], lr=config.critic_lr
        )
        self.buffer = ReplayBuffer(config.buffer_size, num_features)
        self.updates = 0

    def act(self, features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The actor's action for a client set; with ``generator``, plus exploration noise."""
        with torch.no_grad():
            action = torch.tanh(self.actor(features).squeeze(-1))
            if generator is not None:
                noise = (
                    torch.randn(action.shape, generator=generator) * self.config.exploration_noise
                )
                action = (action + noise).clamp(-1.0, 1.0)
        return action

    def _q(
        self, critic: nn.Module, s: torch.Tensor, a: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return critic(torch.cat([s, a.unsqueeze(-1)], dim=-1), mask)

    def update(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, float]:
        """One TD3 step on a batch: both critics regress on r + γ(1 − done) min Q'(s', ã'), and
        every ``policy_delay`` steps the actor ascends Q1 and the targets move by τ."""
        cfg = self.config
        s, a, mask, r = batch["s"], batch["a"], batch["mask"], batch["r"]
        with torch.no_grad():
            s2, mask2 = batch["s2"], batch["mask2"]
            noise = (torch.randn(mask2.shape, generator=generator) * cfg.policy_noise).clamp(
                -cfg.noise_clip, cfg.noise_clip
            )
            a2 = (torch.tanh(self.actor_target(s2).squeeze(-1)) + noise).clamp(-1.0, 1.0) * mask2
            q_next = torch.min(
                self._q(self.critic1_target, s2, a2, mask2),
                self._q(self.critic2_target, s2, a2, mask2),
            )
            target = r + cfg.gamma * (1 - batch["done"]) * q_next
        critic_loss = nn.functional.mse_loss(
            self._q(self.critic1, s, a, mask), target
        ) + nn.functional.mse_loss(self._q(self.critic2, s, a, mask), target)
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
            for net, target_net in (
                (self.actor, self.actor_target),
                (self.critic1, self.critic1_target),
                (self.critic2, self.critic2_target),
            ):
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
            for key, value in self.update(
                self.buffer.sample(self.config.batch_size, generator), generator
            ).items():
                sums.setdefault(key, []).append(value)
        return {key: sum(values) / len(values) for key, values in sums.items()}

    _NETS = ("actor", "critic1", "critic2", "actor_target", "critic1_target", "critic2_target")

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: _module_state(getattr(self, name)) for name in self._NETS}
        out.update(
            actor_opt=_optimizer_state(self.actor_opt),
            critic_opt=_optimizer_state(self.critic_opt),
            buffer=self.buffer.state_dict(),
            updates=self.updates,
        )
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
