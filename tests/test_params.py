"""Declared hyperparameters: checks and messages generated from a declaration, user classes with
and without one, merge functions, attacks, and ``fedmerge list --aggregator / --attack``."""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedmerge.aggregators import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    create_aggregator,
    get_aggregator_class,
    merge_function,
    register,
)
from fedmerge.aggregators.params import (
    HyperparameterError,
    check,
    describe,
    format_specs,
    hyperparameter,
)
from fedmerge.aggregators.registry import aggregator_params
from fedmerge.clients.attacks import AttackConfig, attack_params
from fedmerge.federation.cli import main

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Knobs:
    rate: float = hyperparameter(0.1, "a rate", gt=0, le=1)
    count: int = hyperparameter(3, "a count", ge=1)
    rank: int = hyperparameter(8, "a rank; -1 = full", ge=1, also=(-1,))
    mode: str = hyperparameter("a", "a mode", choices=("a", "b"))
    flag: bool = hyperparameter(False, "a flag")
    cap: int | None = hyperparameter(None, "a cap", ge=0)
    scale: float = hyperparameter(1.0, "any finite scale")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rate": 0}, "own: rate=0 is invalid: must be a number in (0, 1]"),
        ({"rate": 1.5}, "own: rate=1.5 is invalid: must be a number in (0, 1]"),
        ({"count": -3}, "own: count=-3 is invalid: must be an integer >= 1"),
        ({"count": 2.0}, "own: count=2.0 is invalid: must be an integer >= 1"),
        ({"count": True}, "own: count=True is invalid: must be an integer >= 1"),
        ({"rank": 0}, "own: rank=0 is invalid: must be an integer >= 1, or -1"),
        ({"mode": "c"}, "own: mode='c' is invalid: must be one of a, b"),
        ({"flag": 1}, "own: flag=1 is invalid: must be true or false"),
        ({"cap": -1}, "own: cap=-1 is invalid: must be an integer >= 0, or None (unset)"),
        ({"scale": float("inf")}, "own: scale=inf is invalid: must be a finite number"),
        ({"scale": "1"}, "own: scale='1' is invalid: must be a finite number"),
    ],
)
def test_a_bad_value_names_owner_parameter_value_and_rule(values, message) -> None:
    with pytest.raises(HyperparameterError) as info:
        check("own", Knobs, values)
    assert str(info.value) == message
    assert info.value.detail == message.removeprefix("own: ")


def test_the_error_survives_pickling_with_its_parts() -> None:
    import pickle

    error = pickle.loads(
        pickle.dumps(HyperparameterError("own", "rate", 2.0, "a number in (0, 1]"))
    )
    assert (error.owner, error.name, error.value, error.rule) == (
        "own",
        "rate",
        2.0,
        "a number in (0, 1]",
    )
    assert str(error) == "own: rate=2.0 is invalid: must be a number in (0, 1]"


def test_good_values_are_converted_to_the_declared_type() -> None:
    knobs = check("own", Knobs, {"rate": 1, "rank": -1, "cap": None, "scale": -2})
    assert knobs == Knobs(rate=1.0, rank=-1, scale=-2.0)
    assert type(knobs.rate) is float and type(knobs.scale) is float
    assert check("own", Knobs, {"cap": 4}).cap == 4


def test_an_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(
        TypeError,
        match=r"^own has no parameter 'rnak' \(did you mean 'rank'\?\); "
        r"it accepts: rate, count, rank, mode, flag, cap, scale$",
    ):
        check("own", Knobs, {"rnak": 2})


def test_describe_and_format_list_every_field_aligned() -> None:
    specs = describe(Knobs)
    assert [s.name for s in specs] == [f.name for f in dataclasses.fields(Knobs)]
    rank = specs[2]
    assert (rank.type, rank.default, rank.allowed, rank.doc) == (
        "int",
        "8",
        "an integer >= 1, or -1",
        "a rank; -1 = full",
    )
    assert specs[5].type == "int | None"
    lines = format_specs(specs).splitlines()
    assert len(lines) == 1 + len(specs)
    doc_column = lines[0].index("doc")
    assert all(line[doc_column:].startswith(spec.doc) for line, spec in zip(lines[1:], specs))


