"""The names this module held before it was split by concern; import from where they live now.

- ``fedmerge.federation.served``: served models of upscaling aggregators (SMILE, WEMoE), their
  spec and weights in transit, ``build_served``, ``save_served``, ``load_served``;
- ``fedmerge.federation.proxy``: the server's unlabelled proxy inputs (``proxy_split``,
  ``proxy_inputs``);
- ``fedmerge.federation.evaluation``: scoring, per task for multi-task data
  (``evaluate_per_task``, ``ModelScorer``).
"""

from __future__ import annotations

from fedmerge.federation.evaluation import evaluate_per_task
from fedmerge.federation.proxy import PROXY_SALT, proxy_inputs, proxy_split
from fedmerge.federation.served import (
    FORMAT,
    ServedModelError,
    build_served,
    load_served,
    save_served,
    served_spec,
)

__all__ = [
    "FORMAT",
    "PROXY_SALT",
    "ServedModelError",
    "build_served",
    "evaluate_per_task",
    "load_served",
    "proxy_inputs",
    "proxy_split",
    "save_served",
    "served_spec",
]
