"""Conversions between Flower's ArrayRecord, NumPy and torch, without needless copies.

A Flower ``Array`` holds the bytes of ``np.save``: a short header, then the raw buffer. Parsing
the header and viewing the rest with ``np.frombuffer`` gives a read-only array over the message's
own bytes, where ``Array.numpy()`` would copy them through ``np.load``.

The bytes come from the network, so the header is parsed here, defensively, rather than by
``np.lib.format`` (whose parser lets a mangled header escape as ``tokenize.TokenError`` and
accepts structured and object dtypes): every way a header or buffer can be wrong is an
``ArrayFormatError`` that names the problem.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = [
    "ArrayFormatError",
    "MAX_HEADER_BYTES",
    "array_view",
    "parse_npy_header",
    "record_to_numpy",
    "state_to_record",
    "to_numpy_state",
    "to_torch_state",
]


MAGIC = b"\x93NUMPY"
"""The first six bytes of every ``np.save`` output."""

MAX_HEADER_BYTES = 4096
"""The longest header accepted; ``np.save`` writes 128 bytes for any array a model holds."""

ARRAY_KINDS = "biufc"
"""dtype kinds a weight or buffer may have: bool, integers, floats, complex. Never object (it
needs unpickling), void or structured (their layout is not a plain buffer)."""

MAX_NDIM = 32
_HEADER_KEYS = {"descr", "fortran_order", "shape"}


class ArrayFormatError(ValueError):
    """The bytes of an ``Array`` are not a plain ``np.save`` array; the message says why."""


def parse_npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, offset of the buffer) of ``np.save`` bytes whose buffer has
    exactly the size the header declares; ``ArrayFormatError`` for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ArrayFormatError(f"array data must be bytes, got {type(data).__name__}")
    if len(data) < 10 or bytes(data[:6]) != MAGIC:
        raise ArrayFormatError("not np.save bytes (no NUMPY magic)")
    major, minor = data[6], data[7]
    if (major, minor) not in ((1, 0), (2, 0), (3, 0)):
        raise ArrayFormatError(f"unsupported .npy format version {major}.{minor}")
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    if len(data) < start:
        raise ArrayFormatError("truncated .npy header")
    header_len = int.from_bytes(data[8:start], "little")
    if header_len > MAX_HEADER_BYTES:
        raise ArrayFormatError(f".npy header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if len(data) < start + header_len:
        raise ArrayFormatError("truncated .npy header")
    try:
        text = bytes(data[start : start + header_len]).decode("utf-8" if major == 3 else "latin1")
        header = ast.literal_eval(text)
    except Exception as err:  # SyntaxError, ValueError, RecursionError, MemoryError, ...
        raise ArrayFormatError(
            f".npy header is not a Python literal ({type(err).__name__})"
        ) from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        keys = sorted(map(repr, header)) if isinstance(header, dict) else type(header).__name__
        raise ArrayFormatError(
            f".npy header must be a dict of descr, fortran_order, shape; got {keys}"
        )
    descr, fortran_order, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise ArrayFormatError(
            f"dtype {descr!r} is refused: only plain numeric dtypes are accepted"
        )
    try:
        dtype = np.dtype(descr)
    except Exception:
        raise ArrayFormatError(f"unknown dtype {descr[:40]!r}") from None
    if (
        dtype.kind not in ARRAY_KINDS
        or dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.hasobject
    ):
        raise ArrayFormatError(
            f"dtype {descr[:40]!r} is refused: only plain numeric dtypes are accepted"
        )
    if not isinstance(fortran_order, bool):
        raise ArrayFormatError(f"fortran_order must be True or False, got {fortran_order!r}")
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ArrayFormatError(
            f"shape must be a tuple of at most {MAX_NDIM} non-negative ints, got {str(shape)[:80]}"
        )
    count = 1
    for n in shape:  # Python ints: a lying shape cannot overflow
        count *= n
    offset = start + header_len
    expected = count * dtype.itemsize
    if len(data) - offset != expected:
        raise ArrayFormatError(
            f"buffer of {len(data) - offset} bytes where {dtype}{list(shape)} needs {expected}"
        )
    return shape, fortran_order, dtype, offset


def array_view(array: Array) -> np.ndarray:
    """A zero-copy, read-only NumPy view of a Flower Array's ``np.save`` bytes; ``ArrayFormatError``
    when it is not an ``Array`` of well-formed ``np.save`` bytes."""
    if not isinstance(array, Array):
        raise ArrayFormatError(f"expected a flwr Array, got {type(array).__name__}")
    data = array.data
    if not isinstance(data, bytes):
        raise ArrayFormatError(f"array data must be bytes, got {type(data).__name__}")
    shape, fortran_order, dtype, offset = parse_npy_header(data)
    count = math.prod(shape)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of an ArrayRecord as a zero-copy view; ``ArrayFormatError`` naming the key of the
    first one that is not a well-formed array (or when ``record`` is no ArrayRecord at all)."""
    if not isinstance(record, ArrayRecord):
        raise ArrayFormatError(f"expected an ArrayRecord, got {type(record).__name__}")
    out = {}
    for key, arr in record.items():
        try:
            out[key] = array_view(arr)
        except ArrayFormatError as err:
            raise ArrayFormatError(f"{str(key)[:100]}: {err}") from None
    return out


def state_to_record(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """ArrayRecord from a state dict of tensors or arrays (one serialisation copy, as Flower does)."""
    return ArrayRecord(
        array_dict={
            key: Array.from_numpy_ndarray(np.asarray(_as_numpy(value), order="C"))
            for key, value in state.items()
        }
    )


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
