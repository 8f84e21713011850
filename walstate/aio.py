"""The asyncio face of walstate: :func:`open` gives an :class:`AsyncEngine`.

Every call that can block -- opening and recovery, a durable write waiting for
its fsync, a read that may touch the LMDB snapshot, a checkpoint, closing --
runs in a thread pool owned by the engine, never on the event loop. Durable
writes release the GIL while they wait for the disk, so writes awaited at the
same time from many tasks share fsyncs (group commit), as writes from many
threads do.

    db = await walstate.aio.open(path)
    async with walstate.aio.open(path) as db:
        await db.put(b"k", b"v")
        async with db.batch() as b:
            b.put(b"a", b"1")
            b.delete(b"b")
        async for k, v in db.items(b"a", b"c"):
            ...

Cancellation: a write handed to the pool is carried out to its end. If the
task awaiting it is cancelled meanwhile, the await waits for the write to
finish and then raises ``CancelledError`` -- so when the caller sees
``CancelledError`` from ``put``/``delete``/a batch's exit/``sync``, the write
happened (durable per ``sync``), and when the cancellation came before the
call (or inside an ``async with db.batch()`` block) nothing was written. A
batch is one WAL record: it is never half applied.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from . import codec
from . import engine as _engine
from .checkpoint import CheckpointInfo
from .engine import Engine
from .errors import ClosedError

__all__ = ["DEFAULT_WORKERS", "AsyncBatch", "AsyncEngine", "open"]

# Threads of an engine's pool: enough that many durable writes wait for one fsync
# together (each waiting write holds a thread, not the GIL).
DEFAULT_WORKERS = 32
# (key, value) pairs fetched per trip to the pool by ``async for``.
ITEMS_CHUNK = 256

T = TypeVar("T")


async def _finish(fut: asyncio.Future[T]) -> T:
    """Awaits a call already running in the pool. If the awaiting task is
    cancelled, the call still runs to its end; this waits for it and then
    re-raises the cancellation (so that the caller knows the call is over)."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((fut,))
        if not fut.cancelled():
            fut.exception()  # the cancellation wins; the call's error is not lost silently
        raise


class AsyncBatch:
    """Operations committed as one atomic WAL record when ``async with
    db.batch() as b`` exits without an exception (``b.put``/``b.delete`` are plain
    calls: they only record the operation). An exception -- a cancellation
    included -- inside the block discards it and nothing is written. If the task
    is cancelled while the exit commits, the commit finishes first (see the
    module's docstring): the write happened. ``lsn`` holds the record's LSN after
    the exit (None for an empty batch)."""

    def __init__(self, db: AsyncEngine) -> None:
        db.engine._check_open()
        self._db = db
        # checked here (bad keys and values raise at once, naming the limit) and
        # handed to the engine's batch in the pool: making it may start the
        # engine's session, an fsync
        self._ops: list[tuple[bytes, bytes | None]] = []
        self.lsn: int | None = None

    def put(self, key: bytes, value: bytes) -> None:
        """Adds a PUT of ``key`` to the batch (nothing is written before the exit)."""
        self._ops.append((codec.as_key(key), codec.as_value(value)))

    def delete(self, key: bytes) -> None:
        """Adds a DELETE of ``key`` to the batch."""
        self._ops.append((codec.as_key(key), None))

    def _commit(self) -> int | None:
        with self._db.engine.batch() as b:
            for k, v in self._ops:
                if v is None:
                    b.delete(k)
                else:
                    b.put(k, v)
        return b.lsn

    async def __aenter__(self) -> AsyncBatch:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        ops, self._ops = self._ops, []
        if exc_type is not None or not ops:
            return  # discarded (or nothing to write)
        self._ops = ops
        try:
            self.lsn = await self._db._write(self._commit)
        finally:
            self._ops = []


