"""Run directory: metrics survive a reopen and a kill between rounds, the model round-trips through
safetensors, plots are real PNGs, reports show the numbers, and broken files fail loudly."""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedmerge.federation.results import (
    METRICS_SCHEMA,
    RunDir,
    RunFileError,
    compare_table,
    format_run_report,
    format_table,
    plot_curves,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ACCURACY = {1: 0.61, 2: 0.74, 3: 0.72}
LOSS = {1: 1.10, 2: 0.80, 3: 0.85}
ROUND_TIME = {1: 2.0, 2: 2.5, 3: 1.5}


def round_rows(r: int) -> list[tuple[str, int | None, str, float]]:
    return [
        ("server", None, "accuracy", ACCURACY[r]),
        ("server", None, "loss", LOSS[r]),
        ("client", 0, "train_loss", 1.0 / r),
        ("client", 7, "train_loss", 2.0 / r),
        ("aggregator", None, "num_clients", 2.0),
        ("system", None, "round_time_s", ROUND_TIME[r]),
    ]


def logged_run(tmp_path, name: str = "exp", accuracy_shift: float = 0.0) -> RunDir:
    run = RunDir.create(tmp_path, name)
    for r in (3, 1, 2):  # out of order: curves must still come back sorted
        rows = [
            (s, c, m, v + accuracy_shift if m == "accuracy" else v) for s, c, m, v in round_rows(r)
        ]
        run.log_round(r, rows)
    return run


def test_create_names_folder_and_adds_suffix(tmp_path):
    first = RunDir.create(tmp_path / "runs", "exp")
    second = RunDir.create(tmp_path / "runs", "exp")
    assert first.path.parent == tmp_path / "runs" and first.path.name.startswith("exp-")
    assert first.path.is_dir() and second.path.is_dir() and first.path != second.path
    assert first.metrics_path == first.path / "metrics.parquet"
    assert first.model_path.name == "model.safetensors" and first.plot_path.name == "accuracy.png"
    with pytest.raises(ValueError, match="run name"):
        RunDir.create(tmp_path, "a/b")


def test_same_second_gets_suffix(tmp_path, monkeypatch):
    class FixedClock:
        @staticmethod
        def now():
            return datetime(2024, 5, 1, 12, 0, 0)

    monkeypatch.setattr("fedmerge.federation.results.datetime", FixedClock)
    names = [RunDir.create(tmp_path, "exp").path.name for _ in range(3)]
    assert names == ["exp-20240501-120000", "exp-20240501-120000-1", "exp-20240501-120000-2"]


def test_metrics_round_trip_through_disk(tmp_path):
    run = logged_run(tmp_path)
    reopened = RunDir(run.path)
    table = reopened.metrics()
    assert table.schema.equals(METRICS_SCHEMA)
    assert table.equals(run.metrics())
    assert table.num_rows == 3 * len(round_rows(1))
    rows = table.to_pylist()
    assert {
        "round": 3,
        "scope": "server",
        "client_id": None,
        "metric": "accuracy",
        "value": 0.72,
    } in rows
    assert {
        "round": 2,
        "scope": "client",
        "client_id": 7,
        "metric": "train_loss",
        "value": 1.0,
    } in rows
    for row in rows:
        assert (row["client_id"] is None) == (row["scope"] != "client")
    assert reopened.server_curve() == sorted(ACCURACY.items())
    assert reopened.server_curve("loss") == sorted(LOSS.items())


def test_metrics_file_is_valid_after_every_round(tmp_path):
    run = RunDir.create(tmp_path, "exp")
    assert run.metrics().num_rows == 0 and not run.metrics_path.exists()
    for r in (1, 2, 3):
        run.log_round(r, round_rows(r))
        on_disk = pq.read_table(run.metrics_path)
        assert on_disk.schema.equals(METRICS_SCHEMA)
        assert sorted(set(on_disk["round"].to_pylist())) == list(range(1, r + 1))
    assert not list(run.path.glob(".*tmp*"))  # no temporary file left behind


def test_reopened_run_appends_to_existing_rounds(tmp_path):
    run = RunDir.create(tmp_path, "exp")
    run.log_round(1, round_rows(1))
    resumed = RunDir(run.path)
    resumed.log_round(2, round_rows(2))
    assert RunDir(run.path).server_curve() == [(1, ACCURACY[1]), (2, ACCURACY[2])]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([("global", None, "accuracy", 0.5)], "scope"),
        ([("server", None, "", 0.5)], "metric name"),
        ([("server", None, "accuracy", "high")], "must be a number"),
        ([("client", -1, "train_loss", 0.5)], "client_id"),
        ([("server", "accuracy", 0.5)], "a row is"),
    ],
)
def test_bad_rows_are_refused_before_writing(tmp_path, rows, match):
    run = RunDir.create(tmp_path, "exp")
    with pytest.raises(ValueError, match=match):
        run.log_round(1, rows)
    assert not run.metrics_path.exists()
    with pytest.raises(ValueError, match="round"):
        run.log_round(-1, [])


