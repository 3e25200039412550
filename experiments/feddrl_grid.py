"""Run FedDRL's attack grid (attacks x malicious fractions x methods x seeds) and tabulate it.

Every cell is one ordinary run of the experiment file (``fedmerge run`` with overrides), so each
has its run folder; one JSON line per finished run goes to ``<out>/results.jsonl`` and finished
runs are skipped when the script is started again, so a long grid can be stopped and resumed.
A fraction of 0 is the clean run, run once per method and seed whatever the attack. The tables
(final test accuracy, mean ± std over seeds; detection precision / recall and clients dropped,
averaged over rounds, for the methods that drop clients) go to ``<out>/tables.md``.

    .venv/bin/python experiments/feddrl_grid.py experiments/feddrl_attacks.toml --out runs/feddrl_grid \
        --attacks noise,sign_flip,label_flip --fractions 0,0.2,0.4 --seeds 0,1,2 \
        --methods fedavg,krum,median,trimmed_mean:beta=0.2,feddrl --set federation.num_rounds=20

A method is a registered aggregator name, optionally with keyword arguments after a colon
(``trimmed_mean:beta=0.2``; values are TOML); ``feddrl`` takes the experiment file's
``[aggregator]`` table. ``--address`` attaches every run to one running Ray cluster instead of
starting a local Ray per run (``ray start --head`` once, then ``--address 127.0.0.1:6379``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmerge.federation.config import AggregatorConfig, load_config  # noqa: E402
from fedmerge.federation.runner import run_experiment  # noqa: E402

DETECTION = ("detection_precision", "detection_recall", "clients_dropped")


def _cells(attacks: list[str], fractions: list[float], seeds: list[int], methods: list[str]):
    for seed in seeds:
        for fraction in fractions:
            for attack in ["none"] if fraction == 0 else attacks:
                for method in methods:
                    yield attack, fraction, seed, method


def _key(attack: str, fraction: float, seed: int, method: str) -> str:
    return f"{attack}/{fraction:g}/{seed}/{method}"


def method_config(method: str) -> AggregatorConfig:
    """``name`` or ``name:key=value,key=value`` (values in TOML syntax) as an aggregator config."""
    name, _, args = method.partition(":")
    params = tomllib.loads("\n".join(args.split(","))) if args else {}
    return AggregatorConfig(name=name, params=params)


def run_cell(
    experiment: Path,
    sets: list[str],
    out: Path,
    attack: str,
    fraction: float,
    seed: int,
    method: str,
    address: str | None = None,
) -> dict:
    overrides = [
        *sets,
        f"seed={seed}",
        f"attack.seed={seed}",
        f"attack.fraction={fraction}",
        f'attack.kind="{attack}"',
        f'output.root="{out / "runs"}"',
        f'name="{attack}-{fraction:g}-s{seed}-{method.replace(":", "-").replace(",", "-")}"',
    ]
    config = load_config(experiment, overrides)
    if (
        method != config.aggregator.name
    ):  # the file's [aggregator] keys belong to the method it names
        config = dataclasses.replace(config, aggregator=method_config(method))
    started = time.perf_counter()
    run = run_experiment(config, address=address, progress=lambda _: None).run_dir
    rows = run.metrics().to_pylist()
    per_metric: dict[str, list[float]] = {}
    for row in rows:
        if row["scope"] == "aggregator" and row["metric"] in DETECTION:
            per_metric.setdefault(row["metric"], []).append(row["value"])
    curve = run.server_curve("accuracy")
    return {
        "key": _key(attack, fraction, seed, method),
        "attack": attack,
        "fraction": fraction,
        "seed": seed,
        "method": method,
        "final_accuracy": curve[-1][1],
        "rounds": len(curve),
        **{f"mean_{m}": statistics.fmean(v) for m, v in per_metric.items()},
        "wall_s": time.perf_counter() - started,
        "run_dir": str(run.path),
    }


def _fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def tables(results: list[dict], methods: list[str]) -> str:
    """Markdown: final accuracy (%) per (attack, fraction) and method; detection per method."""
    settings = sorted(
        {(r["attack"], r["fraction"]) for r in results}, key=lambda s: (s[1] > 0, s[0], s[1])
    )
    lines = [
        "| attack | fraction | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for attack, fraction in settings:
        cells = []
        for method in methods:
            values = [
                r["final_accuracy"]
                for r in results
                if (r["attack"], r["fraction"], r["method"]) == (attack, fraction, method)
            ]
            n = len(values)
            cells.append(_fmt(values) + (f" (n={n})" if n > 1 else ""))
        lines.append(f"| {attack} | {fraction:g} | " + " | ".join(cells) + " |")
    lines += goal_table(results, settings)
    detect = [
        m for m in methods if any(f"mean_{DETECTION[2]}" in r for r in results if r["method"] == m)
    ]
    if detect:
        lines += [
            "",
            "| attack | fraction | method | precision | recall | clients dropped / round |",
            "|---|---|---|---|---|---|",
        ]
        for attack, fraction in settings:
            for method in detect:
                cell = [
                    r
                    for r in results
                    if (r["attack"], r["fraction"], r["method"]) == (attack, fraction, method)
                ]
                if not cell:
                    continue
                p = [r["mean_detection_precision"] for r in cell if "mean_detection_precision" in r]
                rec = [r["mean_detection_recall"] for r in cell if "mean_detection_recall" in r]
                dropped = [r["mean_clients_dropped"] for r in cell if "mean_clients_dropped" in r]
                lines.append(
                    f"| {attack} | {fraction:g} | {method} | {_fmt(p)} | {_fmt(rec)} | "
                    f"{_fmt(dropped, 1.0)} |"
                )
    return "\n".join(lines)


def goal_table(results: list[dict], settings: list[tuple[str, float]]) -> list[str]:
    """The issue's goal, per attacked setting: where FedAvg loses more than 10 points against the
    clean run, does FedDRL stay within 3 points of it? Seed-paired differences, mean ± std."""

    def final(attack: str, fraction: float, method: str) -> dict[int, float]:
        return {
            r["seed"]: r["final_accuracy"]
            for r in results
            if (r["attack"], r["fraction"], r["method"]) == (attack, fraction, method)
        }

    clean_fedavg, clean_feddrl = final("none", 0.0, "fedavg"), final("none", 0.0, "feddrl")
    lines = [
        "",
        "| attack | fraction | FedAvg − clean FedAvg | FedDRL − clean FedAvg | FedDRL − clean FedDRL "
        "| goal (FedAvg < −10 → FedDRL ≥ −3 vs clean FedAvg) |",
        "|---|---|---|---|---|---|",
    ]
    for attack, fraction in settings:
        if fraction == 0:
            continue
        fedavg, feddrl = final(attack, fraction, "fedavg"), final(attack, fraction, "feddrl")

        def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
            return [a[s] - b[s] for s in sorted(set(a) & set(b))]

        loss, gap = paired(fedavg, clean_fedavg), paired(feddrl, clean_fedavg)
        if not loss or not gap:
            verdict = "not run"
        elif statistics.fmean(loss) > -0.10:
            verdict = "FedAvg loses ≤ 10 points: goal does not apply"
        else:
            verdict = "met" if statistics.fmean(gap) >= -0.03 else "not met"
        lines.append(
            f"| {attack} | {fraction:g} | {_fmt(loss)} | {_fmt(gap)} | "
            f"{_fmt(paired(feddrl, clean_feddrl))} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attacks", default="noise,sign_flip,label_flip")
    parser.add_argument("--fractions", default="0,0.2,0.4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--methods", default="fedavg,krum,krum:multi=7,median,trimmed_mean:beta=0.2,feddrl"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field for every run (repeatable)",
    )
    parser.add_argument("--address", default=None, help="Ray cluster every run attaches to")
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="write tables.md from <out>/results.jsonl without running anything",
    )
    args = parser.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    results = (
        [json.loads(line) for line in results_path.read_text().splitlines()]
        if results_path.exists()
        else []
    )
    done = {r["key"] for r in results}
    cells = [] if args.tables_only else list(_cells(attacks, fractions, seeds, methods))
    for attack, fraction, seed, method in cells:
        key = _key(attack, fraction, seed, method)
        if key in done:
            continue
        print(f"=== {key}", flush=True)
        result = run_cell(
            args.experiment, args.set, args.out, attack, fraction, seed, method, args.address
        )
        print(
            f"    final accuracy {result['final_accuracy']:.4f}  ({result['wall_s']:.0f} s)",
            flush=True,
        )
        with results_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        results.append(result)
        (args.out / "tables.md").write_text(tables(results, methods) + "\n")
    (args.out / "tables.md").write_text(tables(results, methods) + "\n")
    print(tables(results, methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
