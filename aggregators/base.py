"""The aggregator contract: what a server-side merge receives and returns.

An aggregator sees one round at a time. The executor (the Ray ``AggregatorActor``, or a plain
loop in tests) calls ``begin_round`` with the round's context, ``accumulate`` once per accepted
client reply in a fixed order, then ``finalize``. Incremental methods (FedAvg) fold each reply
into an accumulator and drop it; the others keep the updates and merge them in ``aggregate``.

This module imports neither flwr nor ray, so every algorithm is a plain computation over tensors.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedmerge.aggregators.params import check, is_declaration

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
    "declared_params",
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
    ``num_clients`` is the federation's population N and ``sampled`` the ids of the clients
    sampled to train this round, in sampling order (replies may be fewer): what methods that
    scale by the sampling rate need (SCAFFOLD's control variate, the privacy accountant);
    ``num_rounds`` is the run's configured number of rounds (a privacy budget spans them).
    0 and () where the executor does not know them.
    """

    round: int
    global_state: Mapping[str, torch.Tensor]
    base_state: Mapping[str, torch.Tensor]
    seed: int = 0
    device: torch.device = torch.device("cpu")
    evaluate: Callable[[Mapping[str, torch.Tensor]], dict[str, float]] | None = None
    evaluate_many: (
        Callable[[Sequence[Mapping[str, torch.Tensor]]], list[dict[str, float]]] | None
    ) = None
    malicious: frozenset[int] = frozenset()
    build_model: Callable[[], torch.nn.Module] | None = None
    proxy_inputs: Mapping[int, torch.Tensor] | None = None
    num_clients: int = 0
    sampled: tuple[int, ...] = ()
    num_rounds: int = 0


@dataclass
class AggregateResult:
    """The next global weights, the round's aggregator metrics, and an optional served model.

    ``served_model`` is set by upscaling methods (SMILE, WEMoE) whose evaluated model differs
    from the broadcast weights.
    """

    state: StateDict
    metrics: dict[str, float] = field(default_factory=dict)
    served_model: torch.nn.Module | None = None


def declared_params(cls: type) -> type | None:
    """The hyperparameter declaration ``cls`` uses: the nearest ``Params`` dataclass in its MRO,
    unless a class in between defines its own ``__init__`` (then its keywords are the parameters,
    as for any class without a declaration)."""
    for klass in cls.__mro__:
        if klass is Aggregator or klass is object:
            return None
        own = vars(klass)
        if "Params" in own and is_declaration(own["Params"]):
            return own["Params"]
        if "__init__" in own:
            return None
    return None


def _signature(params: type) -> inspect.Signature:
    """``__init__``'s keywords as the declaration gives them (for ``inspect.signature``)."""
    hints = typing.get_type_hints(params)
    keywords = []
    for f in dataclasses.fields(params):
        default: dict[str, Any] = {}
        if f.default is not dataclasses.MISSING:
            default["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default["default"] = f.default_factory()
        keywords.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], **default
            )
        )
    return inspect.Signature(keywords)


class Aggregator(ABC):
    """Base class of server-side merges.

    Subclasses set ``name`` and implement either ``aggregate`` (sees all of a round's updates)
    or, for incremental methods, override ``begin_round`` / ``accumulate`` / ``finalize``.
    Hyperparameters are keyword arguments of ``__init__``. The built-ins declare them once, as
    a frozen dataclass ``Params`` of ``fedmerge.aggregators.params.hyperparameter`` fields, and
    take ``**params`` checked by ``set_hyperparameters``; a class without ``Params`` has its
    ``__init__`` keywords as its parameters. State that must survive a restart (learned agents,
    fused scopes) goes through ``state_dict`` / ``load_state_dict``.
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = declared_params(cls)
        fields = dataclasses.fields(params) if params is not None else ()
        clash = [f.name for f in fields if hasattr(Aggregator, f.name)]
        if clash:
            raise TypeError(
                f"{cls.__qualname__}.Params: {clash[0]!r} is an Aggregator attribute; "
                "rename the hyperparameter"
            )
        # inspect.signature(cls), and so create_aggregator's keyword check, follows the declaration.
        cls.__signature__ = None if params is None else _signature(params)  # type: ignore[attr-defined]

    def __init__(self) -> None:
        self._ctx: RoundContext | None = None
        self._updates: list[ClientUpdate] = []

    def set_hyperparameters(self, values: Mapping[str, Any]) -> Any:
        """Check ``values`` against the class's ``Params``, set each parameter as an attribute of
        the same name, keep the checked instance as ``self.hparams`` and return it.

        A bad value is a ``HyperparameterError`` naming this aggregator, the parameter, the value
        and what is allowed; an unknown name a TypeError with a "did you mean".
        """
        params = declared_params(type(self))
        if params is None:
            raise TypeError(f"{type(self).__qualname__} declares no Params")
        hparams = check(type(self).name or type(self).__qualname__, params, values)
        for f in dataclasses.fields(hparams):
            setattr(self, f.name, getattr(hparams, f.name))
        self.hparams = hparams
        return hparams

    # ---- client side -------------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Scalar]:
        """Extra config sent to every client this round (e.g. a regulariser's target)."""
        return {}

    def plan_run(self, *, num_rounds: int, num_clients: int, clients_per_round: int) -> None:
        """Called once on the driver before any client trains, with the run's shape: a method
        that can tell the run is impossible (a privacy budget it would exceed) raises ValueError
        here. The default accepts every run."""
        return None

    def client_arrays(self, server_round: int, client_id: int) -> Mapping[str, torch.Tensor] | None:
        """Tensors sent to one client this round beside the global model (SCAFFOLD's correction
        c − c_i), or None, the default: nothing extra. The client's loss terms receive them
        (``fedmerge.aggregators.terms``); each one adds to the round's download."""
        return None

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
        raise NotImplementedError(
            f"{type(self).__name__} gives no round state, so it cannot load one"
        )

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Aggregator state to checkpoint (tensors and plain data only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but was given {sorted(state)}")
