"""Conversions between Flower's ArrayRecord, NumPy and torch, without needless copies.

A Flower ``Array`` holds the bytes of ``np.save``: a short header, then the raw buffer. Parsing
the header and viewing the rest with ``np.frombuffer`` gives a read-only array over the message's
own bytes, where ``Array.numpy()`` would copy them through ``np.load``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["array_view", "record_to_numpy", "state_to_record", "to_numpy_state", "to_torch_state"]


def array_view(array: Array) -> np.ndarray:
    """A zero-copy, read-only NumPy view of a Flower Array's ``np.save`` bytes."""
    data = array.data
    header = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(header)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(header)
    if dtype.hasobject:
        raise ValueError("object arrays are refused: they would need unpickling")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=header.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array_view(arr) for key, arr in record.items()}


def state_to_record(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """ArrayRecord from a state dict of tensors or arrays (one serialisation copy, as Flower does)."""
    return ArrayRecord(array_dict={
        key: Array.from_numpy_ndarray(np.asarray(_as_numpy(value), order="C"))
        for key, value in state.items()
    })


def to_numpy_state(state: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    return {key: _as_numpy(value) for key, value in state.items()}


def to_torch_state(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors sharing memory with the arrays (read-only arrays included: callers must not write)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: torch.from_numpy(np.asarray(value)) for key, value in state.items()}


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
