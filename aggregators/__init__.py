"""Server-side merges as plain PyTorch: the Aggregator contract, the registry and the built-ins.

Importing this package registers the built-in algorithms; it never imports flwr or ray.
"""

from aggregators.base import AggregateResult, Aggregator, ClientUpdate, RoundContext
from aggregators.registry import (
    available,
    create_aggregator,
    get_aggregator_class,
    merge_function,
    register,
)

# The built-in algorithms register themselves on import.
from aggregators import fedavg, fedprox, wsa  # noqa: E402, F401  isort: skip
from aggregators import simple_average, smile, task_arithmetic, ties, wemoe  # noqa: E402, F401  isort: skip
from aggregators import feddrl, krum, median, trimmed_mean  # noqa: E402, F401  isort: skip

__all__ = [
    "AggregateResult",
    "Aggregator",
    "ClientUpdate",
    "RoundContext",
    "available",
    "create_aggregator",
    "get_aggregator_class",
    "merge_function",
    "register",
]
