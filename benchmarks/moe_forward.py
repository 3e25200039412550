"""Served SMILE and WEMoE forward passes, fedmerge's beside fusion_bench's on the same inputs.

    python -m benchmarks.moe_forward                 # fedmerge: the new forward and the old one
    python -m benchmarks.moe_forward --reference     # and fusion_bench's modules, in one run
    python -m benchmarks.moe_forward --quick         # tiny shapes: a smoke test

SMILE: MiniLM-sized linears (384→384, 384→1536, 1536→384), N = 4, 8, 16 experts of rank k = 32
(k_gate = 16) routed top-1, top-2 or to all N, and dense experts (k = −1, the whole ΔWi) routed
top-1 and top-2; 32 × 64 tokens. "old" is the forward fedmerge had before routing sparsely
(every expert on every token, the unselected ones multiplied by zero; ``smile_forward_masked``).
WEMoE: one MiniLM MLP (384 → 1536 → 384, GELU), N = 4, 8 experts, 32 samples × 64 tokens, the
forward and the forward + backward to the router (test-time adaptation); "old" is the factored
form (``WEMoEMLP.forward_factored``), "new" the module's own choice (``path = "auto"``).

With ``--reference`` the same weights and inputs go, as a .pt file, to
``benchmarks/fusionbench_worker.py`` run in ``.venv-fusionbench`` (created on first use:
``python3.11 -m venv``, then torch's CPU wheel and fusion-bench from PyPI; never a dependency of
fedmerge). fusion_bench's ``SmileMoELinear`` builds its experts with its own SVDs; fedmerge's
SmileLinear is loaded with those factors, so both compute the same function and their outputs are
compared (max abs difference, must be ≤ 1e-5; the worker's outputs come back as .pt files).
Timings: torch threads fixed on both sides (``--threads``, default 1); for each case the two
sides alternate in ``--rounds`` rounds (so that both see the same load), each round
``--warmup`` calls and then ``--repeats`` timed ones; a figure is the median of all timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    add_json_flag,
    format_machine,
    machine_info,
    markdown_table,
    write_json,
)

VENV = ROOT / ".venv-fusionbench"
WORKER = ROOT / "benchmarks" / "fusionbench_worker.py"
TORCH_PIN = "torch==2.13.0"  # as the Makefile installs it: the CPU wheel from the configured index
TOLERANCE = 1e-5
FULL = {
    "smile_shapes": ((384, 384), (384, 1536), (1536, 384)),
    "smile_experts": (4, 8, 16),
    "wemoe": (384, 1536),
    "wemoe_experts": (4, 8),
    "batch": (32, 64),
    "k_gate": 16,
    "k": 32,
}
QUICK = {
    "smile_shapes": ((24, 40),),
    "smile_experts": (4,),
    "wemoe": (24, 48),
    "wemoe_experts": (2,),
    "batch": (4, 8),
    "k_gate": 4,
    "k": 6,
}


def smile_variants(n: int, k: int) -> list[tuple[str, int, int]]:
    """(label, expert rank, top_k) of each SMILE row for n experts."""
    return [
        ("top-1", k, 1),
        ("top-2", k, 2),
        (f"all {n}", k, n),
        ("dense top-1", -1, 1),
        ("dense top-2", -1, 2),
    ]


def smile_forward_masked(layer: Any, x: Any) -> Any:
    """SmileLinear's forward before sparse routing: every expert runs on every token and the
    unselected ones are multiplied by their zero routing weight (the computation the sparse one
    replaces; kept to show the speed-up and to test that the two agree)."""
    from torch.nn import functional as F

    y = layer.base(x)
    weights = layer.routing_weights(x)
    if layer.k > 0:
        hidden = F.linear(x, layer.expert_v.reshape(-1, layer.in_features))
        hidden = hidden.unflatten(-1, (layer.num_experts, layer.k)) * weights.unsqueeze(-1)
        y = y + F.linear(
            hidden.flatten(-2), layer.expert_u.permute(1, 0, 2).reshape(layer.out_features, -1)
        )
    else:
        for i in range(layer.num_experts):
            y = y + weights[..., i : i + 1] * F.linear(x, layer.expert_w[i])
    if layer.expert_bias is not None:
        y = y + weights @ layer.expert_bias
    return y


# ---- cases --------------------------------------------------------------------------------------


def make_cases(sizes: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """The weights and inputs of every row: fine-tuned weights are W0 plus a random ΔW."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    batch, tokens = sizes["batch"]
    cases = []
    for in_f, out_f in sizes["smile_shapes"]:
        x = randn(batch, tokens, in_f)
        w0, b0 = randn(out_f, in_f, std=in_f**-0.5), randn(out_f, std=0.1)
        for n in sizes["smile_experts"]:
            ws = [w0 + randn(out_f, in_f, std=0.02 * in_f**-0.5) for _ in range(n)]
            bs = [b0 + randn(out_f, std=0.01) for _ in range(n)]
            for label, k, top_k in smile_variants(n, sizes["k"]):
                cases.append(
                    {
                        "kind": "smile",
                        "id": f"smile {in_f}->{out_f} N={n} {label}",
                        "shape": f"{in_f}→{out_f}",
                        "n": n,
                        "label": label,
                        "w0": w0,
                        "b0": b0,
                        "ws": ws,
                        "bs": bs,
                        "x": x,
                        "k_gate": sizes["k_gate"],
                        "k": k,
                        "top_k": top_k,
                    }
                )
    hidden, mlp = sizes["wemoe"]
    x = randn(batch, tokens, hidden)

    def mlp_state(std: float, around: dict[str, torch.Tensor] | None = None) -> dict:
        shapes = {"w1": (mlp, hidden), "b1": (mlp,), "w2": (hidden, mlp), "b2": (hidden,)}
        return {
            name: (0 if around is None else around[name]) + randn(*shape, std=std)
            for name, shape in shapes.items()
        }

    base = mlp_state(hidden**-0.5)
    for n in sizes["wemoe_experts"]:
        router = {
            "fc1.weight": randn(hidden, hidden, std=0.05),
            "fc1.bias": randn(hidden, std=0.05),
            "fc2.weight": randn(n, hidden, std=0.05),
            "fc2.bias": 0.3 + randn(n, std=0.05),
        }
        cases.append(
            {
                "kind": "wemoe",
                "id": f"wemoe N={n}",
                "n": n,
                "base": base,
                "experts": [mlp_state(0.01 * hidden**-0.5, base) for _ in range(n)],
                "router": router,
                "x": x,
            }
        )
    return cases


