"""experiments/fl_baselines.py: its table follows from its results, and a quick grid runs both
systems (fedmerge, and Flower's own strategy in a plain run_simulation) and resumes."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "fl_baselines", ROOT / "experiments" / "fl_baselines.py"
)
baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baselines)


def _row(system: str, method: str, alpha: float, seed: int, final: float) -> dict:
    return {
        "system": system,
        "method": method,
        "alpha": alpha,
        "seed": seed,
        "rounds": 2,
        "per_round": {"accuracy": [0.1, final]},
    }


def test_the_table_is_the_mean_and_std_of_the_final_accuracies() -> None:
    finals = [0.61, 0.64, 0.70]
    rows = [_row("fedmerge", "fedadam", 0.1, s, a) for s, a in enumerate(finals)]
    rows.append(_row("flower", "fedadam", 0.1, 0, 0.5))
    table = baselines.tables(rows).splitlines()
    assert table[0] == "| method | α = 0.1: fedmerge | α = 0.1: Flower |"
    mean, std = 100 * statistics.fmean(finals), 100 * statistics.stdev(finals)
    assert table[2] == f"| fedadam | {mean:.1f} ± {std:.1f} (n=3) | 50.0 ± 0.0 (n=1) |"


def test_flower_gets_the_same_hyperparameters() -> None:
    adam = baselines._flower_strategy("fedadam", 20, 0.5, 2)
    p = baselines.METHODS["fedadam"]
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (
        p["eta"],
        p["beta_1"],
        p["beta_2"],
        p["tau"],
    )
    momentum = baselines._flower_strategy("fedavgm", 20, 0.5, 2)
    assert momentum.server_momentum == baselines.METHODS["fedavgm"]["server_momentum"]
    with pytest.raises(ValueError, match="scaffold"):
        baselines._flower_strategy("scaffold", 20, 0.5, 2)


@pytest.mark.slow
def test_a_quick_grid_runs_both_systems_and_skips_finished_cells(tmp_path, capsys) -> None:
    args = ["--quick", "--out", str(tmp_path), "--methods", "fedprox", "--alphas", "0.5"]
    assert baselines.main([*args, "--seeds", "0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["system"] for r in rows) == ["fedmerge", "flower"]
    for row in rows:
        accuracy = row["per_round"]["accuracy"]
        assert len(accuracy) == 2 and accuracy[-1] > 0.2, row  # ten classes: chance is 0.1
    capsys.readouterr()
    assert baselines.main([*args, "--seeds", "0"]) == 0  # everything done: nothing runs again
    assert "[1/2]" not in capsys.readouterr().out
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert "fedprox" in (tmp_path / "tables.md").read_text()
