"""``TaskStore.map``: a process pool whose every transition is recorded.

The process that holds the engine (the parent) records everything; worker
processes only run ``fn``. Items go to the workers in chunks over one pipe
per worker, at most ``_PREFETCH`` chunks outstanding per worker, so that a
worker never waits for the parent's fsync. The parent's loop:

1. start the chunks it is about to send: one WAL record for all of them
   (PENDING/FAILED -> RUNNING, attempts + 1; an item without a task yet is
   created RUNNING), durable before any is sent;
2. send them; wait for results or a worker's death;
3. record every result that came in: one record (RUNNING -> SUCCESS with
   the pickled result as payload, or FAILED with the error's text).

A worker that dies (killed, or ``fn`` crashed it) leaves its chunks RUNNING:
the one it was running is started again one item per chunk, the ones it had
not begun as they were, in a new worker; an item that kills its worker alone
fails ("worker process died"). If the parent dies,
its workers die with it (PR_SET_PDEATHSIG; else at their next message) and
the items left RUNNING belong to a dead owner: ``recover()`` -- which the
next ``map`` calls first -- gives them back.
"""

from __future__ import annotations

import collections
import ctypes
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from .tasks import (
    _COUNTS_KEPT,
    _FAILED,
    _IDX,
    _NO_OWNER,
    _PENDING,
    _RECORDS,
    _RUNNING,
    _SUCCESS,
    FORMAT_VERSION,
    MAX_ID_BYTES,
    RECORD_HEADER,
    InvalidTransitionError,
    TasksFailedError,
    TaskStore,
    _decode_rec,
    _id_bytes,
    decode_payload,
    error_text,
)

