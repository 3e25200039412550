"""What the model-merging aggregators share: task vectors, grouping by task, per-task heads.

A multi-task model keeps one classification head per task under ``heads.<task index>.``; those
keys are never merged across tasks. A client that trained on a single task says so with the
metric ``task_id`` (sent by the client app), so the head of task t is the example-weighted mean
of the heads of task t's clients, whatever method merges the rest. Without task ids (a one-task
model such as the Fashion-MNIST CNN) every client is its own group and there are no heads.

``group_states`` turns a round's updates into the models a merge combines: one per client
(``"client"``) or, with ``"task"``, the example-weighted mean of each task's clients (clients
without a task id stay on their own), so several clients of one task count as one fine-tuned
model, as in the papers' one-model-per-task setting.

``dare_states`` is DARE's drop-and-rescale of each model's task vector, the option the task-vector
methods share (``dare`` = the drop rate; 0 leaves the models untouched).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmerge.aggregators.base import (
    AggregateResult,
    ClientUpdate,
    RoundContext,
    StateDict,
    checked_num_examples,
)

__all__ = [
    "GROUP_BY",
    "HEAD_PATTERN",
    "Group",
    "count_parameters",
    "dare_generator",
    "dare_states",
    "drop_and_rescale",
    "group_states",
    "head_task",
    "merge_per_task",
    "merged_heads",
    "mergeable",
    "stored_bytes",
    "task_id",
]

GROUP_BY = ("task", "client")
HEAD_PATTERN = re.compile(r"^heads\.(\d+)\.")
"""Keys of a per-task head: ``heads.<task index>.<param>``."""


def head_task(key: str) -> int | None:
    """The task index of a per-task head key, None for a shared parameter."""
    match = HEAD_PATTERN.match(key)
    return int(match.group(1)) if match else None


def task_id(update: ClientUpdate) -> int | None:
    """The single task a client trained on (its ``task_id`` metric), None when it reported none
    or a negative one (a shard that mixes tasks)."""
    value = update.metrics.get("task_id")
    if value is None or value < 0:
        return None
    if value != int(value):
        raise ValueError(f"client {update.client_id}: task_id must be an integer, got {value!r}")
    return int(value)


def mergeable(key: str, tensor: torch.Tensor) -> bool:
    """Whether a merge combines ``key``: floating-point shared parameters (not heads, not integer
    buffers such as BatchNorm's step counter)."""
    return tensor.is_floating_point() and head_task(key) is None


@dataclass(frozen=True)
class Group:
    """One model a merge combines: its weights, example count, the clients and task behind it."""

    state: Mapping[str, torch.Tensor]
    num_examples: float
    clients: tuple[int, ...]
    task: int | None


def _weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], device: torch.device
) -> StateDict:
    total = float(sum(weights))
    out: StateDict = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.to(device)
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64, device=device)
        for state, w in zip(states, weights):
            acc.add_(state[key].to(device), alpha=w / total)
        out[key] = acc.to(first.dtype)
    return out


def group_states(
    updates: Sequence[ClientUpdate], group_by: str, device: torch.device
) -> list[Group]:
    """The round's models to merge, in a fixed order (by first client), on ``device``."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r} is invalid: must be one of {', '.join(GROUP_BY)}")
    if not updates:
        raise ValueError("no client updates to merge")
    buckets: dict[object, list[ClientUpdate]] = {}
    for u in updates:
        t = task_id(u) if group_by == "task" else None
        buckets.setdefault(("task", t) if t is not None else ("client", u.client_id), []).append(u)
    groups = []
    for members in buckets.values():
        counts = [checked_num_examples(u) for u in members]
        if len(members) == 1:
            state = {k: v.to(device) for k, v in members[0].state.items()}
        else:
            state = _weighted_mean([u.state for u in members], counts, device)
        tasks = {task_id(u) for u in members}
        groups.append(
            Group(
                state=state,
                num_examples=float(sum(counts)),
                clients=tuple(u.client_id for u in members),
                task=tasks.pop() if len(tasks) == 1 else None,
            )
        )
    return groups


def merged_heads(
    base: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], device: torch.device
) -> StateDict:
    """Every per-task head key: the example-weighted mean over the clients of its task.

    A head no client of its task trained keeps the base value. When no client reported a task
    id, heads are averaged over all clients (plain FedAvg), the only choice left.
    """
    head_keys = [k for k in base if head_task(k) is not None]
    if not head_keys:
        return {}
    any_ids = any(task_id(u) is not None for u in updates)
    out: StateDict = {}
    for t in sorted({head_task(k) for k in head_keys}):
        keys = [k for k in head_keys if head_task(k) == t]
        members = [u for u in updates if not any_ids or task_id(u) == t]
        if not members:
            out.update({k: base[k].to(device) for k in keys})
            continue
        out.update(
            _weighted_mean(
                [{k: u.state[k] for k in keys} for u in members],
                [checked_num_examples(u) for u in members],
                device,
            )
        )
    return out


def count_parameters(module: torch.nn.Module) -> int:
    """Stored numbers of a module: parameters and floating buffers (frozen task vectors, the
    pretrained weights a MoE layer keeps), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if not tensor.is_floating_point() or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel()
    return total


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of a module, integer ones too (the positions a sparse
    tensor stores next to its values), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


