"""An in-memory stand-in for the part of the Engine API that TaskStore uses.

A dict, sorted iteration and batch buffering; one "WAL record" per put, delete
or batch, counted in ``stats()["wal_records"]``. Not durable, not a model of
the engine beyond that API subset.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from typing import Any


class FakeBatch:
    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine
        self._ops: list[tuple[bytes, bytes | None]] = []
        self.lsn: int | None = None

    def put(self, key: bytes, value: bytes) -> None:
        self._ops.append((FakeEngine._key(key), bytes(value)))

    def delete(self, key: bytes) -> None:
        self._ops.append((FakeEngine._key(key), None))

    def __enter__(self) -> FakeBatch:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.lsn = self._engine._apply(self._ops, batch=True)


class FakeEngine:
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []  # sorted
        self._lsn = 0
        self._mutex = threading.Lock()
        self._stats = {"puts": 0, "deletes": 0, "batches": 0, "wal_records": 0}

    @staticmethod
    def _key(key: bytes) -> bytes:
        key = bytes(key)
        if not 1 <= len(key) <= 511:
            raise ValueError("a key is 1..511 bytes")
        return key

    def _apply(self, ops: list[tuple[bytes, bytes | None]], batch: bool = False) -> int:
        with self._mutex:
            for key, value in ops:
                if value is None:
                    self._stats["deletes"] += 1
                    if key in self._data:
                        del self._data[key]
                        self._keys.pop(bisect.bisect_left(self._keys, key))
                else:
                    self._stats["puts"] += 1
                    if key not in self._data:
                        bisect.insort(self._keys, key)
                    self._data[key] = value
            self._stats["batches"] += batch
            self._stats["wal_records"] += 1
            self._lsn += 1
            return self._lsn

    def put(self, key: bytes, value: bytes) -> int:
        return self._apply([(self._key(key), bytes(value))])

    def delete(self, key: bytes) -> int:
        return self._apply([(self._key(key), None)])

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        return self._data.get(bytes(key), default)

    def __contains__(self, key: bytes) -> bool:
        return bytes(key) in self._data

    def items(self, start: bytes | None = None,
              stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        with self._mutex:
            lo = 0 if start is None else bisect.bisect_left(self._keys, bytes(start))
            hi = len(self._keys) if stop is None else bisect.bisect_left(self._keys, bytes(stop))
            snapshot = [(k, self._data[k]) for k in self._keys[lo:hi]]
        return iter(snapshot)

    def batch(self) -> FakeBatch:
        return FakeBatch(self)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def close(self) -> None:
        pass
