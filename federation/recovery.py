"""Server actors that may die: wait for Ray to restart them, restore their state, retry.

The ``AggregatorActor`` and ``EvaluatorActor`` are created with ``max_restarts`` (config
``ray.aggregator.max_restarts`` / ``ray.evaluator.max_restarts``). When one dies, Ray starts a
fresh process that runs ``__init__`` again with the original arguments; the driver then has to
bring it back to where it was:

- ``RoundAggregation`` keeps, on the driver, the state after the last completed round
  (``RoundState``: global weights and ``Aggregator.state_dict()``) and what it takes to rebuild
  the open round: every ``SNAPSHOT_EVERY`` replies a snapshot of the actor's round so far
  (``Aggregator.round_state()``, e.g. FedAvg's sums), and the accepted replies that came after
  it, each ``ray.put`` once and held as an ObjectRef. A restarted aggregator actor is given that
  state, the round is begun again, the snapshot loaded and the later replies re-sent in their
  original order, so the result is the one the dead actor would have produced, and the memory
  held for this stays flat in the number of clients. An aggregator without round state (one that
  merges all replies at once) has all of the round's replies kept and re-sent instead.
- The evaluator is stateless: its call is simply retried once the actor is back.

Ray also restarts an actor between two calls, so a restart need not fail any call. Every call
therefore says what state it assumes (the round of the actor's state, or the open round's
*token*); an actor that does not hold it raises ``ActorStateLost``, which is recovered from like a
death. Nothing sent to a dead incarnation, and no state it lost, can slip into a result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from fedmerge.federation.actors import ActorStateLost

__all__ = ["ActorGuard", "RoundAggregation", "RoundState", "ServerActorError"]

log = logging.getLogger("fedmerge")

T = TypeVar("T")

RETRY_INTERVAL_S = 0.2
"""How often a restarting actor is asked whether it is back."""

MAX_IN_FLIGHT = 4
"""Replies handed to the aggregator actor and not yet merged, at most: when replies arrive faster
than the actor merges them, the driver waits rather than queue them all in Ray's object store."""

SNAPSHOT_EVERY = 8
"""Replies kept for a replay before the driver asks the aggregator actor for a snapshot of its
round, which then replaces them: a round keeps one snapshot and at most
``SNAPSHOT_EVERY + MAX_IN_FLIGHT + 1`` replies whatever its number of clients. A snapshot costs the
actor one copy of its round state (two models' worth for FedAvg's float64 sums) per
``SNAPSHOT_EVERY`` replies merged, and the driver a second copy into its own object store."""


class ServerActorError(RuntimeError):
    """A server actor died for good (restarts used up) or stopped answering; the message says which."""


@dataclass
class RoundState:
    """The server's state after a completed round: where a restarted actor or a resumed run starts.

    ``round`` is the last round completed (0 before the first); ``global_state`` the weights the
    next round broadcasts; ``aggregator_state`` what ``Aggregator.state_dict()`` returned then.
    """

    round: int
    global_state: Mapping[str, np.ndarray]
    aggregator_state: Mapping[str, Any] = field(default_factory=dict)


