"""The contract every built-in aggregator keeps, checked for each registered name.

(a) it accepts its declared hyperparameters at their defaults and at another valid value;
(b) it rejects a wrong value of each declared parameter with an error naming the parameter;
(c) ``state_dict`` round-trips: a fresh instance that loads it has the same ``state_dict`` and
    makes the same next merge;
(d) N identical client updates θ merge back to θ ("the same model", per method, below).

All rounds run on one tiny two-task BERT (the only layout WEMoE upscales; the others treat it as
any state dict), with a RoundContext holding everything a method may need: the base model, the
architecture, proxy inputs (WEMoE) and a labelled validation set (FedDRL).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence

import pytest
import torch
from torch import nn

from fedmerge.aggregators import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    available,
    create_aggregator,
    get_aggregator_class,
)
from fedmerge.aggregators.base import declared_params
from fedmerge.aggregators.params import HyperparameterError, check_value, field_bounds
from fedmerge.aggregators.registry import AGGREGATORS, ENTRY_POINT_GROUP
from fedmerge.clients.tasks.text import MultiTaskTextClassifier

VOCAB, CLIENTS = 40, 4

BUILTINS = sorted(
    name
    for name in available()
    if get_aggregator_class(name).__module__.startswith("fedmerge.aggregators.")
)


def test_every_registered_name_is_covered() -> None:
    """Nothing is left out silently. A fresh ``import fedmerge.aggregators`` registers exactly the
    names run here plus the installed plugins (entry points of other distributions, tested in
    test_aggregators.py); the other names registered in this process come from test modules."""
    fresh = subprocess.run(
        [sys.executable, "-c", "import fedmerge.aggregators as a; print(*a.available())"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    plugins = set(AGGREGATORS._entry_points())
    assert set(fresh) == set(BUILTINS) | plugins, ENTRY_POINT_GROUP
    assert not plugins & set(BUILTINS)
    assert len(BUILTINS) >= 12
    for name in set(available()) - set(BUILTINS) - plugins:
        assert not get_aggregator_class(name).__module__.startswith("fedmerge."), name


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_declares_documented_params(name: str) -> None:
    params = declared_params(get_aggregator_class(name))
    assert params is not None, f"{name} declares no Params"
    for f in dataclasses.fields(params):
        assert f.metadata.get("doc"), f"{name}.{f.name} has no doc"


# ---- a tiny model and the round context ---------------------------------------------------------


def tiny_model(seed: int = 0) -> MultiTaskTextClassifier:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return MultiTaskTextClassifier(BertModel(config), [3, 2]).eval()


def tiny_inputs(n: int, task: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids[torch.arange(8).expand(n, 8) >= lengths.unsqueeze(1)] = 0
    return torch.cat([torch.full((n, 1), task), ids], dim=1)


BASE = {k: v.clone() for k, v in tiny_model().state_dict().items()}
VAL_X = torch.cat([tiny_inputs(24, 0, 5), tiny_inputs(24, 1, 6)])
VAL_Y = torch.cat([torch.arange(24) % 3, torch.arange(24) % 2])
PROBE = torch.cat([tiny_inputs(6, 0, 11), tiny_inputs(6, 1, 12)])


def evaluate_many(states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Accuracy and loss of each state on the validation set (FedDRL's rewards)."""
    out = []
    for state in states:
        model = tiny_model(1)
        model.load_state_dict(dict(state))
        with torch.no_grad():
            logits = model(VAL_X)
        out.append(
            {
                "accuracy": float((logits.argmax(1) == VAL_Y).float().mean()),
                "loss": float(nn.functional.cross_entropy(logits, VAL_Y)),
            }
        )
    return out


def context(round_: int, global_state: Mapping[str, torch.Tensor]) -> RoundContext:
    return RoundContext(
        round=round_,
        global_state=global_state,
        base_state=BASE,
        seed=3,
        evaluate=lambda s: evaluate_many([s])[0],
        evaluate_many=evaluate_many,
        build_model=lambda: tiny_model(7),
        proxy_inputs={0: tiny_inputs(16, 0, 1), 1: tiny_inputs(16, 1, 2)},
        num_clients=CLIENTS,
        sampled=tuple(range(CLIENTS)),
    )


def perturbed(seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in BASE.items()
    }


def client_losses(i: int) -> dict[str, float]:
    """The losses a client's reply carries: its mean training loss, and its loss at the received
    model when the aggregator asks for it (q-FedAvg)."""
    return {"train_loss": 0.5 + 0.25 * i, "initial_loss": 1.0 + 0.5 * i}


def distinct_updates(round_: int) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            client_id=i,
            state=perturbed(100 * round_ + i),
            num_examples=10 + 5 * i,
            metrics={"task_id": float(i % 2), **client_losses(i), "local_steps": 3.0},
        )
        for i in range(CLIENTS)
    ]


