"""The local training loop a client runs each round, evaluation, and state-dict plumbing.

``train`` is deterministic: with the same model weights, data, config and seed it produces
bit-identical weights and metrics (on CPU, with the same thread count). Aggregators that need a
client-side term (WSA's regulariser, FedProx's proximal term) pass it as a ``LossTerm``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedmerge.clients.adapters import PeftConfig
from fedmerge.clients.tasks.base import ArrayData, Task

__all__ = ["LossTerm", "TrainConfig", "evaluate", "get_state", "set_state", "train"]

# An extra differentiable term added to the task loss at every step, computed from the model.
LossTerm = Callable[[nn.Module], torch.Tensor]

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings; ``momentum`` applies to SGD only (Adam keeps its betas)."""

    local_epochs: int = field(
        default=1, metadata={"doc": "local epochs per round on each sampled client"}
    )
    batch_size: int = field(default=32, metadata={"doc": "local mini-batch size"})
    lr: float = field(default=0.05, metadata={"doc": "local learning rate"})
    momentum: float = field(default=0.9, metadata={"doc": "SGD momentum (sgd only)"})
    weight_decay: float = field(
        default=0.0, metadata={"doc": "L2 weight decay of the local optimizer"}
    )
    optimizer: str = field(default="sgd", metadata={"doc": "local optimizer: sgd | adam"})
    trainable: str = field(
        default="",
        metadata={
            "doc": "regular expression: only parameters whose names it "
            "matches (re.search) train, the rest stay frozen; "
            "empty = all"
        },
    )
    peft: PeftConfig = field(
        default_factory=PeftConfig,
        metadata={"doc": "LoRA adapters instead of full fine-tuning (peft)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.peft, Mapping):  # as it crosses processes, in the run config
            object.__setattr__(self, "peft", PeftConfig.from_dict(self.peft))
        try:
            re.compile(self.trainable)
        except re.error as err:
            raise ValueError(
                f"trainable={self.trainable!r} is invalid: not a regular expression ({err})"
            ) from None
        if self.peft.enabled and self.trainable:
            raise ValueError(
                f"trainable={self.trainable!r} is invalid with [train.peft]: the adapters train, "
                "and peft.trainable names what else does (the heads by default)"
            )
        checks = {
            "local_epochs": self.local_epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "momentum": 0.0 <= self.momentum < 1.0,
            "weight_decay": self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            "optimizer": self.optimizer in OPTIMIZERS,
        }
        rules = {
            "local_epochs": ">= 1",
            "batch_size": ">= 1",
            "lr": "a positive number",
            "momentum": "in [0, 1)",
            "weight_decay": ">= 0",
            "optimizer": f"one of {', '.join(OPTIMIZERS)}",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is invalid: must be {rules[name]}"
                )


def _trainable_parameters(model: nn.Module, cfg: TrainConfig) -> list[nn.Parameter]:
    """The parameters ``cfg.trainable`` selects (all when empty); the others get requires_grad
    False, so they keep their weights exactly. Selecting none is a ValueError. Under
    ``[train.peft]`` the adapted model says what trains (``requires_grad``, set when the adapters
    were injected)."""
    if cfg.peft.enabled:
        return [p for p in model.parameters() if p.requires_grad]
    if not cfg.trainable:
        return list(model.parameters())
    pattern = re.compile(cfg.trainable)
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(name)))
        if p.requires_grad:
            chosen.append(p)
    if not chosen:
        raise ValueError(
            f"train.trainable={cfg.trainable!r} matches no parameter of {type(model).__name__}"
        )
    return chosen


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = _trainable_parameters(model, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _batch(
    task: Task, data: ArrayData, index: np.ndarray, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` (copied out of the possibly memory-mapped arrays) as model inputs, targets."""
    inputs = task.preprocess(data.x[index]).to(device)
    targets = torch.from_numpy(np.asarray(data.y[index], dtype=np.int64)).to(device)
    return inputs, targets


def train(
    model: nn.Module,
    task: Task,
    data: ArrayData,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    loss_terms: Sequence[LossTerm] = (),
) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs over ``data``.

    Each epoch visits every example once in an order drawn from a generator seeded with
    ``seed``; torch's global RNG (dropout, say) is seeded too, inside a fork, so the caller's
    RNG state is untouched. The optimised objective is the task loss plus ``loss_terms``.

    Returns metrics of the last epoch: ``train_loss`` (the task loss alone, without the extra
    terms, so runs with and without them compare) and ``train_accuracy``, both averaged over its
    examples as the weights changed, ``num_examples`` (= len(data), one epoch's examples) and
    ``local_steps``, the optimizer steps taken (K of SCAFFOLD's control-variate update).
    """
    n = len(data)
    if n == 0:
        raise ValueError("train() got an empty data set: a client needs at least one example")
    model.to(device).train()
    optimizer = _optimizer(model, cfg)
    order_rng = torch.Generator().manual_seed(seed)
    cuda_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    steps = 0
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for _ in range(cfg.local_epochs):
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            order = torch.randperm(n, generator=order_rng).numpy()
            for start in range(0, n, cfg.batch_size):
                inputs, targets = _batch(task, data, order[start : start + cfg.batch_size], device)
                outputs = model(inputs)
                task_loss = task.loss(outputs, targets)
                objective = task_loss
                for term in loss_terms:
                    objective = objective + term(model)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                steps += 1
                loss_sum += task_loss.detach().double() * len(targets)
                correct += (outputs.detach().argmax(dim=1) == targets).sum()
    return {
        "train_loss": loss_sum.item() / n,
        "train_accuracy": correct.item() / n,
        "num_examples": float(n),
        "local_steps": float(steps),
    }


def evaluate(
    model: nn.Module,
    task: Task,
    data: ArrayData,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean task loss and accuracy of ``model`` over ``data`` (eval mode, no gradients).

    ``channels_last`` stores the model and image batches (4-D inputs) as NHWC, where the CPU's
    convolutions and max-pooling are vectorised over channels (about twice as fast for the
    Fashion-MNIST CNN on one thread); it converts ``model``'s parameters in place.
    """
    n = len(data)
    if n == 0:
        raise ValueError("evaluate() got an empty data set")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be >= 1")
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            inputs, targets = _batch(
                task, data, np.arange(start, min(start + batch_size, n)), device
            )
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            outputs = model(inputs)
            loss_sum += task.loss(outputs, targets).double() * len(targets)
            correct += (outputs.argmax(dim=1) == targets).sum()
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "num_examples": float(n)}


def get_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers as detached CPU copies (safe to ship or keep)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def set_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly: the same keys and shapes, or a ValueError that
    names every missing key, unexpected key and shape mismatch."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(state)):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: expected a torch.Tensor, got {type(value).__name__}")
        elif value.shape != expected[key].shape:
            problems.append(
                f"{key}: shape {tuple(value.shape)}, model has {tuple(expected[key].shape)}"
            )
    if problems:
        raise ValueError(f"state does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
