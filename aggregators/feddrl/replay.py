"""FedDRL's replay buffer: stage-2 transitions over client sets of any size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["ReplayBuffer"]


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

    def add(
        self,
        state: torch.Tensor,
        action: torch.Tensor,
        reward: float,
        next_state: torch.Tensor,
        done: bool,
    ) -> None:
        self.items.append(
            (
                state.detach().float().clone(),
                action.detach().float().clone(),
                float(reward),
                next_state.detach().float().clone(),
                float(done),
            )
        )
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
        return {
            "s": s,
            "mask": mask,
            "a": a.squeeze(-1),
            "r": torch.tensor([b[2] for b in batch]),
            "s2": s2,
            "mask2": mask2,
            "done": torch.tensor([b[4] for b in batch]),
        }

    def state_dict(self) -> dict[str, Any]:
        def cat(rows: list[torch.Tensor], width: int) -> torch.Tensor:
            return (
                torch.cat([r.reshape(-1, width) for r in rows]) if rows else torch.zeros(0, width)
            )

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
            raise ValueError(
                "FedDRL state td3/buffer: its arrays disagree on the number of transitions"
            )
        self.capacity = int(state["capacity"])
        self.items = [
            (
                states[i].clone(),
                actions[i].clone(),
                float(rewards[i]),
                next_states[i].clone(),
                float(dones[i]),
            )
            for i in range(len(sizes))
        ]
