"""The fine-tuned client models of a one-shot table, cached as safetensors + a JSON index.

Shared by smile_text_table.py and lora_table.py: every table re-runs from the same client models,
and loading the cache runs no code (no pickle).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedmerge.aggregators import ClientUpdate


def load_client_models(cache: Path, label: str) -> tuple[list[ClientUpdate], list[float]] | None:
    """The cached (updates, seconds to train each) of ``label``, or None when there are none."""
    index = cache / f"{label}.json"
    if not index.is_file():
        return None
    meta = json.loads(index.read_text())
    updates = [
        ClientUpdate(
            c["client_id"],
            load_file(str(cache / c["file"])),
            c["num_examples"],
            {"task_id": c["task_id"]},
        )
        for c in meta["clients"]
    ]
    return updates, meta["seconds"]


def save_client_models(
    cache: Path, label: str, updates: Sequence[ClientUpdate], seconds: Sequence[float]
) -> None:
    """Write ``updates`` (one safetensors file each) and the index ``load_client_models`` reads."""
    cache.mkdir(parents=True, exist_ok=True)
    clients = []
    for u in updates:
        name = f"{label}-client{u.client_id}.safetensors"
        save_file({k: v.contiguous() for k, v in u.state.items()}, str(cache / name))
        clients.append(
            {
                "client_id": u.client_id,
                "file": name,
                "num_examples": u.num_examples,
                "task_id": u.metrics["task_id"],
            }
        )
    (cache / f"{label}.json").write_text(json.dumps({"clients": clients, "seconds": list(seconds)}))
