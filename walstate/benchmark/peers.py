"""The contenders of ``walstate bench``: walstate and the stores a Python user
would pick instead, each behind the same small face, at its honest durability.

Every store here offers ``put(k, v)`` and ``get(k)`` as plain callables (the
bound method itself where the library allows it, so that no adapter layer is
measured), ``batch(items)`` (one atomic write of many puts, durable when the
store is), ``prefill(items)`` (untimed), ``thread_put()`` (a put callable for
one more writer thread) and ``close()``.

The raw baselines (framed ``os.write`` loops) are not stores: they live in
benchmark.py as inline loops, the cheapest honest Python code.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections.abc import Callable
from typing import Any

import crc32c as _crc

Items = list[tuple[bytes, bytes]]

# The raw baselines' framing: crc32c(key+value), length, sequence number, then
# key+value. Not walstate's record format (that one lives in C alone); the
# same work per record: a checksum, a header, one buffer.
RAW_HEADER = struct.Struct("<IIQ")


def frame(seq: int, key: bytes, value: bytes) -> bytes:
    body = key + value
    return RAW_HEADER.pack(_crc.crc32c(body), len(body), seq) + body


def available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


MISSING_NOTES = {
    "rocksdict": "rocksdict not installed: RocksDB rows skipped (pip install 'walstate[bench]')",
    "plyvel": "plyvel not installed: LevelDB rows skipped (pip install 'walstate[bench]')",
}

# What each contender's acknowledgement means (docs/PERFORMANCE.md prints this).
DURABILITY = {
    "raw write+fdatasync": "os.write of framed record(s), then os.fdatasync: on disk when it "
                           "returns",
    "raw write+fdatasync, preallocated": "os.pwrite of a framed record into a zero-filled "
                                         "file, then os.fdatasync: no size change to persist",
    "raw write": "os.write of a framed record: in the OS page cache; survives a process crash, "
                 "not power loss",
    "walstate sync=always": "returns after fdatasync of the WAL (group commit); survives power "
                            "loss",
    "walstate sync=interval": "WAL flushed and fdatasynced every second by a background "
                              "thread; power loss may lose up to 1 s",
    "walstate sync=none": "WAL in a user-space buffer / page cache; the OS decides (db.sync() "
                          "forces); a process crash may lose the unflushed buffer",
    "sqlite3 WAL FULL": "journal_mode=WAL, synchronous=FULL: the WAL is fsynced at every "
                        "commit; survives power loss",
    "sqlite3 WAL NORMAL": "journal_mode=WAL, synchronous=NORMAL: fsync only at WAL "
                          "checkpoints; survives a process crash, power loss may roll back "
                          "recent commits",
    "lmdb sync": "py-lmdb sync=True: each write transaction commit is fsynced; survives power "
                 "loss",
    "lmdb nosync": "py-lmdb sync=False, metasync=False: commits reach the page cache only; a "
                   "process crash keeps them, power loss may lose them",
    "rocksdb sync": "rocksdict WriteOptions.sync=True: the WAL is fsynced before a write "
                    "returns",
    "rocksdb nosync": "rocksdict sync=False (WAL on): the WAL write reaches the page cache; "
                      "survives a process crash, not power loss",
    "leveldb sync": "plyvel put(sync=True): the log is fsynced before a write returns",
    "leveldb nosync": "plyvel put(sync=False): the log write reaches the page cache; survives a "
                      "process crash, not power loss",
}


def durability(row: str) -> str | None:
    """What the acknowledgement of the contender in ``row`` means (longest known prefix)."""
    best = max((k for k in DURABILITY if row.startswith(k)), key=len, default=None)
    return DURABILITY[best] if best else None


class Store:
    """A key-value store under test (see the module docstring)."""

    name = ""
    put: Callable[[bytes, bytes], Any]
    get: Callable[[bytes], Any]

    def prefill(self, items: Items) -> None:
        for i in range(0, len(items), 5000):
            self.batch(items[i:i + 5000])

    def batch(self, items: Items) -> None:
        raise NotImplementedError

    def thread_put(self) -> Callable[[bytes, bytes], Any]:
        return self.put

    def close(self) -> None:
        raise NotImplementedError


class WalstateStore(Store):
    def __init__(self, d: str, sync: str, **options: Any) -> None:
        import walstate

        self.name = f"walstate sync={sync}"
        self.db = walstate.open(os.path.join(d, "ws"), sync=sync, **options)
        self.put = self.db.put
        self.get = self.db.get

    def batch(self, items: Items) -> None:
        with self.db.batch() as b:
            put = b.put
            for k, v in items:
                put(k, v)

    def checkpoint(self) -> Any:
        return self.db.checkpoint()

    def close(self) -> None:
        self.db.close()

    def abandon(self) -> None:
        """Drops the engine without the shutdown checkpoint (not measured, and the
        directory is deleted next); a plain close where the test hook is gone."""
        abandon = getattr(self.db, "_abandon", None)
        if abandon is None:
            self.db.close()
        else:
            abandon()


class SqliteStore(Store):
    SQL_PUT = "INSERT OR REPLACE INTO kv VALUES (?, ?)"
    SQL_GET = "SELECT v FROM kv WHERE k = ?"

    def __init__(self, d: str, synchronous: str) -> None:
        self.name = f"sqlite3 WAL {synchronous}"
        self.path = os.path.join(d, "s.db")
        self.synchronous = synchronous
        self.con = self._connect()
        self.con.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB) "
                         "WITHOUT ROWID")
        self._extra: list[sqlite3.Connection] = []
        ex, sql_put, sql_get = self.con.execute, self.SQL_PUT, self.SQL_GET
        self.put = lambda k, v: ex(sql_put, (k, v))
        self.get = lambda k: ex(sql_get, (k,)).fetchone()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                              timeout=60.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={self.synchronous}")
        return con

    def batch(self, items: Items) -> None:
        con = self.con
        con.execute("BEGIN")
        con.executemany(self.SQL_PUT, items)
        con.execute("COMMIT")

    def thread_put(self) -> Callable[[bytes, bytes], Any]:
        con = self._connect()  # one connection per writer thread, as sqlite3 wants
        self._extra.append(con)
        ex, sql_put = con.execute, self.SQL_PUT
        return lambda k, v: ex(sql_put, (k, v))

    def close(self) -> None:
        for c in self._extra:
            c.close()
        self.con.close()


class LmdbStore(Store):
    def __init__(self, d: str, sync: bool) -> None:
        import lmdb

        self.name = "lmdb sync" if sync else "lmdb nosync"
        self.path = os.path.join(d, "lmdb")
        self.env = env = lmdb.open(self.path, map_size=4 << 30, sync=sync, metasync=sync)
        begin = env.begin

        def put(k: bytes, v: bytes) -> None:
            with begin(write=True) as txn:
                txn.put(k, v)

        def get(k: bytes) -> bytes | None:
            with begin() as txn:
                return txn.get(k)

        self.put, self.get = put, get

    def batch(self, items: Items) -> None:
        with self.env.begin(write=True) as txn:
            put = txn.put
            for k, v in items:
                put(k, v)

    def close(self) -> None:
        self.env.close()


def rocksdb_options(big_memtable: bool = False) -> Any:
    from rocksdict import Options

    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    if big_memtable:  # keep every record of a recovery run in the WAL + memtable
        opts.set_write_buffer_size(1 << 30)
        opts.set_max_total_wal_size(4 << 30)
    return opts


class RocksStore(Store):
    def __init__(self, d: str, sync: bool, big_memtable: bool = False) -> None:
        from rocksdict import Rdict, WriteOptions

        self.name = "rocksdb sync" if sync else "rocksdb nosync"
        self.db = Rdict(os.path.join(d, "rocks"), rocksdb_options(big_memtable))
        self.wo = WriteOptions()
        self.wo.sync = sync
        self.wo.disable_wal = False
        self.db.set_write_options(self.wo)
        self.put = self.db.put  # uses the write options preset above
        self.get = self.db.get

    def batch(self, items: Items) -> None:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        put = wb.put
        for k, v in items:
            put(k, v)
        self.db.write(wb, self.wo)

    def close(self) -> None:
        self.db.close()


class LevelStore(Store):
    def __init__(self, d: str, sync: bool) -> None:
        import functools

        import plyvel

        self.name = "leveldb sync" if sync else "leveldb nosync"
        self.sync = sync
        self.db = plyvel.DB(os.path.join(d, "level"), create_if_missing=True)
        # put(sync=...) is keyword-only: partial is the cheapest way to bind it
        self.put = functools.partial(self.db.put, sync=sync)
        self.get = self.db.get

    def batch(self, items: Items) -> None:
        with self.db.write_batch(sync=self.sync) as wb:
            put = wb.put
            for k, v in items:
                put(k, v)

    def close(self) -> None:
        self.db.close()


StoreFactory = Callable[[str], Store]


def factories(kind: str) -> tuple[dict[str, StoreFactory], list[str]]:
    """The stores of one durability ``kind`` ("durable" or "fast") present here,
    by contender name, and notes on the missing peers."""
    durable = kind == "durable"
    out: dict[str, StoreFactory] = {}
    if durable:
        out["walstate sync=always"] = lambda d: WalstateStore(d, "always")
        out["sqlite3 WAL FULL"] = lambda d: SqliteStore(d, "FULL")
    else:
        out["walstate sync=none"] = lambda d: WalstateStore(d, "none")
        out["walstate sync=interval"] = lambda d: WalstateStore(d, "interval")
        out["sqlite3 WAL NORMAL"] = lambda d: SqliteStore(d, "NORMAL")
    out["lmdb sync" if durable else "lmdb nosync"] = lambda d: LmdbStore(d, durable)
    notes = []
    if available("rocksdict"):
        out["rocksdb sync" if durable else "rocksdb nosync"] = lambda d: RocksStore(d, durable)
    else:
        notes.append(MISSING_NOTES["rocksdict"])
    if available("plyvel"):
        out["leveldb sync" if durable else "leveldb nosync"] = lambda d: LevelStore(d, durable)
    else:
        notes.append(MISSING_NOTES["plyvel"])
    return out, notes


def versions() -> dict[str, str]:
    """Versions of the peers present (for the report)."""
    import lmdb

    out = {"sqlite3": sqlite3.sqlite_version, "lmdb": f"py-lmdb {lmdb.__version__} "
           f"(LMDB {'.'.join(map(str, lmdb.version()))})"}
    for mod in ("rocksdict", "plyvel"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:  # noqa: BLE001 - not installed: no version to report
            pass
    return out