def run_round(
    agg: Aggregator, ctx: RoundContext, updates: Sequence[ClientUpdate]
) -> AggregateResult:
    agg.begin_round(ctx)
    for update in updates:
        agg.accumulate(update)
    return agg.finalize()


FAST = {"wemoe": {"steps": 4}, "scaffold": {"local_lr": 0.1}}
"""Settings that only make a round cheaper (WEMoE's default is 1,000 router steps), or that a
run fills in (SCAFFOLD's local_lr: the run's [train] lr)."""


# ---- (a) and (b): declared values ---------------------------------------------------------------


def _params(name: str) -> type:
    return declared_params(get_aggregator_class(name))


FREE_FORM = {("dp", "inner"): "fedadam", ("dp", "inner_params"): {"accumulator": "float32"}}
"""Valid non-default values of parameters that no range describes: the DP wrapper's inner
aggregator (a name checked against the registry) and its keywords (a table checked by the inner's
own declaration)."""


def _other_valid(name: str, field: dataclasses.Field) -> object:
    """A valid value of ``field`` other than its default."""
    if (name, field.name) in FREE_FORM:
        return FREE_FORM[name, field.name]
    params = _params(name)
    tp, optional, b = field_bounds(params, field.name)
    default = field.default
    if b.choices is not None:
        return next(c for c in b.choices if c != default)
    if tp is bool:
        return not default
    start = 1 if default is None else default
    low = b.ge if b.ge is not None else b.gt
    high = b.le if b.le is not None else b.lt
    candidates = [start * 2, start + 1, start / 2, start - 1]
    candidates += [
        v
        for v in (low, high, None if low is None or high is None else (low + high) / 2)
        if v is not None
    ]
    for value in candidates:
        value = int(value) if tp is int else float(value)
        if value == default:
            continue
        try:
            return check_value(name, params, field.name, value)
        except HyperparameterError:
            continue
    raise AssertionError(f"no other valid value found for {name}.{field.name}")


def _invalid(name: str, field: dataclasses.Field) -> list[object]:
    """Values ``field`` must refuse: of the wrong type, outside its range or choices."""
    tp, optional, b = field_bounds(_params(name), field.name)
    if b.choices is not None:
        return ["no_such_choice", 3]
    if tp is bool:
        return ["yes", 1]
    bad: list[object] = ["0.5", True]
    if tp is int:
        bad.append(1.5)
    else:
        bad += [math.nan, math.inf]
    if b.ge is not None:
        bad.append(b.ge - 1)
    if b.gt is not None:
        bad.append(b.gt)
    if b.le is not None:
        bad.append(b.le + 1)
    if b.lt is not None:
        bad.append(b.lt)
    return [v for v in bad if v not in b.also or isinstance(v, bool)]


@pytest.mark.parametrize("name", BUILTINS)
def test_a_accepts_defaults_and_another_valid_value(name: str) -> None:
    params = _params(name)
    defaults = {f.name: f.default for f in dataclasses.fields(params)}
    for agg in (create_aggregator(name, {}), create_aggregator(name, defaults)):
        assert agg.hparams == params()
        for key, value in defaults.items():
            assert getattr(agg, key) == value, key
    for f in dataclasses.fields(params):
        value = _other_valid(name, f)
        agg = create_aggregator(name, {f.name: value})
        assert getattr(agg.hparams, f.name) == value and getattr(agg, f.name) == value, f.name


@pytest.mark.parametrize("name", BUILTINS)
def test_b_rejects_wrong_values_naming_the_parameter(name: str) -> None:
    cls = get_aggregator_class(name)
    for f in dataclasses.fields(_params(name)):
        for value in _invalid(name, f):
            with pytest.raises(ValueError) as info:
                create_aggregator(name, {f.name: value})
            message = str(info.value)
            assert message.startswith(
                f"aggregator {name!r}: {f.name}={value!r} is invalid: must be "
            ), message
            with pytest.raises(HyperparameterError, match=f"^{name}: {f.name}="):
                cls(**{f.name: value})
    fields = [f.name for f in dataclasses.fields(_params(name))]
    if not fields:  # median: nothing is accepted
        with pytest.raises(
            ValueError, match=r"has no parameter 'beta'; it accepts: \(no parameters\)"
        ):
            create_aggregator(name, {"beta": 0.1})
        return
    with pytest.raises(
        ValueError, match=f"has no parameter '{fields[0]}x' \\(did you mean '{fields[0]}'\\?\\)"
    ):
        create_aggregator(name, {fields[0] + "x": 1})


# ---- (c) state round trip -----------------------------------------------------------------------


