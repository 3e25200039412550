"""Tasks as plug-ins: a task class in the user's own file, by import path, by a name it registers
(listed in ``[run] plugins``) and through an installed package's ``fedmerge.tasks`` entry point.

The slow tests are real Ray + Flower simulations: the Flower clients in Ray workers, the
evaluator actor, FedDRL's scoring and a ``fedmerge resume`` in a fresh process must all build the
user's task, which they can only do by importing the user's file themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fedmerge
from fedmerge.clients.tasks import TASKS, TaskSpec, as_task, create_task, task_params
from fedmerge.federation.config import ConfigError
from fedmerge.federation.runner import pin_plugins
from fedmerge.plugins import PluginError, import_plugins

from .conftest import ROOT, digits_overrides

WINE_TASK = '''
"""A user's own task: scikit-learn's bundled wine data, a two-layer MLP."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fedmerge
from fedmerge.clients.tasks import ArrayData, Task

LOADS = []  # which processes loaded the data (the driver only: clients read shards)


@fedmerge.register_task
class Wine(Task):
    name = "wine_user"
    num_classes = 3

    def load(self, split, data_dir=None):
        from sklearn.datasets import load_wine

        LOADS.append(split)
        x, y = load_wine(return_X_y=True)
        x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(y))
        index = order[:40] if split == "test" else order[40:]
        return ArrayData(x[index], y[index].astype(np.int64))

    def build_model(self):
        return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))

    def preprocess(self, x):
        return torch.from_numpy(np.asarray(x, dtype=np.float32))
