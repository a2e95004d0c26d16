"""Flower ``Array`` ↔ numpy without writing or re-parsing the ``.npy`` header of every array.

Flower keeps each array as ``.npy`` bytes and ``Array.numpy()`` runs ``np.load``, which parses
the header with ``ast.literal_eval``: ≈ 20 µs per array, so a server reading 1,000 replies of
a 12-tensor model twice a round spent ≈ 0.5 s on headers alone (BENCHMARKS.md, population
scale). Here the header is compared byte for byte with the one ``np.save`` writes for the
array's declared dtype and shape (made once per dtype and shape); when they are equal and the
dtype is a plain number the values are read in place, otherwise (another header, a Fortran
order, a structured or subarray dtype) numpy reads it, after its header was checked against
the payload's length. Either way the result is what ``np.load`` reads, so a reply cannot be
validated as one array and aggregated as another.

The other way, ``state_record`` writes the bytes ``np.save`` would, with the header made once
per dtype and shape, and builds each ``Array`` once: Flower's ``ArrayRecord(state_dict)`` runs
``np.save`` per tensor and then copies every ``Array`` it made (``from_array_dict``), ≈ 0.3 ms
per reply of the 12-tensor HSTU, paid for every client of a cohort node.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY = "numpy.ndarray"  # Flower's SType.NUMPY


@functools.lru_cache(maxsize=256)
def _header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``
    (what it writes for zeros of that kind, less the values)."""
    zeros = np.zeros(shape, dtype=dtype)
    buffer = io.BytesIO()
    np.save(buffer, zeros, allow_pickle=False)
    return buffer.getvalue()[: buffer.tell() - zeros.nbytes]


def array_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, read in place (read-only) when its header is the canonical one for a
    plain numeric dtype; raises ``ValueError`` for bytes that are not one whole array (checked
    before anything is allocated, so a forged header cannot make the reader allocate more
    than the payload holds)."""
    try:
        dtype = np.dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
    except (TypeError, ValueError):
        return _checked_load(array)
    data = array.data
    plain = dtype.kind in "biuf" and dtype.subdtype is None and dtype == np.dtype(dtype.str)
    size = dtype.itemsize * math.prod(shape)
    if array.stype != NUMPY or not plain or min(shape, default=0) < 0 or size > len(data):
        return _checked_load(array)
    header = _header(dtype.str, shape)
    if len(data) != len(header) + size or not data.startswith(header):
        return _checked_load(array)
    return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)


def _checked_load(array: Array) -> np.ndarray:
    """``array.numpy()`` once its ``.npy`` header (numpy's own parser) says the payload holds
    exactly one array of a dtype without objects."""
    if array.stype != NUMPY:
        raise ValueError(f"an array of type {array.stype!r}, not {NUMPY!r}")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(stream)
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise ValueError(f"not a .npy array: {err}") from err
    if dtype.hasobject or min(shape, default=0) < 0:
        raise ValueError(f"a .npy array of {dtype}{shape} is not accepted")
    if len(array.data) - stream.tell() != dtype.itemsize * math.prod(shape):
        raise ValueError(f"the payload is not one {dtype}{shape} array")
    return array.numpy()


def record_numpy(record: ArrayRecord) -> list[np.ndarray]:
    """``record.to_numpy_ndarrays()`` through ``array_numpy``."""
    return [array_numpy(array) for array in record.values()]


def state_record(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """``ArrayRecord(state)`` (the same keys, dtypes, shapes and ``.npy`` bytes), built without
    ``np.save``: the canonical header and the C-ordered values."""
    record = ArrayRecord()
    for key, value in state.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a scalar 1-d)
            array = array.copy(order="C")
        data = _header(array.dtype.str, array.shape) + array.tobytes()
        record[key] = Array(
            dtype=str(array.dtype), shape=tuple(array.shape), stype=NUMPY, data=data
        )
    return record
