"""Server-side merges as plain PyTorch: the Aggregator contract, the registry and the built-ins.

Importing this package registers the built-in algorithms; it never imports flwr or ray.
"""

if __name__ != "fedmerge.aggregators":  # the repository root is on sys.path in a checkout
    raise ImportError(f"import this package as fedmerge.aggregators, not {__name__}")

from fedmerge.aggregators.base import AggregateResult, Aggregator, ClientUpdate, RoundContext
from fedmerge.aggregators.registry import (
    available,
    create_aggregator,
    get_aggregator_class,
    merge_function,
    register,
)

# The built-in algorithms register themselves on import.
from fedmerge.aggregators import fedavg, fedprox, wsa  # noqa: E402, F401  isort: skip
from fedmerge.aggregators import simple_average, smile, task_arithmetic, ties, wemoe  # noqa: E402, F401  isort: skip
from fedmerge.aggregators import bulyan, feddrl, krum, median, trimmed_mean  # noqa: E402, F401  isort: skip
from fedmerge.aggregators import fedadagrad, fedadam, fedavgm, fedyogi  # noqa: E402, F401  isort: skip
from fedmerge.aggregators import isotropic, qfedavg, tsv  # noqa: E402, F401  isort: skip
from fedmerge.aggregators import dp  # noqa: E402, F401  isort: skip
from fedmerge.aggregators import scaffold  # noqa: E402, F401  isort: skip

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
