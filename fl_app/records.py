"""Named numpy arrays <-> Flower ArrayRecords, keeping the model's state_dict names.

Kept apart from the strategies so a ClientApp process, started afresh for every message in
deployment, imports nothing it does not use.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays into an ArrayRecord, keeping the names (state_dict keys)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}
