"""The `fedmerge` command: listing, partition reports, re-reports, and clear errors (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedmerge.federation.cli import main
from fedmerge.federation.results import RunDir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "experiments" / "fashion_mnist_fedavg.toml")


def test_list_shows_every_registry(capsys):
    assert main(["list", "--fields"]) == 0
    out = capsys.readouterr().out
    for name in (
        "fedavg",
        "example_plugin",
        "fashion_mnist",
        "digits",
        "dirichlet",
        "pathological",
        "data.alpha",
    ):
        assert name in out


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("fedmerge")
    result = subprocess.run([str(script), "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fedavg" in result.stdout


def test_partition_prints_counts_and_saves_heatmap(tmp_path, capsys):
    png = tmp_path / "parts.png"
    code = main(
        [
            "partition",
            DEFAULT,
            "--set",
            "data.task=digits",
            "--set",
            "data.num_clients=4",
            "--set",
            "data.alpha=0.1",
            "--out",
            str(png),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "heat-map" in out and out.count("\n") > 5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_is_a_clear_error(capsys):
    assert main(["run", DEFAULT, "--set", "data.alfa=0.3"]) == 2
    err = capsys.readouterr().err
    assert "data.alfa" in err and "Traceback" not in err


def test_unknown_aggregator_fails_before_anything_starts(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                DEFAULT,
                "--set",
                "aggregator.name=fedavgg",
                "--set",
                f"output.root='{tmp_path}'",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "fedavgg" in err and "fedavg" in err
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_unknown_aggregator_parameter_is_named(tmp_path, capsys):
    assert (
        main(["run", DEFAULT, "--set", "aggregator.lam=0.1", "--set", f"output.root='{tmp_path}'"])
        == 2
    )
    assert "lam" in capsys.readouterr().err


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    code = main(["partition", DEFAULT, "--set", f"data.data_dir='{tmp_path / 'empty'}'"])
    err = capsys.readouterr().err
    assert code == 2 and "make data" in err and "Traceback" not in err


def test_a_run_without_its_data_fails_before_making_a_folder(tmp_path, capsys):
    root = tmp_path / "runs"
    code = main(
        [
            "run",
            DEFAULT,
            "--set",
            f"data.data_dir='{tmp_path / 'empty'}'",
            "--set",
            f"output.root='{root}'",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "make data" in err and "Traceback" not in err
    assert not root.exists() or not any(root.iterdir())


def test_report_reprints_and_replots(tmp_path, capsys):
    run = RunDir.create(tmp_path, "demo")
    for r, acc in ((1, 0.5), (2, 0.75)):
        run.log_round(
            r,
            [
                ("server", None, "accuracy", acc),
                ("server", None, "loss", 1.0 / r),
                ("system", None, "round_time_s", 1.5),
            ],
        )
    assert main(["report", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "0.7500" in out and "0.5000" in out
    assert run.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(tmp_path / "missing")]) == 2
