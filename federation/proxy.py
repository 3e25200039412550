"""The server's unlabelled proxy inputs (WEMoE's router training data), per task.

``data.proxy_inputs = "test"`` takes the test split's inputs (WEMoE's transductive setting);
``"held_out"`` draws ``data.proxy_size`` examples of each task out of the training data before it
is partitioned, so that no client holds them. Their labels are never used.
"""

from __future__ import annotations

import numpy as np

from fedmerge.clients.tasks.base import ArrayData, Task

__all__ = ["PROXY_SALT", "proxy_inputs", "proxy_split"]

PROXY_SALT = 0x9E0
"""Separates the proxy hold-out's random draw from the server validation set's (same seed)."""


def proxy_split(
    task: Task, train: ArrayData, test: ArrayData, *, source: str, size: int, seed: int
) -> tuple[ArrayData, ArrayData]:
    """(training data left for the clients, data whose inputs are the server's proxy inputs).

    ``source = "test"``: the test split (WEMoE's transductive setting), training data untouched.
    ``source = "held_out"``: ``size`` examples of each task drawn (seeded) out of ``train``,
    before it is partitioned, so that no client holds them; their labels are never used.
    """
    if source == "test":
        return train, test
    if source != "held_out":
        raise ValueError(f"data.proxy_inputs={source!r} is invalid: must be 'test' or 'held_out'")
    if size < 1:
        raise ValueError(
            f"data.proxy_size={size!r} is invalid: held_out proxy inputs need a size >= 1"
        )
    from fedmerge.federation.scoring import hold_out  # imports Ray, which the rest does not need

    groups = task.task_index(train.x)
    return hold_out(train, size, seed, groups=groups, key="data.proxy_size", salt=PROXY_SALT)


def proxy_inputs(task: Task, data: ArrayData) -> dict[int, np.ndarray]:
    """The server's unlabelled inputs per task index (one task: all under 0)."""
    groups = task.task_index(data.x)
    if groups is None:
        return {0: data.x}
    return {int(t): data.x[groups == t] for t in np.unique(groups)}
