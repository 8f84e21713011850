"""Payload encodings of WAL records (docs/FORMAT.md, "Payloads").

The C layer frames records (header, CRC, LSN); this module only encodes and
decodes what is inside a record: PUT = u16 key length | key | value,
DELETE = key, BATCH = u32 count, then per operation u8 op | u16 key length |
u32 value length | key | value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ._native import lib, speedups

PUT = lib.WAL_TYPE_PUT
DELETE = lib.WAL_TYPE_DELETE
BATCH = lib.WAL_TYPE_BATCH
IGNORABLE = lib.WAL_TYPE_IGNORABLE
SHUTDOWN = lib.WAL_TYPE_SHUTDOWN  # written by a clean close: no LSN was handed out after it
SESSION = lib.WAL_TYPE_SESSION    # written (and synced) by a writable open: the log is in use

MAX_KEY = lib.WAL_MAX_KEY
MAX_VALUE = lib.WAL_MAX_VALUE
MAX_RECORD = lib.WAL_REC_MAX_PAYLOAD
REC_HEADER = lib.WAL_REC_HDR_SIZE  # bytes of framing per record

_BATCH_HEAD = struct.Struct("<I")
_BATCH_OP = struct.Struct("<BHI")
OP_PUT = lib.WAL_BATCH_OP_PUT
OP_DELETE = lib.WAL_BATCH_OP_DELETE
BATCH_OP_HEADER = lib.WAL_BATCH_OP_HDR_SIZE  # bytes per operation before its key

TYPE_NAMES = {PUT: "PUT", DELETE: "DELETE", BATCH: "BATCH"}


def as_key(key: object) -> bytes:
    """``key`` as bytes, or TypeError/ValueError naming the limit."""
    if type(key) is not bytes:
        if isinstance(key, str) or not _is_buffer(key):
            raise TypeError(f"key must be bytes or a buffer, not {type(key).__name__}")
        key = bytes(memoryview(key).cast("B"))  # type: ignore[arg-type]
    n = len(key)
    if n == 0 or n > MAX_KEY:
        raise ValueError(f"key must be 1..{MAX_KEY} bytes, got {n}")
    return key  # type: ignore[return-value]


def as_bound(bound: object, name: str) -> bytes | None:
    """A range bound (``items(start=, stop=)``) as bytes: any buffer of any
    length -- a bound is compared with keys, it is not one (b"" sorts first).
    None stays None; TypeError naming ``name`` otherwise."""
    if bound is None or type(bound) is bytes:
        return bound  # type: ignore[return-value]
    if isinstance(bound, str) or not _is_buffer(bound):
        raise TypeError(f"{name} must be bytes, a buffer or None, not {type(bound).__name__}")
    return bytes(memoryview(bound).cast("B"))  # type: ignore[arg-type]


def as_value(value: object) -> bytes:
    """``value`` as bytes, or TypeError/ValueError naming the limit."""
    if type(value) is not bytes:
        if isinstance(value, str) or not _is_buffer(value):
            raise TypeError(f"value must be bytes or a buffer, not {type(value).__name__}")
        value = bytes(memoryview(value).cast("B"))  # type: ignore[arg-type]
    if len(value) > MAX_VALUE:  # type: ignore[arg-type]
        raise ValueError(f"value must be at most {MAX_VALUE} bytes (64 MiB), "
                         f"got {len(value)}")  # type: ignore[arg-type]
    return value  # type: ignore[return-value]


def _is_buffer(obj: object) -> bool:
    try:
        memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


# BATCH payload of a list of (key, value) pairs, value None a delete (in C)
encode_batch = speedups.encode_batch


def decode(rtype: int, payload: bytes) -> Iterator[tuple[bytes, bytes | None]]:
    """The (key, value-or-None) operations of a record, in order.

    Raises ValueError on a payload that does not parse (the CRC matched, so
    this means a bug or a format this version does not know).
    """
    if rtype == PUT:
        if len(payload) < 3:
            raise ValueError("PUT payload too short")
        klen = payload[0] | payload[1] << 8
        if klen == 0 or 2 + klen > len(payload):
            raise ValueError("PUT key length out of range")
        yield payload[2:2 + klen], payload[2 + klen:]
    elif rtype == DELETE:
        if not payload:
            raise ValueError("DELETE payload empty")
        yield payload, None
    elif rtype == BATCH:
        yield from _decode_batch(payload)
    elif rtype & IGNORABLE:
        return
    else:
        raise ValueError(f"unknown record type {rtype} (not marked safe to ignore)")


def _decode_batch(payload: bytes) -> Iterator[tuple[bytes, bytes | None]]:
    if len(payload) < 4:
        raise ValueError("BATCH payload too short")
    (count,) = _BATCH_HEAD.unpack_from(payload, 0)
    pos, end = 4, len(payload)
    for _ in range(count):
        if pos + 7 > end:
            raise ValueError("BATCH operation header past the end")
        op, klen, vlen = _BATCH_OP.unpack_from(payload, pos)
        pos += 7
        if op not in (OP_PUT, OP_DELETE) or klen == 0 or pos + klen + vlen > end:
            raise ValueError("BATCH operation out of range")
        key = payload[pos:pos + klen]
        pos += klen
        if op == OP_PUT:
            yield key, payload[pos:pos + vlen]
            pos += vlen
        else:
            yield key, None
    if pos != end:
        raise ValueError("BATCH payload has trailing bytes")