class _ItemsIterator:
    """``async for k, v in db.items(...)``: the engine's iterator advanced in
    the pool, ITEMS_CHUNK pairs per trip."""

    def __init__(self, db: AsyncEngine, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._db = db
        self._args = args
        self._kwargs = kwargs
        self._it: Any = None
        self._buf: list[tuple[bytes, bytes]] = []
        self._pos = 0
        self._done = False

    def __aiter__(self) -> _ItemsIterator:
        return self

    def _fill(self) -> list[tuple[bytes, bytes]]:
        if self._it is None:
            self._it = self._db.engine.items(*self._args, **self._kwargs)
        out = []
        for pair in self._it:
            out.append(pair)
            if len(out) >= ITEMS_CHUNK:
                break
        return out

    async def __anext__(self) -> tuple[bytes, bytes]:
        if self._pos < len(self._buf):
            self._pos += 1
            return self._buf[self._pos - 1]
        if self._done:
            raise StopAsyncIteration
        self._buf = await self._db._read(self._fill)
        self._pos = 0
        if len(self._buf) < ITEMS_CHUNK:
            self._done = True
        if not self._buf:
            await self.aclose()
            raise StopAsyncIteration
        self._pos = 1
        return self._buf[0]

    async def aclose(self) -> None:
        """Releases the underlying iterator (also done when it is exhausted)."""
        self._done = True
        it, self._it = self._it, None
        if it is not None:
            it.close()  # runs the generator's cleanup: closes its snapshot cursor, no I/O


class AsyncEngine:
    """An open walstate directory for asyncio code: :func:`open` gives one.

    ``await db.put/get/delete/sync/checkpoint/close``, ``async with db.batch()``,
    ``async for k, v in db.items(...)``, ``db.info()``/``db.stats()`` (these two
    read counters in memory and only list the WAL directory). The synchronous
    :class:`walstate.Engine` is ``db.engine``; its calls are thread-safe, so
    it may be shared with threads.
    """

    def __init__(self, engine: Engine, pool: concurrent.futures.ThreadPoolExecutor,
                 own_pool: bool = True) -> None:
        self.engine = engine
        self._pool = pool
        self._own_pool = own_pool

    @property
    def path(self) -> str:
        return self.engine.path

    # ---- running calls in the pool ---------------------------------------------
    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self.engine._closed:
            raise ClosedError(f"walstate engine for {self.engine.path} is closed")
        try:
            return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except RuntimeError:  # the pool stopped: closed meanwhile
            raise ClosedError(f"walstate engine for {self.engine.path} is closed") from None

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await _finish(self._submit(fn, *args))

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(fn, *args)

    # ---- the engine's calls ------------------------------------------------------
    async def put(self, key: bytes, value: bytes) -> int:
        """Appends a PUT and applies it; returns its LSN, durable per ``sync`` when
        the await returns. Cancelled while it runs: the write still happens
        (``CancelledError`` is raised once it has)."""
        return await self._write(self.engine.put, key, value)

    async def get(self, key: bytes, default: Any = None) -> Any:
        """The latest committed value of ``key``, or ``default``."""
        return await self._read(self.engine.get, key, default)

    async def contains(self, key: bytes) -> bool:
        """Whether ``key`` has a value (``key in db`` of the synchronous engine)."""
        return await self._read(self.engine.__contains__, key)

    async def delete(self, key: bytes) -> int:
        """Appends a DELETE (of a key that may not exist); returns its LSN.
        Cancelled while it runs: the delete still happens."""
        return await self._write(self.engine.delete, key)

    def batch(self) -> AsyncBatch:
        """``async with db.batch() as b: b.put(k, v); b.delete(k)`` -- one atomic
        record, committed (off the event loop) by the exit."""
        return AsyncBatch(self)

    def items(self, start: bytes | None = None, stop: bytes | None = None,
              **more: Any) -> _ItemsIterator:
        """``async for k, v in db.items(start=None, stop=None)``: the pairs of
        :meth:`walstate.Engine.items` with the same arguments (``more``: any
        further ones it takes), read in the pool, a chunk at a time."""
        self.engine._check_open()
        return _ItemsIterator(self, (start, stop), more)

    async def sync(self) -> int:
        """Makes every earlier write durable; returns the durable LSN."""
        return await self._write(self.engine.sync)

    async def checkpoint(self) -> CheckpointInfo:
        """Runs a checkpoint now; returns once it is durable."""
        return await self._write(self.engine.checkpoint)

    def info(self) -> dict[str, Any]:
        """What :meth:`walstate.Engine.info` returns."""
        return self.engine.info()

    def stats(self) -> dict[str, Any]:
        """What :meth:`walstate.Engine.stats` returns."""
        return self.engine.stats()

    async def close(self) -> None:
        """Flushes, runs the shutdown checkpoint and releases the lock (in the
        pool), then stops the pool. Idempotent; later calls raise ClosedError."""
        try:
            if not self.engine._closed:
                await self._write(self.engine.close)
        finally:
            if self._own_pool:
                self._pool.shutdown(wait=False)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<walstate.aio.AsyncEngine {self.engine!r}>"


class _Opening:
    """What :func:`open` returns: awaitable (``db = await open(...)``) and an
    async context manager (``async with open(...) as db``), like
    ``aiosqlite.connect``."""

    def __init__(self, path: str | os.PathLike[str], max_workers: int,
                 options: dict[str, Any]) -> None:
        self._path = path
        self._max_workers = max_workers
        self._options = options
        self._db: AsyncEngine | None = None

    async def _open(self) -> AsyncEngine:
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="walstate-aio")
        try:
            fut = asyncio.get_running_loop().run_in_executor(
                pool, lambda: _engine.open(self._path, **self._options))
            eng = await _finish(fut)
        except asyncio.CancelledError:
            # the open finished (``_finish`` waited): close what it opened
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                await asyncio.get_running_loop().run_in_executor(pool, fut.result().close)
            pool.shutdown(wait=False)
            raise
        except BaseException:
            pool.shutdown(wait=False)
            raise
        return AsyncEngine(eng, pool)

    def __await__(self) -> Generator[Any, None, AsyncEngine]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncEngine:
        self._db = await self._open()
        return self._db

    async def __aexit__(self, *exc: object) -> None:
        if self._db is not None:
            await self._db.close()


def open(path: str | os.PathLike[str], *, max_workers: int = DEFAULT_WORKERS,  # noqa: A001
         **options: Any) -> _Opening:
    """Opens (creating if missing) the walstate directory ``path`` off the event
    loop -- lock, recovery -- and gives an :class:`AsyncEngine`:
    ``db = await walstate.aio.open(path)`` or
    ``async with walstate.aio.open(path) as db: ...`` (closed on exit).

    ``options`` are those of :func:`walstate.open` (``sync=``, ``config=``, ...);
    ``max_workers`` sizes the engine's thread pool. Raises what
    :func:`walstate.open` raises (ConfigError, LockedError, ...), and
    ValueError for a ``max_workers`` below 1.
    """
    if type(max_workers) is not int or max_workers < 1:
        raise ValueError(f"max_workers must be an int >= 1, not {max_workers!r}")
    return _Opening(path, max_workers, options)

