"""The FedDRL grid script: method strings, the cells it runs, and the tables and goal verdicts it
derives from its results (the published tables must follow from the published results)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "feddrl_grid", ROOT / "experiments" / "feddrl_grid.py"
)
grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid)


def _row(
    attack: str, fraction: float, seed: int, method: str, accuracy: float, **extra: float
) -> dict:
    return {
        "key": grid._key(attack, fraction, seed, method),
        "attack": attack,
        "fraction": fraction,
        "seed": seed,
        "method": method,
        "final_accuracy": accuracy,
        **extra,
    }


def test_method_strings_carry_keyword_arguments():
    assert grid.method_config("median").name == "median"
    trimmed = grid.method_config("trimmed_mean:beta=0.2")
    assert (trimmed.name, trimmed.params) == ("trimmed_mean", {"beta": 0.2})
    assert grid.method_config("krum:num_byzantine=2,multi=3").params == {
        "num_byzantine": 2,
        "multi": 3,
    }


def test_a_clean_fraction_runs_once_whatever_the_attack():
    cells = list(grid._cells(["noise", "sign_flip"], [0.0, 0.4], [0, 1], ["fedavg"]))
    assert [c for c in cells if c[1] == 0.0] == [
        ("none", 0.0, 0, "fedavg"),
        ("none", 0.0, 1, "fedavg"),
    ]
    assert len(cells) == 2 + 2 * 2


def test_goal_verdicts_are_seed_paired():
    results = [
        _row("none", 0.0, 0, "fedavg", 0.70),
        _row("none", 0.0, 1, "fedavg", 0.72),
        _row(
            "none", 0.0, 0, "feddrl", 0.73, mean_clients_dropped=2.0, mean_detection_precision=0.0
        ),
        _row(
            "none", 0.0, 1, "feddrl", 0.73, mean_clients_dropped=3.0, mean_detection_precision=0.0
        ),
        # FedAvg collapses, FedDRL 1.5 points below clean FedAvg: met
        _row("sign_flip", 0.4, 0, "fedavg", 0.10),
        _row("sign_flip", 0.4, 1, "fedavg", 0.10),
        _row(
            "sign_flip",
            0.4,
            0,
            "feddrl",
            0.69,
            mean_clients_dropped=5.0,
            mean_detection_precision=0.8,
            mean_detection_recall=1.0,
        ),
        _row(
            "sign_flip",
            0.4,
            1,
            "feddrl",
            0.70,
            mean_clients_dropped=6.0,
            mean_detection_precision=0.6,
            mean_detection_recall=0.9,
        ),
        # FedDRL 10 points below: not met
        _row("noise", 0.4, 0, "fedavg", 0.10),
        _row("noise", 0.4, 1, "fedavg", 0.12),
        _row("noise", 0.4, 0, "feddrl", 0.60),
        _row("noise", 0.4, 1, "feddrl", 0.62),
        # FedAvg loses 4.5 points: the goal does not apply
        _row("label_flip", 0.2, 0, "fedavg", 0.65),
        _row("label_flip", 0.2, 1, "fedavg", 0.68),
        _row("label_flip", 0.2, 0, "feddrl", 0.70),
        _row("label_flip", 0.2, 1, "feddrl", 0.71),
    ]
    text = grid.tables(results, ["fedavg", "feddrl"])
    goal = text.split("| goal (")[1].split("\n\n")[0].splitlines()[2:]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in goal}
    assert rows[("sign_flip", "0.4")].endswith("| met |")
    assert "| -61.0 ± 1.4 | -1.5 ± 0.7 | -3.5 ± 0.7 |" in rows[("sign_flip", "0.4")]
    assert rows[("noise", "0.4")].endswith("| not met |")
    assert rows[("label_flip", "0.2")].endswith("goal does not apply |")
    assert "| none | 0 | 71.0 ± 1.4 (n=2) | 73.0 ± 0.0 (n=2) |" in text
    assert "| sign_flip | 0.4 | feddrl | 70.0 ± 14.1 | 95.0 ± 7.1 | 5.5 ± 0.7 |" in text


def test_published_tables_follow_from_published_results(tmp_path):
    published = ROOT / "docs" / "results" / "feddrl_grid"
    shutil.copy(published / "results.jsonl", tmp_path / "results.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (
        len(rows) == 126 and len({r["key"] for r in rows}) == 126
    )  # 7 settings x 6 methods x 3 seeds
    assert (
        grid.main(["experiments/feddrl_attacks.toml", "--out", str(tmp_path), "--tables-only"]) == 0
    )
    assert (tmp_path / "tables.md").read_text() == (published / "tables.md").read_text()
