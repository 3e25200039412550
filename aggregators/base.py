"""The aggregator contract: what a server-side merge receives and returns.

An aggregator sees one round at a time. The executor (the Ray ``AggregatorActor``, or a plain
loop in tests) calls ``begin_round`` with the round's context, ``accumulate`` once per accepted
client reply in a fixed order, then ``finalize``. Incremental methods (FedAvg) fold each reply
into an accumulator and drop it; the others keep the updates and merge them in ``aggregate``.

This module imports neither flwr nor ray, so every algorithm is a plain computation over tensors.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

StateDict = dict[str, torch.Tensor]
Scalar = int | float | str | bool

__all__ = [
    "AggregateResult",
    "Aggregator",
    "ClientUpdate",
    "RoundContext",
    "Scalar",
    "StateDict",
    "checked_num_examples",
    "example_weights",
]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its full local weights after training, and how much data made them."""

    client_id: int
    state: Mapping[str, torch.Tensor]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def checked_num_examples(update: ClientUpdate) -> int | float:
    """The update's example count, or ValueError naming the client when it is not a positive number.

    Every example-weighted merge divides by these counts, so a zero, negative, NaN or non-numeric
    count is rejected here rather than turning into a division by zero or a silent NaN later.
    """
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n <= 0:
        raise ValueError(
            f"client {update.client_id}: num_examples must be a positive number, got {n!r}"
        )
    return n


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Each update's share of the round's examples, pi = ni / sum nj (checked as above)."""
    counts = [checked_num_examples(u) for u in updates]
    total = sum(counts)
    return [n / total for n in counts]


@dataclass(frozen=True)
class RoundContext:
    """What the server knows when a round's replies start arriving.

    ``global_state`` is the model broadcast this round (θt); ``base_state`` the round-0 model
    (θ0, the pretrained or initial weights) that task-vector methods subtract. ``evaluate``
    scores a candidate state on the server's validation data when the run has some (FedDRL);
    ``evaluate_many`` scores several at once (in parallel on Ray workers in a run) and returns
    their metrics in the order given. ``malicious`` is the ground truth of a simulated attack,
    the ids of the clients that misbehave: for detection metrics only, never for decisions.
    ``build_model`` returns a fresh model of the run's architecture, for methods that serve a
    model other than the broadcast weights (SMILE, WEMoE); ``proxy_inputs`` holds the server's
    unlabelled inputs, model-ready, per task index, for test-time adaptation (WEMoE's routers).
    """

    round: int
    global_state: Mapping[str, torch.Tensor]
    base_state: Mapping[str, torch.Tensor]
    seed: int = 0
    device: torch.device = torch.device("cpu")
    evaluate: Callable[[Mapping[str, torch.Tensor]], dict[str, float]] | None = None
    evaluate_many: Callable[[Sequence[Mapping[str, torch.Tensor]]], list[dict[str, float]]] | None = None
    malicious: frozenset[int] = frozenset()
    build_model: Callable[[], torch.nn.Module] | None = None
    proxy_inputs: Mapping[int, torch.Tensor] | None = None


@dataclass
class AggregateResult:
    """The next global weights, the round's aggregator metrics, and an optional served model.

    ``served_model`` is set by upscaling methods (SMILE, WEMoE) whose evaluated model differs
    from the broadcast weights.
    """

    state: StateDict
    metrics: dict[str, float] = field(default_factory=dict)
    served_model: torch.nn.Module | None = None


class Aggregator(ABC):
    """Base class of server-side merges.

    Subclasses set ``name`` and implement either ``aggregate`` (sees all of a round's updates)
    or, for incremental methods, override ``begin_round`` / ``accumulate`` / ``finalize``.
    Hyperparameters are explicit keyword arguments of ``__init__``; state that must survive a
    restart (learned agents, fused scopes) goes through ``state_dict`` / ``load_state_dict``.
    """

    name: ClassVar[str] = ""

    needs: ClassVar[frozenset[str]] = frozenset()
    """What the aggregator reads from its ``RoundContext`` beyond the weights, seed and device:
    ``"validation"`` (``evaluate`` / ``evaluate_many`` on the server's validation set, which
    ``data.server_val_size`` holds out), ``"proxy_inputs"`` (the server's unlabelled inputs,
    ``data.proxy_inputs``), ``"model_builder"`` (``build_model``) and ``"base_model"``
    (``base_state``, the round-0 weights). A run ships validation data and proxy inputs to the
    aggregator only when they are declared, and refuses before it starts a need it cannot meet
    or a name outside this vocabulary; ``build_model`` and ``base_state`` cost nothing and are
    always given, so declaring them documents the dependency."""

    def __init__(self) -> None:
        self._ctx: RoundContext | None = None
        self._updates: list[ClientUpdate] = []

    # ---- client side -------------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Scalar]:
        """Extra config sent to every client this round (e.g. a regulariser's target)."""
        return {}

    # ---- server side -------------------------------------------------------------------
    def begin_round(self, ctx: RoundContext) -> None:
        self._ctx = ctx
        self._updates = []

    def accumulate(self, update: ClientUpdate) -> None:
        self._updates.append(update)

    def finalize(self) -> AggregateResult:
        if self._ctx is None:
            raise RuntimeError(f"{type(self).__name__}.finalize() called before begin_round()")
        if not self._updates:
            raise ValueError(f"{type(self).__name__}: no client updates to aggregate this round")
        ctx, updates = self._ctx, self._updates
        self._updates = []
        return self.aggregate(ctx, updates)

    @abstractmethod
    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """Merge a round's updates into the next global state."""

    # ---- within a round ----------------------------------------------------------------
    def round_state(self) -> dict[str, Any] | None:
        """A snapshot of the open round so far (an incremental method's accumulator and counters),
        or None when the method has none to give, the default.

        The executor keeps a snapshot instead of the replies it covers, so that an executor
        restarted mid-round needs only the replies after it (see ``load_round_state``); with None
        it keeps every reply of the round. Tensors in the snapshot may share memory with the live
        accumulator: serialise or copy them before the next ``accumulate``.
        """
        return None

    def load_round_state(self, state: Mapping[str, Any]) -> None:
        """Put back a ``round_state()`` snapshot, right after ``begin_round`` with the round's context.

        Accumulating the replies that came after the snapshot, in their order, must then give bit
        for bit the result of a round never interrupted. Tensors in ``state`` may be read-only
        views: copy what will be written.
        """
        raise NotImplementedError(f"{type(self).__name__} gives no round state, so it cannot load one")

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Aggregator state to checkpoint (tensors and plain data only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but was given {sorted(state)}")
