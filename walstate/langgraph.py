"""LangGraph checkpoint savers on a walstate engine: durable, crash-safe graph memory.

    from walstate.langgraph import WalstateSaver, AsyncWalstateSaver

    with WalstateSaver.from_path("agent-state") as saver:
        graph = builder.compile(checkpointer=saver)
    async with AsyncWalstateSaver.from_path("agent-state") as saver:
        graph = builder.compile(checkpointer=saver)

Both implement every method of ``langgraph.checkpoint.base.BaseCheckpointSaver``,
the synchronous and the ``a``-prefixed ones: put, put_writes, get_tuple, list,
delete_thread, and also copy_thread, delete_for_runs and prune. ``keep_last=N``
keeps only the newest N checkpoints of each thread and namespace (older ones and
their writes are deleted in the same atomic record that adds a new one).

Durability is the engine's: under ``sync="always"`` (the default) a put or
put_writes returns only once it is on disk; concurrent savers' writes share
fsyncs. Each call is one atomic WAL record, so a crash leaves every checkpoint
either complete with its run index or absent.

Keys (all under the saver's ``prefix``, ``b"lg/"`` by default; NUL separates
the parts, so thread ids, namespaces and checkpoint ids must not contain NUL)::

    c\\0 thread \\0 ns \\0 ~id \\xff c                 the checkpoint
    c\\0 thread \\0 ns \\0 ~id \\xff w task \\0 idx     a pending write of it
    r\\0 run_id \\0 thread \\0 ns \\0 id               the run index (delete_for_runs)

``~id`` is the checkpoint id's UTF-8 bytes complemented, so that ascending key
order is descending id order: the newest checkpoint of a thread is the first key
of its range, and a checkpoint's writes follow it. ``get_tuple`` and ``list``
are range reads that stop when they have what they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        get_checkpoint_id,
        get_checkpoint_metadata,
        writes_sort_key,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("walstate.langgraph needs LangGraph: pip install 'walstate[langgraph]' "
                      f"(langgraph, langgraph-checkpoint) -- {exc}") from exc

from . import aio
from . import engine as _engine
from .codec import MAX_KEY
from .engine import Engine

__all__ = ["AsyncWalstateSaver", "WalstateSaver"]

T = TypeVar("T")

_COMPLEMENT = bytes(range(255, -1, -1))
_TAG_CKPT = b"c"
_TAG_WRITE = b"w"
# deletes and copies go in records of at most this many operations
_CHUNK_OPS = 2048
# tuples fetched per trip to the thread pool by alist()
_LIST_CHUNK = 64


# ---- encoding ---------------------------------------------------------------------

def _part(s: object, what: str) -> bytes:
    if not isinstance(s, str):
        if not isinstance(s, int) or isinstance(s, bool):
            raise TypeError(f"{what} must be a str, not {type(s).__name__}")
        s = str(s)  # LangGraph's own savers take str(thread_id) too
    b = s.encode("utf-8")
    if b"\x00" in b:
        raise ValueError(f"{what} must not contain NUL characters: {s!r}")
    return b


def _enc_id(cid: str) -> bytes:
    return _part(cid, "checkpoint_id").translate(_COMPLEMENT) + b"\xff"


def _dec_id(enc: bytes) -> str:
    return enc.translate(_COMPLEMENT).decode("utf-8")


def _pack(*parts: bytes) -> bytes:
    out = [struct.pack("<B", len(parts))]
    for p in parts:
        out.append(struct.pack("<I", len(p)))
        out.append(p)
    return b"".join(out)


def _unpack(buf: bytes) -> list[bytes]:
    n = buf[0]
    pos, out = 1, []
    for _ in range(n):
        (ln,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        out.append(buf[pos:pos + ln])
        pos += ln
    return out


def _idx(i: int) -> bytes:
    return struct.pack(">Q", i + (1 << 63))


def _unidx(b: bytes) -> int:
    return struct.unpack(">Q", b)[0] - (1 << 63)


def _after(prefix: bytes) -> bytes:
    """The first key above every key that starts with ``prefix`` (which ends in NUL)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