def test_hyperparameter_refuses_two_lower_bounds() -> None:
    with pytest.raises(TypeError, match="at most one of ge/gt"):
        hyperparameter(1, "x", ge=0, gt=0)


# ---- user aggregators ----------------------------------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch):
    from fedmerge.aggregators import registry

    monkeypatch.setattr(registry.AGGREGATORS, "_entries", dict(registry.AGGREGATORS._entries))


def _readme_plugin_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "class Params" in b)


def _updates() -> list[ClientUpdate]:
    return [
        ClientUpdate(
            client_id=i,
            state={"w": torch.tensor([float(i)])},
            num_examples=1,
            metrics={"train_loss": loss},
        )
        for i, loss in enumerate([0.3, 0.1, 0.2, 0.9])
    ]


def test_the_readmes_declared_aggregator_works_as_it_says(isolated_registry) -> None:
    namespace: dict = {}
    exec(compile(_readme_plugin_example(), "README.md", "exec"), namespace)  # noqa: S102
    cls = get_aggregator_class("mean_of_best")
    assert str(inspect.signature(cls)) == "(*, keep: int = 2, metric: str = 'train_loss')"
    agg = create_aggregator("mean_of_best", {"keep": 3})
    assert (agg.keep, agg.metric) == (3, "train_loss")
    ctx = RoundContext(
        round=1, global_state={"w": torch.zeros(1)}, base_state={"w": torch.zeros(1)}
    )
    assert agg.aggregate(ctx, _updates()).state["w"].tolist() == [1.0]  # clients 1, 2, 0
    with pytest.raises(
        ValueError,
        match=r"^aggregator 'mean_of_best': keep=0 is invalid: must be an "
        r"integer >= 1$",
    ):
        create_aggregator("mean_of_best", {"keep": 0})
    with pytest.raises(ValueError, match=r"no parameter 'kep' \(did you mean 'keep'\?\)"):
        create_aggregator("mean_of_best", {"kep": 3})
    assert [s.name for s in aggregator_params("mean_of_best")] == ["keep", "metric"]


def test_a_user_class_without_a_declaration_works_as_before(isolated_registry) -> None:
    @register("plain_test")
    class Plain(Aggregator):
        def __init__(self, *, factor: float = 1.0) -> None:
            super().__init__()
            if factor <= 0:
                raise ValueError("factor must be > 0")
            self.factor = factor

        def aggregate(self, ctx, updates):
            return AggregateResult(state={"w": self.factor * updates[0].state["w"]})

    assert create_aggregator("plain_test", {"factor": 2.0}).factor == 2.0
    with pytest.raises(
        ValueError, match="aggregator 'plain_test': invalid parameters: factor must"
    ):
        create_aggregator("plain_test", {"factor": 0})
    with pytest.raises(ValueError, match=r"no parameter 'factr' \(did you mean 'factor'\?\)"):
        create_aggregator("plain_test", {"factr": 1})
    [spec] = aggregator_params("plain_test")
    assert (spec.name, spec.type, spec.default, spec.allowed) == (
        "factor",
        "float",
        "1.0",
        "(not declared)",
    )


def test_a_subclass_with_its_own_init_is_not_bound_by_its_parents_declaration(
    isolated_registry,
) -> None:
    from fedmerge.aggregators.fedavg import FedAvg

    class Custom(FedAvg):
        def __init__(self, *, alpha: int) -> None:
            super().__init__()
            self.alpha = alpha

    assert list(inspect.signature(Custom).parameters) == ["alpha"]

    class Renamed(FedAvg):
        name = "renamed_test"

    assert list(inspect.signature(Renamed).parameters) == ["accumulator"]
    assert Renamed(accumulator="float32").accumulator == "float32"


def test_a_hyperparameter_may_not_shadow_an_aggregator_attribute() -> None:
    with pytest.raises(TypeError, match="'state_dict' is an Aggregator attribute"):

        class Bad(Aggregator):
            @dataclass(frozen=True)
            class Params:
                state_dict: int = hyperparameter(1, "clashes")

            def aggregate(self, ctx, updates):  # pragma: no cover - never built
                raise AssertionError