class ActorGuard:
    """Runs calls on an actor that Ray may restart.

    ``call(what, step, restore)`` runs ``step``; when the actor dies under it (or turns out to have
    lost its state in a restart), waits until the restarted actor accepts ``restore`` (which puts
    state back into it) and runs ``step`` again, at most ``max_restarts`` times per call. Every recovery is noted (``take_notes``) for the run's
    event log. A dead-for-good actor or one silent for ``timeout`` seconds raises
    ``ServerActorError``.
    """

    def __init__(self, name: str, *, max_restarts: int, timeout: float) -> None:
        self.name = name
        self.max_restarts = max_restarts
        self.timeout = timeout
        self.restarts = 0
        self._notes: list[str] = []

    def get(self, refs: Any, what: str) -> Any:
        """``ray.get`` bounded by the guard's timeout, with an error that names the actor."""
        try:
            return ray.get(refs, timeout=self.timeout)
        except GetTimeoutError:
            raise ServerActorError(
                f"the {self.name} actor gave no answer within {self.timeout:g} s during {what}"
            ) from None

    def call(self, what: str, step: Callable[[], T], restore: Callable[[], None]) -> T:
        failures, cause = 0, None
        while True:
            try:
                if cause is not None:
                    self._revive(what, restore, cause)
                return step()
            except (RayActorError, ActorStateLost) as err:
                failures, cause = failures + 1, err
                if failures > self.max_restarts:
                    raise ServerActorError(
                        f"the {self.name} actor died during {what} and was not brought back "
                        f"(ray.{self.name}.max_restarts = {self.max_restarts}): {_first_line(err)}"
                    ) from err
                log.warning(
                    "the %s actor %s during %s (%s); restoring it",
                    self.name,
                    _how(err),
                    what,
                    _first_line(err),
                )

    def take_notes(self) -> list[str]:
        """The recoveries since the last call, one sentence each."""
        notes, self._notes = self._notes, []
        return notes

    def _revive(self, what: str, restore: Callable[[], None], cause: BaseException) -> None:
        started = time.monotonic()
        while True:
            try:
                restore()
                break
            except ActorUnavailableError:  # still restarting
                if time.monotonic() - started > self.timeout:
                    raise ServerActorError(
                        f"the {self.name} actor was not restarted within "
                        f"{self.timeout:g} s after it died during {what}"
                    ) from None
                time.sleep(RETRY_INTERVAL_S)
            except ActorDiedError as err:
                raise ServerActorError(
                    f"the {self.name} actor died during {what} and Ray did not restart it "
                    f"(ray.{self.name}.max_restarts = {self.max_restarts}): {_first_line(err)}"
                ) from err
        self.restarts += 1
        note = f"{self.name} actor {_how(cause)} during {what}; restored in {time.monotonic() - started:.1f} s"
        log.warning(note)
        self._notes.append(note)


@dataclass(frozen=True)
class _Reply:
    client_id: int
    arrays: ray.ObjectRef
    num_examples: int
    metrics: dict[str, float]