def _same(a: object, b: object, where: str = "") -> None:
    """Deep equality of state dicts, metrics and nested plain data (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for key in a:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _untimed(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith("_s")}  # wall times differ


@pytest.mark.parametrize("name", BUILTINS)
def test_c_state_round_trips_and_gives_the_same_next_merge(name: str) -> None:
    first = create_aggregator(name, FAST.get(name, {}))
    result1 = run_round(first, context(1, BASE), distinct_updates(1))
    saved = first.state_dict()
    restored = create_aggregator(name, FAST.get(name, {}))
    restored.load_state_dict(saved)
    _same(restored.state_dict(), saved, "state_dict")

    ctx2, updates2 = context(2, result1.state), distinct_updates(2)
    a, b = run_round(first, ctx2, updates2), run_round(restored, ctx2, updates2)
    _same(a.state, b.state, "state")
    _same(_untimed(a.metrics), _untimed(b.metrics), "metrics")
    assert (a.served_model is None) == (b.served_model is None)
    if a.served_model is not None:
        with torch.no_grad():
            assert torch.equal(a.served_model(PROBE), b.served_model(PROBE))
    _same(first.state_dict(), restored.state_dict(), "state_dict after the next round")


# ---- (d) identical updates ----------------------------------------------------------------------

SAME_MODEL = {
    # θ0 + λ Σi τi over one model per client (no task ids here): λ = 1/N is the mean, θ.
    "task_arithmetic": {"lam": 1 / CLIENTS},
    # TIES averages the agreeing entries (τ itself here) and scales by λ; keep = 1 trims nothing.
    "ties": {"lam": 1.0, "keep": 1.0},
    # TSV-M keeping every singular triple of N copies of τ rebuilds τ (α = 1).
    "tsv_m": {"share": 1.0},
    # q-FedAvg steps s (w̄ − w) with s = L ΣF^q / Σh, which is 1 only at q = 0 (h = L F^q).
    "qfedavg": {"q": 0.0},
    # SMILE's linears are θ0 plus a routed mix of N copies of τ (full rank: k is capped at the
    # layer's size), so θ; its other parameters are θ only when taken from the clients' average.
    "smile": {"nonlinear": "average"},
    # WEMoE: θ0 + λ0 Σi τi outside the MLPs and θ0 + Σi λi(x) τi inside, λi = init_lambda while
    # the routers are untrained with zero weights (router_std 0): λ0 = 1/N gives θ everywhere.
    "wemoe": {"init_lambda": 1 / CLIENTS, "router_std": 0.0, "steps": 0},
    # DP without noise and with a bound no update reaches is FedAvg of the (uniform) mean.
    "dp": {"noise_multiplier": 0.0, "clipping_norm": 1e6},
    # SCAFFOLD's step x + η_g mean(θ − x) is θ at η_g = 1 (its default); local_lr as in a run.
    "scaffold": {"local_lr": 0.1},
}
"""Per method, the settings under which merging N copies of θ means θ; the others (averages,
robust statistics, FedDRL's kept-and-weighted averages) give θ back at any setting (defaults)."""

ISOTROPIC = {"iso_c", "iso_cts"}
"""Iso-C and Iso-CTS give every shared 2-D task vector one singular value, so N copies of θ are
θ there only when τ's spectrum is flat: they must give θ back on every other key (their closed
forms on 2-D keys are tested in test_merge_methods.py)."""


ADAPTIVE_STEPS = {"fedadagrad", "fedadam", "fedyogi"}
"""Server optimisers whose step is not the pseudo-gradient at any setting (FedAvgM's is, at its
defaults)."""


@pytest.mark.parametrize("name", BUILTINS)
def test_d_identical_updates_merge_back_to_the_same_model(name: str) -> None:
    theta = perturbed(7, scale=0.1)
    updates = [
        ClientUpdate(
            client_id=i,
            state=theta,
            num_examples=10 + 5 * i,
            metrics={**client_losses(i), "local_steps": 3.0},
        )
        for i in range(CLIENTS)
    ]
    agg = create_aggregator(name, SAME_MODEL.get(name, {}))
    result = run_round(agg, context(1, BASE), updates)
    assert set(result.state) == set(theta)
    if name in ADAPTIVE_STEPS:
        # No setting of an adaptive server optimiser steps by the pseudo-gradient Δ = θ − θt
        # itself (it steps by η m / (√v + τ)); what holds is that it moves from θt towards θ,
        # entry by entry.
        for key, value in theta.items():
            if value.is_floating_point():
                delta, step = value - BASE[key], result.state[key] - BASE[key]
                moved = delta.abs() > 1e-6
                assert torch.equal(torch.sign(step[moved]), torch.sign(delta[moved])), key
        return
    for key, value in theta.items():
        assert result.state[key].dtype == value.dtype, key
        if name in ISOTROPIC and value.dim() == 2 and not key.startswith("heads."):
            continue
        assert torch.allclose(result.state[key].double(), value.double(), rtol=0, atol=1e-6), key
    if result.served_model is not None:  # the upscaled model computes what θ computes
        single = tiny_model(2)
        single.load_state_dict(theta)
        with torch.no_grad():
            served, expected = result.served_model(PROBE), single(PROBE)
        assert torch.allclose(served, expected, rtol=0, atol=1e-4), (served - expected).abs().max()