'''


@pytest.fixture
def isolated_tasks(monkeypatch):
    """Registrations and imports made by a test vanish after it."""
    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("wine_user_"):
            del sys.modules[name]


def _write_task(folder: Path, module: str) -> Path:
    path = folder / f"{module}.py"
    path.write_text(textwrap.dedent(WINE_TASK))
    return path


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return digits_overrides(
        tmp_path,
        "data.num_clients=3",
        "data.min_partition_size=5",
        "train.lr=0.1",
        "train.local_epochs=3",
        "federation.num_rounds=2",
        *extra,
    )


def _accuracy(run_dir: Path) -> list[float]:
    table = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    rows = table[(table.scope == "server") & (table.metric == "accuracy")].sort_values("round")
    return rows.value.tolist()


# ---- fast: resolution, parameters, errors ---------------------------------------------------


def test_a_task_resolves_by_name_path_and_entry_point(tmp_path, isolated_tasks, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_task(tmp_path, "wine_user_a")
    by_path = create_task("wine_user_a:Wine")
    assert by_path.name == "wine_user" and TASKS.resolve("wine_user") is type(by_path)
    assert TASKS.origin("wine_user") == "wine_user_a" == TASKS.origin("wine_user_a:Wine")
    plugin = create_task("example_iris", {"hidden": 5})  # tests/plugins' installed package
    assert plugin.params.hidden == 5 and type(plugin).__module__ == "fedmerge_example_plugin.tasks"
    assert TASKS.origin("example_iris") is None  # an entry point resolves anywhere
    assert TASKS.origin("digits") is None  # and so does a built-in
    assert "example_iris" in fedmerge.available_tasks()
    assert [s.name for s in task_params("example_iris")] == ["hidden"]


def test_task_errors_name_the_task_the_parameter_and_the_routes():
    with pytest.raises(PluginError, match=r"unknown task 'digit'\. Did you mean 'digits'\?"):
        create_task("digit")
    with pytest.raises(PluginError, match="fedmerge.tasks"):
        create_task("no_such_task")
    with pytest.raises(ValueError, match=r"task 'digits' takes no parameters.*hidden"):
        create_task("digits", {"hidden": 3})
    with pytest.raises(ValueError, match=r"hidden=0 is invalid: must be an integer >= 1"):
        create_task("example_iris", {"hidden": 0})
    with pytest.raises(ValueError, match=r"has no parameter 'hiden' \(did you mean 'hidden'\?\)"):
        create_task("example_iris", {"hiden": 3})
    with pytest.raises(PluginError, match="cannot import 'no_such_module_xyz'"):
        create_task("no_such_module_xyz:Task")
    with pytest.raises(PluginError, match="not a fedmerge Task subclass"):
        create_task("fedmerge.clients.tasks.base:ArrayData")


def test_a_config_names_task_errors_before_anything_runs(tmp_path):
    with pytest.raises(
        ConfigError, match=r"data\.task: unknown task 'fashion_mnis'.*fashion_mnist"
    ):
        fedmerge.load_config(
            ROOT / "experiments/fashion_mnist_fedavg.toml", ["data.task=fashion_mnis"]
        )
    with pytest.raises(ConfigError, match=r"data\.task_params: task 'example_iris'.*hidden=-1"):
        fedmerge.load_config(
            ROOT / "experiments/fashion_mnist_fedavg.toml",
            ["data.task=example_iris", "data.task_params.hidden=-1"],
        )
    with pytest.raises(ConfigError, match=r"run\.plugins: .*missing\.py' is not a file"):
        fedmerge.load_config(
            ROOT / "experiments/fashion_mnist_fedavg.toml",
            [f"run.plugins=[{str(tmp_path / 'missing.py')!r}]"],
        )


def test_a_run_pins_the_modules_of_its_plug_ins(tmp_path, isolated_tasks, monkeypatch):
    """A name registered by the user's module (imported by the user, not listed) gets that
    module's file into run.plugins, so fresh processes import it; a module inside a package is
    listed by name; built-ins and entry points add nothing."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write_task(tmp_path, "wine_user_b")
    import_plugins(["wine_user_b"])
    config = parse_config_with(tmp_path, "data.task=wine_user")
    pinned = pin_plugins(config)
    assert pinned.run.plugins == (str(path.resolve()),)
    assert pin_plugins(pinned) is pinned  # nothing more to add
    plain = parse_config_with(tmp_path, "data.task=example_iris")
    assert pin_plugins(plain) is plain
    package = parse_config_with(
        tmp_path, "aggregator.name=tests.plugins.custom_aggregators:MedianOfClients"
    )
    assert pin_plugins(package).run.plugins == ("tests.plugins.custom_aggregators",)


def test_a_task_registered_by_the_running_script_is_refused_with_the_fix(isolated_tasks, tmp_path):
    namespace: dict = {"__name__": "__main__"}
    exec(textwrap.dedent(WINE_TASK), namespace)  # noqa: S102 - a script's own class, as __main__
    config = parse_config_with(tmp_path, "data.task=wine_user")
    with pytest.raises(
        ConfigError, match=r"data\.task: task 'wine_user' is registered by the script"
    ):
        pin_plugins(config)


def test_a_task_spec_crosses_processes_as_plain_data(tmp_path, isolated_tasks):
    path = _write_task(tmp_path, "wine_user_c")
    spec = TaskSpec("wine_user", {}, (str(path),))
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert TaskSpec.from_dict("digits") == TaskSpec("digits")
    code = (
        "import json, sys; from fedmerge.clients.tasks import as_task; "
        "t = as_task(json.loads(sys.argv[1])); print(type(t).__module__, t.load('train').x.shape)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, spec.to_json()],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=300,
    ).stdout.split()
    assert out == ["wine_user_c", "(138,", "13)"]
    assert as_task(spec.to_dict()).name == "wine_user"


def parse_config_with(tmp_path: Path, *overrides: str):
    return fedmerge.load_config(
        ROOT / "experiments/fashion_mnist_fedavg.toml", _overrides(tmp_path, *overrides)
    )


# ---- slow: real simulations -----------------------------------------------------------------


@pytest.mark.slow
def test_a_users_task_by_import_path_runs_everywhere_and_resumes_in_a_fresh_process(
    tmp_path, isolated_tasks, monkeypatch
):
    """Clients, the evaluator and FedDRL's scoring actors build the task from the user's file;
    then ``fedmerge resume``, a new process that never saw the file, continues the run from its
    round-1 checkpoint and gets round 2 exactly as the uninterrupted run did."""
    folder = tmp_path / "mine"
    folder.mkdir()
    path = _write_task(folder, "wine_user_d")
    monkeypatch.syspath_prepend(str(folder))
    config = parse_config_with(
        tmp_path,
        "data.task=wine_user_d:Wine",
        "aggregator.name=feddrl",
        "data.server_val_size=20",
        "checkpoint.keep=0",
    )
    outcome = fedmerge.run(config, progress=lambda _: None)
    run = outcome.run_dir
    first = _accuracy(run.path)
    assert len(first) == 2 and first[-1] > 0.6, first  # three classes: chance is 1/3
    recorded = fedmerge.load_config(run.config_path)
    assert recorded.run.plugins == (str(path.resolve()),)
    events = run.events()
    assert not [e for e in events if e["kind"] in ("failed", "rejected")], events
    # Stop after round 1, as a kill would leave it, then resume in a fresh process.
    import shutil

    shutil.rmtree(run.checkpoint_dir / "round_00002")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "fedmerge", "resume", str(run.path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _accuracy(run.path) == first


@pytest.mark.slow
def test_the_documented_task_file_runs_from_the_command_line_through_run_plugins(tmp_path):
    """No code on the user's side beyond the task file: `fedmerge run` with
    experiments/wine_task.py in run.plugins and the name it registers (the README's command)."""
    sets = _overrides(
        tmp_path,
        f"run.plugins=[{str(ROOT / 'experiments' / 'wine_task.py')!r}]",
        "data.task=wine",
        "data.task_params.hidden=32",
    )
    command = [
        sys.executable,
        "-m",
        "fedmerge",
        "run",
        str(ROOT / "experiments/fashion_mnist_fedavg.toml"),
    ]
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("digits-e2e")]
    accuracy = _accuracy(run)
    assert len(accuracy) == 2 and accuracy[-1] > 0.6, accuracy


def test_the_documented_task_is_the_shipped_file():
    import re

    shipped = (ROOT / "experiments" / "wine_task.py").read_text()
    (block,) = [
        b
        for b in re.findall(
            r"```python\n(.*?)```", (ROOT / "docs" / "plugins.md").read_text(), re.S
        )
    ]
    assert shipped.endswith(block) and "class Wine(Task)" in block


@pytest.mark.slow
def test_an_installed_packages_task_runs_through_its_entry_point(tmp_path):
    config = parse_config_with(
        tmp_path, "data.task=example_iris", "data.task_params.hidden=8", "aggregator.name=fedavg"
    )
    outcome = fedmerge.run(config, progress=lambda _: None)
    accuracy = _accuracy(outcome.run_dir.path)
    assert len(accuracy) == 2 and accuracy[-1] > 0.6, accuracy
    assert np.isfinite(accuracy).all()


def test_fedmerge_list_shows_a_tasks_parameters_and_imports_plugins_first(
    tmp_path, capsys, isolated_tasks
):
    from fedmerge.federation.cli import main

    assert main(["list", "--task", "example_iris"]) == 0
    out = capsys.readouterr().out
    assert "[data.task_params] keys" in out and "hidden" in out and ">= 1" in out
    path = _write_task(tmp_path, "wine_user_f")
    assert main(["list", "--plugins", str(path)]) == 0
    assert "wine_user" in capsys.readouterr().out.split("tasks:")[1].splitlines()[0]
    assert main(["list", "--plugins", str(tmp_path / "none.py")]) == 2
    assert "none.py' is not a file" in capsys.readouterr().err


def test_a_models_heads_must_match_the_tasks_it_declares():
    from fedmerge.clients.tasks import DataError

    multi = create_task("text_multitask")
    multi.check_model(["encoder.w", "heads.0.weight", "heads.1.weight", "heads.2.bias"])
    with pytest.raises(DataError, match=r"declares 3 tasks .* no parameters under heads\.1\."):
        multi.check_model(["encoder.w", "heads.0.weight", "heads.2.weight"])
    single = create_task("digits")
    single.check_model(["conv.weight", "head.weight"])
    with pytest.raises(DataError, match=r"declares no task_names but its model has per-task heads"):
        single.check_model(["heads.0.weight"])


def test_a_partitioner_by_import_path_takes_its_own_params(tmp_path):
    from fedmerge.federation.server import partition_params

    spec = "tests.plugins.user_partitioner:sorted_blocks"
    config = parse_config_with(
        tmp_path, f"data.partitioner={spec!r}", "data.partitioner_params.overlap=0"
    )
    assert partition_params(config.data) == {"overlap": 0}
    with pytest.raises(
        ConfigError,
        match=r"data\.partitioner_params\.overlab is not a parameter .*did you mean 'overlap'",
    ):
        parse_config_with(
            tmp_path, f"data.partitioner={spec!r}", "data.partitioner_params.overlab=1"
        )
    with pytest.raises(
        ConfigError,
        match=r"data\.partitioner: unknown partitioner 'dirichelt'\. Did you mean 'dirichlet'",
    ):
        parse_config_with(tmp_path, "data.partitioner=dirichelt")
    dirichlet = parse_config_with(
        tmp_path, "data.alpha=0.3", "data.partitioner_params.min_partition_size=7"
    )
    assert partition_params(dirichlet.data) == {"alpha": 0.3, "min_partition_size": 7}
