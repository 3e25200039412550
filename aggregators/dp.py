"""Central (client-level) differential privacy around an incremental aggregator.

Each sampled client's update Δi = θi − θt (every floating-point key of the reply, as one vector)
is clipped to norm ≤ C, the clipped updates are summed in float64, Gaussian noise N(0, (zC)²) is
added to every coordinate of the sum, and the sum is divided by the number of clients *sampled*
(m, public), not the number that replied. The wrapped aggregator then sees one synthetic update
θt + noisy mean, so FedAvg keeps it and a server optimiser steps on the noisy pseudo-gradient.
The privacy spent is composed by ``dp_accounting``'s RDP accountant after every round.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    Scalar,
    StateDict,
)
from fedmerge.aggregators.params import HyperparameterError, hyperparameter
from fedmerge.aggregators.registry import create_aggregator, get_aggregator_class, register

__all__ = [
    "CLIENT_CLIP_KEY",
    "CLIENT_CLIP_TOLERANCE",
    "UNCLIPPED_METRIC",
    "DifferentialPrivacy",
    "PrivacyBudgetExceeded",
    "clip_update",
    "epsilon",
    "update_norm",
]

CLIENT_CLIP_KEY = "dp_clip"
"""The key of the aggregator's client config that tells clients to clip: {"norm": C, "report": b}."""

UNCLIPPED_METRIC = "dp_unclipped"
"""The reply metric a client-side clipping client reports: 1.0 when ‖Δi‖ ≤ C before clipping."""

CLIENT_CLIP_TOLERANCE = 1e-3
"""Relative slack on C when the server checks a client-clipped update (float32 rounding of
θt + Δ and the driver's float32 norm). The server re-clips to exactly C, so the slack never
loosens the sensitivity bound."""

ACCOUNTANTS = ("without_replacement", "poisson")


class PrivacyBudgetExceeded(ValueError):
    """The configured rounds would spend more privacy than ``max_epsilon`` allows."""


def update_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """‖state − reference‖₂ over the floating-point keys of ``state``, in float64."""
    total = 0.0
    for key, value in state.items():
        if value.is_floating_point():
            diff = value.double() - reference[key].to(value.device).double()
            total += float(diff.square().sum())
    return math.sqrt(total)


def clip_update(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clipping_norm: float
) -> tuple[dict[str, torch.Tensor], bool]:
    """``reference`` + Δ·min(1, C/‖Δ‖) for Δ = state − reference over the floating keys (others
    unchanged), and whether ‖Δ‖ ≤ C held already: what a client does before replying under
    ``clipping = "client"``."""
    if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
        raise ValueError(f"the clipping norm must be a positive number, got {clipping_norm!r}")
    norm = update_norm(state, reference)
    if norm <= clipping_norm:
        return dict(state), True
    scale = clipping_norm / norm
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            base = reference[key].double()
            out[key] = (base + (value.double() - base) * scale).to(value.dtype)
        else:
            out[key] = value
    return out, False


