"""Resumes cannot mix runs: an edited config.toml, a forged checkpoint.json and a second writer of
the same run folder are refused before anything changes; a finished SMILE run killed before it
saved its served model gets exactly that served model back on resume.

All but the last test build a run folder by hand (config, metrics, events, a checkpoint) and need
no Ray: a resume refused here must fail before Ray is started, which ``no_ray`` enforces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.clients.tasks import get_task
from fedmerge.federation import runner
from fedmerge.federation.checkpoint import (
    CheckpointError,
    config_changes,
    load_checkpoint,
    save_checkpoint,
)
from fedmerge.federation.cli import main
from fedmerge.federation.results import RunDir, RunLockedError

from .conftest import digits_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_ray(monkeypatch):
    """A refused resume must not get as far as starting Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a resume that should have been refused")

    monkeypatch.setattr(runner, "init_ray", refuse)


def digits_state() -> dict[str, np.ndarray]:
    torch.manual_seed(7)
    return {k: v.numpy().copy() for k, v in get_task("digits").build_model().state_dict().items()}


def stopped_run(
    tmp_path: Path, *overrides: str, checkpoint_round: int = 2, logged: int = 3
) -> RunDir:
    """A digits run folder as a kill leaves it: rounds 1..logged logged, a checkpoint after
    ``checkpoint_round`` recording the config the run started with."""
    config = digits_config(tmp_path, "federation.num_rounds=4", *overrides)
    run = RunDir.create(config.output.root_path, config.name)
    run.write_config(config.to_toml())
    for r in range(1, logged + 1):
        run.log_round(
            r, [("server", None, "accuracy", r / 10), ("system", None, "round_time_s", 1.0)]
        )
    run.log_events(logged, [(1, "failed", "boom")])
    save_checkpoint(
        run.checkpoint_dir,
        checkpoint_round,
        config.seed,
        digits_state(),
        {},
        config=config.to_dict(),
    )
    return run


def untouched(run: RunDir) -> tuple[bytes, bytes]:
    return run.metrics_path.read_bytes(), run.events_path.read_bytes()


# ---- an edited config.toml --------------------------------------------------------------------


def test_an_edited_config_is_refused_with_the_keys_named_before_anything_changes(
    tmp_path, capsys, no_ray
):
    run = stopped_run(tmp_path)
    before = untouched(run)
    edited = digits_config(
        tmp_path,
        "federation.num_rounds=4",
        "aggregator.name=median",
        "train.lr=0.1",
        "data.num_clients=4",
    )
    run.write_config(edited.to_toml())
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(run.config_path) in err
    assert "aggregator.name ('fedavg' -> 'median')" in err
    assert "train.lr (0.05 -> 0.1)" in err
    assert "data.num_clients (3 -> 4)" in err
    assert untouched(run) == before  # no truncation, no "resumed" event


def test_a_changed_seed_is_refused_before_ray_or_truncation(tmp_path, capsys, no_ray):
    run = stopped_run(tmp_path)
    before = untouched(run)
    run.write_config(digits_config(tmp_path, "federation.num_rounds=4", "seed=8").to_toml())
    assert main(["resume", str(run.path)]) == 2
    assert "seed (7 -> 8)" in capsys.readouterr().err
    assert untouched(run) == before


@pytest.mark.parametrize(
    "override",
    ["federation.num_rounds=6", "output.root='elsewhere'", "checkpoint.keep=5", "ray.num_cpus=1"],
)
def test_only_the_ray_address_may_change_on_resume(tmp_path, override):
    run = stopped_run(tmp_path)
    checkpoint = load_checkpoint(run.checkpoint_dir / "round_00002")
    moved = digits_config(tmp_path, "federation.num_rounds=4", "ray.address='10.0.0.1:6379'")
    runner._check_resumable(moved, run, checkpoint)  # allowed: where Ray is changes no result
    changed = digits_config(tmp_path, "federation.num_rounds=4", override)
    with pytest.raises(CheckpointError, match=f"in {override.split('=')[0]} "):
        runner._check_resumable(changed, run, checkpoint)


