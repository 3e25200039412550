"""fedmerge: federated model merging on Flower and Ray.

The public API. Aggregators, tasks and configs import only torch; ``run``, ``resume`` and
``compare`` load Flower and Ray on first use, so ``import fedmerge`` stays light::

    import fedmerge

    config = fedmerge.load_config("experiments/fashion_mnist_fedavg.toml", ["federation.num_rounds=3"])
    outcome = fedmerge.run(config)

The subpackages are ``fedmerge.aggregators`` (server-side merges, no flwr or ray),
``fedmerge.clients`` (tasks, partitioners, local training, the ClientApp) and
``fedmerge.federation`` (config, strategy, Ray actors, runner, results).
"""

from __future__ import annotations

import os as _os
from importlib import metadata as _metadata
from typing import Any

# A wheel installs the subpackages inside this folder. In a source tree (a checkout, or the
# working_dir a Ray Job uploads) they sit beside it, at the repository root, so that is where
# this package looks for them.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "federation")) and _os.path.isfile(
    _os.path.join(_root, "federation", "__init__.py")
):
    __path__.append(_root)  # noqa: F821  (a package's __path__)

from fedmerge.aggregators import (  # noqa: E402
    AggregateResult,
    Aggregator,
    ClientUpdate,
    RoundContext,
    available,
    create_aggregator,
    merge_function,
    register,
)
from fedmerge.clients.tasks import Task, available_tasks, get_task, register_task  # noqa: E402
from fedmerge.federation.config import ConfigError, ExperimentConfig, load_config, parse_config  # noqa: E402

try:
    __version__ = _metadata.version("fedmerge")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "run": ("fedmerge.federation.runner", "run_experiment"),
    "resume": ("fedmerge.federation.runner", "resume_experiment"),
    "compare": ("fedmerge.federation.runner", "compare"),
    "RunDir": ("fedmerge.federation.results", "RunDir"),
    "load_served": ("fedmerge.federation.served", "load_served"),
    "RoundCallback": ("fedmerge.federation.callbacks", "RoundCallback"),
}


def __getattr__(name: str) -> Any:
    """``run``, ``resume``, ``compare``, ``RunDir``, ``load_served`` and ``RoundCallback`` import
    Flower and Ray."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedmerge' has no attribute {name!r}")


__all__ = [
    "AggregateResult",
    "Aggregator",
    "ClientUpdate",
    "ConfigError",
    "ExperimentConfig",
    "RoundCallback",
    "RoundContext",
    "RunDir",
    "Task",
    "__version__",
    "available",
    "available_tasks",
    "compare",
    "create_aggregator",
    "get_task",
    "load_config",
    "load_served",
    "merge_function",
    "parse_config",
    "register",
    "register_task",
    "resume",
    "run",
]
