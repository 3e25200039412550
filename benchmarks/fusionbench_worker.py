"""The reference side of ``benchmarks.moe_forward``: fusion_bench's modules on the same inputs.

Runs in ``.venv-fusionbench`` (torch + fusion-bench, no fedmerge)::

    .venv-fusionbench/bin/python benchmarks/fusionbench_worker.py CASES.pt OUT.pt THREADS

For each case of CASES.pt (written by ``benchmarks.moe_forward``) it builds fusion_bench's
``SmileMoELinear`` (from the base and fine-tuned linears: its own SVDs) or
``WeightEnsemblingMoE`` (base and expert MLPs, batch_first, a two-layer router loaded with the
case's router weights), times its forward (and forward + router backward), and writes the
outputs, the router gradients and, for SMILE, the factors it built, so that fedmerge's layer is
loaded with exactly the same experts.
"""

from __future__ import annotations

import statistics
import sys
import time
from importlib.metadata import version

import torch
from torch import nn


def median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def mlp(state: dict[str, torch.Tensor]) -> nn.Sequential:
    fc1, fc2 = linear(state["w1"], state["b1"]), linear(state["w2"], state["b2"])
    return nn.Sequential(fc1, nn.GELU(), fc2)


def smile_case(case: dict, warmup: int, repeats: int) -> dict:
    from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

    base = linear(case["w0"], case["b0"])
    experts = [linear(w, b) for w, b in zip(case["ws"], case["bs"])]
    layer = SmileMoELinear(
        base, experts, gate_k=case["k_gate"], k=case["k"], top_k=case["top_k"], full_matrices=False
    ).eval()
    x = case["x"]
    with torch.no_grad():
        out = layer(x)
        seconds = median_seconds(lambda: layer(x), warmup, repeats)
    n, k_gate = layer.num_experts, layer.gate.k
    factors = {"gate": layer.gate.weights.detach().view(n, k_gate, -1).clone()}
    if case["k"] > 0:
        factors["u"] = torch.stack([e.u.detach() for e in layer.experts])
        factors["v"] = torch.stack([e.svh.detach() for e in layer.experts])
    else:
        factors["w"] = torch.stack([e.weight.detach() for e in layer.experts])
    factors["bias"] = torch.stack([e.bias.detach() for e in layer.experts])
    return {"forward_s": seconds, "out": out, "factors": factors}


def wemoe_case(case: dict, warmup: int, repeats: int) -> dict:
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
    with torch.no_grad():
        out = module(x)
        forward_s = median_seconds(lambda: module(x), warmup, repeats)
    router = list(module.gate.parameters())

    def step() -> None:
        for p in router:
            p.grad = None
        (module(x) ** 2).mean().backward()

    step()
    grads = {name: p.grad.clone() for name, p in module.gate.named_parameters()}
    backward_s = median_seconds(step, warmup, repeats)
    return {"forward_s": forward_s, "backward_s": backward_s, "out": out, "grads": grads}


def main() -> None:
    cases_path, out_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    spec = torch.load(cases_path, weights_only=False)
    results = {}
    for case in spec["cases"]:
        run = smile_case if case["kind"] == "smile" else wemoe_case
        results[case["id"]] = run(case, spec["warmup"], spec["repeats"])
    torch.save(
        {"results": results, "fusion_bench": version("fusion-bench"), "torch": torch.__version__},
        out_path,
    )


if __name__ == "__main__":
    main()
