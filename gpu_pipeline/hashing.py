"""The 64-bit hashes shared by the kernels, the operators and the reference model.

The CUDA/C++ kernels implement exactly these functions (``kernels/portable.cuh``); this
module is their readable definition and the slow path used by tests.

* ``hash_bytes``: FNV-1a 64 over the UTF-8 bytes, then the splitmix64 finaliser (FNV alone
  clusters badly under linear probing).
* ``session_id``: a deterministic function of (user_id, first event's ts, first event's id).
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def mix64(x: int) -> int:
    """splitmix64 finaliser: a bijection on 64-bit integers with good avalanche."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hash_bytes(data: bytes) -> int:
    """64-bit hash of a byte string (event ids are hashed over their UTF-8 bytes)."""
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return mix64(h)


def session_id(user_id: int, first_ts_ms: int, first_event_id: str) -> int:
    """The session id: unsigned 64-bit, deterministic in (user, first ts, first event id)."""
    h = mix64((user_id & MASK64) ^ 0x9E3779B97F4A7C15)
    h = mix64(h ^ (first_ts_ms & MASK64))
    return mix64(h ^ hash_bytes(first_event_id.encode("utf-8")))
