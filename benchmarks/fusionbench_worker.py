"""The reference side of ``benchmarks.moe_forward``: fusion_bench's modules on the same inputs.

Runs in ``.venv-fusionbench`` (torch + fusion-bench, no fedmerge)::

    .venv-fusionbench/bin/python benchmarks/fusionbench_worker.py CASES.pt OUTDIR THREADS

A server that ``benchmarks.moe_forward`` drives over stdin/stdout, so that the two sides'
timings alternate case by case, under the same load. For each case of CASES.pt it builds
fusion_bench's ``SmileMoELinear`` (from the base and fine-tuned linears: its own SVDs) or
``WeightEnsemblingMoE`` (base and expert MLPs, batch_first, a two-layer router loaded with the
case's router weights), saves the outputs, the router gradients and, for SMILE, the factors it
built (fedmerge's layer is loaded with exactly the same experts), and times its forward (and
forward + router backward) on request.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version

import torch
from torch import nn


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def mlp(state: dict[str, torch.Tensor]) -> nn.Sequential:
    fc1, fc2 = linear(state["w1"], state["b1"]), linear(state["w2"], state["b2"])
    return nn.Sequential(fc1, nn.GELU(), fc2)


def times(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return seconds


def build_smile(case: dict) -> dict:
    """fusion_bench's SmileMoELinear from the case's linears, its output and its factors."""
    from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

    base = linear(case["w0"], case["b0"])
    experts = [linear(w, b) for w, b in zip(case["ws"], case["bs"])]
    layer = SmileMoELinear(
        base, experts, gate_k=case["k_gate"], k=case["k"], top_k=case["top_k"], full_matrices=False
    ).eval()
    x = case["x"]
    n, k_gate = layer.num_experts, layer.gate.k
    factors = {"gate": layer.gate.weights.detach().view(n, k_gate, -1).clone()}
    if case["k"] > 0:
        factors["u"] = torch.stack([e.u.detach() for e in layer.experts])
        factors["v"] = torch.stack([e.svh.detach() for e in layer.experts])
    else:
        factors["w"] = torch.stack([e.weight.detach() for e in layer.experts])
    factors["bias"] = torch.stack([e.bias.detach() for e in layer.experts])

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    with torch.no_grad():
        out = layer(x)
    return {"saved": {"out": out, "factors": factors}, "passes": {"forward": forward}}


def build_wemoe(case: dict) -> dict:
    """fusion_bench's WeightEnsemblingMoE over the case's MLPs with the case's router weights."""
    from fusion_bench.models.we_moe import WeightEnsemblingMoE

    module = WeightEnsemblingMoE(
        hidden_size=case["x"].shape[-1],
        base_model=mlp(case["base"]),
        expert_models=[mlp(e) for e in case["experts"]],
        init_lambda=0.3,
        batch_first=True,
        router_hidden_layers=2,
    )
    module.gate.load_state_dict(case["router"])
    x = case["x"]
    router = list(module.gate.parameters())

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def backward() -> None:
        for p in router:
            p.grad = None
        (module(x) ** 2).mean().backward()

    with torch.no_grad():
        out = module(x)
    backward()
    grads = {name: p.grad.clone() for name, p in module.gate.named_parameters()}
    return {
        "saved": {"out": out, "grads": grads},
        "passes": {"forward": forward, "backward": backward},
    }


def main() -> None:
    """Serve timing requests: a line "INDEX WARMUP REPEATS" on stdin times case INDEX (built on
    first request, its outputs saved to OUTDIR/INDEX.pt) and answers one JSON line of times."""
    cases_path, out_dir, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    cases = torch.load(cases_path, weights_only=False)
    print(json.dumps({"fusion_bench": version("fusion-bench"), "torch": torch.__version__}))
    sys.stdout.flush()
    current, built = None, None
    for line in sys.stdin:
        index, warmup, repeats = (int(v) for v in line.split())
        if index != current:
            case = cases[index]
            built = (build_smile if case["kind"] == "smile" else build_wemoe)(case)
            torch.save(built["saved"], f"{out_dir}/{index}.pt")
            current = index
        answer = {name: times(fn, warmup, repeats) for name, fn in built["passes"].items()}
        print(json.dumps(answer))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