def test_model_round_trip_with_metadata(tmp_path):
    run = RunDir.create(tmp_path, "exp")
    state = {
        "fc.weight": torch.randn(4, 3).t(),  # non-contiguous on purpose
        "fc.bias": torch.randn(4),
        "steps": torch.arange(5, dtype=torch.int64),
    }
    run.save_model(state, metadata={"round": "3", "aggregator": "fedavg"})
    loaded = RunDir(run.path).load_model()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor)
    assert run.model_metadata() == {"round": "3", "aggregator": "fedavg"}
    with pytest.raises(TypeError, match="str to str"):
        run.save_model(state, metadata={"round": 3})


def test_plots_are_png(tmp_path):
    run = logged_run(tmp_path)
    plot_curves({"exp": run.server_curve()}, run.plot_path, title="exp")
    overlay = tmp_path / "compare.png"
    plot_curves({"a": run.server_curve(), "b": [(1, 0.5), (2, 0.6)]}, overlay, title="compare")
    for path in (run.plot_path, overlay):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_summary_and_report(tmp_path):
    run = logged_run(tmp_path)
    summary = summarize(run)
    assert summary == {
        "run": run.path.name,
        "rounds_completed": 3,
        "final_accuracy": ACCURACY[3],
        "final_loss": LOSS[3],
        "best_accuracy": ACCURACY[2],
        "best_round": 2,
        "wall_time_s": pytest.approx(sum(ROUND_TIME.values())),
    }
    run.write_summary(summary)
    assert RunDir(run.path).read_summary() == summary

    report = format_run_report(run)
    for accuracy in ACCURACY.values():
        assert f"{accuracy:.4f}" in report
    header = report.splitlines()[2]
    assert header.split() == ["round", "accuracy", "loss", "clients", "round", "time", "s"]
    assert "best accuracy:    0.7400 (round 2)" in report


def test_summary_of_empty_run(tmp_path):
    run = RunDir.create(tmp_path, "exp")
    assert summarize(run) == {
        "run": run.path.name,
        "rounds_completed": 0,
        "final_accuracy": None,
        "final_loss": None,
        "best_accuracy": None,
        "best_round": None,
        "wall_time_s": None,
    }
    assert "rounds completed: 0" in format_run_report(run)


def test_compare_table_lists_every_label(tmp_path):
    runs = {
        "fedavg": logged_run(tmp_path, "a"),
        "wsa": logged_run(tmp_path, "b", accuracy_shift=0.1),
    }
    table = compare_table(runs)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "rounds", "final"]
    assert lines[2].startswith("fedavg") and lines[3].startswith("wsa")
    assert "0.8400" in lines[3]  # wsa's best accuracy, shifted


def test_format_table_alignment():
    text = format_table(["name", "acc", "n"], [["a", 0.5, 3], ["long name", 0.123456, None]])
    assert text.splitlines() == [
        "name          acc  n",
        "---------  ------  -",
        "a          0.5000  3",
        "long name  0.1235  -",
    ]
    with pytest.raises(ValueError, match="cells"):
        format_table(["a", "b"], [[1]])


def test_missing_run_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .*nope.* does not exist"):
        RunDir(tmp_path / "nope")
    run = RunDir.create(tmp_path, "exp")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        run.load_model()


def test_corrupt_metrics_file_names_it(tmp_path):
    run = logged_run(tmp_path)
    data = run.metrics_path.read_bytes()
    run.metrics_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError, match="metrics.parquet"):
        RunDir(run.path).metrics()


def test_wrong_schema_names_file(tmp_path):
    run = RunDir.create(tmp_path, "exp")
    pq.write_table(pa.table({"round": [1], "acc": [0.5]}), run.metrics_path)
    with pytest.raises(RunFileError, match="metrics.parquet.*schema"):
        run.metrics()


def test_corrupt_model_file_names_it(tmp_path):
    run = RunDir.create(tmp_path, "exp")
    run.model_path.write_bytes(b"not a safetensors file")
    with pytest.raises(RunFileError, match="model.safetensors"):
        run.load_model()
