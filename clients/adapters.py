"""LoRA adapters on any model a task builds, with Hugging Face's ``peft``.

``[train.peft]`` turns full fine-tuning into adapter training: every process of a run (clients,
evaluator, aggregator, resume) builds the same model, ``Task.build_model()`` with low-rank
adapters injected into the ``target_modules`` (``peft.inject_adapter_in_model``), seeded so the
frozen base and the adapters' initial values are identical everywhere. Only the trainable
tensors travel: the adapters ``lora_A`` / ``lora_B`` and the parameters ``trainable`` names (the
task heads by default). The frozen base stays where each process built it; a digest of it rides
in the run config, so a client whose base differs (another checkpoint, another transformers
version) fails with a clear error instead of training against the wrong weights.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fedmerge.aggregators.lora import LoraModule

__all__ = [
    "METHODS",
    "PeftConfig",
    "adapter_layout",
    "frozen_digest",
    "inject",
    "load_received",
    "reply_state",
    "require_peft",
    "trainable_keys",
]

METHODS = ("lora",)
"""The adapter methods ``[train.peft] method`` accepts ("" = full fine-tuning)."""

BIASES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class PeftConfig:
    """``[train.peft]``: the LoRA adapters clients train instead of the whole model (Hu et al.
    2022, https://arxiv.org/abs/2106.09685); the fields are those of ``peft.LoraConfig``."""

    method: str = field(
        default="",
        metadata={"doc": 'adapter method: lora | "" (full fine-tuning, the default)'},
    )
    r: int = field(default=8, metadata={"doc": "LoRA rank"})
    alpha: float = field(
        default=16.0, metadata={"doc": "LoRA alpha: the adapter's output is scaled by alpha / r"}
    )
    dropout: float = field(default=0.0, metadata={"doc": "dropout on the adapter's input"})
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "modules that get adapters: names matched as suffixes (peft's rule), "
            'e.g. ["query", "value"]'
        },
    )
    bias: str = field(
        default="none", metadata={"doc": "biases that train: none | all | lora_only (peft's)"}
    )
    use_rslora: bool = field(
        default=False,
        metadata={"doc": "rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)"},
    )
    trainable: str = field(
        default=r"(^|\.)heads?\.",
        metadata={
            "doc": "regex (re.search) of the parameters besides the adapters that train and "
            "travel; the task heads by default"
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        try:
            re.compile(self.trainable)
        except re.error as err:
            raise ValueError(
                f"trainable={self.trainable!r} is invalid: not a regular expression ({err})"
            ) from None
        rules = {
            "method": (self.method in ("", *METHODS), f'one of {", ".join(METHODS)} or ""'),
            "r": (isinstance(self.r, int) and self.r >= 1, ">= 1"),
            "alpha": (self.alpha > 0 and math.isfinite(self.alpha), "a positive number"),
            "dropout": (0.0 <= self.dropout < 1.0, "in [0, 1)"),
            "bias": (self.bias in BIASES, f"one of {', '.join(BIASES)}"),
            "target_modules": (
                not self.method or (self.target_modules and all(self.target_modules)),
                'a non-empty list of module names when method is set, e.g. ["query", "value"]',
            ),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {rule}")

    @property
    def enabled(self) -> bool:
        return bool(self.method)

    @property
    def scaling(self) -> float:
        """What the adapter's B·A is multiplied by: alpha / r (alpha / sqrt(r) with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["target_modules"] = list(self.target_modules)
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PeftConfig:
        return cls(**{k: v for k, v in raw.items() if k != "seed"})


def require_peft() -> Any:
    """The ``peft`` module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"[train.peft] needs the peft package ({err}); install it with "
            "pip install 'fedmerge[lora]'"
        ) from None
    return peft


def inject(model: nn.Module, config: PeftConfig, *, seed: int) -> nn.Module:
    """``model`` with LoRA adapters in ``config.target_modules``; everything else frozen except
    the parameters ``config.trainable`` matches. The adapters' initial values (A random, B zero,
    peft's default) are drawn from ``seed`` without touching the caller's RNG."""
    peft = require_peft()
    lora = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias=config.bias,
        use_rslora=config.use_rslora,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = peft.inject_adapter_in_model(lora, model)
        except ValueError as err:  # peft's "Target modules ... not found in the base model"
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _leaf(m)})
            raise ValueError(
                f"target_modules={list(config.target_modules)} fits no module of "
                f"{type(model).__name__} ({err}); its layer names include: "
                f"{', '.join(names[:20])}"
            ) from None
    pattern = re.compile(config.trainable)
    for name, param in model.named_parameters():
        if "lora_" not in name and pattern.search(name):
            param.requires_grad_(True)
    return model


def _leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None and any(True for _ in module.parameters())


def trainable_keys(model: nn.Module) -> list[str]:
    """The state keys that train and travel, in the model's state order."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [key for key in model.state_dict() if key in trainable]


def adapter_layout(model: nn.Module) -> tuple[LoraModule, ...]:
    """Every adapted linear layer of a peft model: its A, B and base weight keys and scaling."""
    peft = require_peft()
    layer_type = peft.tuners.lora.Linear
    modules = []
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            if not isinstance(module, layer_type) or getattr(module, "fan_in_fan_out", False):
                raise ValueError(
                    f"{name}: adapters on {type(module.get_base_layer()).__name__} layers cannot "
                    "be merged as B·A products (only nn.Linear); target linear layers only"
                )
            modules.append(
                LoraModule(
                    name=name,
                    a_key=f"{name}.lora_A.default.weight",
                    b_key=f"{name}.lora_B.default.weight",
                    base_key=f"{name}.base_layer.weight",
                    scaling=float(module.scaling["default"]),
                )
            )
    return tuple(modules)


def frozen_digest(model: nn.Module, shared: Iterable[str]) -> str:
    """BLAKE2b of every state tensor not in ``shared`` (what each process keeps from its own
    build): names, dtypes, shapes and bytes, in sorted key order."""
    skip = set(shared)
    digest = hashlib.blake2b(digest_size=16)
    for key, value in sorted(model.state_dict().items()):
        if key in skip:
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer, no copy
    return digest.hexdigest()


def load_received(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load the tensors a LoRA run sends (adapters, heads, and under the products merge the
    adapted layers' base weights) into ``model``; the rest keeps the values of its build.

    Strict about what arrives: every key must be one of the model's, with its shape, and every
    trainable tensor must be there; a ValueError names each problem."""
    expected = model.state_dict()
    problems = []
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(trainable_keys(model)) - set(state))
    if unknown:
        problems.append(f"keys the model does not have: {', '.join(unknown[:10])}")
    if missing:
        problems.append(f"missing trainable keys: {', '.join(missing[:10])}")
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"{key}: shape {tuple(state[key].shape)}, model has {tuple(expected[key].shape)}"
            )
    if problems:
        raise ValueError(
            f"state does not fit the adapted {type(model).__name__}: " + "; ".join(problems)
        )
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)


def reply_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, detached CPU copies: what a LoRA client sends back."""
    params = dict(model.named_parameters())
    return {k: params[k].detach().to("cpu", copy=True) for k in trainable_keys(model)}
