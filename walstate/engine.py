"""The Engine: ties the WAL, the in-memory table, checkpoints and recovery
together. Writes go to the WAL first, then to the in-memory table of changes
since the last checkpoint; reads look there, then in the LMDB snapshot.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from . import _hooks, _opening, codec, control
from ._native import speedups as _speedups
from .archive import Archiver
from .checkpoint import Checkpointer, CheckpointInfo, fsync_latency
from .config import Config
from .errors import (
    ClosedError,
    CorruptionError,
    DiskFullError,
    EngineFailedError,
    ReadOnlyError,
    WalStateError,
)
from .layout import (
    FORMAT_VERSION,
    DirLock,
    Layout,
    read_marker,
)
from .recovery import replay, replay_read_only
from .snapshot import Snapshot, _keep_forever
from .wal import Wal, list_segments

log = logging.getLogger("walstate")

_MISSING = object()
REC_OVERHEAD = codec.REC_HEADER
# After an unclean shutdown, LSNs restart this far above the last one on disk:
# a put under sync="none"/"interval" may have returned an LSN that the crash
# lost, and LSNs are never reused.
LSN_SKIP_AFTER_CRASH = 1 << 32
# A recovery that replayed more keys than this checkpoints in the background.
RECOVERY_CHECKPOINT_INLINE_KEYS = 50_000


def _field(holder: str, name: str, doc: str) -> Any:
    """An attribute kept in a C object's field (``self.<holder>.<name>``)."""
    return property(lambda self: getattr(getattr(self, holder), name),
                    lambda self, v: setattr(getattr(self, holder), name, v), doc=doc)


class _ClosedTable:
    """Stands in for the in-memory table after close (or in a process that
    inherited the engine through fork): every use raises ClosedError, so that a
    call racing close() fails cleanly, and the C hot path (which serves only a
    dict) takes the slow path."""

    def __init__(self, message: str) -> None:
        self.message = message

    def _closed(self, *args: object, **kw: object) -> Any:
        raise ClosedError(self.message)

    get = update = items = keys = values = _closed
    __getitem__ = __setitem__ = __len__ = __iter__ = __contains__ = _closed


# Every engine of this process, so that a child made by os.fork() can make the
# ones it inherited inert (_Inherited) before any of its code runs.
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_inherited_keep: list[Engine] = []  # in a fork child: never released (see _inherited)


def _after_fork_in_child() -> None:
    for eng in list(_engines):
        eng._inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)
_keep_forever(_inherited_keep)  # not even the interpreter's exit frees it


class Batch:
    """Operations committed as one WAL record when the ``with`` block exits
    without an exception; nothing is visible before. ``lsn`` is set after exit
    (None for an empty batch)."""

    # the state lives in self._b (walstate._speedups.BatchOps: put and delete in C,
    # calling the methods below for everything out of the ordinary)
    _ops = _field("_b", "ops", "the operations: (key, value or None)")
    _size = _field("_b", "size", "their payload bytes")
    _done = _field("_b", "done", "committed or discarded")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.lsn: int | None = None
        put, delete = Batch.put.__get__(self), Batch.delete.__get__(self)
        self._b: Any = _speedups.BatchOps(put, delete, codec.MAX_RECORD)
        self.put = self._b.put  # type: ignore[method-assign]
        self.delete = self._b.delete  # type: ignore[method-assign]

    def _add(self, key: bytes, value: bytes | None) -> None:
        if self._done:
            raise ClosedError("this batch has already been committed or discarded")
        n = codec.BATCH_OP_HEADER + len(key) + (len(value) if value is not None else 0)
        self._size += n
        if self._size > codec.MAX_RECORD:
            self._size -= n
            raise ValueError(f"batch larger than the {codec.MAX_RECORD} byte record limit")
        self._ops.append((key, value))

    def put(self, key: bytes, value: bytes) -> None:
        if type(key) is not bytes or not 0 < len(key) <= codec.MAX_KEY:
            key = codec.as_key(key)
        if type(value) is not bytes or len(value) > codec.MAX_VALUE:
            value = codec.as_value(value)
        size = self._size + codec.BATCH_OP_HEADER + len(key) + len(value)
        if size > codec.MAX_RECORD or self._done:  # the general case raises
            return self._add(key, value)
        self._size = size
        self._ops.append((key, value))

    def delete(self, key: bytes) -> None:
        self._add(codec.as_key(key), None)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        self._done = True
        if exc_type is None and self._ops:
            self.lsn = self._engine._commit_batch(self._ops)
        self._ops = []