# ---- the savers' common part ----------------------------------------------------------

class _Saver(BaseCheckpointSaver[str]):
    """Everything but the async methods (see WalstateSaver, AsyncWalstateSaver)."""

    engine: Engine

    def __init__(self, engine: Engine, *, serde: SerializerProtocol | None = None,
                 keep_last: int | None = None, prefix: bytes = b"lg/") -> None:
        super().__init__(serde=serde)
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an open walstate.Engine, not {type(engine).__name__}")
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise ValueError(f"keep_last must be None or an int >= 1, not {keep_last!r}")
        if type(prefix) is not bytes or not prefix or b"\x00" in prefix:
            raise ValueError(f"prefix must be non-empty bytes without NUL, not {prefix!r}")
        self.engine = engine
        self.keep_last = keep_last
        self.prefix = prefix
        self._ck = prefix + b"c\x00"
        self._runp = prefix + b"r\x00"

    # ---- keys -----------------------------------------------------------------------
    def _thread_prefix(self, thread_id: object) -> bytes:
        return self._ck + _part(thread_id, "thread_id") + b"\x00"

    def _ns_prefix(self, thread_id: object, ns: str) -> bytes:
        return self._thread_prefix(thread_id) + _part(ns, "checkpoint_ns") + b"\x00"

    @staticmethod
    def _check_len(key: bytes) -> bytes:
        if len(key) > MAX_KEY:
            raise ValueError(
                f"thread_id, checkpoint_ns, checkpoint_id and task_id together make a "
                f"{len(key)}-byte key; walstate keys are at most {MAX_KEY} bytes")
        return key

    def _parse(self, key: bytes) -> tuple[str, str, str, bytes, bytes]:
        """(thread_id, ns, checkpoint_id, tag, rest) of a checkpoint or write key."""
        pos = len(self._ck)
        t_end = key.index(b"\x00", pos)
        n_end = key.index(b"\x00", t_end + 1)
        i_end = key.index(b"\xff", n_end + 1)
        return (key[pos:t_end].decode(), key[t_end + 1:n_end].decode(),
                _dec_id(key[n_end + 1:i_end]), key[i_end + 1:i_end + 2], key[i_end + 2:])

    # ---- reading ----------------------------------------------------------------------
    def _groups(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes, list]]:
        """Per checkpoint in [start, stop), newest first: (its key prefix, its record
        or b"" when missing, its writes' [(key, value)])."""
        it = self.engine.items(start, stop)
        try:
            base: bytes | None = None
            rec = b""
            writes: list[tuple[bytes, bytes]] = []
            for k, v in it:
                cut = k.index(b"\xff", len(self._ck)) + 1
                if base is None or k[:cut] != base:
                    if base is not None:
                        yield base, rec, writes
                    base, rec, writes = k[:cut], b"", []
                if k[cut:cut + 1] == _TAG_CKPT:
                    rec = v
                else:
                    writes.append((k, v))
            if base is not None:
                yield base, rec, writes
        finally:
            it.close()

    def _tuple(self, base: bytes, rec: bytes, writes: list) -> CheckpointTuple:
        thread_id, ns, cid, _, _ = self._parse(base + _TAG_CKPT)
        parent, _run, ctype, cbytes, mtype, mbytes = _unpack(rec)
        loads = self.serde.loads_typed
        pending = []
        for k, v in writes:
            task_path, channel, vtype, vbytes = _unpack(v)
            _, _, _, _, rest = self._parse(k)
            sep = rest.index(b"\x00")
            task_id, idx = rest[:sep].decode(), _unidx(rest[sep + 1:])
            pending.append((writes_sort_key(task_path.decode(), task_id, idx),
                            (task_id, channel.decode(), loads((vtype.decode(), vbytes)))))
        pending.sort(key=lambda p: p[0])
        conf = {"thread_id": thread_id, "checkpoint_ns": ns}
        return CheckpointTuple(
            config={"configurable": {**conf, "checkpoint_id": cid}},
            checkpoint=loads((ctype.decode(), cbytes)),
            metadata=loads((mtype.decode(), mbytes)),
            parent_config=({"configurable": {**conf, "checkpoint_id": parent.decode()}}
                           if parent else None),
            pending_writes=[w for _, w in pending],
        )

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint of ``config`` (its ``checkpoint_id``, else the newest of
        the thread and namespace) with its pending writes, or None."""
        c = config["configurable"]
        prefix = self._ns_prefix(c["thread_id"], c.get("checkpoint_ns", ""))
        cid = get_checkpoint_id(config)
        if cid:
            start = prefix + _enc_id(cid)
            stop = start + b"\xff"
        else:
            start, stop = prefix, _after(prefix)
        for base, rec, writes in self._groups(start, stop):
            if rec:
                return self._tuple(base, rec, writes)
        return None

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None,
             limit: int | None = None) -> Iterator[CheckpointTuple]:
        """Checkpoints newest first (descending checkpoint_id): of ``config``'s
        thread (and namespace, when it names one; and only its checkpoint_id, when
        it names one), or of every thread for None; only those whose metadata has
        every ``filter`` item, only those older than ``before``'s checkpoint_id, at
        most ``limit``."""
        if limit is not None and limit <= 0:
            return
        before_id = get_checkpoint_id(before) if before else None
        only_id = get_checkpoint_id(config) if config else None
        ranges: list[tuple[bytes, bytes]]
        exact = False
        if config is None:
            ranges, exact = [(self._ck, _after(self._ck))], False
        else:
            c = config["configurable"]
            ns = c.get("checkpoint_ns")
            if ns is None:
                tp = self._thread_prefix(c["thread_id"])
                ranges = [(tp, _after(tp))]
            else:
                prefix = self._ns_prefix(c["thread_id"], ns)
                exact = True
                cid = get_checkpoint_id(config)
                if cid:
                    s = prefix + _enc_id(cid)
                    ranges = [(s, s + b"\xff")]
                else:
                    ranges = [(prefix, _after(prefix))]
                if before_id is not None:
                    # ids below before_id: keys above every key of before_id's group
                    s = prefix + _enc_id(before_id) + b"\xff"
                    ranges = [(max(s, ranges[0][0]), ranges[0][1])]
        groups = self._groups(*ranges[0])
        if not exact:
            # several namespaces or threads: newest first across them all
            rows = []
            for g in groups:
                if g[1]:
                    cid = self._parse(g[0] + _TAG_CKPT)[2]
                    if ((before_id is None or cid < before_id)
                            and (only_id is None or cid == only_id)):
                        rows.append((cid, g))
            rows.sort(key=lambda r: r[0], reverse=True)
            groups = iter([g for _, g in rows])  # type: ignore[assignment]
        n = 0
        for base, rec, writes in groups:
            if not rec:
                continue
            if filter:
                md = self._metadata(rec)
                if not all(md.get(k, _NOTHING) == v for k, v in filter.items()):
                    continue
            yield self._tuple(base, rec, writes)
            n += 1
            if limit is not None and n >= limit:
                return

    def _metadata(self, rec: bytes) -> dict[str, Any]:
        parts = _unpack(rec)
        return self.serde.loads_typed((parts[4].decode(), parts[5]))

    # ---- writing ---------------------------------------------------------------------
    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        """Stores ``checkpoint`` (durable per the engine's ``sync`` on return) as a
        child of ``config``'s checkpoint_id; with ``keep_last``, the thread's
        namespace keeps its newest ``keep_last`` checkpoints (one atomic record)."""
        c = config["configurable"]
        thread_id, ns = c["thread_id"], c.get("checkpoint_ns", "")
        prefix = self._ns_prefix(thread_id, ns)
        cid = checkpoint["id"]
        base = prefix + _enc_id(cid)
        md = get_checkpoint_metadata(config, metadata)
        md.pop("writes", None)  # type: ignore[misc]
        run_id = md.get("run_id")
        run = b"" if run_id is None else _part(run_id, "run_id")
        ctype, cbytes = self.serde.dumps_typed(checkpoint)
        mtype, mbytes = self.serde.dumps_typed(md)
        parent = c.get("checkpoint_id")
        rec = _pack(b"" if not parent else _part(parent, "checkpoint_id"), run,
                    ctype.encode(), cbytes, mtype.encode(), mbytes)
        key = self._check_len(base + _TAG_CKPT)
        with self.engine.batch() as b:
            b.put(key, rec)
            if run:
                b.put(self._check_len(self._run_key(run, prefix, cid)), b"")
            if self.keep_last is not None:
                self._trim(b, prefix, base)
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                 "checkpoint_id": cid}}

    def _trim(self, b: Any, prefix: bytes, base: bytes) -> None:
        """Adds to batch ``b`` the deletes that leave the namespace ``prefix`` with its
        newest ``keep_last`` checkpoints, counting the one being put (``base``)."""
        keep = self.keep_last
        assert keep is not None
        rank, ours_counted = 0, False
        for g_base, g_rec, g_writes in self._groups(prefix, _after(prefix)):
            if not ours_counted and g_base >= base:
                rank += 1
                ours_counted = True
                if g_base == base:
                    continue
            if rank >= keep:
                self._delete_group(b, g_base, g_rec, g_writes)
            elif g_rec:
                rank += 1

    def _run_key(self, run: bytes, ns_prefix: bytes, cid: str) -> bytes:
        return self._runp + run + b"\x00" + ns_prefix[len(self._ck):] + _part(cid, "checkpoint_id")

    def _delete_group(self, b: Any, base: bytes, rec: bytes, writes: list) -> None:
        """Adds to batch ``b`` the deletes of one checkpoint, its writes and its
        run-index key."""
        if rec:
            b.delete(base + _TAG_CKPT)
            run = _unpack(rec)[1]
            if run:
                thread_id, ns, cid, _, _ = self._parse(base + _TAG_CKPT)
                b.delete(self._run_key(run, self._ns_prefix(thread_id, ns), cid))
        for k, _ in writes:
            b.delete(k)

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        """Stores the pending writes of task ``task_id`` for ``config``'s
        checkpoint, as one atomic record. A write already stored under the same
        (task_id, index) is kept, except for the special channels (errors,
        interrupts...), which replace it -- as LangGraph's own savers do."""
        c = config["configurable"]
        base = (self._ns_prefix(c["thread_id"], c.get("checkpoint_ns", ""))
                + _enc_id(c["checkpoint_id"]) + _TAG_WRITE + _part(task_id, "task_id") + b"\x00")
        replace = all(w[0] in WRITES_IDX_MAP for w in writes)
        path = _part(task_path, "task_path")
        rows = []
        for i, (channel, value) in enumerate(writes):
            key = self._check_len(base + _idx(WRITES_IDX_MAP.get(channel, i)))
            vtype, vbytes = self.serde.dumps_typed(value)
            rows.append((key, _pack(path, channel.encode(), vtype.encode(), vbytes)))
        get = self.engine.get
        if not replace:
            rows = [(k, v) for k, v in rows if get(k) is None]
        if not rows:
            return
        with self.engine.batch() as b:
            for k, v in rows:
                b.put(k, v)

    # ---- deleting, copying ------------------------------------------------------------
    def _delete_range(self, start: bytes, stop: bytes,
                      keep: Callable[[bytes, bytes, int], bool] | None = None) -> None:
        """Deletes the checkpoints in [start, stop) (``keep(ns_prefix, base, rank)``
        says which stay; rank counts per namespace from 0, newest first)."""
        batch: Any = None
        n = 0
        ranks: dict[bytes, int] = {}
        try:
            for base, rec, writes in list(self._groups(start, stop)):
                ns_prefix = base[:base.index(b"\x00", base.index(b"\x00", len(self._ck)) + 1) + 1]
                rank = ranks.get(ns_prefix, 0)
                if rec:
                    ranks[ns_prefix] = rank + 1
                if keep is not None and rec and keep(ns_prefix, base, rank):
                    continue
                if batch is None:
                    batch = self.engine.batch()
                self._delete_group(batch, base, rec, writes)
                n += 1 + len(writes)
                if n >= _CHUNK_OPS:
                    batch.__exit__(None, None, None)
                    batch, n = None, 0
        except BaseException as exc:
            if batch is not None:
                batch.__exit__(type(exc), exc, None)
            raise
        if batch is not None:
            batch.__exit__(None, None, None)

    def delete_thread(self, thread_id: str) -> None:
        """Deletes every checkpoint and write of ``thread_id`` (all namespaces)."""
        tp = self._thread_prefix(thread_id)
        self._delete_range(tp, _after(tp))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Deletes every checkpoint (and its writes) whose metadata's run_id is one
        of ``run_ids``, in any thread."""
        if isinstance(run_ids, (str, bytes)):
            raise TypeError("run_ids must be a sequence of run ids, not one string")
        for run_id in run_ids:
            rp = self._runp + _part(run_id, "run_id") + b"\x00"
            for k, _ in list(self.engine.items(rp, _after(rp))):
                rest = k[len(rp):]
                t_end = rest.index(b"\x00")
                n_end = rest.index(b"\x00", t_end + 1)
                ns_prefix = self._ck + rest[:n_end + 1]
                s = ns_prefix + _enc_id(rest[n_end + 1:].decode())
                self._delete_range(s, s + b"\xff")
                if self.engine.get(k) is not None:  # an index key whose checkpoint is gone
                    self.engine.delete(k)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copies every checkpoint and write of ``source_thread_id`` (all
        namespaces) to ``target_thread_id``; checkpoint ids stay the same."""
        src = self._thread_prefix(source_thread_id)
        dst = self._thread_prefix(target_thread_id)
        rows = list(self.engine.items(src, _after(src)))
        for i in range(0, len(rows), _CHUNK_OPS):
            with self.engine.batch() as b:
                for k, v in rows[i:i + _CHUNK_OPS]:
                    nk = self._check_len(dst + k[len(src):])
                    b.put(nk, v)
                    thread_id, ns, cid, tag, _ = self._parse(nk)
                    if tag == _TAG_CKPT:
                        run = _unpack(v)[1]
                        if run:
                            b.put(self._run_key(run, self._ns_prefix(target_thread_id, ns), cid),
                                  b"")

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``strategy="keep_latest"``: each namespace of each thread keeps only its
        newest checkpoint (with its writes); ``"delete"``: the threads are deleted.

        (LangGraph's DeltaChannel rebuilds a value from its ancestors' writes: a
        graph that uses it must not be pruned, nor run with ``keep_last``.)"""
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"strategy must be 'keep_latest' or 'delete', not {strategy!r}")
        if isinstance(thread_ids, (str, bytes)):
            raise TypeError("thread_ids must be a sequence of thread ids, not one string")
        for thread_id in thread_ids:
            tp = self._thread_prefix(thread_id)
            if strategy == "delete":
                self._delete_range(tp, _after(tp))
            else:
                self._delete_range(tp, _after(tp), keep=lambda ns, base, rank: rank == 0)

    def get_next_version(self, current: str | None, channel: None = None) -> str:
        """Channel versions as LangGraph's own savers make them: a zero-padded
        counter and a random fraction (``"00..07.0123..."``), increasing."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"


class _Nothing:
    pass


_NOTHING = _Nothing()


# ---- the synchronous saver -------------------------------------------------------------

class WalstateSaver(_Saver):
    """A LangGraph checkpoint saver on a walstate :class:`~walstate.Engine`.

    ``WalstateSaver(db, keep_last=None, serde=None)`` on an open engine (which
    stays the caller's to close), or ``with WalstateSaver.from_path(path, **options)
    as saver`` (opens the engine with ``walstate.open``'s options, closes it at the
    end). Thread-safe: graphs in many threads may share one saver. The ``a``
    methods work too (each runs the synchronous one in the event loop's default
    thread pool), so it also serves async code.
    """

    @classmethod
    @contextlib.contextmanager
    def from_path(cls, path: str, *, keep_last: int | None = None,
                  serde: SerializerProtocol | None = None,
                  **options: Any) -> Iterator[WalstateSaver]:
        """Opens the walstate directory ``path`` (created if missing; ``options``
        are walstate.open's: ``sync="always"`` by default) and yields a saver on
        it; the engine is closed at the end."""
        db = _engine.open(path, **options)
        try:
            yield cls(db, keep_last=keep_last, serde=serde)
        finally:
            db.close()

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await aio._finish(loop.run_in_executor(None, lambda: fn(*args, **kwargs)))

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._run(self.get_tuple, config)

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        it = self.list(config, filter=filter, before=before, limit=limit)
        while True:
            chunk = await self._run(_take, it, _LIST_CHUNK)
            for t in chunk:
                yield t
            if len(chunk) < _LIST_CHUNK:
                return

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        return await self._run(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await self._run(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._run(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._run(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._run(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._run(self.prune, thread_ids, strategy=strategy)


def _take(it: Iterator[T], n: int) -> list[T]:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out


# ---- the asyncio saver ----------------------------------------------------------------

class AsyncWalstateSaver(_Saver):
    """A LangGraph checkpoint saver for asyncio graphs (``graph.ainvoke``,
    ``astream``) on a walstate engine.

    ``AsyncWalstateSaver(db, keep_last=None, serde=None)`` on an open
    :class:`walstate.aio.AsyncEngine` (or a :class:`walstate.Engine`), which stays
    the caller's to close; or ``async with AsyncWalstateSaver.from_path(path,
    **options) as saver``. Every ``a`` method runs in the async engine's thread
    pool, never on the event loop: puts from many tasks share fsyncs. A cancelled
    ``aput``/``aput_writes`` still completes its (atomic) write before
    ``CancelledError`` is raised. The synchronous methods work as well, from any
    thread.
    """

    def __init__(self, engine: aio.AsyncEngine | Engine, *,
                 serde: SerializerProtocol | None = None, keep_last: int | None = None,
                 prefix: bytes = b"lg/") -> None:
        if isinstance(engine, aio.AsyncEngine):
            self.aengine: aio.AsyncEngine | None = engine
            engine = engine.engine
        else:
            self.aengine = None
        super().__init__(engine, serde=serde, keep_last=keep_last, prefix=prefix)

    @classmethod
    @contextlib.asynccontextmanager
    async def from_path(cls, path: str, *, keep_last: int | None = None,
                        serde: SerializerProtocol | None = None,
                        **options: Any) -> AsyncIterator[AsyncWalstateSaver]:
        """Opens ``path`` with ``walstate.aio.open(path, **options)`` (off the event
        loop) and yields a saver on it; the engine is closed at the end."""
        async with aio.open(path, **options) as db:
            yield cls(db, keep_last=keep_last, serde=serde)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        pool = self.aengine._pool if self.aengine is not None else None
        return await aio._finish(loop.run_in_executor(pool, lambda: fn(*args, **kwargs)))

    aget_tuple = WalstateSaver.aget_tuple
    alist = WalstateSaver.alist
    aput = WalstateSaver.aput
    aput_writes = WalstateSaver.aput_writes
    adelete_thread = WalstateSaver.adelete_thread
    adelete_for_runs = WalstateSaver.adelete_for_runs
    acopy_thread = WalstateSaver.acopy_thread
    aprune = WalstateSaver.aprune