def _events(
    accountant: str,
    num_clients: int,
    sampled: int,
    noise_multiplier: float,
    count_stddev: float | None,
) -> tuple[Any, Any]:
    """(a fresh accountant, the DpEvent of one round) for ``accountant`` (see the class doc)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    relation = dp_accounting.NeighboringRelation
    replace = accountant == "without_replacement"
    # Replace-one: the sum's sensitivity is 2C and the count's 1; add/remove: C and 1/2 (the count
    # centred as in Andrew et al.). A multiplier is the noise std over the sensitivity.
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2 if replace else noise_multiplier)
    event: Any = gaussian
    if count_stddev is not None:
        count = dp_accounting.GaussianDpEvent(count_stddev if replace else 2 * count_stddev)
        event = dp_accounting.ComposedDpEvent([gaussian, count])
    if replace:
        return (
            RdpAccountant(neighboring_relation=relation.REPLACE_ONE),
            dp_accounting.SampledWithoutReplacementDpEvent(num_clients, sampled, event),
        )
    return (
        RdpAccountant(neighboring_relation=relation.ADD_OR_REMOVE_ONE),
        dp_accounting.PoissonSampledDpEvent(sampled / num_clients, event),
    )


def epsilon(
    ledger: Sequence[Sequence[Any]], delta: float, accountant: str = "without_replacement"
) -> float:
    """ε at ``delta`` after the rounds of ``ledger``: rows [N, m, z_update, count_stddev or None,
    rounds], each a run of identical rounds. inf when any round added no noise."""
    import dp_accounting

    if not ledger:
        return 0.0
    events = []
    fresh = None
    for num_clients, sampled, z, count_stddev, rounds in ledger:
        if z <= 0 or (count_stddev is not None and count_stddev <= 0):
            return math.inf
        fresh, event = _events(accountant, int(num_clients), int(sampled), z, count_stddev)
        events.append(dp_accounting.SelfComposedDpEvent(event, int(rounds)))
    assert fresh is not None
    fresh.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
    return float(fresh.get_epsilon(delta))


def _incremental(cls: type) -> bool:
    """Whether ``cls`` folds replies as they arrive (overrides ``accumulate``) rather than keeping
    them all for a robust or upscaling ``aggregate`` that needs the individual updates."""
    return getattr(cls, "accumulate", None) is not Aggregator.accumulate


@register()
class DifferentialPrivacy(Aggregator):
    """DP-FedAvg's central Gaussian mechanism around any incremental aggregator.

    McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
    ICLR 2018, https://arxiv.org/abs/1710.06963 (fixed clipping, noise on the sum); Andrew,
    Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
    NeurIPS 2021, https://arxiv.org/abs/1905.03871 (``adaptive``: C ← C·exp(−η(b̄ − γ)) from the
    noisy fraction b̄ of unclipped updates, the update noise z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)).

    Updates are weighted uniformly: example counts would leak and break the sensitivity bound.
    Dividing by the m clients sampled (``RoundContext.sampled``) keeps the divisor public; a
    client that drops out contributes a zero update (the mean shrinks, the guarantee holds). An
    executor that does not say whom it sampled makes m the replies received and N = m.
    Integer buffers take θt's value (a client's counter is data too).

    Accounting (``accountant``): fedmerge samples exactly m of N clients without replacement, so
    the default composes ``SampledWithoutReplacementDpEvent(N, m, Gaussian(z/2))`` under the
    replace-one relation (a replaced client moves the clipped sum by up to 2C). ``"poisson"``
    composes ``PoissonSampledDpEvent(m/N, Gaussian(z))`` under add/remove, what TFF and Flower
    users usually report: an approximation, not a guarantee for fixed-size sampling.

    Noise comes from a generator seeded by (run seed, round), so a resumed or replayed round is
    exact; ``secure_noise`` draws the seed from the OS instead (not reproducible). State: the
    clipping norm, the accounting ledger and the inner aggregator's state.
    """

    name = "dp"

    @dataclass(frozen=True)
    class Params:
        inner: str = hyperparameter(
            "fedavg", "the incremental aggregator that gets the noisy mean (fedavg, fedadam, ...)"
        )
        inner_params: dict[str, Any] | None = hyperparameter(
            None, "the inner aggregator's own keywords, a table (None = its defaults)"
        )
        noise_multiplier: float | None = hyperparameter(
            None,
            "z: noise std on the clipped sum is z·C (None = 1.0, or calibrated from target_epsilon)",
            ge=0,
        )
        target_epsilon: float | None = hyperparameter(
            None, "calibrate z so that the configured rounds spend this ε at delta", gt=0
        )
        clipping_norm: float = hyperparameter(
            1.0, "C: each update's L2 bound (the initial C when adaptive)", gt=0
        )
        adaptive: bool = hyperparameter(
            False, "adapt C to the target_quantile of update norms (Andrew et al. 2021)"
        )
        target_quantile: float = hyperparameter(
            0.5, "γ: the fraction of updates adaptive clipping leaves unclipped", ge=0, le=1
        )
        clip_lr: float = hyperparameter(0.2, "η_C: the geometric step of adaptive clipping", gt=0)
        clipped_count_stddev: float | None = hyperparameter(
            None, "σ_b: noise std on the unclipped count (None = m/20, Andrew et al.)", ge=0
        )
        delta: float = hyperparameter(1e-5, "δ at which ε is reported", gt=0, lt=1)
        max_epsilon: float = hyperparameter(
            0.0, "budget: refuse a run whose rounds would spend more ε; 0 = none", ge=0
        )
        clipping: str = hyperparameter(
            "server",
            "who clips: server, or client (the server never sees unclipped updates)",
            choices=("server", "client"),
        )
        accountant: str = hyperparameter(
            "without_replacement",
            "sampling the accountant assumes: without_replacement (exact for fedmerge) or "
            "poisson (the common approximation)",
            choices=ACCOUNTANTS,
        )
        secure_noise: bool = hyperparameter(
            False, "seed the noise from the OS, not the run seed (deployment; not reproducible)"
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        hp = self.set_hyperparameters(params)
        inner_params = {} if hp.inner_params is None else hp.inner_params
        if not isinstance(inner_params, Mapping):
            raise HyperparameterError(
                self.name, "inner_params", hp.inner_params, "a table of the inner's keywords"
            )
        try:
            cls = get_aggregator_class(hp.inner)
        except (ValueError, KeyError, ImportError, TypeError) as err:
            raise HyperparameterError(
                self.name, "inner", hp.inner, f"a registered aggregator's name ({err})"
            ) from None
        if cls is DifferentialPrivacy or not _incremental(cls):
            raise HyperparameterError(
                self.name,
                "inner",
                hp.inner,
                "an incremental aggregator (fedavg, fedavgm, fedadam, fedyogi, fedadagrad, "
                "fedprox): robust and upscaling merges need the individual updates, which "
                "the noise hides",
            )
        try:
            self._inner = create_aggregator(hp.inner, dict(inner_params))
        except ValueError as err:
            raise HyperparameterError(
                self.name, "inner_params", hp.inner_params, f"keywords of {hp.inner!r}: {err}"
            ) from None
        if hp.noise_multiplier is not None and hp.target_epsilon is not None:
            raise ValueError("give noise_multiplier or target_epsilon, not both")
        self._z: float | None = (
            hp.noise_multiplier
            if hp.noise_multiplier is not None
            else (1.0 if hp.target_epsilon is None else None)
        )
        self._clip = hp.clipping_norm
        self._ledger: list[list[Any]] = []
        self._reset_round()

    # ---- planning and accounting -----------------------------------------------------------
    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(getattr(self._inner, "needs", frozenset()))

    def _count_stddev(self, sampled: int) -> float | None:
        if not self.adaptive:
            return None
        return sampled / 20 if self.clipped_count_stddev is None else self.clipped_count_stddev

    def _update_multiplier(self, z: float, sampled: int) -> float:
        """z_Δ: the update's noise multiplier, z itself unless adaptive clipping spends some."""
        sigma_b = self._count_stddev(sampled)
        if sigma_b is None or z == 0:
            return z
        if not 2 * sigma_b > z:
            raise ValueError(
                f"adaptive clipping with noise_multiplier {z:g} needs clipped_count_stddev > "
                f"z/2 = {z / 2:g} (got {sigma_b:g}, m = {sampled}): the count's noise would "
                "spend more than the whole budget"
            )
        return (z**-2 - (2 * sigma_b) ** -2) ** -0.5

    def _row(self, num_clients: int, sampled: int, z: float) -> list[Any]:
        return [
            num_clients,
            sampled,
            self._update_multiplier(z, sampled),
            self._count_stddev(sampled),
        ]

    def _epsilon_of(self, rows: Sequence[Sequence[Any]]) -> float:
        return epsilon(rows, self.delta, self.accountant)

    def plan_run(self, *, num_rounds: int, num_clients: int, clients_per_round: int) -> None:
        """Calibrate z (``target_epsilon``) and check the budget for the whole run, before any
        client trains: a ``PrivacyBudgetExceeded`` names ε, δ, the rounds, z and the budget."""
        if num_rounds <= 0 or num_clients <= 0 or clients_per_round <= 0:
            return
        if self._z is None:
            self._z = self._calibrate(num_rounds, num_clients, clients_per_round)
        self._check_budget(num_rounds, num_clients, clients_per_round)

    def _calibrate(self, rounds: int, num_clients: int, sampled: int) -> float:
        """The smallest z whose ``rounds`` rounds spend at most ``target_epsilon`` at ``delta``.

        The accountant treats the update's and the count's Gaussians of an adaptive round as one
        of multiplier z (that is what z_Δ is chosen for), so the fixed-clipping event calibrates
        both; the adaptive constraint 2σ_b > z is checked when the round begins."""
        import dp_accounting

        assert self.target_epsilon is not None

        def event(z: float) -> Any:
            one = _events(self.accountant, num_clients, sampled, z, None)[1]
            return dp_accounting.SelfComposedDpEvent(one, rounds)

        def fresh() -> Any:
            return _events(self.accountant, num_clients, sampled, 1.0, None)[0]

        try:
            return float(
                dp_accounting.calibrate_dp_mechanism(
                    fresh,
                    event,
                    self.target_epsilon,
                    self.delta,
                    bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
                )
            )
        except Exception as err:
            raise ValueError(
                f"cannot calibrate noise_multiplier to target_epsilon {self.target_epsilon:g} at "
                f"delta {self.delta:g} over {rounds} rounds ({sampled} of {num_clients} "
                f"clients a round): {err}"
            ) from None

    def _check_budget(self, rounds: int, num_clients: int, sampled: int) -> None:
        if not self.max_epsilon:
            return
        assert self._z is not None
        spent = self._epsilon_of([self._row(num_clients, sampled, self._z) + [rounds]])
        if spent > self.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"differential privacy: {rounds} rounds with noise_multiplier {self._z:g} "
                f"({sampled} of {num_clients} clients a round, {self.accountant} accountant) "
                f"would spend epsilon {spent:.4g} at delta {self.delta:g}, over the budget "
                f"max_epsilon = {self.max_epsilon:g}; raise noise_multiplier, lower "
                "federation.num_rounds or raise max_epsilon"
            )

    # ---- client side -----------------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Scalar]:
        config = dict(self._inner.client_config(server_round))
        if self.clipping == "client":
            config[CLIENT_CLIP_KEY] = {"norm": self._clip, "report": True}  # type: ignore[assignment]
        return config

    # ---- server side -----------------------------------------------------------------------
    def _reset_round(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._keys: tuple[str, ...] = ()
        self._seen: set[int] = set()
        self._unclipped = 0

    def begin_round(self, ctx: RoundContext) -> None:
        super().begin_round(ctx)
        self._reset_round()
        sampled = len(ctx.sampled)
        if self._z is None:
            if not (ctx.num_rounds and ctx.num_clients and sampled):
                raise ValueError(
                    "target_epsilon needs the run's rounds, population and sample size; this "
                    "executor gives none: set noise_multiplier instead"
                )
            self._z = self._calibrate(ctx.num_rounds, ctx.num_clients, sampled)
        if sampled and ctx.num_clients:
            self._update_multiplier(self._z, sampled)  # the adaptive constraint, before training
            self._check_budget(ctx.num_rounds or ctx.round, ctx.num_clients, sampled)

    def accumulate(self, update: ClientUpdate) -> None:
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("DifferentialPrivacy.accumulate() called before begin_round()")
        who = f"client {update.client_id}"
        if ctx.sampled and update.client_id not in ctx.sampled:
            raise ValueError(f"{who} was not sampled this round")
        if update.client_id in self._seen:
            raise ValueError(f"{who} replied twice this round")
        state = update.state
        keys = tuple(sorted(state))
        if self._keys and keys != self._keys:
            raise ValueError(f"{who}: its keys differ from the round's first reply")
        unknown = [k for k in keys if k not in ctx.global_state]
        if unknown:
            raise ValueError(f"{who}: key {unknown[0]!r} is not in the global model")
        for key in keys:
            value, ref = state[key], ctx.global_state[key]
            if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
                raise ValueError(f"{who}: {key!r} is not a tensor of shape {tuple(ref.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{who}: {key!r} has non-finite values (NaN or inf)")
        norm = update_norm(state, ctx.global_state)
        if self.clipping == "client":
            if norm > self._clip * (1 + CLIENT_CLIP_TOLERANCE):
                raise ValueError(
                    f"{who}: update norm {norm:.6g} exceeds the clipping norm {self._clip:.6g} "
                    "clients must clip to (clipping = 'client')"
                )
            unclipped = update.metrics.get(UNCLIPPED_METRIC)
            if unclipped not in (0, 1, 0.0, 1.0) or isinstance(unclipped, bool):
                raise ValueError(
                    f"{who}: metric {UNCLIPPED_METRIC!r} must be 0 or 1, got {unclipped!r}"
                )
            was_unclipped = unclipped == 1
        else:
            was_unclipped = norm <= self._clip
        scale = 1.0 if norm <= self._clip else self._clip / norm
        first = not self._keys
        for key in keys:
            value = state[key]
            if not value.is_floating_point():
                continue
            diff = (value.double() - ctx.global_state[key].double().to(value.device)) * scale
            if first:
                self._sums[key] = diff.to(ctx.device)
            else:
                self._sums[key].add_(diff.to(ctx.device))
        self._keys = keys
        self._seen.add(update.client_id)
        self._unclipped += int(was_unclipped)

    def _generator(self, ctx: RoundContext) -> torch.Generator:
        seed = (
            secrets.randbits(63)
            if self.secure_noise
            else int(np.random.default_rng([ctx.seed, ctx.round, 0xD1F]).integers(2**63))
        )
        return torch.Generator().manual_seed(seed)

    def finalize(self) -> AggregateResult:
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("DifferentialPrivacy.finalize() called before begin_round()")
        if not self._keys:
            raise ValueError("DifferentialPrivacy: no client updates to aggregate this round")
        assert self._z is not None
        replies = len(self._seen)
        sampled = len(ctx.sampled) or replies
        population = ctx.num_clients if ctx.sampled and ctx.num_clients else sampled
        z_update = self._update_multiplier(self._z, sampled)
        std = z_update * self._clip
        gen = self._generator(ctx)
        mean: StateDict = {}
        for key in self._keys:  # sorted: the noise of a key never depends on arrival order
            if key not in self._sums:
                continue
            total = self._sums[key]
            noise = torch.randn(total.shape, generator=gen, dtype=torch.float64)
            mean[key] = (total + std * noise.to(total.device)) / sampled
        synthetic = {}
        for key in self._keys:
            ref = ctx.global_state[key]
            if key in mean:
                synthetic[key] = (ref.double().to(mean[key].device) + mean[key]).to(ref.dtype)
            else:
                synthetic[key] = ref.clone()
        clip_used = self._clip
        sigma_b = self._count_stddev(sampled)
        if sigma_b is not None:
            noisy = self._unclipped + sigma_b * float(
                torch.randn((), generator=gen, dtype=torch.float64)
            )
            fraction = noisy / sampled
            self._clip = self._clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))
            clipped_fraction = 1.0 - fraction
        else:
            clipped_fraction = 1.0 - self._unclipped / replies
        row = [population, sampled, z_update, sigma_b]
        if self._ledger and self._ledger[-1][:4] == row:
            self._ledger[-1][4] += 1
        else:
            self._ledger.append([*row, 1])
        self._inner.begin_round(ctx)
        self._inner.accumulate(ClientUpdate(client_id=-1, state=synthetic, num_examples=1))
        result = self._inner.finalize()
        self._reset_round()
        inner_metrics = dict(result.metrics)
        inner_metrics.pop("num_examples", None)  # the synthetic update's 1, not the clients'
        metrics = {
            **inner_metrics,
            "dp_epsilon": self._epsilon_of(self._ledger),
            "dp_delta": self.delta,
            "dp_noise_multiplier": self._z,
            "dp_noise_std": std / sampled,
            "dp_clipping_norm": clip_used,
            "dp_clipped_fraction": clipped_fraction,
            "dp_replies": float(replies),
            "num_clients": replies,
        }
        return AggregateResult(
            state=result.state, metrics=metrics, served_model=result.served_model
        )

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        self.begin_round(ctx)
        for update in updates:
            self.accumulate(update)
        return self.finalize()

    # ---- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "clipping_norm": float(self._clip),
            "noise_multiplier": None if self._z is None else float(self._z),
            "ledger": [list(row) for row in self._ledger],
            "inner": self._inner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            self._clip, self._ledger = self.clipping_norm, []
            self._inner.load_state_dict({})
            return
        expected = {"clipping_norm", "noise_multiplier", "ledger", "inner"}
        if set(state) != expected:
            raise ValueError(f"dp state has keys {sorted(state)}, expected {sorted(expected)}")
        clip = state["clipping_norm"]
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ValueError(f"dp state: clipping_norm must be a positive number, got {clip!r}")
        ledger = state["ledger"]
        if not isinstance(ledger, (list, tuple)) or any(
            not isinstance(row, (list, tuple)) or len(row) != 5 for row in ledger
        ):
            raise ValueError("dp state: ledger must be rows [N, m, z, count_stddev, rounds]")
        self._clip = float(clip)
        if state["noise_multiplier"] is not None:
            self._z = float(state["noise_multiplier"])
        self._ledger = [list(row) for row in ledger]
        self._inner.load_state_dict(state["inner"])