_PREFETCH = 2  # chunks outstanding per worker
_HEARTBEAT = 5.0  # seconds between the parent's heartbeats while it runs a map
_PICKLE = 2 << 1  # flags: the payload's codec is pickle
_HAS_ERROR = 0x01
_PACK = RECORD_HEADER.pack


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker(conn: Any, fn_blob: bytes, parent: int) -> None:
    """A worker process: run ``fn`` on each chunk received, send the results."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _die_with_parent()
    fn = pickle.loads(fn_blob)
    dumps, protocol = pickle.dumps, pickle.HIGHEST_PROTOCOL
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        chunk_no, items = msg
        out: list[tuple[bool, Any]] = []
        for item in items:
            try:
                out.append((True, dumps(fn(item), protocol)))
            except Exception as exc:  # noqa: BLE001 - the item's failure, recorded
                out.append((False, error_text(exc)))
        try:
            conn.send((chunk_no, out))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, fn_blob: bytes) -> None:
        parent_conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child_conn, fn_blob, os.getpid()),
                                daemon=True, name="walstate-map-worker")
        self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        self.outstanding: collections.deque[int] = collections.deque()
        self.dead = False

    def stop(self, timeout: float) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class _Map:
    """One ``map`` call's state: the items, their records, the chunks."""

    def __init__(self, store: TaskStore, items: list[Any], ids: list[str],
                 raw_ids: list[bytes], retries: int) -> None:
        self.store = store
        self.items = items
        self.ids = ids
        self.raw_ids = raw_ids
        self.rec_keys = [_RECORDS + raw for raw in raw_ids]
        self.retries = retries
        # per item: (code, attempts, payload, codec, error) as recorded
        self.recs: list[Any] = [None] * len(items)
        self.tries = [0] * len(items)  # started in this call
        self.results: list[Any] = [None] * len(items)
        self.failed: dict[int, str] = {}

    # Each writer below builds one batch for many items and commits it under the
    # store's lock (the counters come with it), then waits for its fsync outside.
    def _commit(self, ops: list[tuple[bytes, bytes | None]], delta: dict[int, int],
                owner: bool = False, now: float = 0.0) -> None:
        store = self.store
        with store._mu:  # noqa: SLF001
            if owner:
                store._owner_ops(ops, now)  # noqa: SLF001
            lsn = store._commit(ops, delta)  # noqa: SLF001
        store._wait(lsn)  # noqa: SLF001

    def start(self, indices: list[int]) -> None:
        now = time.time()
        token = self.store._token  # noqa: SLF001
        ops: list[tuple[bytes, bytes | None]] = []
        add = ops.append
        delta: dict[int, int] = {_RUNNING: 0}
        run_idx = _IDX[_RUNNING]
        recs, rec_keys, raw_ids = self.recs, self.rec_keys, self.raw_ids
        # the record of a fresh item's first start is the same bytes for all
        first = _PACK(FORMAT_VERSION, _RUNNING, 0, 1, now, 0, token)
        new = []
        fresh = 0
        for i in indices:
            code, attempts, payload, cid, _ = recs[i]
            if code == 0:  # no record yet: created and started in one
                add((run_idx + raw_ids[i], b""))
                add((rec_keys[i], first))
                fresh += 1
                new.append((_RUNNING, 1, b"", 0, None))
                continue
            if code != _RUNNING:
                add((_IDX[code] + raw_ids[i], None))
                add((run_idx + raw_ids[i], b""))
                delta[code] = delta.get(code, 0) - 1
                delta[_RUNNING] += 1
            attempts += 1
            add((rec_keys[i], _PACK(FORMAT_VERSION, _RUNNING, cid << 1, attempts, now,
                                    len(payload), token) + payload))
            new.append((_RUNNING, attempts, payload, cid, None))
        delta[_RUNNING] += fresh
        self._commit(ops, delta, owner=True, now=now)
        tries = self.tries
        for i, rec in zip(indices, new, strict=True):
            recs[i] = rec
            tries[i] += 1

    def finish(self, done: list[tuple[int, bool, Any]]) -> list[int]:
        """Records results: (index, ok, pickled result or error text). Returns the
        items to run again (failed, with retries left)."""
        now = time.time()
        ops: list[tuple[bytes, bytes | None]] = []
        add = ops.append
        succ_idx, fail_idx, run_idx = _IDX[_SUCCESS], _IDX[_FAILED], _IDX[_RUNNING]
        recs, rec_keys, raw_ids = self.recs, self.rec_keys, self.raw_ids
        headers: dict[tuple[int, int], bytes] = {}  # (attempts, result size) -> header
        new = []
        n_ok = n_failed = 0
        for i, ok, value in done:
            attempts = recs[i][1]
            raw = raw_ids[i]
            add((run_idx + raw, None))
            if ok:
                add((succ_idx + raw, b""))
                header = headers.get((attempts, len(value)))
                if header is None:
                    header = headers[attempts, len(value)] = _PACK(
                        FORMAT_VERSION, _SUCCESS, _PICKLE, attempts, now, len(value), _NO_OWNER)
                add((rec_keys[i], header + value))
                new.append((_SUCCESS, attempts, value, 2, None))
                n_ok += 1
            else:
                _, _, payload, cid, _ = recs[i]
                add((fail_idx + raw, b""))
                err = value.encode("utf-8", "surrogatepass")
                add((rec_keys[i], _PACK(FORMAT_VERSION, _FAILED, (cid << 1) | _HAS_ERROR,
                                        attempts, now, len(payload), _NO_OWNER) + payload + err))
                new.append((_FAILED, attempts, payload, cid, value))
                n_failed += 1
        self._commit(ops, {_RUNNING: -(n_ok + n_failed), _SUCCESS: n_ok, _FAILED: n_failed})
        again = []
        results, failed = self.results, self.failed
        for (i, ok, value), rec in zip(done, new, strict=True):
            recs[i] = rec
            if ok:
                results[i] = value
                if failed:
                    failed.pop(i, None)
            elif self.tries[i] <= self.retries and self._may_retry(rec[1]):
                again.append(i)
            else:
                failed[i] = value
        return again

    def _may_retry(self, attempts: int) -> bool:
        limit = self.store.max_attempts
        return limit is None or attempts < limit

    def release(self, indices: list[int]) -> None:
        """RUNNING -> PENDING for items started but not finished (interrupted).
        Reads each record again: an interruption may have come between a commit
        and the bookkeeping after it."""
        now = time.time()
        ops: list[tuple[bytes, bytes | None]] = []
        db = self.store._db  # noqa: SLF001
        with self.store._mu:  # noqa: SLF001
            for i in indices:
                raw = self.raw_ids[i]
                value = db.get(_RECORDS + raw)
                if value is None:
                    continue
                rec = _decode_rec(self.ids[i], value)
                if rec.code != _RUNNING or rec.owner != self.store._token:  # noqa: SLF001
                    continue
                ops.append((_IDX[_RUNNING] + raw, None))
                ops.append((_IDX[_PENDING] + raw, b""))
                ops.append((_RECORDS + raw, _PACK(FORMAT_VERSION, _PENDING, rec.codec << 1,
                                                  rec.attempts, now, len(rec.payload),
                                                  _NO_OWNER) + rec.payload))
            if not ops:
                return
            n = len(ops) // 3
            lsn = self.store._commit(ops, {_RUNNING: -n, _PENDING: n})  # noqa: SLF001
        self.store._wait(lsn)  # noqa: SLF001