_DARE_STREAM = 0xDA7E
"""Keeps DARE's masks apart from any other random stream derived from the run's seed."""


def drop_and_rescale(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on one task-vector tensor: each entry is dropped (set to 0) with probability ``p``
    and the kept ones are scaled by 1/(1 - p), so the expectation is ``tau`` itself.

    The mask is drawn on the CPU from ``generator`` (the same masks on any device), one uniform
    number per entry in row-major order. ``p`` = 0 returns ``tau`` unchanged.
    """
    if p == 0:
        return tau
    return _dropped(tau, _dare_mask(tau, p, generator), p)


def _dare_mask(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which entries DARE keeps (True with probability 1 - ``p``), on ``tau``'s device."""
    if not 0 <= p < 1:
        raise ValueError(f"dare: drop rate p={p!r} is invalid: must be in [0, 1)")
    return (torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= p).to(tau.device)


def _dropped(tau: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    return torch.where(keep, tau / (1 - p), torch.zeros_like(tau))


def dare_generator(seed: int, round_: int, clients: Sequence[int]) -> torch.Generator:
    """The CPU generator of one model's DARE masks in one round: a function of the run's seed,
    the round and the clients behind the model, so a run is reproducible and no two models (nor
    two rounds) share a mask."""
    entropy = [seed, round_, _DARE_STREAM, len(clients), *clients]  # the count: no id is lost
    return torch.Generator().manual_seed(int(np.random.default_rng(entropy).integers(2**63)))


def dare_states(
    base: Mapping[str, torch.Tensor],
    groups: Sequence[Group],
    p: float,
    *,
    seed: int,
    round_: int,
) -> tuple[list[Mapping[str, torch.Tensor]], dict[str, float]]:
    """Each group's weights with DARE applied to its task vector θ − θ0 on the floating keys of
    ``base`` (computed in float32, cast back), and the metric ``dare_kept`` (the share of the
    masks' entries kept, over all models). Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing
    Abilities from Homologous Models as a Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099.

    With ``p`` = 0 the groups' states come back as they are and there is no metric, so a merge
    without DARE is bit for bit what it was. Keys are visited in ``base``'s order.
    """
    if p == 0:
        return [g.state for g in groups], {}
    kept = total = 0
    out: list[Mapping[str, torch.Tensor]] = []
    for group in groups:
        generator = dare_generator(seed, round_, group.clients)
        state = dict(group.state)
        for key, theta0 in base.items():
            if not theta0.is_floating_point():
                continue
            base32 = theta0.float()
            tau = state[key].to(base32.device, torch.float32) - base32
            keep = _dare_mask(tau, p, generator)
            kept += int(keep.sum())
            total += keep.numel()
            state[key] = (base32 + _dropped(tau, keep, p)).to(theta0.dtype)
        out.append(state)
    return out, {"dare_kept": kept / total if total else 1.0}


MergeFunction = Callable[
    [Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]], StateDict
]


def merge_per_task(
    ctx: RoundContext,
    updates: Sequence[ClientUpdate],
    merge: MergeFunction,
    *,
    group_by: str,
    dare: float = 0.0,
) -> AggregateResult:
    """The round of a one-model-per-task merge (task arithmetic, TIES, TSV-M, Iso-C...): the
    clients grouped into models (``group_states``), DARE applied to their task vectors when
    ``dare`` > 0, ``merge(shared_base, states)`` over every key but the per-task heads, and each
    head the mean of its own task's clients (``merged_heads``)."""
    groups = group_states(updates, group_by, ctx.device)
    base = {k: v.to(ctx.device) for k, v in ctx.base_state.items()}
    shared = {k: v for k, v in base.items() if mergeable(k, v) or not v.is_floating_point()}
    states, dare_metrics = dare_states(shared, groups, dare, seed=ctx.seed, round_=ctx.round)
    state = merge(shared, states)
    state.update(merged_heads(base, updates, ctx.device))
    return AggregateResult(
        state={k: state[k] for k in base},
        metrics={
            "num_clients": float(len(updates)),
            "num_models": float(len(groups)),
            "num_examples": float(sum(u.num_examples for u in updates)),
            **dare_metrics,
        },
    )