def smile_layer(case: dict[str, Any], factors: dict[str, Any] | None) -> Any:
    """fedmerge's SmileLinear for ``case``: its own construction, or loaded with the reference's
    factors (its Ui and SiViᵀ are this layer's expert_u and expert_v: the same product)."""
    import torch
    from torch import nn

    from fedmerge.aggregators.smile import SmileLinear, upscale_linear

    out_f, in_f = case["w0"].shape
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(case["w0"])
        base.bias.copy_(case["b0"])
    if factors is None:
        return upscale_linear(
            base, case["ws"], case["bs"], k_gate=case["k_gate"], k=case["k"], top_k=case["top_k"]
        ).eval()
    layer = SmileLinear(
        in_f,
        out_f,
        case["n"],
        k_gate=factors["gate"].shape[1],
        k=case["k"],
        top_k=case["top_k"],
        bias=True,
    )
    with torch.no_grad():
        layer.base.load_state_dict(base.state_dict())
        layer.gate.copy_(factors["gate"])
        if case["k"] > 0:
            layer.expert_u.copy_(factors["u"])
            layer.expert_v.copy_(factors["v"])
        else:
            layer.expert_w.copy_(factors["w"])
        layer.expert_bias.copy_(factors["bias"])
    return layer.eval()


def wemoe_module(case: dict[str, Any]) -> Any:
    import torch

    from fedmerge.aggregators.wemoe import TAU_NAMES, WEMoEMLP

    base = case["base"]
    hidden_f, in_f = base["w1"].shape
    module = WEMoEMLP(in_f, hidden_f, in_f, case["n"], activation="gelu")
    with torch.no_grad():
        for name in TAU_NAMES:
            getattr(module, name).copy_(base[name])
            module.set_task_vectors(
                name, torch.stack([e[name] - base[name] for e in case["experts"]])
            )
        module.router.load_state_dict(case["router"])
    return module.eval()


# ---- the reference side -------------------------------------------------------------------------


