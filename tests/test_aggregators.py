"""FedAvg and the aggregator registry, as plain computations: no Ray, no Flower."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import weakref
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
import torch

from fedmerge.aggregators import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    available,
    create_aggregator,
    get_aggregator_class,
    merge_function,
    register,
    registry,
)
from fedmerge.aggregators.fedavg import FedAvg, fedavg

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = "tests.plugins.custom_aggregators"


def ctx(round_: int = 1) -> RoundContext:
    return RoundContext(round=round_, global_state={}, base_state={})


def run_round(agg: Aggregator, updates: list[ClientUpdate]) -> AggregateResult:
    agg.begin_round(ctx())
    for update in updates:
        agg.accumulate(update)
    return agg.finalize()


def hand_updates() -> list[ClientUpdate]:
    """Three clients with 1, 2 and 5 examples (8 in all): values chosen so the mean is exact."""
    f32, f64, i64 = torch.float32, torch.float64, torch.int64
    return [
        ClientUpdate(
            client_id=0,
            num_examples=1,
            state={
                "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=f32),
                "d": torch.tensor([0.1, -1.0], dtype=f64),
                "nbt": torch.tensor([10, 4, 12], dtype=i64),
                "mask": torch.tensor([True, True]),
            },
        ),
        ClientUpdate(
            client_id=1,
            num_examples=2,
            state={
                "w": torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=f32),
                "d": torch.tensor([0.2, 2.0], dtype=f64),
                "nbt": torch.tensor([11, 0, 0], dtype=i64),
                "mask": torch.tensor([False, True]),
            },
        ),
        ClientUpdate(
            client_id=2,
            num_examples=5,
            state={
                "w": torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=f32),
                "d": torch.tensor([0.3, 4.0], dtype=f64),
                "nbt": torch.tensor([3, 0, 0], dtype=i64),
                "mask": torch.tensor([True, False]),
            },
        ),
    ]


def random_updates(num: int, seed: int = 0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 64), "bn.n": ()}
    updates = []
    for i in range(num):
        state = {k: torch.randn(s, generator=gen) for k, s in shapes.items() if k != "bn.n"}
        state["bn.n"] = torch.tensor(100 + i, dtype=torch.int64)
        n = int(torch.randint(1, 5000, (), generator=gen))
        updates.append(ClientUpdate(client_id=i, state=state, num_examples=n))
    return updates


# ---- FedAvg ------------------------------------------------------------------------------------


def test_fedavg_matches_hand_computation() -> None:
    result = run_round(FedAvg(), hand_updates())
    s = result.state
    # (1*w0 + 2*w1 + 5*w2) / 8
    assert s["w"].dtype == torch.float32
    assert torch.equal(s["w"], torch.tensor([[11.0, 12.0], [15.0, 16.0]]) / 8)
    assert s["d"].dtype == torch.float64
    assert s["d"].tolist() == pytest.approx([(0.1 + 2 * 0.2 + 5 * 0.3) / 8, (-1 + 4 + 20) / 8])
    # Integer buffers keep int64: weighted means 47/8 = 5.875 -> 6, 4/8 = 0.5 -> 0 and
    # 12/8 = 1.5 -> 2 (rounded to nearest, ties to even).
    assert s["nbt"].dtype == torch.int64
    assert s["nbt"].tolist() == [6, 0, 2]
    # bool: weighted share of True, 6/8 -> True and 3/8 -> False.
    assert s["mask"].dtype == torch.bool
    assert s["mask"].tolist() == [True, False]
    assert result.metrics == {"num_clients": 3, "num_examples": 8}


def test_fedavg_does_not_depend_on_arrival_order() -> None:
    updates = random_updates(4)
    reference = run_round(FedAvg(), updates).state
    for perm in itertools.permutations(updates):
        state = run_round(FedAvg(), list(perm)).state
        for key, value in reference.items():
            assert torch.equal(state[key], value), key


def test_fedavg_aggregate_and_pure_function_share_the_incremental_result() -> None:
    updates = random_updates(5, seed=1)
    incremental = run_round(FedAvg(), updates)
    at_once = FedAvg().aggregate(ctx(), updates)
    total = sum(u.num_examples for u in updates)
    pure_counts = fedavg([u.state for u in updates], [u.num_examples for u in updates])
    pure_normalised = fedavg([u.state for u in updates], [u.num_examples / total for u in updates])
    assert at_once.metrics == incremental.metrics
    for key, value in incremental.state.items():
        assert torch.equal(at_once.state[key], value), key
        assert torch.equal(pure_counts[key], value), key
        torch.testing.assert_close(pure_normalised[key], value, rtol=1e-6, atol=1e-6)


def test_fedavg_keeps_no_client_update_alive() -> None:
    """One accumulator: after accumulate, nothing of a client's state is referenced any more."""
    agg = FedAvg()
    agg.begin_round(ctx())
    refs = []
    for update in random_updates(3, seed=2):
        agg.accumulate(update)
        refs.extend(weakref.ref(t) for t in update.state.values())
        del update
    gc.collect()
    assert all(ref() is None for ref in refs)
    result = agg.finalize()
    expected = fedavg(
        [u.state for u in random_updates(3, seed=2)],
        [u.num_examples for u in random_updates(3, seed=2)],
    )
    for key, value in expected.items():
        assert torch.equal(result.state[key], value), key


