"""The served MoE layers' fast forwards equal the computations they replace.

SMILE routes sparsely (each expert runs on its own tokens only); it must equal the masked form
(every expert on every token, unselected ones weighted 0) and a per-token hand computation.
WEMoE merges the weights per sample where that is cheaper; it must equal the factored form,
outputs and router gradients alike, and the choice between them must follow the batch shape.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.moe_forward import smile_forward_masked
from fedmerge.aggregators.smile import upscale_linear
from fedmerge.aggregators.wemoe import TAU_NAMES, WEMoEMLP


def smile_layer(n: int, k: int, top_k: int, *, in_f: int = 12, out_f: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=gen))
        base.bias.copy_(torch.randn(out_f, generator=gen))
    weights = [base.weight + torch.randn(out_f, in_f, generator=gen) for _ in range(n)]
    biases = [base.bias + torch.randn(out_f, generator=gen) for _ in range(n)]
    return upscale_linear(base, weights, biases, k_gate=3, k=k, top_k=top_k).eval()


def per_token(layer, x: torch.Tensor) -> torch.Tensor:
    """y = W0 x + b0 + Σ_{i ∈ top_k} p̃i (ΔWi x + Δbi), one token at a time."""
    rows = []
    for t in x.reshape(-1, layer.in_features):
        logits = torch.stack([torch.linalg.vector_norm(g @ t) for g in layer.gate])
        p = torch.softmax(logits, dim=0)
        top = torch.topk(p, layer.top_k).indices.tolist()
        y = layer.base.weight @ t + layer.base.bias
        total = sum(p[i] for i in top)
        for i in top:
            dw = layer.expert_u[i] @ layer.expert_v[i] if layer.k > 0 else layer.expert_w[i]
            y = y + p[i] / total * (dw @ t + layer.expert_bias[i])
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], layer.out_features)


CASES = [(1, 1), (4, 1), (4, 2), (4, 4)]


@pytest.mark.parametrize("k", [3, -1])
@pytest.mark.parametrize(("n", "top_k"), CASES)
def test_sparse_smile_equals_the_masked_forward_and_the_per_token_formula(n, top_k, k):
    layer = smile_layer(n, k, top_k)
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        new = layer(x)
        assert new.shape == (3, 7, 10)
        torch.testing.assert_close(new, smile_forward_masked(layer, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(new, per_token(layer, x), atol=1e-5, rtol=0)
        # a single token and a flat batch route the same way
        torch.testing.assert_close(layer(x[0, 0]), new[0, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer(x[1]), new[1], atol=1e-5, rtol=0)


def test_sparse_smile_routes_each_token_to_its_own_experts():
    """With 4 experts and top-1 every expert serves some of 64 tokens here, and a token's output
    uses its own expert only: zeroing another expert's factors leaves it unchanged."""
    layer = smile_layer(4, 3, 1)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chosen = layer.routing_weights(x).argmax(dim=-1)
        assert set(chosen.tolist()) == {0, 1, 2, 3}
        before = layer(x)
        layer.expert_u[0].zero_()
        after = layer(x)
    untouched = chosen != 0
    torch.testing.assert_close(after[untouched], before[untouched], atol=0, rtol=0)
    assert not torch.allclose(after[~untouched], before[~untouched])


@pytest.mark.parametrize("k", [3, -1])
@pytest.mark.parametrize(("n", "top_k"), [(4, 2), (4, 4)])
def test_sparse_smile_input_gradients_equal_the_masked_forward(n, top_k, k):
    layer = smile_layer(n, k, top_k)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    grads = []
    for forward in (layer, lambda t: smile_forward_masked(layer, t)):
        xi = x.clone().requires_grad_(True)
        (forward(xi) ** 2).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def wemoe_module(n: int = 3, *, sparse: bool = False, seed: int = 0) -> WEMoEMLP:
    gen = torch.Generator().manual_seed(seed)
    in_f, hidden = 8, 16
    if sparse:
        sizes = {"w1": n * hidden * in_f, "b1": n * hidden, "w2": n * in_f * hidden, "b2": n * in_f}
        nnz = {name: size // 2 for name, size in sizes.items()}
    module = WEMoEMLP(in_f, hidden, in_f, n, activation="gelu", sparse=nnz if sparse else None)
    with torch.no_grad():
        for name in TAU_NAMES:
            getattr(module, name).copy_(torch.randn(getattr(module, name).shape, generator=gen))
            tau = torch.randn(module.tau_shapes[name], generator=gen) * 0.3
            if sparse:
                flat = tau.reshape(-1)
                flat[torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 2]] = 0
            module.set_task_vectors(name, tau)
        for p in module.router.parameters():  # routers far from their near-constant start
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.eval()


def forward_and_grads(module: WEMoEMLP, x: torch.Tensor, path: str):
    module.path = path
    module.zero_grad(set_to_none=True)
    for p in module.router.parameters():
        p.requires_grad_(True)
    xi = x.clone().requires_grad_(True)
    y = module(xi)
    (y**2).mean().backward()
    grads = {name: p.grad.clone() for name, p in module.router.named_parameters()}
    return y.detach(), grads, xi.grad


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", [(4, 6), (5,)])
def test_merged_wemoe_equals_the_factored_form_outputs_and_router_gradients(shape, sparse):
    module = wemoe_module(sparse=sparse)
    x = torch.randn(*shape, 8, generator=torch.Generator().manual_seed(4))
    if len(shape) == 2:  # padding: the last two positions of sample 0 are not tokens
        module.token_mask = torch.ones(shape)
        module.token_mask[0, -2:] = 0
    merged = forward_and_grads(module, x, "merged")
    factored = forward_and_grads(module, x, "factored")
    torch.testing.assert_close(merged[0], factored[0], atol=1e-5, rtol=1e-5)
    for name in factored[1]:
        assert factored[1][name].abs().sum() > 0, name  # the routers do get a gradient
        torch.testing.assert_close(merged[1][name], factored[1][name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[2], factored[2], atol=1e-5, rtol=1e-5)


def test_merged_wemoe_in_chunks_of_samples_equals_one_chunk():
    module = wemoe_module()
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(5))
    module.path = "merged"
    with torch.no_grad():
        whole = module(x)
        module.MERGE_CHUNK = 1  # one sample's weights at a time
        torch.testing.assert_close(module(x), whole, atol=1e-5, rtol=1e-5)


def test_wemoe_picks_the_cheaper_form_for_the_batch_shape(monkeypatch):
    module = wemoe_module(n=4)  # MERGE_COST 8: merge when tokens·5 > tokens + 32
    assert module.merges_per_sample(32, 64) and module.merges_per_sample(2, 9)
    assert not module.merges_per_sample(32, 8) and not module.merges_per_sample(32, 1)
    called = []
    for name in ("forward_merged", "forward_factored"):
        original = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda x, lam, _f=original, _n=name: called.append(_n) or _f(x, lam)
        )
    with torch.no_grad():
        module(torch.randn(2, 9, 8))  # 9 tokens a sample: merged
        module(torch.randn(2, 8))  # one token a sample: factored
        module(torch.randn(2, 8, 8))  # 8 tokens a sample: factored
        module.path = "merged"
        module(torch.randn(2, 8))
    assert called == ["forward_merged", "forward_factored", "forward_factored", "forward_merged"]
    module.path = "fastest"
    with pytest.raises(ValueError, match="path='fastest' is invalid"):
        module(torch.randn(2, 8))


def test_the_path_is_not_part_of_the_saved_state():
    module = wemoe_module()
    keys = set(module.state_dict())
    module.path = "merged"
    assert set(module.state_dict()) == keys
    assert "path" not in module.config()
