"""WEMoE: task arithmetic outside the MLPs, a weight-ensembling mixture of experts inside them.

Each transformer block's MLP becomes a ``WEMoEMLP``: the frozen pretrained MLP, the frozen MLP
task vectors τi and a small trainable router. For each sample the router, applied to the tokens
entering the MLP and averaged over the sample's real (non-padding) tokens, gives weights
λ(x) ∈ R^N (no softmax), and the MLP computed is θ0 + Σi λi(x) τi. Every other parameter is
task arithmetic, θ0 + λ0 Σi τi, and per-task heads stay per task. The routers are trained on the
server by test-time adaptation: minimising the entropy of the predictions on unlabelled proxy
inputs of every task.

Supported MLPs: BERT-style blocks (``intermediate.dense`` → activation → ``output.dense``, as in
all-MiniLM-L6-v2); the block's ``intermediate`` module is replaced by the whole WEMoE MLP and
``output.dense`` by an identity (``Removed``), which is exact because the first feeds only the
second. Another layout is refused with its module named.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from fedmerge.aggregators.base import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    StateDict,
)
from fedmerge.aggregators.fedavg import fedavg
from fedmerge.aggregators.merging import (
    GROUP_BY,
    count_parameters,
    group_states,
    mergeable,
    merged_heads,
    stored_bytes,
)
from fedmerge.aggregators.params import hyperparameter
from fedmerge.aggregators.registry import register
from fedmerge.aggregators.task_arithmetic import task_arithmetic
from fedmerge.aggregators.upscaled import Removed, module_type, set_submodule

__all__ = [
    "ACTIVATIONS",
    "MLPSite",
    "Router",
    "WEMoE",
    "WEMoEMLP",
    "find_mlps",
    "prune_magnitude",
    "train_routers",
    "upscale_mlps",
]

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_ACTIVATION_CLASSES = {
    "GELUActivation": "gelu",
    "ReLU": "relu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
}


def _activation_name(module: nn.Module) -> str:
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    name = _ACTIVATION_CLASSES.get(type(module).__name__)
    if name is None:
        raise ValueError(
            f"WEMoE: unsupported MLP activation {type(module).__name__}; "
            f"supported: {', '.join(sorted(_ACTIVATION_CLASSES))}, nn.GELU"
        )
    return name


TAU_NAMES = ("w1", "b1", "w2", "b2")
"""The MLP tensors a WEMoE module holds task vectors of: first linear, then second linear."""


def index_dtype(numel: int) -> torch.dtype:
    """The integer type of flat positions into a tensor of ``numel`` entries: int32 where it fits."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


@module_type("wemoe_router")
class Router(nn.Module):
    """r(h) = W2 ReLU(W1 h + b1) + b2; weights N(0, std²), b1 = 0, b2 = init_lambda."""

    def __init__(
        self, features: int, num_experts: int, *, init_lambda: float = 0.3, std: float = 0.01
    ) -> None:
        super().__init__()
        self.features, self.num_experts, self.init_lambda, self.std = (
            features,
            num_experts,
            init_lambda,
            std,
        )
        self.fc1 = nn.Linear(features, features)
        self.fc2 = nn.Linear(features, num_experts)
        with torch.no_grad():
            nn.init.normal_(self.fc1.weight, std=std)
            nn.init.normal_(self.fc2.weight, std=std)
            self.fc1.bias.zero_()
            self.fc2.bias.fill_(init_lambda)

    def config(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "num_experts": self.num_experts,
            "init_lambda": self.init_lambda,
            "std": self.std,
        }

    @classmethod
    def empty(cls, config: Mapping[str, Any], shared: dict[str, Any]) -> Router:
        c = dict(config)
        return cls(c.pop("features"), c.pop("num_experts"), **c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(h)))


