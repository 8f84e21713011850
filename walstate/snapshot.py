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
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lmdb

from .codec import MAX_KEY
from .errors import (
    ConfigError,
    CorruptionError,
    DiskFullError,
    EngineFailedError,
    LockedError,
    MismatchError,
    StaleReadError,
    WalStateError,
)
from .layout import FORMAT_VERSION, SNAPSHOT_DATA, SNAPSHOT_LOCK, fsync_dir
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


def _check_size(env: lmdb.Environment, data_file: str) -> None:
    """CorruptionError if data.mdb is visibly cut short, before anything reads it: a
    page past the end of the file read through the mapping kills the process
    (SIGBUS).

    The meta page's last_pgno is not an exact bound: pages a transaction
    allocated and freed again ("loose" pages) count there but are never written,
    so after a crash the file may end a little before it (seen: one page). So the
    file may fall short of last_pgno by a slack of up to 1/8 of it (at most 256
    pages); a bigger cut is corruption. (Reading the trees to find the exact
    bound would itself read past the end.) A partial last page is no danger --
    the mapping reads zeros up to the end of the page that holds the end of the
    file -- and a power loss can leave one (a write torn at a sector boundary).
    """
    psize = env.stat()["psize"]
    pages = env.info()["last_pgno"] + 1
    size = os.path.getsize(data_file)
    slack = min(256, pages // 8)
    if size < (pages - slack) * psize:
        env.close()
        raise CorruptionError(f"the snapshot {data_file} is truncated: {size} bytes, but its "
                              f"pages reach {pages * psize}", path=data_file, offset=size)


class _SharedEnv:
    """One LMDB environment per directory per process (LMDB refuses a second
    open in one process): engines of one process on one directory share it,
    and share its reader registry, which map growth waits on."""

    def __init__(self, env: lmdb.Environment, locked: bool, writable: bool) -> None:
        self.env = env
        self.locked = locked      # has a lock file: readers hold LMDB reader slots
        self.writable = writable
        self.refs = 0
        self.data = env.open_db(b"data", create=writable)
        self.metadb = env.open_db(b"meta", create=writable)
        self.readers: set[object] = set()
        self.resizing = False
        self.cv = threading.Condition()
        self.users: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        # One read transaction kept between gets (Snapshot.get), used by one
        # thread at a time under rtxn_mu (py-lmdb opens with MDB_NOTLS, so a read
        # transaction may move between threads when its use is serialised). It is
        # dropped after every commit (so gets see it, and it pins no old pages),
        # before the map changes and before the environment closes.
        self.rtxn: lmdb.Transaction | None = None
        self.rtxn_mu = threading.Lock()

    def drop_rtxn(self) -> None:
        """Ends the read transaction kept between gets (waits for a get using it)."""
        with self.rtxn_mu:
            txn, self.rtxn = self.rtxn, None
            if txn is not None:
                txn.abort()

    @contextmanager
    def quiesced(self, timeout_error: Callable[[], Exception]) -> Iterator[None]:
        """Holds new readers back and waits (at most 10 s, then raises
        timeout_error()) until no read is in progress: LMDB allows replacing or
        resizing the map only with no transaction active in the process."""
        with self.cv:
            self.resizing = True
        try:
            self.drop_rtxn()  # and no new one while resizing (Snapshot.get)
            deadline = time.monotonic() + 10.0
            while self.readers:
                if time.monotonic() > deadline:
                    raise timeout_error()
                time.sleep(0.001)
            yield
        finally:
            with self.cv:
                self.resizing = False
                self.cv.notify_all()

    def upgrade(self, path: str, map_size: int) -> None:
        """Reopens a read-only environment for writing (a writer opens a directory
        that read-only engines of this process already have open), under every
        user, once the reads in progress are done."""
        with self.quiesced(lambda: LockedError(
                f"{path}: read-only readers of this process did not finish within 10 s; "
                "open for writing again later")):
            self.env.close()
            env = _open_env(path, map_size, read_only=False, create=False)
            self.env, self.locked, self.writable = env, True, True
            self.data = env.open_db(b"data", create=True)
            self.metadb = env.open_db(b"meta", create=True)
            for snap in list(self.users):
                snap._bind(self)


def _open_env(path: str, map_size: int, read_only: bool, create: bool) -> lmdb.Environment:
    """The LMDB environment as walstate uses it (docs/FORMAT.md, "Snapshot")."""
    return lmdb.open(path, map_size=map_size, subdir=True, max_dbs=2, readonly=read_only,
                     lock=not read_only, sync=True, metasync=False, writemap=False,
                     create=create, readahead=False, meminit=False, max_readers=512)


# LMDB's lock file is ~33 KiB for max_readers=512; LMDB writes it through a
# shared mapping, so it gets its space beforehand (see _allocate_lock_file).
LOCK_FILE_BYTES = 64 * 1024


def _allocate_lock_file(path: str) -> None:
    """Gives LMDB's lock file its disk space before LMDB maps it: LMDB sizes it
    with ftruncate (a sparse file) and writes it through a shared mapping, so
    on a full disk the first store into it kills the process with SIGBUS
    (found: the first open on a full tmpfs). With the space allocated here a
    full disk is a DiskFullError, and LMDB, finding the file large enough,
    keeps its size."""
    lock = os.path.join(path, SNAPSHOT_LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_blocks * 512 < LOCK_FILE_BYTES:
            try:
                os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DiskFullError(f"creating the snapshot's lock file {lock}: the disk "
                                        "is full; free some space and open again", lock) from exc
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
    finally:
        os.close(fd)


_shared: dict[str, _SharedEnv] = {}
_shared_mu = threading.Lock()
# In a child made by os.fork(): the environments it inherited. LMDB forbids
# using an environment after fork, and releasing one (closing it, aborting its
# read transactions) writes to the reader table that the parent shares, so
# they are kept, never released, for as long as the child lives -- this list
# holds an extra reference (made in _keep_forever) that not even the
# interpreter's exit drops; a new open in the child makes its own environment.
_inherited: list[_SharedEnv] = []


def _keep_forever(obj: object) -> None:
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


_inherited_from: dict[str, int] = {}  # directory -> the parent that has it open
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _shared_mu, _pid
    _inherited.extend(_shared.values())
    _inherited_from.update(dict.fromkeys(_shared, _pid))
    _pid = os.getpid()
    _shared.clear()
    _shared_mu = threading.Lock()


_keep_forever(_inherited)
os.register_at_fork(after_in_child=_after_fork_in_child)


class Snapshot:
    """The LMDB environment under DIR/snapshot."""

    def __init__(self, path: str, *, map_size: int, read_only: bool, create: bool) -> None:
        """A read-only snapshot is opened without LMDB's lock file, so that it changes
        no byte on disk; it then has no reader slot, and a writer in another
        process may recycle the pages of a read once it has committed two more
        transactions. Reads therefore validate themselves: a read whose
        transaction fell two or more behind the writer is retried (get) or
        refused (items), never returned. In one process every open of a
        directory shares one environment (a read-only open beside this
        process's writer reads through the writer's)."""
        self.path = path
        self.read_only = read_only
        self.view_lsn: int | None = None  # set_view
        self._view_ok: tuple[bytes | None, bytes | None] | None = None
        data_file = os.path.join(path, SNAPSHOT_DATA)
        if not create and not os.path.exists(data_file):
            raise CorruptionError(f"the snapshot {data_file} is missing: the directory was "
                                  "initialised, so walstate will not start it empty",
                                  path=data_file)
        if create:
            os.makedirs(path, exist_ok=True)
        key = os.path.realpath(path)
        if key in _inherited_from:
            raise LockedError(
                f"{path}: this process was forked from process {_inherited_from[key]}, which "
                "has this snapshot open; LMDB cannot open it again in the child: open the "
                "directory from a new process (e.g. multiprocessing's 'spawn')",
                pid=_inherited_from[key])
        with _shared_mu:
            sh = _shared.get(key)
            if sh is not None and not read_only and not sh.writable:
                try:
                    sh.upgrade(path, map_size)
                except lmdb.Error as exc:
                    raise self._translate(exc, "opening the snapshot", opening=True) from None
            if sh is None:
                if not read_only:
                    _allocate_lock_file(path)
                try:
                    env = _open_env(path, map_size, read_only, create)
                except (lmdb.MemoryError, lmdb.InvalidParameterError) as exc:
                    # mmap's ENOMEM/EINVAL: the map does not fit this machine's
                    # address space (or limits); nothing is wrong with the files
                    raise ConfigError("map_size", f"{map_size} bytes: the snapshot {path} "
                                      f"cannot be mapped that large on this machine ({exc}); "
                                      "choose a smaller map_size") from None
                except lmdb.Error as exc:
                    raise self._translate(exc, "opening the snapshot", opening=True) from None
                try:
                    _check_size(env, data_file)
                    sh = _SharedEnv(env, locked=not read_only, writable=not read_only)
                except lmdb.MemoryError as exc:
                    raise ConfigError("map_size", f"{map_size} bytes cannot be mapped on this "
                                      f"machine ({exc}, opening {path}); choose a smaller "
                                      "map_size (the engine grows the map as needed)") from None
                except lmdb.Error as exc:
                    raise self._translate(exc, "opening the snapshot", opening=True) from None
                _shared[key] = sh
            sh.refs += 1
        self._key = key
        self._bind(sh)
        sh.users.add(self)
        if create:
            try:
                fsync_dir(path)  # LMDB does not fsync its directory
            except BaseException:
                self.close()  # else the environment stays open in this process
                raise

    def _bind(self, sh: _SharedEnv) -> None:
        """Points this open at the shared environment's current handles."""
        self._sh = sh
        self.env = sh.env
        self.data = sh.data
        self.metadb = sh.metadb
        self._readers = sh.readers
        self._validate = not sh.locked

    # ---- errors ----------------------------------------------------------
    def _translate(self, exc: BaseException, what: str, opening: bool = False) -> Exception:
        """The walstate error for an LMDB failure (at open: unreadable files are
        corruption; later: unknown failures leave durability unknown)."""
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
        if opening:
            return CorruptionError(f"{msg}; the snapshot cannot be opened", path=self.path)
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
        return self._meta(META_CHECKPOINT)

    def _meta(self, name: bytes) -> dict | None:
        return self.meta_state((name,))[0]

    def meta_state(self, names: tuple[bytes, ...] = (META_CHECKPOINT, META_FOLD)
                   ) -> tuple[dict | None, ...]:
        """The metadata entries ``names`` (checksums verified) as one read sees them."""
        for _ in range(100):
            tid = None
            try:
                with self.env.begin(db=self.metadb) as txn:
                    tid = txn.id()
                    raw = tuple(txn.get(n) for n in names)
            except lmdb.MapResizedError:
                self._adopt_map_size()
                continue
            except lmdb.Error as exc:
                if self._recycled(tid):
                    continue
                raise self._translate(exc, "reading the snapshot metadata") from None
            if not self._recycled(tid):
                return tuple(None if r is None else decode_meta(r, self.path) for r in raw)
        raise WalStateError(f"read-only read of {self.path}: the writer kept recycling pages "
                            "under the read; retry")

    def _recycled(self, tid: int | None) -> bool:
        """True if a read by transaction ``tid`` may have seen pages a writer in
        another process recycled (no lock file: see __init__); such a read,
        failed or not, is retried. False for an environment with a lock file."""
        if not self._validate:
            return False
        return tid is None or not self._still_valid(tid)

    # ---- the view of a read-only engine ------------------------------------
    def set_view(self, lsn: int) -> None:
        """Serves reads only as of WAL position ``lsn``: a read-only engine holds the
        WAL replayed up to ``lsn`` in memory, which shadows every key written
        after the snapshot's checkpoint up to there; so a value read here belongs
        to the state at ``lsn`` exactly while the snapshot holds nothing written
        after it (its checkpoint LSN, and a fold in progress, at or below
        ``lsn``). Once a writer's checkpoint folds later writes, reads raise
        StaleReadError instead of mixing two states."""
        self.view_lsn = lsn
        self._view_ok = None

    def _view_verdict(self, txn: lmdb.Transaction) -> Exception | None:
        """None if what ``txn`` reads belongs to the view (set_view), else the
        error to raise -- once the read is known valid (the bytes of a recycled
        page are not to be judged)."""
        raw = (txn.get(META_CHECKPOINT, db=self.metadb), txn.get(META_FOLD, db=self.metadb))
        if raw == self._view_ok:
            return None
        try:
            upto = 0
            if raw[0] is not None:
                upto = int(decode_meta(raw[0], self.path).get("lsn", 0))
            fold = decode_meta(raw[1], self.path) if raw[1] is not None else {}
            if fold:
                upto = max(upto, int(fold.get("to_lsn", 0)))
        except (CorruptionError, TypeError, ValueError) as exc:
            return exc
        assert self.view_lsn is not None
        if upto > self.view_lsn:
            return StaleReadError(
                f"read-only view of {self.path} at LSN {self.view_lsn} fell behind: a writer's "
                f"checkpoint folded writes up to LSN {upto} into the snapshot, so the older "
                "values this view needs are gone; reopen it to read a newer state")
        self._view_ok = raw
        return None

    def _adopt_map_size(self) -> None:
        """A writer in another process grew the map (LMDB's MDB_MAP_RESIZED): adopt
        its size, once no read of this process is in progress."""
        with self._sh.quiesced(lambda: WalStateError(
                f"following the snapshot map's growth ({self.path}): reads in progress did "
                "not finish within 10 s; retry")):
            try:
                self.env.set_mapsize(0)
            except lmdb.Error as exc:
                raise self._translate(exc, "following the snapshot map's growth") from None

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
        sh = self._sh
        sh.readers.add(tok)
        if sh.resizing:
            sh.readers.discard(tok)
            with sh.cv:
                while sh.resizing:
                    sh.cv.wait()
            sh.readers.add(tok)
        return tok

    def leave(self, tok: object) -> None:
        self._readers.discard(tok)

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` in the snapshot, or None."""
        sh = self._sh
        if self._validate or self.view_lsn is not None:
            return self._get_validated(key)
        mu = sh.rtxn_mu
        if mu.acquire(False):  # else another thread reads through it: a txn of our own
            try:
                txn = sh.rtxn
                if txn is None and not sh.resizing:
                    txn = sh.rtxn = sh.env.begin(db=sh.data)
                if txn is not None:
                    return txn.get(key)
            finally:
                mu.release()
        tok = object()
        readers = sh.readers
        readers.add(tok)
        try:
            if sh.resizing:
                readers.discard(tok)
                tok = self.enter()
            with self.env.begin(db=self.data) as txn:
                return txn.get(key)
        finally:
            readers.discard(tok)

    def _still_valid(self, txnid: int) -> bool:
        """True if pages seen by read transaction ``txnid`` cannot have been recycled
        by a writer that does not know about us (see __init__)."""
        return self.env.info()["last_txnid"] <= txnid + 1

    def _get_validated(self, key: bytes) -> bytes | None:
        """get() in a read transaction of its own, checked: against page recycling
        (no lock file) and against the view (set_view)."""
        view = self.view_lsn is not None
        for _ in range(100):
            tok = self.enter()
            bad = None
            tid = None
            resized = False
            try:
                with self.env.begin(db=self.data) as txn:
                    tid = txn.id()
                    value = txn.get(key)
                    if view:
                        bad = self._view_verdict(txn)
            except lmdb.MapResizedError:
                resized = True
            except lmdb.Error as exc:
                if not self._recycled(tid):
                    raise self._translate(exc, "reading the snapshot") from None
                tid = None
            finally:
                self.leave(tok)
            if resized:
                self._adopt_map_size()
            elif not self._recycled(tid):
                if bad is not None:
                    raise bad
                return value
        raise WalStateError(f"read-only read of {self.path}: the writer kept recycling pages "
                            "under the read; retry")

    def items(self, start: bytes | None, stop: bytes | None,
              chunk: int = 512) -> Iterator[tuple[bytes, bytes]]:
        """Key-ordered (key, value) in [start, stop).

        Read in chunks, each in its own short read transaction, so that an
        iterator left open holds no LMDB snapshot (which would block map growth
        and page reuse). Each key comes with a value committed no earlier than
        the call; keys changed by checkpoints during the iteration may show
        their newer state.
        """
        after: bytes | None = None
        while True:
            rows = self._read_chunk(start, after, stop, chunk)
            yield from rows
            if len(rows) < chunk:
                return
            after = rows[-1][0]

    def _read_chunk(self, start: bytes | None, after: bytes | None, stop: bytes | None,
                    n: int) -> list[tuple[bytes, bytes]]:
        view = self.view_lsn is not None
        for _ in range(100):
            tok = self.enter()
            bad = None
            tid = None
            try:
                with self.env.begin(db=self.data, buffers=False) as txn:
                    tid = txn.id()
                    cur = txn.cursor()
                    if after is not None:
                        ok = cur.set_range(after)
                        if ok and cur.key() == after:
                            ok = cur.next()
                    elif start:
                        # a bound may be longer than any key (LMDB seeks to keys
                        # only): seek to its prefix, skip what sorts before it
                        ok = cur.set_range(start[:MAX_KEY])
                        while ok and cur.key() < start:
                            ok = cur.next()
                    else:
                        ok = cur.first()
                    rows = []
                    while ok and len(rows) < n:
                        k = cur.key()
                        if stop is not None and k >= stop:
                            break
                        rows.append((k, cur.value()))
                        ok = cur.next()
                    if view:
                        bad = self._view_verdict(txn)
            except lmdb.MapResizedError:
                self.leave(tok)
                self._adopt_map_size()
                continue
            except lmdb.Error as exc:
                if self._recycled(tid):
                    continue
                raise self._translate(exc, "reading the snapshot") from None
            finally:
                self.leave(tok)
            if not self._recycled(tid):
                if bad is not None:
                    raise bad
                return rows
        raise WalStateError(f"read-only scan of {self.path}: a writer in another process "
                            "kept recycling pages under the scan; run it again")

    def entries(self) -> int:
        for _ in range(100):
            try:
                with self.env.begin(db=self.data) as txn:
                    return txn.stat(self.data)["entries"]
            except lmdb.MapResizedError:
                self._adopt_map_size()
        raise WalStateError(f"counting the keys of {self.path}: the map kept growing; retry")

    def size_bytes(self) -> int:
        """Bytes of the snapshot file in use (pages up to the last one)."""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def file_bytes(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.path, SNAPSHOT_DATA))
        except OSError:
            return 0

    # ---- writing ---------------------------------------------------------
    def write(self, items: list[tuple[bytes, bytes | None]], meta: dict[bytes, dict],
              durable: bool = False) -> None:
        """One LMDB transaction of puts/deletes (value None) and metadata.

        Its data pages are fdatasynced at commit; its meta page (what makes the
        transaction the current one) only by the next commit or, with
        ``durable``, right away -- LMDB's MDB_NOMETASYNC, which keeps the
        database whole and at worst undoes the last transaction in a crash.
        Grows the map when it is full. Raises DiskFullError / EngineFailedError.
        """
        puts = [kv for kv in items if kv[1] is not None]
        dels = [k for k, v in items if v is None] if len(puts) < len(items) else []
        for _attempt in range(20):
            try:
                with self.env.begin(write=True) as txn:
                    if items:
                        cur = txn.cursor(db=self.data)
                        for i in range(0, len(puts), 256):
                            cur.putmulti(puts[i:i + 256])
                            time.sleep(0)  # let writers have the GIL (see checkpoint._take)
                        for k in dels:
                            if cur.set_key(k):
                                cur.delete()
                    for mk, mv in meta.items():
                        txn.put(mk, encode_meta(mv), db=self.metadb)
                self._sh.drop_rtxn()  # gets see this commit from now on
                if durable:
                    self.env.sync(True)
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                raise self._translate(exc, "writing the snapshot") from None
        raise EngineFailedError(f"writing the snapshot ({self.path}): the map kept filling up")

    def _grow(self) -> None:
        new = self.env.info()["map_size"] * 2
        # a timeout is not a failure of the engine: the checkpoint keeps its WAL
        # and is retried later
        with self._sh.quiesced(lambda: WalStateError(
                f"growing the snapshot map ({self.path}): readers (open items() iterators) "
                "did not finish within 10 s; the checkpoint is retried later")):
            try:
                self.env.set_mapsize(new)
            except lmdb.Error as exc:
                raise self._translate(exc, "growing the snapshot map") from None

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def close(self) -> None:
        """Releases this open; the environment closes with the last one. Idempotent."""
        with _shared_mu:
            sh, self._sh = self._sh, None  # type: ignore[assignment]
            if sh is None:
                return
            sh.users.discard(self)
            sh.refs -= 1
            if sh.refs == 0:
                if _shared.get(self._key) is sh:
                    del _shared[self._key]
                sh.drop_rtxn()
                sh.env.close()
