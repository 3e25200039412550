"""The tables of docs/results/wsa.md from the sweeps' results.jsonl files: final and best test
accuracy (mean ± sample std over seeds, and the mean paired difference to FedAvg of the same
seed), and the scope metrics (mean over rounds, then over seeds) that show how much each
method changes the clients' weight scopes.

    .venv/bin/python experiments/wsa_table.py docs/results/wsa/results.jsonl [docs/results/wsa-strong/results.jsonl]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f} (1 seed)"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def main(paths: list[str]) -> None:
    runs = [
        json.loads(line)
        for path in paths
        for line in Path(path).read_text().splitlines()
        if line.strip()
    ]
    by = defaultdict(dict)  # (alpha, method) -> seed -> record
    for r in runs:
        by[(r["setting"]["data.alpha"], r["method"])][r["seed"]] = r
    order = ["fedavg", "fedprox", "wsa-0.01", "wsa-0.1", "wsa-1", "wsa-10", "wsa-100"]
    for alpha in sorted({a for a, _ in by}):
        base = by.get((alpha, "fedavg"), {})
        print(f"\n### Dirichlet α = {alpha}\n")
        print(
            "| method | seeds | final accuracy % | best accuracy % | final − FedAvg (same seed), pp "
            "| σ spread ×10⁻⁴ | KL to target ×10⁻⁴ |"
        )
        print("|---|---|---|---|---|---|---|")
        for method in sorted(
            (m for a, m in by if a == alpha), key=lambda m: order.index(m) if m in order else 99
        ):
            seeds = by[(alpha, method)]
            acc = {s: [v for _, v in r["curves"]["server/accuracy"]] for s, r in seeds.items()}
            final = [a[-1] for a in acc.values()]
            best = [max(a) for a in acc.values()]
            paired = [
                acc[s][-1] - base[s]["curves"]["server/accuracy"][-1][1] for s in acc if s in base
            ]

            def scope(name: str) -> str:
                per_seed = [
                    statistics.mean(v for _, v in r["curves"].get(name, []))
                    for r in seeds.values()
                    if r["curves"].get(name)
                ]
                return mean_std(per_seed, 1e4, 2) if per_seed else "–"

            diff = (
                "–"
                if method == "fedavg" or not paired
                else f"{100 * statistics.mean(paired):+.2f}"
                + (f" ± {100 * statistics.stdev(paired):.2f}" if len(paired) > 1 else " (1 seed)")
            )
            print(
                f"| {method} | {len(seeds)} | {mean_std(final)} | {mean_std(best)} | {diff} "
                f"| {scope('aggregator/scope_sigma_spread')} | {scope('aggregator/scope_kl_to_target')} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
