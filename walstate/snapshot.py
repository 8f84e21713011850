"""Everything LMDB: the checkpointed state and its metadata. The one place
where ``lmdb.Error`` is translated.

Two named databases: ``data`` (user keys -> values) and ``meta``:
``checkpoint`` (the last complete checkpoint: LSN, system_id, id, reason,
times; JSON prefixed by its CRC32C) and ``fold`` (progress of a checkpoint
being folded in chunks; informational: replay always starts after the
``checkpoint`` LSN, and re-applying records is idempotent).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from collections.abc import Iterator

import lmdb

from .errors import (
    CorruptionError,
    DiskFullError,
    EngineFailedError,
    MismatchError,
    WalStateError,
)
from .layout import FORMAT_VERSION, fsync_dir
from .wal import crc32c

_CRC = struct.Struct("<I")
META_CHECKPOINT = b"checkpoint"
META_FOLD = b"fold"
LOW_SPACE = 4 * 1024 * 1024  # below this much free space an LMDB EIO is a full disk


def encode_meta(meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    return _CRC.pack(crc32c(body)) + body


def decode_meta(raw: bytes, where: str) -> dict:
    if len(raw) < 4 or _CRC.unpack_from(raw)[0] != crc32c(raw[4:]):
        raise CorruptionError(f"snapshot metadata checksum mismatch in {where}", path=where)
    try:
        return json.loads(raw[4:])
    except ValueError as exc:
        raise CorruptionError(f"snapshot metadata unreadable in {where}: {exc}",
                              path=where) from None


class Snapshot:
    """The LMDB environment under DIR/snapshot."""

    def __init__(self, path: str, *, map_size: int, read_only: bool, create: bool) -> None:
        """A read-only snapshot is opened without LMDB's lock file, so that it changes
        no byte on disk; it then has no reader slot, and a writer in another
        process may recycle the pages of a read once it has committed two more
        transactions. Reads therefore validate themselves: a read whose
        transaction fell two or more behind the writer is retried (get) or
        refused (items), never returned."""
        self.path = path
        self.read_only = read_only
        data_file = os.path.join(path, "data.mdb")
        if not create and not os.path.exists(data_file):
            raise CorruptionError(f"the snapshot {data_file} is missing: the directory was "
                                  "initialised, so walstate will not start it empty",
                                  path=data_file)
        if create:
            os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(
                path, map_size=map_size, subdir=True, max_dbs=2, readonly=read_only,
                lock=not read_only, sync=True, metasync=True, writemap=False,
                create=create, readahead=False, meminit=False, max_readers=512)
        except lmdb.Error as exc:
            raise self._translate(exc, "opening the snapshot") from None
        if create:
            fsync_dir(path)  # LMDB does not fsync its directory
        self.data = self.env.open_db(b"data", create=not read_only)
        self.metadb = self.env.open_db(b"meta", create=not read_only)
        # readers register here so that growing the map can wait for them
        self._readers: set[object] = set()
        self._resizing = False
        self._resize_cv = threading.Condition()

    # ---- errors ----------------------------------------------------------
    def _translate(self, exc: BaseException, what: str) -> Exception:
        """The walstate error for an LMDB failure."""
        msg = f"{what} ({self.path}): {exc}"
        if isinstance(exc, lmdb.ReadonlyError):
            return PermissionError(errno.EACCES, msg, self.path)
        if isinstance(exc, (lmdb.DiskError, lmdb.Error)) and self._disk_is_full():
            return DiskFullError(f"{msg}; the disk is full: free some space (nothing "
                                 "acknowledged is lost)", self.path)
        if isinstance(exc, lmdb.CorruptedError | lmdb.InvalidError | lmdb.VersionMismatchError):
            return CorruptionError(msg, path=self.path)
        text = str(exc)
        if "Permission denied" in text:
            return PermissionError(errno.EACCES, msg, self.path)
        if "No space left" in text:
            return DiskFullError(msg, self.path)
        return EngineFailedError(f"{msg}; durability of the snapshot is unknown")

    def _disk_is_full(self) -> bool:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < LOW_SPACE

    # ---- metadata --------------------------------------------------------
    def meta(self) -> dict | None:
        """The last complete checkpoint's metadata (checksum verified), or None."""
        with self.env.begin(db=self.metadb) as txn:
            raw = txn.get(META_CHECKPOINT)
        return None if raw is None else decode_meta(raw, self.path)

    def check_meta(self, system_id: int) -> dict:
        meta = self.meta()
        if meta is None:
            raise CorruptionError(f"the snapshot in {self.path} has no checkpoint metadata",
                                  path=self.path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise MismatchError(f"the snapshot in {self.path} has format version "
                                f"{meta.get('format_version')}; this walstate reads "
                                f"{FORMAT_VERSION}")
        if meta.get("system_id") != system_id:
            raise MismatchError(f"the snapshot in {self.path} belongs to system_id "
                                f"{meta.get('system_id')}, the directory to {system_id}")
        return meta

    # ---- reading ---------------------------------------------------------
    def enter(self) -> object:
        """Registers a reader; pair with leave(). Waits while the map grows."""
        tok = object()
        self._readers.add(tok)
        if self._resizing:
            self._readers.discard(tok)
            with self._resize_cv:
                while self._resizing:
                    self._resize_cv.wait()
            self._readers.add(tok)
        return tok

    def leave(self, tok: object) -> None:
        self._readers.discard(tok)

    def get(self, key: bytes) -> bytes | None:
        if self.read_only:
            return self._get_validated(key)
        tok = self.enter()
        try:
            with self.env.begin(db=self.data) as txn:
                return txn.get(key)
        finally:
            self._readers.discard(tok)

    def _still_valid(self, txnid: int) -> bool:
        """True if pages seen by read transaction ``txnid`` cannot have been recycled
        by a writer that does not know about us (see __init__)."""
        return self.env.info()["last_txnid"] <= txnid + 1

    def _get_validated(self, key: bytes) -> bytes | None:
        for _ in range(100):
            with self.env.begin(db=self.data) as txn:
                tid = txn.id()
                value = txn.get(key)
            if self._still_valid(tid):
                return value
        raise WalStateError(f"read-only read of {self.path}: the writer kept recycling pages "
                            "under the read; retry")

    def items(self, start: bytes | None, stop: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """Key-ordered (key, value) in [start, stop) from one read transaction.

        The transaction (and the reader registration) is taken at the first
        next() call; callers that need it taken now call begin_items().
        """
        tok, txn = self.begin_items()
        return self._iter(tok, txn, start, stop)

    def begin_items(self) -> tuple[object, lmdb.Transaction]:
        tok = self.enter()
        try:
            return tok, self.env.begin(db=self.data, buffers=False)
        except BaseException:
            self.leave(tok)
            raise

    def _iter(self, tok: object, txn: lmdb.Transaction, start: bytes | None,
              stop: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        try:
            cur = txn.cursor()
            ok = cur.set_range(start) if start is not None else cur.first()
            if not self.read_only:
                while ok:
                    k = cur.key()
                    if stop is not None and k >= stop:
                        break
                    yield k, cur.value()
                    ok = cur.next()
                return
            # read-only: read a chunk, check it could not have been recycled, yield it
            tid = txn.id()
            while ok:
                chunk = []
                while ok and len(chunk) < 256:
                    k = cur.key()
                    if stop is not None and k >= stop:
                        ok = False
                        break
                    chunk.append((k, cur.value()))
                    ok = cur.next()
                if not self._still_valid(tid):
                    raise WalStateError(
                        f"read-only scan of {self.path}: a writer in another process changed "
                        "the snapshot under the scan (a read-only open holds no LMDB reader "
                        "slot); run the scan again")
                yield from chunk
        finally:
            txn.abort()
            self.leave(tok)

    def entries(self) -> int:
        with self.env.begin(db=self.data) as txn:
            return txn.stat(self.data)["entries"]

    def size_bytes(self) -> int:
        """Bytes of the snapshot file in use (pages up to the last one)."""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def file_bytes(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            return 0

    # ---- writing ---------------------------------------------------------
    def write(self, items: list[tuple[bytes, bytes | None]], meta: dict[bytes, dict]) -> None:
        """One durable LMDB transaction: puts/deletes (value None) and metadata.

        Grows the map when it is full. Raises DiskFullError / EngineFailedError.
        """
        for _attempt in range(20):
            try:
                with self.env.begin(write=True) as txn:
                    if items:
                        cur = txn.cursor(db=self.data)
                        for k, v in items:
                            if v is None:
                                if cur.set_key(k):
                                    cur.delete()
                            else:
                                cur.put(k, v)
                    for mk, mv in meta.items():
                        txn.put(mk, encode_meta(mv), db=self.metadb)
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                raise self._translate(exc, "writing the snapshot") from None
        raise EngineFailedError(f"writing the snapshot ({self.path}): the map kept filling up")

    def _grow(self) -> None:
        new = self.env.info()["map_size"] * 2
        with self._resize_cv:
            self._resizing = True
        try:
            deadline = time.monotonic() + 10.0
            while self._readers:
                if time.monotonic() > deadline:
                    # not a failure of the engine: the checkpoint keeps its WAL and
                    # is retried later
                    raise WalStateError(
                        f"growing the snapshot map ({self.path}): readers (open items() "
                        "iterators) did not finish within 10 s; the checkpoint is retried "
                        "later")
                time.sleep(0.001)
            try:
                self.env.set_mapsize(new)
            except lmdb.Error as exc:
                raise self._translate(exc, "growing the snapshot map") from None
        finally:
            with self._resize_cv:
                self._resizing = False
                self._resize_cv.notify_all()

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def close(self) -> None:
        self.env.close()
