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

With ``--reference`` the same weights and inputs go, as .pt files, to
``benchmarks/fusionbench_worker.py`` run in ``.venv-fusionbench`` (created on first use:
``python3.11 -m venv``, then torch's CPU wheel and fusion-bench from PyPI; never a dependency of
fedmerge). fusion_bench's ``SmileMoELinear`` builds its experts with its own SVDs; fedmerge's
SmileLinear is loaded with those factors, so both compute the same function and their outputs are
compared (max abs difference, must be ≤ 1e-5). Timings: torch threads fixed (``--threads``),
``--warmup`` calls, then the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
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


def median_seconds(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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


# ---- timing -------------------------------------------------------------------------------------


def time_smile(case: dict[str, Any], ref: dict[str, Any] | None, warmup: int, repeats: int):
    import torch

    layer = smile_layer(case, ref["factors"] if ref else None)
    x = case["x"]
    with torch.no_grad():
        new_out = layer(x)
        old_out = smile_forward_masked(layer, x)
        row = {
            "new_s": median_seconds(lambda: layer(x), warmup, repeats),
            "old_s": median_seconds(lambda: smile_forward_masked(layer, x), warmup, repeats),
            "old_diff": float((new_out - old_out).abs().max()),
        }
    if ref is not None:
        row["ref_s"] = ref["forward_s"]
        row["ref_diff"] = float((new_out - ref["out"]).abs().max())
    return row


def time_wemoe(case: dict[str, Any], ref: dict[str, Any] | None, warmup: int, repeats: int):
    import torch

    module = wemoe_module(case)
    x = case["x"]
    routers = list(module.router.parameters())

    def forward(path: str) -> torch.Tensor:
        module.path = path
        return module(x)

    def step(path: str) -> dict[str, torch.Tensor]:
        module.path = path
        for p in routers:
            p.requires_grad_(True)
            p.grad = None
        (module(x) ** 2).mean().backward()
        return {name: p.grad for name, p in module.router.named_parameters()}

    with torch.no_grad():
        new_out, old_out = forward("auto"), forward("factored")
        fwd = {
            "new_s": median_seconds(lambda: forward("auto"), warmup, repeats),
            "old_s": median_seconds(lambda: forward("factored"), warmup, repeats),
            "old_diff": float((new_out - old_out).abs().max()),
        }
    new_grads, old_grads = step("auto"), step("factored")
    bwd = {
        "new_s": median_seconds(lambda: step("auto"), warmup, repeats),
        "old_s": median_seconds(lambda: step("factored"), warmup, repeats),
        "old_diff": max(float((new_grads[k] - old_grads[k]).abs().max()) for k in new_grads),
    }
    module.path = "auto"
    merged = module.merges_per_sample(*x.shape[:2])
    fwd["path"] = bwd["path"] = "merged" if merged else "factored"
    if ref is not None:
        fwd["ref_s"], bwd["ref_s"] = ref["forward_s"], ref["backward_s"]
        fwd["ref_diff"] = float((new_out - ref["out"]).abs().max())
        bwd["ref_diff"] = max(
            float((new_grads[k] - ref["grads"][k]).abs().max()) for k in new_grads
        )
    return fwd, bwd


# ---- the reference environment ------------------------------------------------------------------


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


def run_reference(cases: list[dict], threads: int, warmup: int, repeats: int) -> dict[str, Any]:
    import torch

    python = ensure_reference_venv()
    with tempfile.TemporaryDirectory(prefix="moe-forward-") as tmp:
        cases_path, out_path = Path(tmp) / "cases.pt", Path(tmp) / "reference.pt"
        torch.save({"cases": cases, "warmup": warmup, "repeats": repeats}, cases_path)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(
            [str(python), str(WORKER), str(cases_path), str(out_path), str(threads)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,  # not the repository: the reference side imports no fedmerge
        )
        if proc.returncode != 0:
            raise SystemExit(
                f"the fusion_bench worker exited {proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        return torch.load(out_path, weights_only=False)


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
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (median)")
    parser.add_argument("--seed", type=int, default=0)
    add_json_flag(parser)
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 9)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    cases = make_cases(sizes, args.seed)
    info = machine_info()
    print(format_machine(info))
    batch, tokens = sizes["batch"]
    print(
        f"torch threads: {args.threads}; {batch} × {tokens} tokens; warm-up {warmup}, "
        f"median of {repeats}; SMILE k_gate = {sizes['k_gate']}, k = {sizes['k']}"
    )
    reference = None
    if args.reference:
        started = time.perf_counter()
        reference = run_reference(cases, args.threads, warmup, repeats)
        print(
            f"reference: fusion-bench {reference['fusion_bench']}, torch {reference['torch']} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    results = reference["results"] if reference else {}
    smile_rows, wemoe_rows, payload = [], [], []
    for case in cases:
        ref = results.get(case["id"])
        if case["kind"] == "smile":
            r = time_smile(case, ref, warmup, repeats)
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
            fwd, bwd = time_wemoe(case, ref, warmup, repeats)
            for label, r in (("forward", fwd), ("forward + router backward", bwd)):
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