def ensure_reference_venv() -> Path:
    """``.venv-fusionbench``'s python, creating the environment on first use."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if marker.is_file():
        return python
    started = time.perf_counter()
    print(f"creating {VENV.name} (torch's CPU wheel and fusion-bench; minutes) ...", flush=True)
    for command in (
        ["python3.11", "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "-q", TORCH_PIN],
        [str(python), "-m", "pip", "install", "-q", "fusion-bench"],
    ):
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(
                f"installing the reference failed: {' '.join(command)} exited {proc.returncode}\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
    marker.touch()
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return python


class Reference:
    """``benchmarks/fusionbench_worker.py`` running in ``.venv-fusionbench``, asked case by case."""

    def __init__(self, cases: list[dict[str, Any]], threads: int) -> None:
        import torch

        python = ensure_reference_venv()
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-forward-")
        self.dir = Path(self._tmp.name)
        torch.save(cases, self.dir / "cases.pt")
        self._stderr = open(self.dir / "stderr.txt", "w+", encoding="utf-8")  # noqa: SIM115
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)  # the reference side imports no fedmerge
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), str(self.dir / "cases.pt"), str(self.dir), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=self.dir,
        )
        self.versions = self._answer()

    def _answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise SystemExit(
                f"the fusion_bench worker exited {self.proc.wait()}:\n{self._stderr.read()[-3000:]}"
            )
        return json.loads(line)

    def times(self, index: int, warmup: int, repeats: int) -> dict[str, list[float]]:
        self.proc.stdin.write(f"{index} {warmup} {repeats}\n")
        self.proc.stdin.flush()
        return self._answer()

    def saved(self, index: int) -> dict[str, Any]:
        import torch

        return torch.load(self.dir / f"{index}.pt", weights_only=False)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self._stderr.close()
        self._tmp.cleanup()


# ---- timing -------------------------------------------------------------------------------------


def times(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return seconds


def smile_passes(case: dict[str, Any], saved: dict[str, Any] | None):
    """fedmerge's timed calls for a SMILE case, and their differences (new vs old, vs reference)."""
    import torch

    layer = smile_layer(case, saved["factors"] if saved else None)
    x = case["x"]
    with torch.no_grad():
        new_out = layer(x)
        diffs = {"old_diff": float((new_out - smile_forward_masked(layer, x)).abs().max())}
        if saved is not None:
            diffs["ref_diff"] = float((new_out - saved["out"]).abs().max())

    def new() -> None:
        with torch.no_grad():
            layer(x)

    def old() -> None:
        with torch.no_grad():
            smile_forward_masked(layer, x)

    return {"forward": {"new": new, "old": old}}, {"forward": diffs}, {}


def wemoe_passes(case: dict[str, Any], saved: dict[str, Any] | None):
    """fedmerge's timed calls for a WEMoE case (forward; forward + router backward)."""
    import torch

    module = wemoe_module(case)
    x = case["x"]
    routers = list(module.router.parameters())

    def forward(path: str) -> torch.Tensor:
        module.path = path
        with torch.no_grad():
            return module(x)

    def backward(path: str) -> dict[str, torch.Tensor]:
        module.path = path
        for p in routers:
            p.requires_grad_(True)
            p.grad = None
        (module(x) ** 2).mean().backward()
        return {name: p.grad for name, p in module.router.named_parameters()}

    def grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    new_out, new_grads = forward("auto"), backward("auto")
    diffs = {
        "forward": {"old_diff": float((new_out - forward("factored")).abs().max())},
        "backward": {"old_diff": grad_diff(new_grads, backward("factored"))},
    }
    if saved is not None:
        diffs["forward"]["ref_diff"] = float((new_out - saved["out"]).abs().max())
        diffs["backward"]["ref_diff"] = grad_diff(new_grads, saved["grads"])
    module.path = "auto"
    path = "merged" if module.merges_per_sample(*x.shape[:2]) else "factored"
    passes = {
        "forward": {"new": lambda: forward("auto"), "old": lambda: forward("factored")},
        "backward": {"new": lambda: backward("auto"), "old": lambda: backward("factored")},
    }
    return passes, diffs, {"path": path}