def run_map(store: TaskStore, fn: Callable[[Any], Any], items: Iterable[Any], *,
            processes: int | None, key: Callable[[Any], str], chunksize: int | None,
            retries: int, context: str | None) -> list[Any]:
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if processes is None:
        processes = os.cpu_count() or 1
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive int, not {processes!r}")
    if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                  or chunksize < 1):
        raise ValueError(f"chunksize must be a positive int or None, not {chunksize!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, not {retries!r}")
    methods = multiprocessing.get_all_start_methods()
    if context is None:
        context = "forkserver" if "forkserver" in methods else "spawn"
    if context not in ("forkserver", "spawn") or context not in methods:
        raise ValueError(f"context must be 'forkserver' or 'spawn' (available here: "
                         f"{[m for m in methods if m != 'fork']}), not {context!r}")
    items = list(items)
    ids = []
    raw_ids = []
    where: dict[bytes, int] = {}
    limit = MAX_ID_BYTES
    for n, item in enumerate(items):
        task_id = key(item)
        raw = b""
        if type(task_id) is str:
            try:
                raw = task_id.encode("utf-8")
            except UnicodeEncodeError:
                raw = b""
        if not 0 < len(raw) <= limit:
            try:
                raw = _id_bytes(task_id)  # raises, naming what is wrong
            except (TypeError, ValueError) as e:
                raise type(e)(f"key(items[{n}]): {e}") from None
        first = where.setdefault(raw, n)
        if first != n:
            raise ValueError(f"items[{first}] and items[{n}] have the same task id "
                             f"{task_id!r}: key() must give each item its own id")
        ids.append(task_id)
        raw_ids.append(raw)
    if not items:
        return []
    try:
        fn_blob = pickle.dumps(fn, pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"fn must be picklable (a module-level function) to run in worker "
                        f"processes: {e}") from None

    m = _Map(store, items, ids, raw_ids, retries)
    store.recover()  # the items of a map whose process died: back to PENDING
    todo: list[int] = []
    db = store._db  # noqa: SLF001
    # a store that holds no task yet (its counters say so): nothing to look up
    empty = db.get(_COUNTS_KEPT) is not None and not any(store.counts().values())
    get = db.get
    for i, rec_key in enumerate(m.rec_keys):
        value = None if empty else get(rec_key)
        if value is None:
            m.recs[i] = (0, 0, b"", 0, None)
            todo.append(i)
            continue
        rec = _decode_rec(ids[i], value)
        m.recs[i] = (rec.code, rec.attempts, rec.payload, rec.codec, rec.error)
        if rec.code == _SUCCESS:
            m.results[i] = rec
        elif rec.code == _PENDING:
            todo.append(i)
        elif rec.code == _FAILED:
            if m._may_retry(rec.attempts):  # noqa: SLF001
                todo.append(i)
            else:
                m.failed[i] = rec.error or ""
        else:
            raise InvalidTransitionError(
                f"task {ids[i]!r} is RUNNING under a live owner (another map or worker of "
                f"this process?): map cannot run it; nothing was written")
    if todo:
        _run_pool(m, todo, fn_blob, processes, chunksize, multiprocessing.get_context(context))
    out = []
    for value in m.results:
        if isinstance(value, bytes):
            out.append(pickle.loads(value))
        elif value is not None:
            out.append(decode_payload(value.payload, value.codec))
        else:
            out.append(None)
    if m.failed:
        raise TasksFailedError({ids[i]: err for i, err in sorted(m.failed.items())})
    return out