def _bad(update: ClientUpdate, **changes) -> ClientUpdate:
    fields = {"client_id": 7, "state": dict(update.state), "num_examples": update.num_examples}
    fields.update(changes)
    return ClientUpdate(**fields)


def _with(state, **items):
    out = dict(state)
    for key, value in items.items():
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("make_bad", "pattern"),
    [
        (lambda u: _bad(u, state=_with(u.state, d=None)), r"client 7: key 'd' is missing"),
        (
            lambda u: _bad(u, state=_with(u.state, extra=torch.zeros(1))),
            r"client 7: unexpected key 'extra'",
        ),
        (
            lambda u: _bad(u, state=_with(u.state, nbt=torch.zeros(4, dtype=torch.int64))),
            r"client 7: 'nbt' has shape \(4,\), expected \(3,\)",
        ),
        (
            lambda u: _bad(u, state=_with(u.state, w=torch.full((2, 2), float("nan")))),
            r"client 7: 'w' has non-finite values",
        ),
        (
            lambda u: _bad(u, num_examples=0),
            r"client 7: num_examples must be a positive number, got 0",
        ),
        (lambda u: _bad(u, num_examples=-3), r"client 7: num_examples .* got -3"),
        (lambda u: _bad(u, num_examples=float("nan")), r"client 7: num_examples .* got nan"),
    ],
)
def test_fedavg_rejects_bad_update_naming_client_and_keeps_going(make_bad, pattern) -> None:
    first, second, third = hand_updates()
    agg = FedAvg()
    agg.begin_round(ctx())
    agg.accumulate(first)
    with pytest.raises(ValueError, match=pattern):
        agg.accumulate(make_bad(second))
    agg.accumulate(third)
    result = agg.finalize()
    expected = fedavg([first.state, third.state], [first.num_examples, third.num_examples])
    assert result.metrics == {"num_clients": 2, "num_examples": 6}
    for key, value in expected.items():
        assert torch.equal(result.state[key], value), key


def test_fedavg_first_update_is_checked_too() -> None:
    agg = FedAvg()
    agg.begin_round(ctx())
    with pytest.raises(ValueError, match="client 3: num_examples"):
        agg.accumulate(ClientUpdate(client_id=3, state={"w": torch.ones(2)}, num_examples=0))
    with pytest.raises(ValueError, match="client 4: 'w' has non-finite"):
        agg.accumulate(
            ClientUpdate(
                client_id=4, state={"w": torch.tensor([1.0, float("inf")])}, num_examples=1
            )
        )
    agg.accumulate(ClientUpdate(client_id=5, state={"w": torch.ones(3)}, num_examples=2))
    assert agg.finalize().state["w"].tolist() == [1.0, 1.0, 1.0]