@module_type("wemoe_mlp")
class WEMoEMLP(nn.Module):
    """act(x W1ᵀ + b1) W2ᵀ + b2 with (W, b) = θ0 + Σi λi(x) τi per sample; λ from the router.

    Inputs are (batch, tokens, features) — λ is the router averaged over the real tokens, those
    marked in ``token_mask`` (padding would otherwise pull λ towards the router's output at
    padding positions) — or (batch, features). Only the router is trainable.

    The module sees only hidden states, so the model that knows which positions are tokens sets
    ``token_mask`` (batch, tokens; 1 = real token) for the duration of a forward on every module
    with ``pools_tokens`` (the text tasks do: ``fedmerge.clients.tasks.text.token_mask``); None =
    every position is a token.

    Two equal computations: the factored form x W0ᵀ + Σi λi (x τiᵀ) runs N + 1 products per
    token; merging (W0 + Σi λi τi) per sample first runs one, after building a weight set per
    sample. ``path`` = "auto" picks the cheaper for each batch shape (``merges_per_sample``),
    for inference and router training alike.
    """

    pools_tokens: ClassVar[bool] = True
    PATHS: ClassVar[tuple[str, ...]] = ("auto", "merged", "factored")
    MERGE_COST: ClassVar[float] = 8.0
    """Cost of merging one sample's weights for one expert, in per-token MLP products."""
    MERGE_CHUNK: ClassVar[int] = 1 << 22
    """Merged weight floats held at once (16 MiB in float32: a few MiniLM MLPs' worth, which
    measured faster than larger chunks)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        num_experts: int,
        *,
        activation: str,
        init_lambda: float = 0.3,
        router_std: float = 0.01,
        shared_router: bool = False,
        router: Router | None = None,
        sparse: Mapping[str, int] | None = None,
    ) -> None:
        """``sparse`` (E-WEMoE's pruned task vectors) maps each of w1, b1, w2, b2 to the number
        of non-zero task-vector entries stored for it: the module then keeps ``tau_<name>_index``
        (flat positions in the (N, ...) stack, int32 where they fit) and ``tau_<name>_values``
        instead of the dense ``tau_<name>``, and forward scatters them into a dense stack."""
        super().__init__()
        self.token_mask: torch.Tensor | None = None
        self.path = "auto"
        """"auto" (the cheaper form for each batch shape), "merged" or "factored"; not saved."""
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is invalid: must be one of {', '.join(ACTIVATIONS)}"
            )
        self.in_features, self.hidden_features, self.out_features = (
            in_features,
            hidden_features,
            out_features,
        )
        self.num_experts, self.activation, self.shared_router = (
            num_experts,
            activation,
            shared_router,
        )
        self.tau_shapes = {
            "w1": (num_experts, hidden_features, in_features),
            "b1": (num_experts, hidden_features),
            "w2": (num_experts, out_features, hidden_features),
            "b2": (num_experts, out_features),
        }
        if sparse is not None and set(sparse) != set(TAU_NAMES):
            raise ValueError(
                f"sparse must give the stored entries of each of {', '.join(TAU_NAMES)}, "
                f"got {sorted(sparse)}"
            )
        self.sparse = None if sparse is None else {name: int(sparse[name]) for name in TAU_NAMES}

        def frozen(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape), requires_grad=False)

        self.w1, self.b1 = frozen(hidden_features, in_features), frozen(hidden_features)
        self.w2, self.b2 = frozen(out_features, hidden_features), frozen(out_features)
        for name, shape in self.tau_shapes.items():
            if self.sparse is None:
                setattr(self, f"tau_{name}", frozen(*shape))
                continue
            nnz = self.sparse[name]
            if not 0 <= nnz <= math.prod(shape):
                raise ValueError(f"sparse[{name!r}] = {nnz} is not in 0..{math.prod(shape)}")
            setattr(self, f"tau_{name}_values", frozen(nnz))
            self.register_buffer(
                f"tau_{name}_index", torch.zeros(nnz, dtype=index_dtype(math.prod(shape)))
            )
        self.router = (
            router
            if router is not None
            else Router(in_features, num_experts, init_lambda=init_lambda, std=router_std)
        )

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "hidden_features": self.hidden_features,
            "out_features": self.out_features,
            "num_experts": self.num_experts,
            "activation": self.activation,
            "shared_router": self.shared_router,
            "router": self.router.config(),
            "sparse": self.sparse,
        }

    @classmethod
    def empty(cls, config: Mapping[str, Any], shared: dict[str, Any]) -> WEMoEMLP:
        c = dict(config)
        router_config = c.pop("router")
        if c["shared_router"]:
            router = shared.setdefault("wemoe_router", Router.empty(router_config, shared))
        else:
            router = Router.empty(router_config, shared)
        return cls(
            c.pop("in_features"),
            c.pop("hidden_features"),
            c.pop("out_features"),
            c.pop("num_experts"),
            activation=c["activation"],
            shared_router=c["shared_router"],
            router=router,
            sparse=c.get("sparse"),
        )

    def set_task_vectors(self, name: str, tau: torch.Tensor) -> None:
        """Store the (N, ...) task-vector stack of ``name`` (w1, b1, w2, b2): as it is when dense,
        its non-zero entries when sparse (``sparse[name]`` must be their number)."""
        shape = self.tau_shapes[name]
        if tuple(tau.shape) != shape:
            raise ValueError(f"tau_{name} must have shape {shape}, got {tuple(tau.shape)}")
        with torch.no_grad():
            if self.sparse is None:
                getattr(self, f"tau_{name}").copy_(tau)
                return
            index = tau.reshape(-1).nonzero().squeeze(1)
            if len(index) != self.sparse[name]:
                raise ValueError(
                    f"tau_{name} has {len(index)} non-zero entries, the module stores "
                    f"{self.sparse[name]}"
                )
            getattr(self, f"tau_{name}_values").copy_(tau.reshape(-1)[index])
            getattr(self, f"tau_{name}_index").copy_(index)

    def tau(self, name: str) -> torch.Tensor:
        """The dense (N, ...) task-vector stack of ``name`` (w1, b1, w2, b2), rebuilt from its
        stored entries when sparse."""
        if self.sparse is None:
            return getattr(self, f"tau_{name}")
        values = getattr(self, f"tau_{name}_values")
        dense = values.new_zeros(math.prod(self.tau_shapes[name]))
        dense[getattr(self, f"tau_{name}_index").long()] = values
        return dense.view(self.tau_shapes[name])

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """λ(x), one row of N weights per sample: for token inputs the router's mean over the
        sample's real tokens (``token_mask``; all tokens when none is set)."""
        lam = self.router(x)
        if x.dim() != 3:
            return lam
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"the token mask is {tuple(mask.shape)} but the module sees (batch, tokens) = "
                f"{tuple(x.shape[:2])}: it runs on other positions than the model masked"
            )
        if mask is None:
            return lam.mean(dim=1)
        m = mask.to(device=lam.device, dtype=lam.dtype).unsqueeze(-1)
        return (lam * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def merges_per_sample(self, batch: int, tokens: int) -> bool:
        """Whether ``path = "auto"`` merges the weights per sample for a (batch, tokens) input.

        The factored form multiplies every token by θ0 and by each τi: tokens·batch·(N + 1)
        MLP products. Merging costs batch·N multiply-adds of the MLP's size to build one weight
        set per sample (memory-bound, ``MERGE_COST`` products' worth each) and then one product
        per token. The same ratio holds for the backward pass (router training)."""
        if self.path not in self.PATHS:
            raise ValueError(
                f"WEMoEMLP.path={self.path!r} is invalid: must be one of {', '.join(self.PATHS)}"
            )
        if self.path != "auto":
            return self.path == "merged"
        n = self.num_experts
        return tokens * batch * (n + 1) > tokens * batch + self.MERGE_COST * batch * n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.expert_weights(x)
        tokens = x.shape[1] if x.dim() == 3 else 1
        if self.merges_per_sample(x.shape[0], tokens):
            return self.forward_merged(x, lam)
        return self.forward_factored(x, lam)

    def forward_factored(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """act(x W0ᵀ + Σi λi x τiᵀ) ...: θ0 and every τi applied to every token."""
        lam = lam.unsqueeze(1) if x.dim() == 3 else lam  # (B, 1, N) broadcasts over tokens
        n = self.num_experts
        h = F.linear(x, self.w1, self.b1)
        h = h + (
            F.linear(
                x, self.tau("w1").reshape(-1, self.in_features), self.tau("b1").reshape(-1)
            ).unflatten(-1, (n, self.hidden_features))
            * lam.unsqueeze(-1)
        ).sum(dim=-2)
        h = ACTIVATIONS[self.activation](h)
        y = F.linear(h, self.w2, self.b2)
        return y + (
            F.linear(
                h, self.tau("w2").reshape(-1, self.hidden_features), self.tau("b2").reshape(-1)
            ).unflatten(-1, (n, self.out_features))
            * lam.unsqueeze(-1)
        ).sum(dim=-2)

    def forward_merged(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """θ0 + Σi λi τi built once per sample, then one batched MLP product per token; samples
        are merged ``MERGE_CHUNK`` floats' worth of weights at a time to bound the memory."""
        tokens = x.dim() == 3
        x3 = x if tokens else x.unsqueeze(1)
        n = self.num_experts
        flat = {name: self.tau(name).reshape(n, -1) for name in TAU_NAMES}
        size = sum(t.shape[1] for t in flat.values())
        chunk = max(1, self.MERGE_CHUNK // size)
        outputs = []
        for start in range(0, x3.shape[0], chunk):
            xs, ls = x3[start : start + chunk], lam[start : start + chunk]
            merged = {
                name: torch.addmm(getattr(self, name).reshape(1, -1), ls, flat[name])
                for name in TAU_NAMES
            }
            w1 = merged["w1"].view(-1, self.hidden_features, self.in_features)
            w2 = merged["w2"].view(-1, self.out_features, self.hidden_features)
            h = torch.baddbmm(merged["b1"].unsqueeze(1), xs, w1.transpose(1, 2))
            h = ACTIVATIONS[self.activation](h)
            outputs.append(torch.baddbmm(merged["b2"].unsqueeze(1), h, w2.transpose(1, 2)))
        y = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return y if tokens else y.squeeze(1)


class MLPSite:
    """One transformer block's MLP: where the WEMoE module goes and which linears it absorbs."""

    def __init__(self, install: str, fc1: str, fc2: str, activation: str) -> None:
        self.install, self.fc1, self.fc2, self.activation = install, fc1, fc2, activation

    @property
    def keys(self) -> list[str]:
        return [f"{self.fc1}.weight", f"{self.fc1}.bias", f"{self.fc2}.weight", f"{self.fc2}.bias"]


def find_mlps(model: nn.Module) -> list[MLPSite]:
    """The transformer MLPs of ``model`` (BERT layout); ValueError when there are none."""
    sites = []
    for name, module in model.named_modules():
        intermediate, output = (
            getattr(module, "intermediate", None),
            getattr(module, "output", None),
        )
        if (
            intermediate is not None
            and isinstance(getattr(intermediate, "dense", None), nn.Linear)
            and hasattr(intermediate, "intermediate_act_fn")
            and output is not None
            and isinstance(getattr(output, "dense", None), nn.Linear)
        ):
            prefix = f"{name}." if name else ""
            sites.append(
                MLPSite(
                    f"{prefix}intermediate",
                    f"{prefix}intermediate.dense",
                    f"{prefix}output.dense",
                    _activation_name(intermediate.intermediate_act_fn),
                )
            )
    if not sites:
        adapted = any(hasattr(m, "base_layer") for m in model.modules())
        raise ValueError(
            f"WEMoE: no transformer MLP (BERT layout: intermediate.dense -> output.dense) "
            f"found in {type(model).__name__}"
            + (
                " (its linear layers carry LoRA adapters: merge LoRA runs with smile, "
                "task_arithmetic or ties)"
                if adapted
                else ""
            )
        )
    return sites


def prune_magnitude(tensor: torch.Tensor, keep: float) -> torch.Tensor:
    """``tensor`` with all but its ``keep`` share of largest-magnitude entries set to 0."""
    n_keep = max(1, math.ceil(keep * tensor.numel()))
    if n_keep >= tensor.numel():
        return tensor.clone()
    magnitude = tensor.abs().reshape(-1)
    threshold = magnitude.kthvalue(tensor.numel() - n_keep + 1).values
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


STORAGE = ("auto", "dense", "sparse")


def upscale_mlps(
    model: nn.Module,
    base_state: Mapping[str, torch.Tensor],
    expert_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    init_lambda: float = 0.3,
    router_std: float = 0.01,
    shared_router: bool = False,
    keep: float = 1.0,
    sites: Sequence[MLPSite] | None = None,
    storage: str = "auto",
) -> list[MLPSite]:
    """Replace each MLP of ``model`` (in place, on its device, float32) by a WEMoEMLP over
    θ0 = ``base_state`` and τi = ``expert_states[i]`` − θ0 (magnitude-pruned to ``keep`` per
    tensor when ``keep`` < 1). Router weights follow torch's global RNG.

    ``storage``: ``"sparse"`` keeps only the task vectors' non-zero entries (value + index),
    ``"dense"`` the whole stacks, ``"auto"`` whichever takes fewer bytes per module (sparse when
    under about half the entries are non-zero, as after E-WEMoE's 10 % pruning)."""
    if storage not in STORAGE:
        raise ValueError(f"storage={storage!r} is invalid: must be one of {', '.join(STORAGE)}")
    sites = list(sites) if sites is not None else find_mlps(model)
    absent = [key for site in sites for key in site.keys if key not in base_state]
    if absent:
        raise ValueError(
            f"WEMoE upscales the MLPs' own weights, which the merged states do not carry "
            f"({absent[0]}...): LoRA runs keep them frozen; merge LoRA adapters with smile, "
            "task_arithmetic or ties"
        )
    device = next(model.parameters()).device
    n = len(expert_states)
    router = (
        Router(
            model.get_submodule(sites[0].fc1).in_features,
            n,
            init_lambda=init_lambda,
            std=router_std,
        )
        if shared_router
        else None
    )
    for site in sites:
        fc1, fc2 = model.get_submodule(site.fc1), model.get_submodule(site.fc2)
        keys = dict(zip(TAU_NAMES, site.keys))
        theta0 = {name: base_state[key].to(device, torch.float32) for name, key in keys.items()}
        taus = {}
        for name, key in keys.items():
            stack = [state[key].to(device, torch.float32) - theta0[name] for state in expert_states]
            taus[name] = torch.stack([prune_magnitude(t, keep) if keep < 1 else t for t in stack])
        nnz = {name: int(torch.count_nonzero(tau)) for name, tau in taus.items()}
        sparse_bytes = sum(
            k * (4 + index_dtype(taus[name].numel()).itemsize) for name, k in nnz.items()
        )
        if storage == "sparse" or (
            storage == "auto" and sparse_bytes < 4 * sum(t.numel() for t in taus.values())
        ):
            sparse = nnz
        else:
            sparse = None
        module = WEMoEMLP(
            fc1.in_features,
            fc1.out_features,
            fc2.out_features,
            n,
            activation=site.activation,
            init_lambda=init_lambda,
            router_std=router_std,
            shared_router=shared_router,
            router=router,
            sparse=sparse,
        ).to(device)
        with torch.no_grad():
            for name in TAU_NAMES:
                getattr(module, name).copy_(theta0[name])
                module.set_task_vectors(name, taus[name])
        set_submodule(model, site.install, module)
        set_submodule(model, site.fc2, Removed())
    return sites


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def train_routers(
    model: nn.Module,
    proxy_inputs: Mapping[int, torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Test-time adaptation: Adam on the routers only, minimising Σ_tasks mean prediction entropy
    over ``batch_size`` proxy inputs of each task per step (drawn with a generator seeded by
    ``seed``). Returns the loss of the first and last step and the wall time."""
    routers = [p for name, p in model.named_parameters() if ".router." in f".{name}"]
    if not routers:
        raise ValueError("train_routers: the model has no WEMoE routers")
    if not proxy_inputs or any(len(x) == 0 for x in proxy_inputs.values()):
        raise ValueError("train_routers: no unlabelled proxy inputs for some task")
    started = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in routers:
        p.requires_grad_(True)
    device = routers[0].device
    optimizer = torch.optim.Adam(routers, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.eval()  # no dropout: the routers adapt to the model as it will be served
    first = last = math.nan
    with torch.enable_grad():
        for step in range(steps):
            loss = torch.zeros((), device=device)
            for task in sorted(proxy_inputs):
                x = proxy_inputs[task]
                index = torch.randint(len(x), (batch_size,), generator=generator)
                loss = loss + _entropy(model(x[index].to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == 0:
                first = loss.item()
            last = loss.item()
    for p in routers:
        p.requires_grad_(False)
    return {
        "router_entropy_first": first,
        "router_entropy_last": last,
        "router_train_s": time.perf_counter() - started,
    }


@register()
class WEMoE(Aggregator):
    """Weight-ensembling MoE, with routers trained by test-time entropy minimisation on the server.

    Tang, Shen, Du, Yang, Du, Tao, "Merging Multi-Task Models via Weight-Ensembling Mixture of
    Experts", ICML 2024, https://arxiv.org/abs/2402.00433. E-WEMoE (``efficient = true``):
    Shen, Tang, et al., "Efficient and Effective Weight-Ensembling Mixture of Experts for
    Multi-Task Model Merging", arXiv 2410.21804, https://arxiv.org/abs/2410.21804 — each MLP task
    vector magnitude-pruned to its top ``keep`` share and one router shared by all layers; the
    pruned task vectors are stored sparsely (values + int32 positions) when that is smaller.

    Outside the MLPs: task arithmetic with ``init_lambda`` (λ0 = 0.3); routers start at
    b2 = λ0, so before training the model is (up to the router's small random weights,
    ``router_std`` = 0.01) task arithmetic. Routers train for ``steps`` Adam steps (``lr`` 1e-4,
    ``batch_size`` 16 per task) on ``RoundContext.proxy_inputs`` (the server's unlabelled inputs)
    on the aggregator's device. Experts are per task (``group_by = "task"``) or per client. The
    WEMoE model is served; the broadcast model is the clients' FedAvg.

    Size report: ``params_served`` counts the stored floating-point numbers (a sparse task
    vector's non-zero values only), ``sparse_index_entries`` the integer positions stored next to
    them, ``bytes_served`` both in bytes; ``params_ratio`` is ``params_served`` over one model's.
    """

    name = "wemoe"
    needs = frozenset({"base_model", "model_builder", "proxy_inputs"})

    @dataclass(frozen=True)
    class Params:
        init_lambda: float = hyperparameter(
            0.3, "task-arithmetic scale λ0 outside the MLPs; the routers start at b2 = λ0"
        )
        steps: int = hyperparameter(
            1000, "Adam steps of router training on the proxy inputs (0 = untrained)", ge=0
        )
        lr: float = hyperparameter(1e-4, "Adam learning rate of the routers", gt=0)
        batch_size: int = hyperparameter(16, "proxy inputs per task per router step", ge=1)
        router_std: float = hyperparameter(0.01, "std of the routers' initial weights", ge=0)
        group_by: str = hyperparameter(
            "task", "one expert per task or per client", choices=GROUP_BY
        )
        efficient: bool = hyperparameter(
            False, "E-WEMoE: prune the MLP task vectors to keep, one shared router"
        )
        keep: float = hyperparameter(
            0.1, "share of each MLP task vector kept (efficient = true only)", gt=0, le=1
        )

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.set_hyperparameters(params)

    def build(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> tuple[nn.Module, int]:
        """The WEMoE model before router training, and its number of experts."""
        if ctx.build_model is None:
            raise ValueError(
                "wemoe needs the run's model architecture (RoundContext.build_model), "
                "which the AggregatorActor provides"
            )
        device = ctx.device
        groups = group_states(updates, self.group_by, device)
        base = {k: v.to(device) for k, v in ctx.base_state.items()}
        model = ctx.build_model().to(device).float()
        sites = find_mlps(model)
        mlp_keys = {k for site in sites for k in site.keys}
        shared = {
            k: v
            for k, v in base.items()
            if k not in mlp_keys and (mergeable(k, v) or not v.is_floating_point())
        }
        state: StateDict = dict(base)
        state.update(task_arithmetic(shared, [g.state for g in groups], lam=self.init_lambda))
        state.update(merged_heads(base, updates, device))
        model.load_state_dict(state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed * 1_000_003 + ctx.round)
            upscale_mlps(
                model,
                base,
                [g.state for g in groups],
                init_lambda=self.init_lambda,
                router_std=self.router_std,
                shared_router=self.efficient,
                keep=self.keep if self.efficient else 1.0,
                sites=sites,
            )
        return model, len(groups)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> AggregateResult:
        started = time.perf_counter()
        one_model = count_parameters(ctx.build_model()) if ctx.build_model is not None else 0
        model, n_experts = self.build(ctx, updates)
        metrics: dict[str, float] = {"construct_s": time.perf_counter() - started}
        if self.steps > 0:
            if not ctx.proxy_inputs:
                raise ValueError(
                    "wemoe trains its routers on unlabelled server inputs, but the round has no "
                    "proxy inputs (RoundContext.proxy_inputs); set steps = 0 to serve it untrained"
                )
            metrics.update(
                train_routers(
                    model,
                    ctx.proxy_inputs,
                    steps=self.steps,
                    lr=self.lr,
                    batch_size=self.batch_size,
                    seed=ctx.seed * 1_000_003 + ctx.round,
                )
            )
        model.eval()
        served = count_parameters(model)
        modules = [m for m in model.modules() if isinstance(m, WEMoEMLP)]
        tau_nonzero = sum(
            int(torch.count_nonzero(m.tau(name))) for m in modules for name in TAU_NAMES
        )
        indices = sum(m.sparse[name] for m in modules if m.sparse is not None for name in TAU_NAMES)
        average = fedavg(
            [u.state for u in updates], [u.num_examples for u in updates], device=ctx.device
        )
        average.update(merged_heads(ctx.base_state, updates, ctx.device))
        metrics.update(
            {
                "num_clients": float(len(updates)),
                "num_examples": float(sum(u.num_examples for u in updates)),
                "num_experts": float(n_experts),
                "params_model": float(one_model),
                "params_served": float(served),
                "params_ratio": served / one_model if one_model else math.nan,
                "task_vector_nonzero": float(tau_nonzero),
                "sparse_index_entries": float(indices),
                "bytes_served": float(stored_bytes(model)),
            }
        )
        return AggregateResult(state=average, metrics=metrics, served_model=model)