def _run_pool(m: _Map, todo: list[int], fn_blob: bytes, processes: int,
              chunksize: int | None, ctx: Any) -> None:
    n = len(todo)
    processes = min(processes, n)
    if chunksize is None:
        chunksize = max(1, min(2000, math.ceil(n / (processes * 8))))
    queue: collections.deque[list[int]] = collections.deque(
        todo[lo:lo + chunksize] for lo in range(0, n, chunksize))
    chunks: dict[int, list[int]] = {}
    next_chunk = 0
    workers = [_Worker(ctx, fn_blob) for _ in range(processes)]
    last_beat = time.monotonic()
    try:
        while queue or chunks:
            # 1. start what the workers will get next (one record), then send it
            sends = []
            for w in workers:
                while not w.dead and queue and len(w.outstanding) < _PREFETCH:
                    chunk = queue.popleft()
                    chunks[next_chunk] = chunk
                    w.outstanding.append(next_chunk)
                    sends.append((w, next_chunk))
                    next_chunk += 1
            if sends:
                m.start([i for _, c in sends for i in chunks[c]])
                for w, c in sends:
                    try:
                        w.conn.send((c, [m.items[i] for i in chunks[c]]))
                    except (BrokenPipeError, OSError):
                        w.dead = True
            # 2. wait for results or deaths
            waitables: list[Any] = []
            for w in workers:
                if w.outstanding:
                    waitables += [w.conn, w.proc.sentinel]
            if not waitables:
                continue
            ready = set(multiprocessing.connection.wait(waitables, timeout=_HEARTBEAT))
            done: list[tuple[int, bool, Any]] = []
            for w in workers:
                if w.conn in ready or w.proc.sentinel in ready:
                    try:
                        while w.conn.poll():
                            c, out = w.conn.recv()
                            w.outstanding.remove(c)
                            done += [(i, ok, v) for i, (ok, v) in zip(chunks.pop(c), out,
                                                                       strict=True)]
                    except (EOFError, OSError):
                        w.dead = True
                    if w.proc.sentinel in ready:
                        w.dead = True
            again = m.finish(done) if done else []
            queue.extend([i] for i in again)
            # 3. replace dead workers; their chunks go again, one item per chunk
            for k, w in enumerate(workers):
                if not w.dead:
                    continue
                w.proc.join()
                code = w.proc.exitcode
                lost = [chunks.pop(c) for c in w.outstanding]
                w.outstanding.clear()
                w.conn.close()
                died = []
                if lost:
                    # A worker runs its chunks in the order sent: it died in the first
                    # one; the others never began (they go again as they are).
                    running, unstarted = lost[0], lost[1:]
                    queue.extendleft(reversed(unstarted))
                    if len(running) > 1:
                        queue.extendleft([i] for i in reversed(running))
                    else:
                        died.append((running[0], False, f"worker process died (exit code "
                                     f"{code}) while running this item"))
                if died:
                    queue.extend([i] for i in m.finish(died))
                workers[k] = _Worker(ctx, fn_blob) if queue or chunks else w
            if time.monotonic() - last_beat > _HEARTBEAT:
                m.store.heartbeat()
                last_beat = time.monotonic()
    except BaseException:
        # KeyboardInterrupt (or an error of this process): what finished is recorded;
        # what was started goes back to PENDING, so that a rerun -- even in this
        # process, whose store is a live owner -- runs it again.
        for w in workers:
            if w.proc.is_alive():
                w.proc.kill()
        try:
            m.release([i for chunk in chunks.values() for i in chunk])
        except Exception:  # noqa: BLE001 - the engine failed: the original error matters
            pass
        raise
    finally:
        for w in workers:
            w.stop(timeout=5.0)