class RoundAggregation:
    """The driver's side of the ``AggregatorActor``: one round at a time, replayable.

    ``begin_round`` / ``accumulate`` (non-blocking) / ``finalize`` mirror the actor's methods;
    ``skip_round`` closes a round without merging. ``state`` is the ``RoundState`` after the last
    round closed; ``served`` the ref of the last merged round's served model (``fedmerge.federation.served``
    spec and weights, or None), held by the driver so that it outlives the actor that made it.
    When the actor may be restarted, replies are kept (as ObjectRefs) so that a
    restarted actor can be given the round again, but only until a snapshot of the actor's round
    covers them: every ``snapshot_every`` kept replies the actor is asked for one (without
    waiting) and, once it has arrived, it replaces the replies before it. When the actor may not
    be restarted (``max_restarts`` = 0) each reply leaves Ray's object store as soon as the actor
    has merged it. Either way, with at most ``MAX_IN_FLIGHT`` replies waiting for the actor, the
    memory a round needs stays flat in the number of clients, except for an aggregator that gives
    no round state (``Aggregator.round_state`` returns None): all its replies are kept.
    """

    def __init__(
        self,
        actor: Any,
        state: RoundState,
        guard: ActorGuard,
        *,
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> None:
        if (
            isinstance(snapshot_every, bool)
            or not isinstance(snapshot_every, int)
            or snapshot_every < 1
        ):
            raise ValueError(f"snapshot_every must be a positive integer, got {snapshot_every!r}")
        self.actor = actor
        self.guard = guard
        self.snapshot_every = snapshot_every
        self.snapshots = 0  # snapshots taken over the run
        self.replayed = 0  # replies re-sent to restarted actors over the run
        self._state = state
        self.served: ray.ObjectRef | None = (
            None  # the last merged round's served model (moe spec, weights) or None
        )
        self.placement: dict[
            str, str
        ] = {}  # where the actor ran its last finalize (actors.placement)
        self._held = (
            state.round
        )  # the round whose result the actor holds (a skipped round changes none)
        self._round: int | None = None
        self._sampled: tuple[int, ...] = ()
        self._token = 0
        self._reset_round()

    @property
    def state(self) -> RoundState:
        return self._state

    @property
    def holds_replies(self) -> bool:
        """Whether the open round's replies are kept for a replay (until a snapshot covers them):
        only if the actor can be restarted."""
        return self.guard.max_restarts > 0

    @property
    def num_kept(self) -> int:
        """Replies of the open round kept for a replay now."""
        return len(self._replies)

    @property
    def num_accepted(self) -> int:
        """Replies handed over in the open round."""
        return self._accepted

    def client_config(self, server_round: int) -> dict[str, Any]:
        what = f"the client config of round {server_round}"
        return self.guard.call(
            what,
            lambda: self.guard.get(self.actor.client_config.remote(server_round, self._held), what),
            self._restore,
        )

    def client_arrays(self, server_round: int, client_id: int) -> dict[str, np.ndarray] | None:
        """The aggregator's tensors for one client this round (``Aggregator.client_arrays``)."""
        what = f"the arrays for client {client_id} in round {server_round}"
        return self.guard.call(
            what,
            lambda: self.guard.get(
                self.actor.client_arrays.remote(server_round, client_id, self._held), what
            ),
            self._restore,
        )

    def begin_round(self, server_round: int, sampled: Sequence[int] = ()) -> None:
        """Open ``server_round``; ``sampled`` (the clients asked to train) reaches the aggregator's
        ``RoundContext``, and every replay of the round, unchanged."""
        self._reset_round()
        self._round = server_round
        self._sampled = tuple(int(c) for c in sampled)
        self.guard.call(f"the start of round {server_round}", self._open, self._restore)

    def accumulate(
        self,
        client_id: int,
        arrays: Mapping[str, np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> None:
        """Hand one validated reply to the actor without waiting; when ``holds_replies`` it is kept
        until a snapshot covers it or the round closes."""
        reply = _Reply(client_id, ray.put(dict(arrays)), num_examples, dict(metrics))
        if self.holds_replies:
            self._replies.append(reply)
        self._pending.append(self._send(reply))
        self._accepted += 1
        self._bound_in_flight()
        if self.holds_replies:
            self._snapshot_step()

    def _snapshot_step(self) -> None:
        """Take the snapshot asked for once it has arrived (waiting for it only when the kept
        replies have grown past ``snapshot_every + MAX_IN_FLIGHT``), and ask for the next one once
        ``snapshot_every`` replies are kept."""
        if self._asked is not None:
            must = len(self._replies) > self.snapshot_every + MAX_IN_FLIGHT
            ready, _ = ray.wait([self._asked[0]], timeout=self.guard.timeout if must else 0)
            if ready:
                self._take_snapshot()
        if self._asked is None and self._snapshots_on and len(self._replies) >= self.snapshot_every:
            self._asked = (self.actor.round_state.remote(self._token), self._accepted)

    def _take_snapshot(self) -> None:
        """Keep the snapshot asked for, on the driver's node, in place of the replies it covers."""
        assert self._asked is not None
        ref, covers = self._asked
        self._asked = None
        try:
            snapshot = ray.get(ref)
        except (RayActorError, ActorStateLost):
            return  # the actor died or was restarted: finalize recovers, from the last snapshot taken
        except Exception as err:
            raise RuntimeError(
                f"the aggregator's round_state() failed in round {self._round}: {_first_line(err)}"
            ) from err
        if snapshot is None:  # this aggregator keeps no round state: every reply stays
            self._snapshots_on = False
            return
        # ray.put first: the old snapshot and the replies may go only once the new one is stored.
        stored = ray.put(snapshot)
        del snapshot, ref
        self._snapshot = stored
        del self._replies[: covers - self._covered]
        self._covered = covers
        self.snapshots += 1

    def _bound_in_flight(self) -> None:
        """Wait until at most ``MAX_IN_FLIGHT`` handed-over replies are still being merged. Errors are
        not raised here: ``finalize`` gets every call's result and surfaces them."""
        older = self._pending[self._merged : len(self._pending) - MAX_IN_FLIGHT]
        if older:
            ray.wait(older, num_returns=len(older), timeout=self.guard.timeout)
            self._merged += len(older)

    def finalize(self) -> tuple[ray.ObjectRef, dict[str, np.ndarray], dict[str, float]]:
        """Merge the round: (ref of the new global state, that state, the aggregator's metrics)."""
        server_round = self._require_round()
        what = f"the aggregation of round {server_round}"

        def step() -> tuple[
            ray.ObjectRef, dict[str, np.ndarray], dict[str, float], dict[str, Any], ray.ObjectRef
        ]:
            self.guard.get(
                self._pending, what
            )  # an aggregator error surfaces at the reply that caused it
            state_ref, metrics_ref, aggregator_ref, served_ref, placement_ref = (
                self.actor.finalize.remote(self._token)
            )
            state, metrics, aggregator_state, self.placement = self.guard.get(
                [state_ref, metrics_ref, aggregator_ref, placement_ref], what
            )
            return state_ref, state, metrics, aggregator_state, served_ref

        state_ref, state, metrics, aggregator_state, self.served = self.guard.call(
            what, step, self._restore
        )
        self._held = server_round
        self._close(RoundState(server_round, state, aggregator_state))
        return state_ref, state, metrics

    def skip_round(self) -> None:
        """Close the round without merging: the global model and the aggregator's state stay."""
        self._close(replace(self._state, round=self._require_round()))

    # ---- internals ---------------------------------------------------------------------
    def _require_round(self) -> int:
        if self._round is None:
            raise RuntimeError("no round is open: call begin_round() first")
        return self._round

    def _close(self, state: RoundState) -> None:
        self._state = state
        self._round = None
        self._reset_round()

    def _reset_round(self) -> None:
        self._replies: list[_Reply] = []  # kept for a replay: those after the snapshot
        self._snapshot: ray.ObjectRef | None = (
            None  # the actor's round after the first _covered replies
        )
        self._covered = 0
        self._asked: tuple[ray.ObjectRef, int] | None = (
            None  # a snapshot asked for, and the replies it covers
        )
        self._snapshots_on = True
        self._pending: list[ray.ObjectRef] = []
        self._merged = 0  # replies of _pending known to be merged
        self._accepted = 0

    def _send(self, reply: _Reply) -> ray.ObjectRef:
        return self.actor.accumulate.remote(
            self._token, reply.client_id, reply.arrays, reply.num_examples, reply.metrics
        )

    def _open(self) -> None:
        """Begin the open round on the actor under a new token, load the round's snapshot if one
        was taken, and (re)send the replies after it in order."""
        self._token += 1
        self._asked = None  # asked of an earlier attempt: its answer would not be trusted
        self.guard.get(
            self.actor.begin_round.remote(self._round, self._token, self._held, self._sampled),
            f"the start of round {self._round}",
        )
        pending = []
        if self._snapshot is not None:
            pending.append(self.actor.load_round_state.remote(self._token, self._snapshot))
        pending.extend(self._send(reply) for reply in self._replies)
        self._pending, self._merged = pending, 0

    def _restore(self) -> None:
        """Give a restarted actor the last completed round's state, then replay the open round."""
        state = self._state
        self.guard.get(
            self.actor.restore.remote(
                dict(state.global_state), dict(state.aggregator_state), state.round
            ),
            f"restoring round {state.round}",
        )
        self._held = state.round
        if self._round is not None:
            self._open()
            self.replayed += len(self._replies)


def _how(err: BaseException) -> str:
    return "had lost its state in a restart" if isinstance(err, ActorStateLost) else "died"


def _first_line(err: BaseException) -> str:
    """The gist of an actor error: the remote exception's own message when there is one."""
    cause = getattr(err, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else err).strip()
    return text.splitlines()[0] if text else type(err).__name__
