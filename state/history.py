"""Fixed-size binary records of a user's recent history: a few bytes per event.

One record = the item's codebook codes and α (``bytes_per_item``), the scenario and action ids (one byte
each) and the event time (float64).  With 3 layers of 256 codewords that is 16 bytes an event, against
4 × d bytes for a raw float32 item vector.
"""

from __future__ import annotations

import numpy as np


def record_dtype(code_bytes: int) -> np.dtype:
    return np.dtype([("code", np.uint8, (code_bytes,)), ("scenario", np.uint8), ("action", np.uint8), ("ts", "<f8")])


def pack(code_records: np.ndarray, scenario: np.ndarray, action: np.ndarray, ts: np.ndarray) -> bytes:
    """``code_records`` (n, code_bytes) uint8 → n packed records."""
    out = np.empty(len(ts), dtype=record_dtype(code_records.shape[1]))
    out["code"], out["scenario"], out["action"], out["ts"] = code_records, scenario, action, ts
    return out.tobytes()


def unpack(blob: bytes, code_bytes: int) -> np.ndarray:
    """Structured array with fields code, scenario, action, ts (in the order applied)."""
    dt = record_dtype(code_bytes)
    if len(blob) % dt.itemsize:
        raise ValueError(f"history blob of {len(blob)} bytes is not a whole number of {dt.itemsize}-byte records")
    return np.frombuffer(blob, dtype=dt)
