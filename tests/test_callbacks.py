"""Round callbacks, aggregator-declared needs, and placement that rides on the round's results.

The fast tests drive the callback list, the config field and the needs check without Ray; the slow
ones run real (tiny) simulations: user callbacks given and named in the config, one that raises,
the README's example, and counting actors that prove no per-round placement call is made.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

import fedmerge
from fedmerge.aggregators import AggregateResult, Aggregator, create_aggregator
from fedmerge.federation.actors import AggregatorActor, EvaluatorActor
from fedmerge.federation.callbacks import (
    CallbackList,
    RoundCallback,
    default_callbacks,
    resolve_callback,
    resolve_callbacks,
)
from fedmerge.federation.config import ConfigError
from fedmerge.federation.results import RunDir
from fedmerge.federation.server import NEEDS, Experiment, check_needs, report_events, report_rows
from fedmerge.federation.strategy import ClientFailure, RoundReport

from .conftest import digits_config

ROOT = Path(__file__).resolve().parents[1]


# ---- callbacks named by import path (module-level: importable as tests.test_callbacks:...) -------


class PathLogger(RoundCallback):
    """One JSON line per hook to path_logger.jsonl in the run folder (the config builds it bare)."""

    def _write(self, run, what: str) -> None:
        with open(Path(run.run_dir.path) / "path_logger.jsonl", "a") as out:
            out.write(json.dumps(what) + "\n")

    def on_run_start(self, run) -> None:
        self._write(run, "start")

    def on_round_end(self, report, run) -> None:
        self._write(run, f"round {report.round}")

    def on_run_end(self, run) -> None:
        self._write(run, "end")


class OnlyRoundEnd:
    """Duck-typed: one hook, no base class."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def on_round_end(self, report, run) -> None:
        self.rounds.append(report.round)


NOT_A_CALLBACK = object()


class NeedsBuiltWithArgs(RoundCallback):
    def __init__(self, level: int) -> None:
        self.level = level


# ---- resolving and checking callbacks ------------------------------------------------------------