def test_config_changes_names_added_removed_and_retyped_keys():
    assert config_changes({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": (1, 2)}}) == []
    changes = {
        key: (repr(old), repr(new))
        for key, old, new in config_changes({"a": {"b": 1, "x": 2}}, {"a": {"b": True, "y": 3}})
    }
    assert changes == {"a.b": ("1", "True"), "a.x": ("2", "(not set)"), "a.y": ("(not set)", "3")}


# ---- a forged checkpoint.json -----------------------------------------------------------------


def forge(run: RunDir, round_dir: str = "round_00002", **fields) -> Path:
    meta_path = run.checkpoint_dir / round_dir / "checkpoint.json"
    text = meta_path.read_text()
    meta = json.loads(text)
    # The fields' raw JSON text goes in below, so that true and 1e999 reach the reader as written.
    for key in fields:
        meta[key] = f"@@{key}@@"
    text = json.dumps(meta)
    for key, raw in fields.items():
        text = text.replace(f'"@@{key}@@"', raw)
    meta_path.write_text(text)
    return meta_path


@pytest.mark.parametrize(
    "field, raw, message",
    [
        ("round", "99", "folder round_00002 is that of round 2"),
        ("round", "true", "must be a non-negative integer, got True"),
        ("round", "1e999", "not valid JSON"),
        ("round", "2.0", "must be a non-negative integer, got 2.0"),
        ("round", '"2"', "must be a non-negative integer, got '2'"),
        ("round", "-1", "must be a non-negative integer"),
        ("round", "1" * 5000, "not valid JSON"),  # beyond Python's int digit limit
        ("round", "NaN", "not valid JSON"),
        ("seed", "true", "field 'seed' must be an integer"),
        ("seed", "8", "field 'seed' is 8, but the recorded config says seed = 7"),
        ("format", "true", "field 'format' is True"),
        ("format", "1", "reads format 2 only"),
        ("files", "[]", "field 'files' must be a JSON object"),
        ("files", '{"global.safetensors": "00"}', "not a SHA-256"),
        (
            "config_digest",
            '"' + "0" * 64 + '"',
            "field 'config_digest' is not the SHA-256 of the recorded config",
        ),
        ("config", "[]", "field 'config' must be a JSON object"),
        ("extra", "1", "field 'extra' is not a field"),
    ],
)
def test_forged_checkpoint_fields_are_named(tmp_path, capsys, no_ray, field, raw, message):
    run = stopped_run(tmp_path)
    before = untouched(run)
    meta_path = forge(run, **{field: raw})
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(meta_path) in err and message in err, err
    assert untouched(run) == before


def test_an_edited_config_inside_the_checkpoint_is_caught_by_its_digest(tmp_path, capsys, no_ray):
    run = stopped_run(tmp_path)
    meta_path = run.checkpoint_dir / "round_00002" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["train"]["lr"] = 0.1
    meta_path.write_text(json.dumps(meta))
    assert main(["resume", str(run.path)]) == 2
    assert "'config_digest' is not the SHA-256 of the recorded config" in capsys.readouterr().err


def test_a_round_beyond_num_rounds_is_refused(tmp_path, capsys, no_ray):
    run = stopped_run(tmp_path, checkpoint_round=2, logged=3)
    (run.checkpoint_dir / "round_00002").rename(run.checkpoint_dir / "round_00099")
    forge(run, "round_00099", round="99")
    before = untouched(run)
    assert main(["resume", str(run.path)]) == 2
    assert (
        "field 'round' is 99, beyond the run's federation.num_rounds = 4" in capsys.readouterr().err
    )
    assert untouched(run) == before


def test_a_checkpoint_ahead_of_the_metrics_is_refused(tmp_path, capsys, no_ray):
    run = stopped_run(tmp_path, checkpoint_round=3, logged=2)
    before = untouched(run)
    assert main(["resume", str(run.path)]) == 2
    assert "holds rounds up to 2 only" in capsys.readouterr().err
    assert untouched(run) == before


def test_weights_that_do_not_fit_the_model_are_refused_before_ray(tmp_path, capsys, no_ray):
    run = stopped_run(tmp_path)
    config = digits_config(tmp_path, "federation.num_rounds=4")
    wrong = {k: np.zeros((1,) + v.shape, v.dtype) for k, v in digits_state().items()}
    save_checkpoint(run.checkpoint_dir, 2, config.seed, wrong, {}, config=config.to_dict())
    before = untouched(run)
    assert main(["resume", str(run.path)]) == 2
    assert "does not fit the digits model" in capsys.readouterr().err
    assert untouched(run) == before


# ---- one writer per run folder ----------------------------------------------------------------


def test_resume_of_a_folder_another_writer_holds_is_refused(tmp_path, capsys, no_ray):
    run = stopped_run(tmp_path)
    before = untouched(run)
    with RunDir(run.path).lock():  # this process plays the live run
        assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert f"run directory {run.path} is being written by process {os.getpid()}" in err
    assert untouched(run) == before


HOLDER = """
import sys
from fedmerge.federation.results import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()  # hold until killed
"""


def test_the_lock_dies_with_its_holder_even_by_sigkill(tmp_path):
    run = stopped_run(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run.path)],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == "locked\n"  # waits for the event, not for a time
        with pytest.raises(RunLockedError, match=f"written by process {holder.pid} "):
            with RunDir(run.path).lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunDir(run.path).lock():  # the kernel released it with the killed process
        pass


def test_a_run_holds_its_folder_locked_while_it_writes(tmp_path):
    config = digits_config(tmp_path)
    seen = []

    class Stop(Exception):
        pass

    def progress(line: str) -> None:
        path = Path(line.removeprefix("run directory: "))
        with pytest.raises(RunLockedError, match=f"written by process {os.getpid()}"):
            with RunDir(path).lock():
                pass
        seen.append(path)
        raise Stop  # end the run here, before Ray

    with pytest.raises(Stop):
        runner.run_experiment(config, progress=progress)
    with RunDir(seen[0]).lock():  # released when the run ended
        pass


# ---- the served model of a finished upscaled run -------------------------------------------------

SMILE = [
    "aggregator.name=smile",
    "aggregator.k_gate=4",
    "aggregator.k=8",
    "aggregator.top_k=2",
    "output.plot=false",
    "checkpoint.keep=0",
]


@pytest.mark.slow
def test_a_finished_smile_run_resumed_saves_the_same_served_model(tmp_path, ray_address):
    config = digits_config(tmp_path, *SMILE)
    whole = runner.run_experiment(config, address=ray_address, progress=lambda _: None).run_dir
    final = load_checkpoint(whole.checkpoint_dir / "round_00002")
    assert final.served is not None  # the served model is part of the checkpoint
    assert load_checkpoint(whole.checkpoint_dir / "round_00001").served is not None

    # Killed after its final checkpoint, before finish_run wrote the model, summary and served model.
    killed = tmp_path / "killed"
    shutil.copytree(whole.path, killed)
    for name in (
        "served_model.safetensors",
        "served_model.json",
        "model.safetensors",
        "summary.json",
    ):
        (killed / name).unlink()
    assert main(["resume", str(killed), "--address", ray_address]) == 0
    for name in ("served_model.safetensors", "served_model.json"):
        assert (killed / name).read_bytes() == (whole.path / name).read_bytes(), name
    # model.safetensors: the same tensors (safetensors orders its metadata keys arbitrarily)
    resumed, reference = RunDir(killed).load_model(), whole.load_model()
    assert resumed.keys() == reference.keys() and all(
        torch.equal(resumed[k], reference[k]) for k in reference
    )
