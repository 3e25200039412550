"""Server actors that may die: wait for Ray to restart them, restore their state, retry.

The ``AggregatorActor`` and ``EvaluatorActor`` are created with ``max_restarts`` (config
``ray.aggregator.max_restarts`` / ``ray.evaluator.max_restarts``). When one dies, Ray starts a
fresh process that runs ``__init__`` again with the original arguments; the driver then has to
bring it back to where it was:

- ``RoundAggregation`` keeps, on the driver, the state after the last completed round
  (``RoundState``: global weights and ``Aggregator.state_dict()``) and the open round's accepted
  replies, each ``ray.put`` once and held as an ObjectRef until ``finalize`` succeeds. A restarted
  aggregator actor is given that state, the round is begun again and the replies are re-sent in
  their original order, so the result is the one the dead actor would have produced.
- The evaluator is stateless: its call is simply retried once the actor is back.

Ray also restarts an actor between two calls, so a restart need not fail any call. Every call
therefore says what state it assumes (the round of the actor's state, or the open round's
*token*); an actor that does not hold it raises ``ActorStateLost``, which is recovered from like a
death. Nothing sent to a dead incarnation, and no state it lost, can slip into a result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from federation.actors import ActorStateLost

__all__ = ["ActorGuard", "RoundAggregation", "RoundState", "ServerActorError"]

log = logging.getLogger("fedmerge")

T = TypeVar("T")

RETRY_INTERVAL_S = 0.2
"""How often a restarting actor is asked whether it is back."""

MAX_IN_FLIGHT = 4
"""Replies handed to the aggregator actor and not yet merged, at most: when replies arrive faster
than the actor merges them, the driver waits rather than queue them all in Ray's object store."""


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
            raise ServerActorError(f"the {self.name} actor gave no answer within {self.timeout:g} s "
                                   f"during {what}") from None

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
                        f"(ray.{self.name}.max_restarts = {self.max_restarts}): {_first_line(err)}") from err
                log.warning("the %s actor %s during %s (%s); restoring it", self.name, _how(err), what,
                            _first_line(err))

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
                    raise ServerActorError(f"the {self.name} actor was not restarted within "
                                           f"{self.timeout:g} s after it died during {what}") from None
                time.sleep(RETRY_INTERVAL_S)
            except ActorDiedError as err:
                raise ServerActorError(
                    f"the {self.name} actor died during {what} and Ray did not restart it "
                    f"(ray.{self.name}.max_restarts = {self.max_restarts}): {_first_line(err)}") from err
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
    round closed; ``served`` the ref of the last merged round's served model (``federation.moe``
    spec and weights, or None), held by the driver so that it outlives the actor that made it.
    Replies are kept (as ObjectRefs) until their round closes, so a restarted actor
    can be given the round again; when the actor may not be restarted (``max_restarts`` = 0) each
    reply leaves Ray's object store as soon as the actor has merged it and, with at most
    ``MAX_IN_FLIGHT`` replies waiting for the actor, the memory a round needs stays flat in the
    number of clients.
    """

    def __init__(self, actor: Any, state: RoundState, guard: ActorGuard) -> None:
        self.actor = actor
        self.guard = guard
        self._state = state
        self.served: ray.ObjectRef | None = None  # the last merged round's served model (moe spec, weights) or None
        self._held = state.round  # the round whose result the actor holds (a skipped round changes none)
        self._round: int | None = None
        self._token = 0
        self._replies: list[_Reply] = []
        self._pending: list[ray.ObjectRef] = []
        self._merged = 0  # replies of _pending known to be merged
        self._accepted = 0

    @property
    def state(self) -> RoundState:
        return self._state

    @property
    def holds_replies(self) -> bool:
        """Whether the open round's replies are kept for a replay: only if the actor can be restarted."""
        return self.guard.max_restarts > 0

    @property
    def num_accepted(self) -> int:
        """Replies handed over in the open round."""
        return self._accepted

    def client_config(self, server_round: int) -> dict[str, Any]:
        what = f"the client config of round {server_round}"
        return self.guard.call(
            what, lambda: self.guard.get(self.actor.client_config.remote(server_round, self._held), what),
            self._restore)

    def begin_round(self, server_round: int) -> None:
        self._round, self._replies, self._pending, self._merged, self._accepted = server_round, [], [], 0, 0
        self.guard.call(f"the start of round {server_round}", self._open, self._restore)

    def accumulate(self, client_id: int, arrays: Mapping[str, np.ndarray], num_examples: int,
                   metrics: Mapping[str, float]) -> None:
        """Hand one validated reply to the actor without waiting; it is kept until the round closes
        when ``holds_replies``."""
        reply = _Reply(client_id, ray.put(dict(arrays)), num_examples, dict(metrics))
        if self.holds_replies:
            self._replies.append(reply)
        self._pending.append(self._send(reply))
        self._accepted += 1
        self._bound_in_flight()

    def _bound_in_flight(self) -> None:
        """Wait until at most ``MAX_IN_FLIGHT`` handed-over replies are still being merged. Errors are
        not raised here: ``finalize`` gets every call's result and surfaces them."""
        older = self._pending[self._merged:len(self._pending) - MAX_IN_FLIGHT]
        if older:
            ray.wait(older, num_returns=len(older), timeout=self.guard.timeout)
            self._merged += len(older)

    def finalize(self) -> tuple[ray.ObjectRef, dict[str, np.ndarray], dict[str, float]]:
        """Merge the round: (ref of the new global state, that state, the aggregator's metrics)."""
        server_round = self._require_round()
        what = f"the aggregation of round {server_round}"

        def step() -> tuple[ray.ObjectRef, dict[str, np.ndarray], dict[str, float], dict[str, Any],
                            ray.ObjectRef]:
            self.guard.get(self._pending, what)  # an aggregator error surfaces at the reply that caused it
            state_ref, metrics_ref, aggregator_ref, served_ref = self.actor.finalize.remote(self._token)
            state, metrics, aggregator_state = self.guard.get([state_ref, metrics_ref, aggregator_ref], what)
            return state_ref, state, metrics, aggregator_state, served_ref

        state_ref, state, metrics, aggregator_state, self.served = self.guard.call(what, step, self._restore)
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
        self._round, self._replies, self._pending, self._merged, self._accepted = None, [], [], 0, 0

    def _send(self, reply: _Reply) -> ray.ObjectRef:
        return self.actor.accumulate.remote(self._token, reply.client_id, reply.arrays, reply.num_examples,
                                            reply.metrics)

    def _open(self) -> None:
        """Begin the open round on the actor under a new token and (re)send its replies in order."""
        self._token += 1
        self.guard.get(self.actor.begin_round.remote(self._round, self._token, self._held),
                       f"the start of round {self._round}")
        self._pending, self._merged = [self._send(reply) for reply in self._replies], 0

    def _restore(self) -> None:
        """Give a restarted actor the last completed round's state, then replay the open round."""
        state = self._state
        self.guard.get(self.actor.restore.remote(dict(state.global_state), dict(state.aggregator_state), state.round),
                       f"restoring round {state.round}")
        self._held = state.round
        if self._round is not None:
            self._open()


def _how(err: BaseException) -> str:
    return "had lost its state in a restart" if isinstance(err, ActorStateLost) else "died"


def _first_line(err: BaseException) -> str:
    """The gist of an actor error: the remote exception's own message when there is one."""
    cause = getattr(err, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else err).strip()
    return text.splitlines()[0] if text else type(err).__name__