class Engine:
    """An open walstate directory. Use :func:`walstate.open` to get one.

    Thread-safe. Every write is appended to the WAL before it is applied;
    under ``sync="always"`` it returns only once durable.
    """

    # The state of the hot path lives in self._hot (walstate._speedups.Hot): its
    # put and get serve the common case in C and call the methods below for the rest.
    _active = _field("_hot", "table", "the in-memory table of changes since the last freeze")
    _last_lsn = _field("_hot", "last_lsn", "LSN of the last write")
    _wal_bytes = _field("_hot", "wal_bytes", "record bytes appended since open")
    _frozen_bytes = _field("_hot", "frozen_bytes", "_wal_bytes when the last table was frozen")
    _writable = _field("_hot", "writable", "open, writable and not failed")
    _sync_always = _field("_hot", "sync_always", "every put waits for durability")
    _frozen = _field("_hot", "frozen", "the tables being checkpointed, newest first")

    def __init__(self, path: str | os.PathLike[str], config: Config,
                 clock: Callable[[], float] | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.config = config
        self._layout = Layout(self.path)
        self._clock = clock or time.monotonic
        # orders WAL appends with table updates (re-entrant: a write that starts the
        # session appends its SESSION record under it too)
        self._lock = threading.RLock()
        hot_args = (Engine.put.__get__(self), self._acknowledge, self._get_cold)
        self._hot: Any = _speedups.Hot(*hot_args)
        self.put = self._hot.put  # type: ignore[method-assign]
        self.get = self._hot.get  # type: ignore[method-assign]
        self._close_mu = threading.Lock()
        self._session_mu = threading.Lock()
        self._session = False  # the log marked in use (_start_session)
        self._closed = False
        self._closing = False  # close() began: new writes raise ClosedError
        self._closed_durable_lsn = 0  # what close() made durable (_acknowledge)
        self._pid = os.getpid()  # the process the engine belongs to (fork)
        self._failed: BaseException | None = None
        self._dirlock: DirLock | None = None
        self._wal: Wal | None = None
        self._snapshot: Snapshot | None = None
        self._checkpointer: Checkpointer | None = None
        self._control: control.ControlServer | None = None
        self._flusher: threading.Thread | None = None
        self._flusher_stop = threading.Event()
        self._frozen: tuple[dict[bytes, bytes | None], ...] = ()
        self._counts = {"deletes": 0, "batches": 0}   # puts: self._hot.puts
        self._sync_always = config.sync == "always"
        self._set_threshold(float(config.max_wal_size))
        self._stats_base: dict[str, Any] = {}
        try:
            self._open()
        except BaseException as exc:
            self._teardown()
            if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                    and not isinstance(exc, DiskFullError)):
                raise DiskFullError(f"opening {self.path}: the disk is full ({exc}); free some "
                                    "space and open again", exc.filename) from exc
            raise
        _engines.add(self)

    # ---- opening -----------------------------------------------------------
    def _open(self) -> None:
        cfg, lay = self.config, self._layout
        ro = cfg.read_only
        _opening.check_map_size(cfg.map_size)
        self._dirlock = _opening.lock_directory(lay, read_only=ro)
        marker = read_marker(lay)
        fresh = marker is None
        if marker is None:
            if ro:
                raise CorruptionError(f"{self.path} is not a walstate directory (no "
                                      f"{lay.marker})", path=lay.marker)
            marker, self._snapshot = _opening.create(lay, map_size=cfg.map_size)
        _opening.check_marker(lay, marker)
        self.system_id = int(marker["system_id"])
        if self._snapshot is None:
            self._snapshot = Snapshot(lay.snapshot, map_size=cfg.map_size, read_only=ro,
                                      create=False)
        meta = self._snapshot.check_meta(self.system_id)
        self._hot.snap_get = self._snapshot.get
        snap_lsn = int(meta["lsn"])
        if not os.path.isdir(lay.wal):
            raise CorruptionError(f"the WAL directory {lay.wal} is missing", path=lay.wal)
        if ro:  # beside a writer that may checkpoint meanwhile (one view, kept)
            meta, rec = replay_read_only(lay.wal, self._snapshot, system_id=self.system_id,
                                         mode=cfg.recovery)
            snap_lsn = int(meta["lsn"])
        else:
            rec = replay(lay.wal, system_id=self.system_id, snapshot_lsn=snap_lsn,
                         mode=cfg.recovery, read_only=ro)
        _opening.check_copy(lay, rec, read_only=ro)
        _hooks.hit("recovery_after_replay")
        self._recovery = rec.report
        self._active = rec.table
        self._last_lsn = rec.last_lsn
        # Only a clean close (or a directory made just now) proves that no LSN was
        # handed out beyond the end of the log.
        clean = fresh or rec.report["clean_shutdown"]
        last = CheckpointInfo.from_meta(meta)
        if not ro:
            skip = 0 if clean else LSN_SKIP_AFTER_CRASH
            self._wal = Wal(lay.wal, system_id=self.system_id, segment_size=cfg.segment_size,
                            buffer_size=cfg.wal_buffer_size,
                            min_next_lsn=rec.last_lsn + 1 + skip, covered_lsn=snap_lsn)
            self._wal_put = self._wal.put_serialized
            self._hot.set_wal(*self._wal.hot_args())
        self._checkpointer = Checkpointer(
            self, self._wal, self._snapshot, system_id=self.system_id, config=cfg,  # type: ignore[arg-type]
            clock=self._clock, last=last, last_lsn=snap_lsn)
        self._checkpointer.archiver = Archiver.from_config(cfg, lay, self.system_id)
        secs = rec.report["seconds"]
        if rec.report["bytes_replayed"] > 1 << 20 and secs > 0:
            self._checkpointer.replay_rate = rec.report["bytes_replayed"] / secs
        self._set_threshold(self._compute_threshold())
        if ro:
            return
        # The checkpoint that ends recovery: before open returns when it is small;
        # after a large replay in the background, so that the engine serves as soon
        # as the replay is done (a crash meanwhile replays the same WAL again).
        later = len(self._active) > RECOVERY_CHECKPOINT_INLINE_KEYS
        # After a clean close with nothing to recover, the session starts with the
        # first write (an open that only reads writes nothing); otherwise now.
        lazy = (not fresh and rec.report["clean_shutdown"] and not self._active
                and not rec.report["truncated_bytes"] and cfg.archive_dir is None)
        if not lazy:
            self._start_session(counted=False)
        if (self._active or rec.report["truncated_bytes"]) and not later:
            self._checkpointer.run("recovery")
        self._stats_base = self._raw_stats()
        if later:
            self._checkpointer.request("recovery")
        try:
            self._control = control.ControlServer(self, lay)
        except OSError as exc:  # e.g. a filesystem without sockets: the rest works
            log.warning("%s: no control channel (%s); `walstate checkpoint` cannot reach "
                        "this writer", self.path, exc)

    def _start_session(self, counted: bool = True) -> None:
        """Marks the log as in use -- a SESSION record, synced: until a clean close
        appends SHUTDOWN after it, a later recovery knows that this session may have
        handed out LSNs it lost -- and starts the background threads. At open, or
        after a clean close at the first write. ``counted``: after open returned
        (its record and fsync are then taken out of stats())."""
        with self._session_mu:
            if self._session or self._closed or self._closing:
                return
            before = self._raw_stats() if counted else {}
            wal = self._wal
            with self._locked():  # a close meanwhile waits for the handle
                if self._closed or self._closing:
                    return
                wal.sync(wal.append(codec.SESSION, b""))  # type: ignore[union-attr]
                self._last_lsn = wal.stats()["next_lsn"] - 1  # type: ignore[union-attr, operator]
            if counted:
                after = self._raw_stats()
                for k in ("wal_records", "wal_bytes_written", "fsyncs", "wal_writes"):
                    self._stats_base[k] = self._stats_base.get(k, 0) + after[k] - before[k]
            self._session = True
            self._checkpointer.start()  # type: ignore[union-attr]
            if self.config.sync == "interval":
                self._flusher = threading.Thread(target=self._flush_loop,
                                                 name="walstate-flusher", daemon=True)
                self._flusher.start()
            if self._failed is None:
                self._writable = True

    # ---- state checks ------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed or self._pid != os.getpid():
            raise self._closed_error()

    def _check_write(self) -> None:
        if self._closed or self._closing or self._pid != os.getpid():
            raise self._closed_error()
        if self._wal is None:
            raise ReadOnlyError(f"{self.path} is open read-only")
        if self._failed is not None:
            raise EngineFailedError(
                f"{self.path}: an earlier write or fsync failed ({self._failed}); writes are "
                "refused until the directory is reopened") from self._failed
        if not self._session:
            try:
                self._start_session()
            except EngineFailedError as exc:
                self._fail(exc)
                raise

    def _closed_error(self) -> ClosedError:
        if self._pid != os.getpid():
            return ClosedError(
                f"walstate engine for {self.path} belongs to process {self._pid}; this "
                f"process ({os.getpid()}) inherited it through fork() and may not use or "
                "close it (nothing was changed): open the directory in this process once "
                "the owner has closed it")
        if self._closed:
            return ClosedError(f"walstate engine for {self.path} is closed")
        return ClosedError(f"walstate engine for {self.path} is closing: no new writes")

    def _inherited(self) -> None:
        """In a child made by os.fork() (see _after_fork_in_child): makes this
        engine, which belongs to the parent, inert -- the C hot path off, the
        tables replaced by ones that raise -- without touching a file, a lock or
        a thread: the parent still uses them all (its WAL offsets and LSNs, its
        flock on LOCK, its LMDB reader slots)."""
        if self._closed:
            return
        hot = self._hot
        hot.writable = 0
        hot.set_wal(0, 0)
        hot.snap_get = None
        hot.table = _ClosedTable(str(self._closed_error()))
        # The parent's resources are never released here: the engine (and its
        # LMDB environment and read transactions, whose release writes to the
        # shared reader table) is kept alive until this process ends.
        _inherited_keep.append(self)
        # fresh locks: a thread of the parent may have held these at the fork
        self._lock = threading.RLock()
        self._close_mu = threading.Lock()

    def _fail(self, exc: BaseException) -> None:
        self._writable = False
        if self._failed is None:
            self._failed = exc
            log.error("engine %s failed: %s; writes refused until reopened", self.path, exc)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The engine's write lock, for Python code that touches the WAL or the
        table: raises the hot path's ``busy`` so that puts in C wait for it."""
        with self._lock:
            hot = self._hot
            hot.busy += 1
            try:
                yield
            finally:
                hot.busy -= 1

    def _set_threshold(self, threshold: float) -> None:
        self._hot.threshold = int(min(threshold, (1 << 63) - 1))

    # ---- writes ------------------------------------------------------------
    def put(self, key: bytes, value: bytes) -> int:
        """Appends a PUT and applies it; returns its LSN (durable per ``sync``).

        (The common case runs in C: walstate._speedups.Hot.put, which calls this
        for the rest -- other key types, errors, an append that must wait.)"""
        if not self._writable:
            self._check_write()
        if type(key) is not bytes or not 0 < len(key) <= codec.MAX_KEY:
            key = codec.as_key(key)
        if type(value) is not bytes or len(value) > codec.MAX_VALUE:
            value = codec.as_value(value)
        hot = self._hot
        try:
            with self._locked():
                if not self._writable:  # closed or failed while we waited for the lock
                    self._check_write()
                lsn = self._wal_put(key, value)
                hot.table[key] = value
                hot.last_lsn = lsn
                hot.puts += 1
                hot.wal_bytes += REC_OVERHEAD + 2 + len(key) + len(value)
        except EngineFailedError as exc:
            self._fail(exc)
            raise
        if hot.sync_always or hot.wal_bytes - hot.frozen_bytes > hot.threshold:
            return self._acknowledge(lsn)
        return lsn

    def delete(self, key: bytes) -> int:
        """Appends a DELETE (of a key that may not exist); returns its LSN."""
        self._check_write()
        key = codec.as_key(key)
        return self._commit(codec.DELETE, key, ((key, None),), "deletes")

    def batch(self) -> Batch:
        """A batch: ``with db.batch() as b: b.put(k, v); b.delete(k)`` -- atomic."""
        self._check_write()
        return Batch(self)

    def _commit_batch(self, ops: list[tuple[bytes, bytes | None]], wait: bool = True) -> int:
        """Commits ``ops`` as one BATCH record. ``wait=False`` returns once it is
        appended and applied, not yet durable: the caller then owes
        ``_acknowledge(lsn)`` before it reports the write done (walstate.tasks
        orders its appends under its own lock and waits for the fsync outside it,
        so that its writers still share fsyncs)."""
        self._check_write()
        return self._commit(codec.BATCH, _speedups.encode_batch(ops), ops, "batches", wait)

    def _commit(self, rtype: int, payload: bytes, ops: Any, kind: str,
                wait: bool = True) -> int:
        """Appends one record holding ``ops`` and applies them (the general put())."""
        try:
            with self._locked():
                if self._closing or self._closed:  # close() began while we waited
                    raise self._closed_error()     # (nothing written)
                lsn = self._wal.append(rtype, payload)  # type: ignore[union-attr]
                self._active.update(ops)
                self._last_lsn = lsn
                self._counts[kind] += 1
                self._wal_bytes += REC_OVERHEAD + len(payload)
        except EngineFailedError as exc:
            self._fail(exc)
            raise
        return self._acknowledge(lsn) if wait else lsn

    def _acknowledge(self, lsn: int) -> int:
        """After an append: waits for durability per ``sync``; asks for a checkpoint
        when the WAL since the last one is too large. Returns ``lsn``."""
        if self._sync_always:
            try:
                self._wal.sync(lsn)  # type: ignore[union-attr]
            except EngineFailedError as exc:
                self._fail(exc)
                raise
            except ClosedError:
                # close() ran meanwhile: its final sync covers every append before it
                if lsn > self._closed_durable_lsn:
                    raise
        hot = self._hot
        if hot.wal_bytes - hot.frozen_bytes > hot.threshold:
            ck = self._checkpointer
            ck.request("wal_size")  # type: ignore[union-attr]
            if self._wal_bytes - self._frozen_bytes > self.config.max_wal_size:
                ck.throttle()  # type: ignore[union-attr]
        return lsn

    def _compute_threshold(self) -> float:
        """WAL bytes since the last freeze that call for a checkpoint."""
        cfg = self.config
        if cfg.max_recovery_seconds is None:
            return float(cfg.max_wal_size)
        rate = self._checkpointer.replay_rate  # type: ignore[union-attr]
        return min(cfg.max_wal_size, cfg.max_recovery_seconds * rate)

    def sync(self) -> int:
        """Makes every earlier write durable; returns the durable LSN."""
        self._check_open()
        if self._wal is None:
            return self._last_lsn
        if self._failed is not None:
            self._check_write()
        try:
            return self._wal.sync()
        except EngineFailedError as exc:
            self._fail(exc)
            raise

    def _flush_loop(self) -> None:
        while not self._flusher_stop.wait(self.config.sync_interval):
            try:
                if self._wal is not None and self._failed is None:
                    self._wal.sync()
            except EngineFailedError as exc:
                self._fail(exc)
            except WalStateError as exc:  # keep flushing; the next write reports it
                log.error("background WAL sync failed: %s", exc)

    # ---- reads -------------------------------------------------------------
    def get(self, key: bytes, default: Any = None) -> Any:
        """The latest committed value of ``key``, or ``default``.

        (Served in C: open() binds the instance's ``get`` to
        walstate._speedups.Hot.get, which calls _get_cold for keys not written
        since the last checkpoint.)"""
        return self._hot.get(key, default)

    def _get_cold(self, key: Any, default: Any = None) -> Any:
        if self._closed or self._pid != os.getpid():
            raise self._closed_error()
        if type(key) is not bytes or not 0 < len(key) <= codec.MAX_KEY:
            key = codec.as_key(key)
            v = self._active.get(key, _MISSING)
            if v is not _MISSING:
                return default if v is None else v
        try:
            for table in self._frozen:
                v = table.get(key, _MISSING)
                if v is not _MISSING:
                    return default if v is None else v
            v = self._snapshot.get(key)  # type: ignore[union-attr]
        except Exception as exc:
            if self._closed:  # close() released the snapshot under us
                raise self._closed_error() from exc
            raise
        return default if v is None else v

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]

    def items(self, start: bytes | None = None,
              stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) in key order with start <= key < stop, over all committed
        writes at the time of the call (later writes may or may not show)."""
        self._check_open()
        start = codec.as_bound(start, "start") or None  # b"": from the first key
        stop = codec.as_bound(stop, "stop")
        with self._locked():
            self._check_open()  # (a close() meanwhile replaced the tables)
            tables = (*reversed(self._frozen), self._active)
            if start is None and stop is None and len(tables) == 1:
                view = dict(self._active)
            else:
                view = {}
                for t in tables:
                    for k, v in t.items():
                        if (start is None or k >= start) and (stop is None or k < stop):
                            view[k] = v
        snap = self._snapshot.items(start, stop)  # type: ignore[union-attr]
        return self._merge(sorted(view), view, snap)

    def _merge(self, keys: list[bytes], view: dict[bytes, bytes | None],
               snap: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
        i, n = 0, len(keys)
        try:
            for sk, sv in snap:
                while i < n and keys[i] < sk:
                    v = view[keys[i]]
                    if v is not None:
                        yield keys[i], v
                    i += 1
                if i < n and keys[i] == sk:
                    v = view[sk]
                    i += 1
                    if v is not None:
                        yield sk, v
                else:
                    yield sk, sv
        except Exception as exc:
            if self._closed:
                raise ClosedError(f"walstate engine for {self.path} was closed during "
                                  "items()") from exc
            raise
        finally:
            snap.close()  # type: ignore[attr-defined]
        while i < n:
            v = view[keys[i]]
            if v is not None:
                yield keys[i], v
            i += 1

    # ---- checkpoints (the Host protocol of checkpoint.py) -------------------
    def _freeze(self) -> tuple[int, dict[bytes, bytes | None]]:
        with self._locked():
            frozen = self._active
            self._active = {}
            self._frozen = (frozen, *self._frozen)
            self._frozen_bytes = self._wal_bytes
            return self._last_lsn, frozen

    def _unfreeze(self, folded: bool) -> None:
        with self._locked():
            oldest = self._frozen[-1]
            rest = self._frozen[:-1]
            if folded:
                self._frozen = rest
            else:
                # the fold failed: its changes go back under the newer ones
                merged = dict(oldest)
                for t in reversed(rest):
                    merged.update(t)
                merged.update(self._active)
                self._active = merged
                self._frozen = ()

    def _wal_bytes_since_checkpoint(self) -> int:
        return self._wal_bytes - self._frozen_bytes

    def checkpoint(self) -> CheckpointInfo:
        """Runs a checkpoint now; returns once it is durable."""
        self._check_write()
        return self._checkpointer.run("manual")  # type: ignore[union-attr]

    # ---- observation ---------------------------------------------------------
    def observe(self, fn: Callable[[str, float], None] | None) -> None:
        """Calls ``fn(event, seconds)`` after every write -- ``"put"``,
        ``"delete"``, ``"batch"`` (a batch's commit), the time durable per
        ``sync`` -- and every ``"checkpoint"`` of this engine, in the thread that
        made it, until ``observe(None)``. Writes that raised are observed too.
        While an observer is set, puts leave the C fast path (about a
        microsecond more each); ``fn`` must be quick and must not raise."""
        self._check_open()
        for name in ("put", "delete", "_commit_batch"):
            self.__dict__.pop(name, None)
        self.put = self._hot.put  # type: ignore[method-assign]
        if fn is not None:
            for name, event in (("put", "put"), ("delete", "delete"),
                                ("_commit_batch", "batch")):
                setattr(self, name, _timed(getattr(self, name), event, fn))
        if self._checkpointer is not None:
            self._checkpointer.observer = fn

    # ---- inspection ----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """State of the directory: see docs/API.md (info())."""
        self._check_open()
        segs = list_segments(self._layout.wal)
        wal_bytes = 0
        for _lsn, p in segs:
            try:
                wal_bytes += os.path.getsize(p)
            except OSError:
                pass
        ck = self._checkpointer
        out: dict[str, Any] = {
            "path": self.path,
            "system_id": self.system_id,
            "format_version": FORMAT_VERSION,
            "last_lsn": self._last_lsn,
            "durable_lsn": self._last_lsn,
            "checkpoint_lsn": ck.last_lsn if ck else 0,
            "wal_bytes": wal_bytes,
            "wal_segments": len(segs),
            "snapshot_bytes": self._snapshot.file_bytes() if self._snapshot else 0,
            "snapshot_keys": self._snapshot.entries() if self._snapshot else 0,
            "map_size": self._snapshot.map_size() if self._snapshot else 0,
            "memtable_keys": len(self._active) + sum(len(t) for t in self._frozen),
            "last_checkpoint": ck.last if ck else None,
            "recovery": dict(self._recovery),
            "read_only": self.config.read_only,
            "sync": self.config.sync,
            "failed": str(self._failed) if self._failed else None,
            "archive": ck.archiver.info() if ck and ck.archiver else None,
        }
        since = self._wal_bytes_since_checkpoint()
        out["wal_bytes_since_checkpoint"] = since
        out["estimated_replay_seconds"] = since / ck.replay_rate if ck else 0.0
        if self._wal is not None:
            st = self._wal.stats()
            out["durable_lsn"] = st["durable_lsn"]
            if st["poisoned"] and out["failed"] is None:  # failed where no call saw it
                from ._native import strerror

                out["failed"] = (f"the write-ahead log failed: {strerror(st['poisoned'])}; "  # type: ignore[arg-type]
                                 "writes are refused until the directory is reopened")
            out["fsync_latency"] = fsync_latency(st["fsync_hist"], st["fsync_ns_max"])  # type: ignore[arg-type]
        else:
            out["fsync_latency"] = fsync_latency([], 0)
        return out

    def stats(self) -> dict[str, Any]:
        """Counters of the work done since open() returned (what open itself did --
        the session record, a recovery checkpoint -- is not counted); see
        docs/API.md (stats())."""
        self._check_open()
        raw = self._raw_stats()
        base = self._stats_base
        return {k: v - base.get(k, 0) for k, v in raw.items()}

    def _raw_stats(self) -> dict[str, Any]:
        st = self._wal.stats() if self._wal is not None else {}
        ck = self._checkpointer
        return {
            "puts": self._hot.puts,
            **self._counts,
            "wal_records": st.get("appends", 0),
            "wal_bytes_written": st.get("bytes_appended", 0),
            "fsyncs": st.get("fsyncs", 0),
            "wal_writes": st.get("writes", 0),
            "segments_created": st.get("segments_created", 0),
            "checkpoints": ck.count if ck else 0,
            "checkpoint_seconds_total": ck.seconds_total if ck else 0.0,
        }

    # ---- closing -------------------------------------------------------------
    def close(self) -> None:
        """Flushes, runs a shutdown checkpoint and releases the lock. Idempotent.

        From the moment close() begins, new writes (and checkpoint()) raise
        ClosedError and write nothing; the writes already in flight complete
        and are covered by the shutdown checkpoint. In a process that inherited
        the engine through fork(), raises ClosedError and changes nothing."""
        if self._pid != os.getpid():
            raise self._closed_error()
        with self._close_mu:
            if self._closed:
                return
            if self._control is not None:
                self._control.close()  # no new control requests
            with self._locked():  # no write is between its check and its append
                self._closing = True
                self._writable = False
            err: BaseException | None = None
            if self._flusher is not None:
                self._flusher_stop.set()
                self._flusher.join()
            if self._checkpointer is not None:
                self._checkpointer.stop()
            if self._wal is not None and self._failed is None and self._session:
                try:
                    if self._wal_bytes > 0 or self._active or self._frozen:
                        self._checkpointer.run("shutdown")  # type: ignore[union-attr]
                    self._wal.append(codec.SHUTDOWN, b"")
                    self._closed_durable_lsn = self._wal.sync()
                except WalStateError as exc:
                    err = exc
                except OSError as exc:
                    err = exc
            self._closed = True
            self._teardown()
            if err is not None:
                raise err

    def _teardown(self, crash: bool = False) -> None:
        """Releases every resource. ``crash`` (the _abandon test hook) drops the
        WAL's buffer instead of flushing it, as a dying process would."""
        self._writable = False
        self._hot.set_wal(0, 0)
        self._hot.snap_get = None
        self._closed = True
        self._active = _ClosedTable(self.path)  # type: ignore[assignment]
        if self._flusher is not None:
            self._flusher_stop.set()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._control is not None:
            self._control.close()
        while self._hot.in_sync:  # puts waiting in C for an fdatasync of this handle
            time.sleep(0.0002)
        if self._wal is not None:
            if crash:
                self._wal.abandon()
            else:
                try:
                    with self._locked():  # no put is inside the C log when its handle goes
                        self._wal.close()
                except WalStateError:
                    pass
        if self._snapshot is not None:
            self._snapshot.close()
        if self._dirlock is not None:
            self._dirlock.release()
            self._dirlock = None

    def _abandon(self) -> None:
        """Test hook: drop the engine as a crash would (no flush, no checkpoint)."""
        with self._close_mu:
            self._teardown(crash=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self._wal is None else "open")
        if self._pid != os.getpid():
            state = f"of process {self._pid}"
        return f"<walstate.Engine {self.path!r} {state}>"


def _timed(call: Callable[..., Any], event: str,
           fn: Callable[[str, float], None]) -> Callable[..., Any]:
    clock = time.perf_counter

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return call(*args, **kwargs)
        finally:
            fn(event, clock() - t0)

    return timed


def open(path: str | os.PathLike[str], *, config: Config | None = None,  # noqa: A001
         clock: Callable[[], float] | None = None, **options: Any) -> Engine:
    """Opens (creating if missing) the walstate directory ``path``: takes the
    single-writer lock, runs crash recovery and returns an :class:`Engine`.

    Options are the fields of :class:`Config` (or pass ``config=``); ``clock``
    (monotonic seconds) drives checkpoint_timeout and exists for tests.
    Raises ConfigError, LockedError, PermissionError, CorruptionError,
    MismatchError, DiskFullError.
    """
    cfg = Config.from_options(config, options)
    return Engine(path, cfg, clock)