def test_fedavg_round_protocol_errors() -> None:
    agg = FedAvg()
    with pytest.raises(RuntimeError, match="before begin_round"):
        agg.accumulate(hand_updates()[0])
    with pytest.raises(RuntimeError, match="before begin_round"):
        agg.finalize()
    agg.begin_round(ctx())
    with pytest.raises(ValueError, match="no client updates"):
        agg.finalize()
    # A new round starts from an empty accumulator.
    first = run_round(agg, hand_updates())
    second = run_round(agg, hand_updates())
    assert torch.equal(first.state["w"], second.state["w"])
    assert agg.state_dict() == {}
    agg.load_state_dict({})


def test_fedavg_pure_function_checks_weights() -> None:
    states = [u.state for u in hand_updates()]
    with pytest.raises(ValueError, match="3 states but 2 weights"):
        fedavg(states, [1, 2])
    with pytest.raises(ValueError, match="weight 1 must be a non-negative number"):
        fedavg(states, [1, -2, 1])
    with pytest.raises(ValueError, match="sum to zero"):
        fedavg(states, [0, 0, 0])
    with pytest.raises(ValueError, match="state 2: key 'w' is missing"):
        fedavg([states[0], states[1], _with(states[2], w=None)], [1, 1, 1])
    # A zero weight drops a state from the mean.
    assert torch.equal(fedavg(states, [1, 0, 0])["w"], states[0]["w"])