def test_a_callback_class_named_by_path_is_built_without_arguments():
    callback = resolve_callback("tests.test_callbacks:PathLogger")
    assert type(callback).__name__ == "PathLogger"
    assert (
        type(resolve_callback("tests.test_callbacks:OnlyRoundEnd")).__name__ == "OnlyRoundEnd"
    )  # duck-typed


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.test_callbacks", r"must look like 'package\.module:Name'"),
        ("no_such_module_xyz:Logger", r"cannot import 'no_such_module_xyz' \(ModuleNotFoundError"),
        ("tests.test_callbacks:Missing", r"'tests\.test_callbacks' has no attribute 'Missing'"),
        (
            "tests.test_callbacks:NOT_A_CALLBACK",
            r"is no round callback: it needs at least one of the methods "
            r"on_run_start, on_round_end, on_run_end",
        ),
        ("tests.test_callbacks:NeedsBuiltWithArgs", r"NeedsBuiltWithArgs\(\) failed \(TypeError"),
    ],
)
def test_a_bad_callback_path_is_a_config_error_naming_it(path, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_callback(path)
    assert f"run.callbacks entry {path!r}" in str(info.value)


def test_given_callbacks_are_checked_and_come_before_those_of_the_config():
    first = OnlyRoundEnd()
    got = resolve_callbacks(["tests.test_callbacks:PathLogger"], [first])
    assert got[0] is first and type(got[1]).__name__ == "PathLogger"
    with pytest.raises(
        ConfigError, match=r"callbacks\[0\]: OnlyRoundEnd is a class; pass an instance"
    ):
        resolve_callbacks([], [OnlyRoundEnd])
    with pytest.raises(ConfigError, match=r"callbacks\[1\]: builtins\.int is no round callback"):
        resolve_callbacks([], [first, 3])


def test_run_callbacks_config_field(tmp_path):
    config = digits_config(tmp_path, 'run.callbacks=["tests.test_callbacks:PathLogger"]')
    assert config.run.callbacks == ("tests.test_callbacks:PathLogger",)
    assert fedmerge.parse_config(config.to_dict()) == config  # round trip through config.toml
    assert (
        "run" not in digits_config(tmp_path).to_dict()
    )  # the default leaves config.toml as it was
    with pytest.raises(ConfigError, match=r"run\.callbacks must be an array of strings, got 3"):
        digits_config(tmp_path, "run.callbacks=[3]")
    with pytest.raises(
        ConfigError, match=r"run\.callbacks must be an array of strings, got string 'x:Y'"
    ):
        digits_config(tmp_path, 'run.callbacks="x:Y"')
    with pytest.raises(ConfigError, match=r"run\.callbacks entry 'nocolon' must look like"):
        digits_config(tmp_path, 'run.callbacks=["nocolon"]')


def test_callbacks_may_change_on_resume_and_old_checkpoints_still_fit(tmp_path):
    """A run's callbacks change no result: a resume may add or drop them. A checkpoint written
    before ``run.callbacks`` existed (no [run] section) fits a config without callbacks."""
    from fedmerge.federation import runner
    from fedmerge.federation.checkpoint import load_checkpoint

    from .test_resume_safety import stopped_run

    run = stopped_run(tmp_path)
    checkpoint = load_checkpoint(run.checkpoint_dir / "round_00002")
    assert "run" not in checkpoint.config
    runner._check_resumable(digits_config(tmp_path, "federation.num_rounds=4"), run, checkpoint)
    with_callbacks = digits_config(
        tmp_path, "federation.num_rounds=4", 'run.callbacks=["tests.test_callbacks:PathLogger"]'
    )
    runner._check_resumable(with_callbacks, run, checkpoint)


def test_a_bad_callback_path_fails_before_any_folder_or_ray(tmp_path):
    config = digits_config(tmp_path, 'run.callbacks=["tests.test_callbacks:Missing"]')
    with pytest.raises(ConfigError, match=r"run\.callbacks entry 'tests\.test_callbacks:Missing'"):
        fedmerge.run(config)
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


# ---- the callback list ---------------------------------------------------------------------------


def _fake_run(tmp_path, **config_overrides):
    run_dir = RunDir.create(tmp_path / "runs", "cb")
    config = digits_config(tmp_path, *config_overrides.get("overrides", ()))
    return SimpleNamespace(
        run_dir=run_dir,
        config=config,
        progress=lambda line: None,
        placement={},
        resume=None,
        started=0.0,
        clients_per_round=3,
    )


class Recorder(RoundCallback):
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def on_round_end(self, report, run) -> None:
        self.log.append((self.name, report.round))


class Raises(RoundCallback):
    def on_round_end(self, report, run) -> None:
        raise RuntimeError(f"boom in round {report.round}")


def test_callbacks_run_builtin_then_user_then_after_and_a_user_error_is_an_event(tmp_path):
    run = _fake_run(tmp_path)
    order: list = []
    callbacks = CallbackList(
        builtin=[Recorder(order, "records")],
        user=[Raises(), Recorder(order, "user")],
        after=[Recorder(order, "upload")],
    )
    callbacks.call("on_round_end", run, 4, RoundReport(round=4, sampled=[]))
    assert order == [
        ("records", 4),
        ("user", 4),
        ("upload", 4),
    ]  # the error skipped no one after it
    (event,) = run.run_dir.events()
    assert event["round"] == 4 and event["kind"] == "callback_failed"
    assert (
        event["reason"]
        == "tests.test_callbacks.Raises.on_round_end raised RuntimeError: boom in round 4"
    )
    assert callbacks.failures == [(4, "tests.test_callbacks.Raises", event["reason"])]
    callbacks.call("on_run_end", run, 4)  # Raises has no such hook of its own: nothing happens
    assert len(run.run_dir.events()) == 1


def test_a_builtin_record_that_fails_fails_the_run(tmp_path):
    run = _fake_run(tmp_path)
    callbacks = CallbackList(builtin=[Raises()], user=[], after=[])
    with pytest.raises(RuntimeError, match="boom in round 1"):
        callbacks.call("on_round_end", run, 1, RoundReport(round=1, sampled=[]))
    assert run.run_dir.events() == []


def test_default_callbacks_put_the_user_between_the_records_and_the_upload():
    user = OnlyRoundEnd()
    names = [type(c).__name__ for c in default_callbacks([user])]
    assert names == [
        "MetricsLog",
        "EventsLog",
        "PlacementLog",
        "Checkpointer",
        "FinalModel",
        "Summary",
        "Plot",
        "OnlyRoundEnd",
        "Upload",
        "Progress",
    ]


class NoPlacementCalls:
    """Stands in for an actor handle: touching any method (``placement`` included) fails."""

    def __getattr__(self, name):
        raise AssertionError(f"the round's records called the actor's {name!r}")


def test_a_round_is_recorded_from_its_report_without_asking_the_actors(tmp_path):
    """The default callbacks write the round's metric rows, events and placement from the report
    alone: the placement the actors returned with finalize/evaluate, no extra actor call."""
    config = digits_config(tmp_path, "checkpoint.every=0")
    run_dir = RunDir.create(tmp_path / "runs", "cb")
    lines: list[str] = []
    experiment = Experiment(config, run_dir, progress=lines.append)
    experiment.aggregator, experiment.evaluator = NoPlacementCalls(), NoPlacementCalls()
    setup = {
        "node_id": "n0",
        "hostname": "h",
        "pid": "1",
        "device": "cpu",
        "gpu": "",
        "ray_gpu_ids": "",
        "node_ip": "10.0.0.1",
    }
    experiment.placement = {"aggregator": dict(setup), "evaluator": dict(setup)}
    on_gpu = {**setup, "pid": "2", "device": "cuda:0", "gpu": "H100", "ray_gpu_ids": "0"}
    report = RoundReport(
        round=1,
        sampled=[0, 1],
        client_metrics={0: {"train_loss": 0.5}},
        failures=[ClientFailure(1, "out of memory")],
        server_metrics={"accuracy": 0.9, "loss": 0.3},
        aggregator_metrics={"aggregate_s": 0.01},
        round_time_s=1.5,
        client_placement={0: {"hostname": "c"}},
        actor_placement={"aggregator": on_gpu},
    )
    experiment.round_end(report)

    expected_rows = report_rows(report) + [
        ("system", None, "aggregator_on_gpu", 1.0),
        ("system", None, "evaluator_on_gpu", 0.0),
    ]
    table = run_dir.metrics()
    got = list(
        zip(
            table["scope"].to_pylist(),
            table["client_id"].to_pylist(),
            table["metric"].to_pylist(),
            table["value"].to_pylist(),
            strict=True,
        )
    )
    assert got == expected_rows
    assert [(e["client_id"], e["kind"], e["reason"]) for e in run_dir.events()] == report_events(
        report
    )
    placements = run_dir.placements()
    assert [(p["role"], p.get("pid"), p.get("device")) for p in placements] == [
        ("aggregator", "2", "cuda:0"),
        ("evaluator", "1", "cpu"),
        ("client", None, None),
    ]
    assert experiment.placement["aggregator"] == on_gpu  # kept for summary.json
    assert re.match(
        r"round   1/2  clients 1/2  test acc 0\.9000  loss 0\.3000  failed 1 rejected 0", lines[-1]
    )


# ---- aggregator-declared needs -------------------------------------------------------------------


def test_builtin_needs_use_the_documented_vocabulary():
    for name in fedmerge.available():
        needs = create_aggregator(name, {}).needs
        assert isinstance(needs, frozenset) and needs <= NEEDS.keys(), name
    assert create_aggregator("fedavg", {}).needs == frozenset()
    assert create_aggregator("feddrl", {}).needs == {"validation"}
    assert create_aggregator("wemoe", {}).needs == {"base_model", "model_builder", "proxy_inputs"}
    assert create_aggregator("smile", {}).needs == {"base_model", "model_builder"}
    assert not hasattr(create_aggregator("feddrl", {}), "needs_validation")


def test_a_need_the_config_cannot_meet_is_a_config_error_before_ray(tmp_path):
    config = digits_config(tmp_path, "aggregator.name=feddrl")
    with pytest.raises(
        ConfigError,
        match=r"aggregator 'feddrl' \(.*FedDRL\) needs 'validation'.*"
        r"data\.server_val_size holds out.*set data\.server_val_size > 0",
    ):
        fedmerge.run(config)
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
    assert check_needs(
        digits_config(tmp_path, "aggregator.name=feddrl", "data.server_val_size=50")
    ) == {"validation"}
    assert check_needs(config.__class__()) == frozenset()  # fedavg


class WantsTheInternet(Aggregator):
    name = "wants_the_internet"
    needs = frozenset({"validation", "internet"})

    def aggregate(self, ctx, updates):
        return AggregateResult(state=dict(ctx.global_state))


class NeedsAString(WantsTheInternet):
    needs = "validation"


def test_an_unknown_need_of_a_user_aggregator_is_a_clear_error(tmp_path):
    config = digits_config(
        tmp_path, "aggregator.name=tests.test_callbacks:WantsTheInternet", "data.server_val_size=50"
    )
    with pytest.raises(
        ConfigError,
        match=r"WantsTheInternet\) declares needs \['internet'\], which no run "
        r"provides; Aggregator\.needs takes names from \['base_model', "
        r"'model_builder', 'proxy_inputs', 'validation'\]",
    ):
        check_needs(config)
    config = digits_config(tmp_path, "aggregator.name=tests.test_callbacks:NeedsAString")
    with pytest.raises(ConfigError, match=r"needs must be a frozenset of names"):
        check_needs(config)


class FakeActorClass:
    """Stands in for a ``@ray.remote`` actor class in ``Experiment.setup``; keeps its arguments."""

    def __init__(self) -> None:
        self.made: list[tuple[tuple, dict]] = []

    def options(self, **options):
        return self

    def remote(self, *args, **kwargs):
        self.made.append((args, kwargs))
        return SimpleNamespace(
            placement=SimpleNamespace(remote=lambda: {"device": "cpu", "hostname": "h"})
        )


def _setup(tmp_path, monkeypatch, *overrides):
    """(what the aggregator actor was given, the clients' shard dir) of ``Experiment.setup``."""
    import fedmerge.federation.server as server

    aggregator, evaluator = FakeActorClass(), FakeActorClass()
    monkeypatch.setattr(server, "AggregatorActor", aggregator)
    monkeypatch.setattr(server, "EvaluatorActor", evaluator)
    monkeypatch.setattr(server.ray, "get", lambda value, timeout=None: value)
    config = digits_config(tmp_path, *overrides)
    experiment = Experiment(config, RunDir.create(config.output.root_path, config.name))
    experiment.setup()
    ((_, kwargs),) = aggregator.made
    return kwargs, experiment.shard_dir


def test_the_aggregator_gets_only_the_data_it_declares_and_the_shards_never_depend_on_it(
    tmp_path, monkeypatch
):
    given, plain = _setup(tmp_path, monkeypatch)
    assert given["validation"] is None and given["proxy"] is None  # fedavg: neither built
    given, held_for_nobody = _setup(tmp_path, monkeypatch, "data.server_val_size=40")
    assert given["validation"] is None  # carved out as configured, but not shipped
    given, held_for_feddrl = _setup(
        tmp_path, monkeypatch, "data.server_val_size=40", "aggregator.name=feddrl"
    )
    assert len(given["validation"]["y"]) == 40 and given["proxy"] is None
    assert held_for_feddrl == held_for_nobody != plain  # same clients' data whoever aggregates

    given, _ = _setup(tmp_path, monkeypatch, "aggregator.name=wemoe")
    assert sum(len(x) for x in given["proxy"].values()) == len(get_test_split())  # the test inputs
    given, proxied_for_nobody = _setup(
        tmp_path, monkeypatch, "data.proxy_inputs='held_out'", "data.proxy_size=30"
    )
    assert given["proxy"] is None
    given, proxied_for_wemoe = _setup(
        tmp_path,
        monkeypatch,
        "data.proxy_inputs='held_out'",
        "data.proxy_size=30",
        "aggregator.name=wemoe",
    )
    assert sum(len(x) for x in given["proxy"].values()) == 30
    assert proxied_for_wemoe == proxied_for_nobody != plain


def get_test_split():
    from fedmerge.clients.tasks import get_task

    return get_task("digits").load("test").y


# ---- real runs -----------------------------------------------------------------------------------


def plain_class(actor_class):
    return actor_class.__ray_metadata__.modified_class.__ray_actor_class__


class CountsPlacementCalls:
    """Mixed into a server actor: counts the calls of its ``placement`` method."""

    def placement(self):
        self.placement_calls = getattr(self, "placement_calls", 0) + 1
        return super().placement()

    def count(self) -> int:
        return getattr(self, "placement_calls", 0)


class CountingAggregatorActor(CountsPlacementCalls, plain_class(AggregatorActor)):
    pass


class CountingEvaluatorActor(CountsPlacementCalls, plain_class(EvaluatorActor)):
    pass


class PlacementCalls(RoundCallback):
    """After each round (the actors still live), how often each was asked where it runs."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int, int]] = []

    def on_round_end(self, report, run) -> None:
        self.counts.append(
            (
                report.round,
                ray.get(run.aggregator.count.remote()),
                ray.get(run.evaluator.count.remote()),
            )
        )


class Hooks(RoundCallback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_run_start(self, run) -> None:
        self.calls.append(("start", sorted(run.placement)))

    def on_round_end(self, report, run) -> None:
        self.calls.append(("round", report.round, sorted(report.server_metrics)))

    def on_run_end(self, run) -> None:
        self.calls.append(
            ("end", run.final_state is not None, (Path(run.run_dir.path) / "summary.json").exists())
        )


@pytest.mark.slow
def test_a_run_calls_every_hook_isolates_a_failing_one_and_asks_no_actor_where_it_runs(
    tmp_path, ray_address, monkeypatch
):
    """One tiny simulation: given and config-named callbacks see every hook; one that raises is an
    event of each round and the run still ends; the actors are asked for their placement once, at
    setup, and every round's placement record still names them."""
    import fedmerge.federation.server as server

    monkeypatch.setattr(server, "AggregatorActor", ray.remote(CountingAggregatorActor))
    monkeypatch.setattr(server, "EvaluatorActor", ray.remote(CountingEvaluatorActor))
    hooks, calls = Hooks(), PlacementCalls()
    config = digits_config(tmp_path, 'run.callbacks=["tests.test_callbacks:PathLogger"]')
    outcome = fedmerge.run(
        config, address=ray_address, progress=lambda _: None, callbacks=[hooks, Raises(), calls]
    )
    run_dir = outcome.run_dir

    assert hooks.calls == [
        ("start", ["aggregator", "evaluator"]),
        ("round", 1, ["accuracy", "evaluate_s", "loss"]),
        ("round", 2, ["accuracy", "evaluate_s", "loss"]),
        ("end", True, True),
    ]
    logged = [
        json.loads(line) for line in (run_dir.path / "path_logger.jsonl").read_text().splitlines()
    ]
    assert logged == ["start", "round 1", "round 2", "end"]
    failed = [e for e in run_dir.events() if e["kind"] == "callback_failed"]
    assert [(e["round"], e["reason"]) for e in failed] == [
        (r, f"tests.test_callbacks.Raises.on_round_end raised RuntimeError: boom in round {r}")
        for r in (1, 2)
    ]

    # placement: one call per actor (setup), none per round; the records still name both actors
    assert calls.counts == [(1, 1, 1), (2, 1, 1)]
    servers = [p for p in run_dir.placements() if p["role"] != "client"]
    assert [(p["round"], p["role"]) for p in servers] == [
        (1, "aggregator"),
        (1, "evaluator"),
        (2, "aggregator"),
        (2, "evaluator"),
    ]
    summary = json.loads((run_dir.path / "summary.json").read_text())
    for p in servers:
        assert {k: p[k] for k in ("node_id", "hostname", "pid", "device")} == {
            k: summary["placement"][p["role"]][k] for k in ("node_id", "hostname", "pid", "device")
        }


@pytest.mark.slow
def test_the_readme_callback_example_runs(tmp_path, ray_address, monkeypatch):
    """The README's logger example, run as written except that its config is the tiny digits one."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "RoundCallback" in b]
    from fedmerge.federation.runner import run_experiment

    monkeypatch.setattr(fedmerge, "load_config", lambda *args, **kwargs: digits_config(tmp_path))
    monkeypatch.setattr(
        fedmerge,
        "run",
        lambda config, **kwargs: run_experiment(
            config, address=ray_address, progress=lambda _: None, **kwargs
        ),
    )
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    accuracy = scope["log"].accuracy
    assert sorted(accuracy) == [1, 2] and all(0.0 < a <= 1.0 for a in accuracy.values())
