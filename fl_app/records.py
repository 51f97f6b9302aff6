"""Named numpy arrays <-> Flower ArrayRecords, keeping the model's state_dict names.

Kept apart from the strategies so a ClientApp process, started afresh for every message in
deployment, imports nothing it does not use.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays into an ArrayRecord, keeping the names (state_dict keys)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def array_view(array: Array) -> np.ndarray:
    """The ndarray a Flower `Array` holds, as a read-only view of its bytes.

    `Array.numpy()` goes through `np.load`, which copies: for the server, reading 1,000 CNN
    replies that way costs more than averaging them. The .npy header is parsed once per
    distinct header (one per array name and shape).
    """
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
        return array.numpy()
    size_bytes = 2 if data[6] == 1 else 4  # .npy v1 stores the header length in 2 bytes
    start = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    key = bytes(data[:start])
    if key not in _HEADERS:
        header = io.BytesIO(key)
        version = np.lib.format.read_magic(header)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        _HEADERS[key] = read(header)
    shape, fortran_order, dtype = _HEADERS[key]
    if fortran_order or dtype.hasobject:
        return array.numpy()
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)


def array_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named read-only views of an ArrayRecord's arrays (see `array_view`)."""
    return {k: array_view(v) for k, v in record.items()}
