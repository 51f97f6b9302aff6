"""Named numpy arrays <-> Flower ArrayRecords, keeping the model's state_dict names.

Kept apart from the strategies so a ClientApp process, started afresh for every message in
deployment, imports nothing it does not use.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays into an ArrayRecord, keeping the names (state_dict keys)."""
    return ArrayRecord({k: to_array(v) for k, v in arrays.items()})


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def to_array(array: np.ndarray) -> Array:
    """A Flower `Array` holding exactly the bytes `Array(ndarray)` would, copied once.

    `Array(ndarray)` runs `np.save` into a BytesIO and then copies it out: two copies of
    every model the server sends or a strategy returns. Here the .npy header is made once
    per (dtype, shape) and joined to the array's buffer.
    """
    array = np.asarray(array)
    if array.dtype.hasobject:
        return Array(array)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, np.lib.format.header_data_from_array_1_0(array))
        header = _NPY_HEADERS[key] = buffer.getvalue()
    data = b"".join((header, memoryview(array).cast("B") if array.size else b""))
    return Array(dtype=str(array.dtype), shape=tuple(int(n) for n in array.shape),
                 stype="numpy.ndarray", data=data)


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


# .npy header bytes -> (dtype, shape, element count, data offset), or None where the array
# cannot be viewed (Fortran order, object dtype).
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int] | None] = {}


def array_view(array: Array) -> np.ndarray:
    """The ndarray a Flower `Array` holds, as a read-only view of its bytes.

    `Array.numpy()` goes through `np.load`, which copies: for the server, reading 1,000 CNN
    replies that way costs more than averaging them. The .npy header is parsed once per
    distinct header (one per array name and shape): a server reads every array of every
    reply, so the per-array cost is kept to a dictionary lookup (~2 us).
    """
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
        return array.numpy()
    size_bytes = 2 if data[6] == 1 else 4  # .npy v1 stores the header length in 2 bytes
    start = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    key = bytes(data[:start])
    if key not in _HEADERS:
        _HEADERS[key] = _parse_header(key)
    layout = _HEADERS[key]
    if layout is None:
        return array.numpy()
    dtype, shape, count, offset = layout
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _parse_header(key: bytes) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    header = io.BytesIO(key)
    version = np.lib.format.read_magic(header)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read(header)
    if fortran_order or dtype.hasobject:
        return None
    return dtype, shape, math.prod(shape), len(key)


def array_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named read-only views of an ArrayRecord's arrays (see `array_view`)."""
    return {k: array_view(v) for k, v in record.items()}