def test_aggregators_package_imports_neither_flwr_nor_ray() -> None:
    code = (
        "import sys, fedmerge, fedmerge.aggregators; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- registry ----------------------------------------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry.AGGREGATORS, "_entries", dict(registry.AGGREGATORS._entries))


@pytest.fixture
def custom_path(monkeypatch):
    """The repository root on sys.path, so that ``tests.plugins...`` imports however pytest runs."""
    monkeypatch.syspath_prepend(str(ROOT))


class Scaled(Aggregator):
    """Test aggregator: FedAvg times a constant."""

    name = "scaled"

    def __init__(self, factor: float = 1.0, *, bias: float = 0.0) -> None:
        super().__init__()
        if factor == 0:
            raise ValueError("factor must not be zero")
        self.factor, self.bias = factor, bias

    def aggregate(self, ctx, updates):
        mean = fedavg([u.state for u in updates], [u.num_examples for u in updates])
        return AggregateResult(state={k: v * self.factor + self.bias for k, v in mean.items()})


def test_register_get_and_create(isolated_registry) -> None:
    assert register()(Scaled) is Scaled
    assert get_aggregator_class("scaled") is Scaled
    assert "scaled" in available() and "fedavg" in available()
    agg = create_aggregator("scaled", {"factor": 2.0, "bias": 1.0})
    assert isinstance(agg, Scaled) and (agg.factor, agg.bias) == (2.0, 1.0)
    # An alias, and re-registering the same class, are both fine.
    register("scaled_alias")(Scaled)
    register()(Scaled)
    assert get_aggregator_class("scaled_alias") is Scaled


def test_register_takes_the_given_name_when_the_class_has_none(isolated_registry) -> None:
    @register("nameless_test")
    class Nameless(Scaled):
        name = ""

    assert Nameless.name == "nameless_test"
    assert get_aggregator_class("nameless_test") is Nameless

    class NoName(Scaled):
        name = ""

    with pytest.raises(ValueError, match="non-empty string"):
        register()(NoName)
    with pytest.raises(TypeError, match="Aggregator subclass"):
        register("x")(dict)


def test_register_duplicate_name_names_both_classes(isolated_registry) -> None:
    register()(Scaled)

    class Other(Scaled):
        pass

    with pytest.raises(
        ValueError,
        match=r"'scaled' is already registered by .*\.Scaled; "
        r"cannot register .*\.Other",
    ):
        register("scaled")(Other)
    with pytest.raises(
        ValueError, match="already registered by fedmerge.aggregators.fedavg.FedAvg"
    ):
        register("fedavg")(Other)


def test_unknown_name_lists_available_and_the_ways_to_plug_in() -> None:
    with pytest.raises(ValueError) as info:
        get_aggregator_class("fedvag")
    message = str(info.value)
    assert "unknown aggregator 'fedvag'" in message
    assert "Did you mean 'fedavg'?" in message
    assert "Available: " in message and "fedavg" in message
    assert "@fedmerge.register" in message
    assert "package.module:ClassName" in message
    assert '"fedmerge.aggregators"' in message


def test_module_path_resolution(custom_path) -> None:
    cls = get_aggregator_class(f"{CUSTOM}:MedianOfClients")
    assert cls.__name__ == "MedianOfClients" and cls.__module__ == CUSTOM
    updates = [
        ClientUpdate(
            client_id=i, state={"w": torch.tensor([float(i), 10.0 - i])}, num_examples=1 + 100 * i
        )
        for i in range(3)
    ]
    assert create_aggregator(f"{CUSTOM}:MedianOfClients", {}).aggregate(ctx(), updates).state[
        "w"
    ].tolist() == [1.0, 9.0]

    best = create_aggregator(f"{CUSTOM}:KeepBestByMetric", {"metric": "acc"})
    scored = [
        ClientUpdate(
            client_id=i, state={"w": torch.tensor([float(i)])}, num_examples=1, metrics={"acc": acc}
        )
        for i, acc in enumerate([0.5, 0.9, 0.7])
    ]
    result = best.aggregate(ctx(), scored)
    assert result.state["w"].tolist() == [1.0] and result.metrics["best_client"] == 1


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("no_such_module_xyz:Thing", "cannot import 'no_such_module_xyz'"),
        (f"{CUSTOM}:NoSuchClass", "'NoSuchClass' not found"),
        (f"{CUSTOM}:torch", "not an aggregators.Aggregator subclass"),
        ("fedmerge.aggregators.base:Aggregator", "is abstract: it does not implement aggregate"),
        (":FedAvg", "must look like"),
    ],
)
def test_module_path_errors(custom_path, spec, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        get_aggregator_class(spec)


def test_merge_function_route(isolated_registry) -> None:
    seen = {}

    @merge_function("scaled_mean_test")
    def scaled_mean(states, weights, *, scale: float, shift: float = 0.0):
        """Test merge: weighted mean, scaled and shifted."""
        seen["weights"] = list(weights)
        return {
            k: scale * sum(w * s[k] for s, w in zip(states, weights)) + shift for k in states[0]
        }

    # The function is still a plain function.
    assert scaled_mean.__name__ == "scaled_mean"
    direct = scaled_mean([{"w": torch.tensor(2.0)}], [1.0], scale=3.0)
    assert direct["w"].item() == 6.0

    cls = get_aggregator_class("scaled_mean_test")
    assert issubclass(cls, Aggregator) and cls.name == "scaled_mean_test"
    assert "Test merge" in cls.__doc__
    agg = create_aggregator("scaled_mean_test", {"scale": 2.0})
    updates = [
        ClientUpdate(client_id=0, state={"w": torch.tensor(4.0)}, num_examples=1),
        ClientUpdate(client_id=1, state={"w": torch.tensor(8.0)}, num_examples=3),
    ]
    result = run_round(agg, updates)
    assert seen["weights"] == [0.25, 0.75]
    assert result.state["w"].item() == 2.0 * (0.25 * 4 + 0.75 * 8)
    assert result.metrics == {"num_clients": 2, "num_examples": 4}

    with pytest.raises(
        ValueError,
        match=r"no parameter 'scael' \(did you mean 'scale'\?\); "
        r"it accepts: scale, shift",
    ):
        create_aggregator("scaled_mean_test", {"scael": 2.0})
    with pytest.raises(ValueError, match="aggregator 'scaled_mean_test': missing .*'scale'"):
        create_aggregator("scaled_mean_test", {})
    with pytest.raises(TypeError, match="must take \\(states, weights\\)"):
        merge_function("bad_test")(lambda states: states)


def test_entry_point_route() -> None:
    eps = {ep.name: ep for ep in entry_points(group="fedmerge.aggregators")}
    assert "example_plugin" in eps, (
        "the example plugin is not installed: "
        "pip install --no-build-isolation -e tests/plugins/fedmerge_example_plugin"
    )
    assert eps["example_plugin"].dist.name == "fedmerge-example-plugin"
    assert "example_plugin" in available()

    cls = get_aggregator_class("example_plugin")
    assert cls.__module__ == "fedmerge_example_plugin" and issubclass(cls, Aggregator)
    agg = create_aggregator("example_plugin", {"beta": 0.25})
    updates = [
        ClientUpdate(
            client_id=i,
            num_examples=1,
            state={"w": torch.tensor([v, -v]), "n": torch.tensor(i, dtype=torch.int64)},
        )
        for i, v in enumerate([1.0, 2.0, 4.0, 100.0])
    ]
    result = agg.aggregate(ctx(), updates)
    # k = 4, beta = 0.25: one value trimmed at each end, the middle two averaged.
    assert result.state["w"].tolist() == [3.0, -3.0]
    assert result.state["n"].dtype == torch.int64 and result.state["n"].item() == 2  # 1.5 -> 2
    with pytest.raises(ValueError, match="aggregator 'example_plugin': invalid parameters: beta"):
        create_aggregator("example_plugin", {"beta": 0.7})


def test_broken_entry_point_names_itself(monkeypatch) -> None:
    broken = EntryPoint(
        name="broken_test", value="no_such_plugin_xyz:Agg", group="fedmerge.aggregators"
    )
    monkeypatch.setattr(registry.AGGREGATORS, "_entry_points", lambda: {"broken_test": broken})
    pattern = (
        r"cannot load aggregator entry point 'broken_test' "
        r"\(no_such_plugin_xyz:Agg, from an unknown distribution\)"
    )
    with pytest.raises(ValueError, match=pattern):
        get_aggregator_class("broken_test")


def test_create_aggregator_parameter_errors(isolated_registry, custom_path) -> None:
    with pytest.raises(
        ValueError, match="aggregator 'fedavg' has no parameter 'lr'; it accepts: accumulator"
    ):
        create_aggregator("fedavg", {"lr": 0.1})
    with pytest.raises(ValueError, match=r"no parameter 'metrc' \(did you mean 'metric'\?\)"):
        create_aggregator(f"{CUSTOM}:KeepBestByMetric", {"metrc": "acc"})
    # The constructor's own ValueError comes back naming the aggregator.
    with pytest.raises(ValueError, match="KeepBestByMetric.*invalid parameters: metric must"):
        create_aggregator(f"{CUSTOM}:KeepBestByMetric", {"metric": ""})
    register()(Scaled)
    with pytest.raises(ValueError, match="aggregator 'scaled': invalid parameters: factor must"):
        create_aggregator("scaled", {"factor": 0})

    @register("needs_arg_test")
    class NeedsArg(Scaled):
        def __init__(self, *, alpha: float) -> None:
            super().__init__()
            self.alpha = alpha

    with pytest.raises(ValueError, match="aggregator 'needs_arg_test'.*missing .*'alpha'"):
        create_aggregator("needs_arg_test", {})
