"""Every benchmark runs with one command and reports every row it promises (``--quick`` sizes).

These tests check that the benchmarks run and print complete tables with numbers in them, and
that the merged weights of the aggregation paths agree; they do not check any time.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"-?[\d,]+(?:\.\d+)?"


def run_benchmark(name: str, *args: str, timeout: float = 600) -> str:
    env = dict(
        os.environ, FEDMERGE_DATA_DIR=os.environ.get("FEDMERGE_DATA_DIR", str(ROOT / "data"))
    )
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"benchmarks.{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def tables(output: str) -> list[list[list[str]]]:
    """Every Markdown table of ``output`` as its rows of cells, the header row first."""
    found: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in output.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                found.append(current)
            if not set(line) <= set("|-: "):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return found


def by_first_cell(table: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row for row in table[1:]}


def numeric(cell: str) -> float:
    match = re.match(NUMBER, cell)
    assert match, f"{cell!r} is not a figure"
    return float(match.group(0).replace(",", ""))


def test_table_parsing_and_cells():
    from benchmarks.aggregation import layer_shapes, parse_cells
    from benchmarks.common import markdown_table

    text = markdown_table(["a", "b"], [["x", 1.5], ["y", None]])
    assert tables("before\n" + text + "\nafter") == [[["a", "b"], ["x", "1.5"], ["y", "-"]]]
    assert parse_cells("50x10M,4x1k") == [(50, 10_000_000), (4, 1000)]
    with pytest.raises(Exception, match="must look like 50x10M"):
        parse_cells("fifty")
    shapes = layer_shapes(1_000_003)
    assert sum(math.prod(shape) for shape in shapes.values()) == 1_000_003


def test_private_peak_sees_a_private_buffer_and_not_shared_memory():
    import mmap

    import numpy as np

    from benchmarks.common import PrivatePeak

    size = 200 * 2**20
    probe = PrivatePeak([os.getpid()], interval=0.005).start()
    shared = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)  # shared anonymous memory is RssShmem
    np.frombuffer(shared, dtype=np.uint8)[:] = 1
    private = np.ones(size, dtype=np.uint8)
    peak = probe.stop()
    growth = peak - probe.start_mb
    del private
    shared.close()
    assert 0.9 * size / 1e6 < growth < 1.5 * size / 1e6, growth


@pytest.mark.slow
def test_aggregation_quick_reports_every_path():
    out = run_benchmark("aggregation", "--quick")
    throughput, memory, breakdown = tables(out)
    header, row = throughput[0], by_first_cell(throughput)["4 x 1M"]
    for column in (
        "Flower FedAvg GB/s (s)",
        "fedmerge GB/s (s)",
        "fedmerge, float32 sums GB/s (s)",
        "fedmerge + Ray, restarts 3 GB/s (s)",
        "fedmerge + Ray, restarts 0 GB/s (s)",
        "ceiling fp32 a*x+y GB/s",
    ):
        assert numeric(row[header.index(column)]) > 0, column
    for cell in by_first_cell(memory)["4 x 1M"][1:]:
        assert numeric(cell) > 0
    assert [(r[0], r[1]) for r in breakdown[1:]] == [("4 x 1M", "3"), ("4 x 1M", "0")]
    assert all(numeric(cell) >= 0 for r in breakdown[1:] for cell in r[2:])
    assert "merged weights agree across paths: yes" in out


def positive_times(values) -> bool:
    """Measured durations: a non-empty list of finite numbers > 0 (wall clock never stands still)."""
    return bool(values) and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_round_quick_reports_flower_and_fedmerge(ray_address, tmp_path):
    # The table rounds to 0.01 s and the ideal round of --quick is ~0.005 s: the figures are
    # checked unrounded, from --json, and the table only for its shape.
    figures = tmp_path / "round.json"
    out = run_benchmark("round", "--quick", "--address", ray_address, "--json", str(figures))
    (table,) = tables(out)
    assert [row[0] for row in table[1:]] == ["flower", "fedmerge"]
    assert all(len(row) == len(table[0]) == 11 for row in table)
    assert re.search(r"fedmerge steady round vs Flower: [\d.]+x", out)
    data = json.loads(figures.read_text(encoding="utf-8"))
    compute = data["results"]["compute"]
    assert compute["clients_per_round"] == 2 and len(compute["client_s"]) == 2
    assert positive_times(compute["client_s"]) and positive_times([data["ideal_round_s"]])
    for system in ("flower", "fedmerge"):
        result = data["results"][system]
        assert len(result["round_s"]) == 2 and positive_times(result["round_s"]), (
            result
        )  # --quick: 2 rounds
        assert positive_times([data["steady_round_s"][system], result["wall_s"]]), result
        assert 0.0 <= result["final_accuracy"] <= 1.0, result
    assert math.isfinite(data["fedmerge_vs_flower"]) and data["fedmerge_vs_flower"] > 0


@pytest.mark.slow
def test_scale_quick_reports_both_systems(ray_address):
    out = run_benchmark("scale", "--quick", "--clients", "40", "--address", ray_address)
    (table,) = tables(out)
    rows = table[1:]
    assert sorted((r[0], r[1]) for r in rows) == [("fedmerge", "40"), ("flower", "40")]
    for row in rows:
        assert numeric(row[2]) > 0, row  # rounds / min
        assert numeric(row[8]) > 0, row  # server peak RSS


@pytest.mark.slow
def test_smile_quick_reports_both_svds(tmp_path):
    figures = tmp_path / "smile.json"
    out = run_benchmark("smile", "--quick", "--json", str(figures))
    (table,) = tables(out)
    rows = by_first_cell(table)
    assert sorted(rows) == ["1", "2"]
    assert all(len(row) == len(table[0]) for row in rows.values())
    experts = json.loads(figures.read_text(encoding="utf-8"))[
        "experts"
    ]  # unrounded: 0.004 s prints 0.00
    assert sorted(experts) == ["1", "2"]
    for by_svd in experts.values():
        assert sorted(by_svd) == ["full", "randomized"]
        for figure in by_svd.values():
            assert positive_times([figure["construct_s"], figure["merge_s"]]), figure
            assert 0.0 <= figure["accuracy"] <= 1.0 and figure["params_ratio"] > 0, figure


@pytest.mark.slow
def test_lora_quick_reports_every_arm_and_the_bytes_it_moved(ray_address, tmp_path):
    from flwr.app import Array

    from fedmerge.federation.config import load_config
    from fedmerge.federation.server import build_aggregator, federated_model, merges_products

    figures = tmp_path / "lora.json"
    out = run_benchmark("lora", "--quick", "--address", ray_address, "--json", str(figures))
    table, breakdown = tables(out)
    assert [row[0] for row in table[1:]] == ["full", "fedit", "products"]
    assert all(len(row) == len(table[0]) == 13 for row in table)
    assert [row[0] for row in breakdown[1:]] == ["full", "fedit", "products"]
    assert all(len(row) == len(breakdown[0]) == 5 for row in breakdown)
    data = json.loads(figures.read_text(encoding="utf-8"))
    arms = data["arms"]
    assert sorted(arms) == ["fedit", "full", "products"]
    clients, rounds = data["clients"], data["rounds"]

    def wire(state) -> int:
        return sum(len(Array(v.numpy()).data) for v in state.values())

    for name, arm in arms.items():
        # The update's size recomputed here from the arm's config, and the bytes the run
        # recorded: every client's reply holds exactly the shared tensors.
        config = load_config(ROOT / data["experiment"], arm["overrides"])
        shared = federated_model(
            config.task_spec.build(),
            seed=config.seed,
            products=merges_products(config, build_aggregator(config)),
        )
        reply = {k: shared.initial_state[k] for k in shared.reply_keys}
        assert arm["update_bytes"] == wire(reply) > 0, name
        assert arm["clients_responded"] == [clients] * rounds, name
        assert arm["bytes_received"] == [clients * wire(reply)] * rounds, name
        assert arm["bytes_sent"] == [clients * wire(shared.initial_state)] * rounds, name
        assert len(arm["round_s"]) == rounds and positive_times(arm["round_s"]), name
        assert positive_times(arm["aggregate_s"]) and positive_times(arm["evaluate_s"]), name
        assert len(arm["aggregate_s"]) == len(arm["evaluate_s"]) == rounds, name
        assert 0.0 <= arm["final_accuracy"] <= 1.0, name
        assert arm["driver_peak_mb"] > 0 and all(arm["actor_peak_mb"].values()), name
        assert sorted(arm["actor_peak_mb"]) == ["aggregator", "evaluator"], name
    full, fedit, products = arms["full"], arms["fedit"], arms["products"]
    assert full["reply_keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    lora_keys = ["0.lora_A.default.weight", "0.lora_B.default.weight", "2.bias", "2.weight"]
    assert fedit["reply_keys"] == products["reply_keys"] == lora_keys
    assert fedit["update_bytes"] == products["update_bytes"] < full["update_bytes"]
    assert max(fedit["bytes_received"]) < min(full["bytes_received"])
    assert max(fedit["bytes_sent"]) < min(full["bytes_sent"])
    # The products merge also ships the adapted layer's base weight down, never up.
    assert min(products["bytes_sent"]) > max(fedit["bytes_sent"])
    assert products["bytes_received"] == fedit["bytes_received"]


def test_moe_forward_quick_reports_every_row_and_equal_outputs(tmp_path):
    """fedmerge's side only (no --reference: fusion-bench is not a dependency): every SMILE
    routing and WEMoE pass gets a row with times, and the new forwards equal the old ones."""
    figures = tmp_path / "moe.json"
    out = run_benchmark("moe_forward", "--quick", "--json", str(figures))
    smile, wemoe = tables(out)
    assert [row[2] for row in smile[1:]] == [
        "top-1",
        "top-2",
        "all 4",
        "dense top-1",
        "dense top-2",
    ]
    assert [(row[0], row[1]) for row in wemoe[1:]] == [
        ("2", "forward"),
        ("2", "forward + router backward"),
    ]
    assert all(len(row) == len(smile[0]) for row in smile)
    assert all(row[5] == "-" for row in smile[1:] + wemoe[1:])  # no reference column figures
    rows = json.loads(figures.read_text(encoding="utf-8"))["rows"]
    assert len(rows) == 7
    for row in rows:
        assert row["new_s"] > 0 and row["old_s"] > 0, row
        assert row["old_diff"] <= 1e-5, row
        assert "ref_s" not in row