def test_a_merge_function_declares_its_parameters(isolated_registry) -> None:
    @dataclass(frozen=True)
    class ScaleParams:
        scale: float = hyperparameter(1.0, "multiplies the weighted mean", gt=0)

    @merge_function("scaled_declared_test", params=ScaleParams)
    def scaled(states, weights, *, scale: float = 1.0):
        return {k: scale * sum(w * s[k] for s, w in zip(states, weights)) for k in states[0]}

    agg = create_aggregator("scaled_declared_test", {"scale": 2})
    assert agg.params == {"scale": 2.0}
    ctx = RoundContext(
        round=1, global_state={"w": torch.zeros(1)}, base_state={"w": torch.zeros(1)}
    )
    assert agg.aggregate(ctx, _updates()[:2]).state["w"].tolist() == [1.0]
    with pytest.raises(
        ValueError,
        match=r"^aggregator 'scaled_declared_test': scale=-1 is invalid: must be "
        r"a number > 0$",
    ):
        create_aggregator("scaled_declared_test", {"scale": -1})
    [spec] = aggregator_params("scaled_declared_test")
    assert (spec.doc, spec.allowed) == ("multiplies the weighted mean", "a number > 0")

    with pytest.raises(TypeError, match=r"params declares \['scale'\] but .* takes \['factor'\]"):
        merge_function("mismatch_test", params=ScaleParams)(
            lambda states, weights, *, factor=1: states[0]
        )


def test_an_undeclared_merge_function_gets_a_declaration_from_its_signature(
    isolated_registry,
) -> None:
    @merge_function("shift_test")
    def shift(states, weights, *, by: float = 0.5, times: int = 1):
        return {k: states[0][k] + by * times for k in states[0]}

    assert [(s.name, s.type, s.default) for s in aggregator_params("shift_test")] == [
        ("by", "float", "0.5"),
        ("times", "int", "1"),
    ]
    with pytest.raises(
        ValueError, match=r"aggregator 'shift_test': times='2' is invalid: must be an integer"
    ):
        create_aggregator("shift_test", {"times": "2"})


# ---- attacks ---------------------------------------------------------------------------------


def test_attack_config_checks_come_from_its_declaration() -> None:
    with pytest.raises(
        ValueError, match=r"^label_noise=0 is invalid: must be a number in \(0, 1\]$"
    ):
        AttackConfig(kind="noisy_labels", label_noise=0)
    assert AttackConfig(kind="noise", fraction=1).fraction == 1.0
    assert [s.name for s in attack_params("noise")] == [
        "kind",
        "fraction",
        "seed",
        "noise_std",
        "count_factor",
    ]
    assert len(attack_params()) == len(dataclasses.fields(AttackConfig))
    with pytest.raises(
        ValueError, match=r"unknown attack kind 'sign_flp'\. Did you mean 'sign_flip'\?"
    ):
        attack_params("sign_flp")


# ---- the command line --------------------------------------------------------------------------


def test_list_aggregator_prints_each_parameter_on_its_line(capsys) -> None:
    assert main(["list", "--aggregator", "smile"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "aggregator 'smile' ([aggregator] keys):"
    assert out[1].split() == ["name", "type", "default", "allowed", "doc"]
    rows = {line.split()[0]: line for line in out[2:]}
    assert list(rows) == [s.name for s in aggregator_params("smile")]
    assert re.match(r"k_gate +int +16 +an integer >= 1 +router rank", rows["k_gate"])
    assert re.match(r"svd +str +'full' +one of full, randomized +", rows["svd"])


def test_list_attack_prints_what_a_kind_reads(capsys) -> None:
    assert main(["list", "--attack", "sign_flip"]) == 0
    out = capsys.readouterr().out
    assert "flip_scale" in out and "noise_std" not in out and "fraction" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--aggregator", "smiel"], "unknown aggregator 'smiel'. Did you mean 'smile'?"),
        (["--attack", "nosie"], "unknown attack kind 'nosie'. Did you mean 'noise'?"),
    ],
)
def test_list_of_an_unknown_name_is_one_error_line(capsys, args, needle) -> None:
    assert main(["list", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmerge: error: ") and needle in lines[0]