def measure(
    index: int,
    case: dict[str, Any],
    reference: Reference | None,
    warmup: int,
    repeats: int,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Median seconds of each pass, the reference's and fedmerge's timed in alternating rounds
    (``rounds`` × ``repeats`` calls each, ``warmup`` calls before each round)."""
    ref_times: dict[str, list[float]] = {}
    if reference is not None:
        first = reference.times(index, warmup, repeats)  # builds it and saves its outputs
        for name, values in first.items():
            ref_times.setdefault(name, []).extend(values)
    saved = reference.saved(index) if reference is not None else None
    build = smile_passes if case["kind"] == "smile" else wemoe_passes
    passes, diffs, extra = build(case, saved)
    own: dict[str, dict[str, list[float]]] = {p: {"new": [], "old": []} for p in passes}
    for r in range(rounds):
        if reference is not None and r > 0:
            for name, values in reference.times(index, warmup, repeats).items():
                ref_times[name].extend(values)
        for name, fns in passes.items():
            for side in ("new", "old"):
                own[name][side].extend(times(fns[side], warmup, repeats))
    rows = {}
    for name in passes:
        row = {
            "new_s": statistics.median(own[name]["new"]),
            "old_s": statistics.median(own[name]["old"]),
            **diffs[name],
            **extra,
        }
        if name in ref_times:
            row["ref_s"] = statistics.median(ref_times[name])
        rows[name] = row
    return rows


# ---- report -------------------------------------------------------------------------------------


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a / b, 2)


def diff(value: float | None) -> str | None:
    return None if value is None else f"{value:.1e}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    parser.add_argument(
        "--reference", action="store_true", help="time fusion_bench's modules beside fedmerge's"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--warmup", type=int, default=None, help="calls before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls a round")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of timing, the two sides alternating"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_json_flag(parser)
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    cases = make_cases(sizes, args.seed)
    info = machine_info()
    print(format_machine(info))
    batch, tokens = sizes["batch"]
    print(
        f"torch threads: {args.threads}; {batch} × {tokens} tokens; median of {rounds} rounds × "
        f"{repeats} calls, {warmup} warm-up calls before each; SMILE k_gate = {sizes['k_gate']}, k = {sizes['k']}"
    )
    reference = Reference(cases, args.threads) if args.reference else None
    if reference is not None:
        print(
            f"reference: fusion-bench {reference.versions['fusion_bench']}, "
            f"torch {reference.versions['torch']}; the two sides alternate in {rounds} rounds "
            f"of {repeats} calls"
        )
    smile_rows, wemoe_rows, payload = [], [], []
    try:
        measured = [
            measure(i, case, reference, warmup, repeats, rounds) for i, case in enumerate(cases)
        ]
    finally:
        if reference is not None:
            reference.close()
    for case, rows in zip(cases, measured):
        if case["kind"] == "smile":
            r = rows["forward"]
            payload.append({"id": case["id"], **r})
            smile_rows.append(
                [
                    case["shape"],
                    case["n"],
                    case["label"],
                    ms(r["old_s"]),
                    ms(r["new_s"]),
                    ms(r.get("ref_s")),
                    ratio(r["old_s"], r["new_s"]),
                    ratio(r.get("ref_s"), r["new_s"]),
                    diff(r["old_diff"]),
                    diff(r.get("ref_diff")),
                ]
            )
        else:
            for name, label in (("forward", "forward"), ("backward", "forward + router backward")):
                r = rows[name]
                payload.append({"id": f"{case['id']} {label}", **r})
                wemoe_rows.append(
                    [
                        case["n"],
                        label,
                        r["path"],
                        ms(r["old_s"]),
                        ms(r["new_s"]),
                        ms(r.get("ref_s")),
                        ratio(r["old_s"], r["new_s"]),
                        ratio(r.get("ref_s"), r["new_s"]),
                        diff(r["old_diff"]),
                        diff(r.get("ref_diff")),
                    ]
                )
    print("\n## SMILE forward, ms (speed = the other's time / new time)\n")
    print(
        markdown_table(
            [
                "layer",
                "N",
                "routing",
                "old ms",
                "new ms",
                "fusion_bench ms",
                "new vs old",
                "new vs fusion_bench",
                "max diff vs old",
                "max diff vs fusion_bench",
            ],
            smile_rows,
        )
    )
    print("\n## WEMoE MLP, ms (gradient differences: the router's)\n")
    print(
        markdown_table(
            [
                "N",
                "pass",
                "path chosen",
                "old (factored) ms",
                "new ms",
                "fusion_bench ms",
                "new vs old",
                "new vs fusion_bench",
                "max diff vs old",
                "max diff vs fusion_bench",
            ],
            wemoe_rows,
        )
    )
    worst = max(
        [p["old_diff"] for p in payload] + [p["ref_diff"] for p in payload if "ref_diff" in p]
    )
    print(f"\nlargest difference: {worst:.1e} (tolerance {TOLERANCE:.0e})")
    write_json(args.json, {"machine": info, "threads": args.threads, "rows": payload})
    if worst > TOLERANCE:
        raise SystemExit(f"outputs differ by {worst:.1e} > {TOLERANCE:.0e}")


if __name__ == "__main__":
    main(sys.argv[1:])
