"""Task states on top of the engine: long-running jobs that resume after a crash.

A task is PENDING, RUNNING, SUCCESS or FAILED::

    create ──> PENDING ──start──> RUNNING ──finish──> SUCCESS
                ^  ^               │  │ ^
                │  └──recover()────┘  │ └─progress (new payload: a resumable cursor)
                │     release()       └──fail──> FAILED
                └──────────retry()──────────────────┘

Every transition is exactly one atomic write (one batch, so one WAL record):
after any crash a task is either before or after a transition, never in
between. An illegal transition raises
:class:`~walstate.errors.InvalidTransitionError` and writes nothing.

The short form (``run`` starts the task, finishes it when the block ends,
fails it with the exception's text when the block raises)::

    import walstate
    from walstate.tasks import Status, TaskStore

    with walstate.open("state") as db:
        tasks = TaskStore(db, codec="json")
        tasks.create_many([f"job-{n}" for n in range(3)], payload=0)
        tasks.recover()                       # tasks of a process that died -> PENDING
        for task in list(tasks.list(status=Status.PENDING)):
            with tasks.run(task.task_id) as t:
                step = t.payload              # the cursor: where to resume
                while step < 10:
                    step += 1                 # ... one unit of real work ...
                    t.progress(step)

and a pool of worker processes whose results are recorded as they come in::

    results = tasks.map(fn, items, processes=4)   # a rerun skips what finished

Ownership: a RUNNING task records its owner (the TaskStore that started it:
host, process id, process start time, boot id) and the owner keeps a
heartbeat. ``recover()`` may run at any time: it returns to PENDING only the
tasks whose owner is gone -- its process exited, or its engine was closed
(only one process at a time holds the directory for writing, so an owner in
another process can never record the task's end) -- and with
``stale_after=seconds`` also those whose heartbeat (the later of the task's
last transition and its owner's ``heartbeat()``) is older than that.

Counts: ``counts()`` reads one counter per status, kept in the same atomic
record as every transition that changes a status, so after any crash the
counters equal a scan of the tasks.

Layout (all keys under ``KEY_PREFIX``, so a TaskStore shares an engine with
other data): ``PREFIX b"r" id`` holds the record; ``PREFIX b"s" <status byte>
id`` is an empty index entry, so that ``list(status=...)`` reads only the
tasks with that status, in id order (UTF-8 byte order is code point order);
``PREFIX b"n" <status byte>`` is that status's count (u64 little-endian) and
``PREFIX b"n\\x00"`` marks the counters as kept (a store written before they
existed gets them, from one scan, in its first transition); ``PREFIX b"o"
<8-byte token>`` describes an owner (JSON: host, pid, start, boot,
heartbeat). A record is ``RECORD_HEADER`` (version 2, status, flags,
attempts, updated_at, payload length, owner token or 8 zero bytes) + payload
+ error (UTF-8, present when flags bit 0 is set); flags bits 1-2 name the
payload's codec (0 bytes, 1 JSON, 2 pickle). Version 1 records (no owner
token, no codec) are still read.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import pickle
import socket
import struct
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import InvalidTransitionError, WalStateError

__all__ = ["InvalidTransitionError", "RunningTask", "Status", "TaskState", "TaskStore",
           "TasksFailedError"]

KEY_PREFIX = b"\x00walstate.tasks\x00"
_RECORDS = KEY_PREFIX + b"r"
_INDEX = KEY_PREFIX + b"s"
_COUNTS = KEY_PREFIX + b"n"
_COUNTS_KEPT = _COUNTS + b"\x00"
_OWNERS = KEY_PREFIX + b"o"
MAX_KEY = 511  # the engine's (LMDB's) key limit
MAX_VALUE = 64 * 1024 * 1024  # the engine's value limit
# The index key is the longer one: prefix + status byte + id.
MAX_ID_BYTES = MAX_KEY - len(_INDEX) - 1

FORMAT_VERSION = 2
# version u8, status u8, flags u8, attempts u32, updated_at f64, payload length u32,
# owner token (8 bytes; zeros: none)
RECORD_HEADER = struct.Struct("<BBBIdI8s")
_RECORD_HEADER_V1 = struct.Struct("<BBBIdI")
_COUNT = struct.Struct("<Q")
_HAS_ERROR = 0x01
_CODEC_SHIFT = 1
_CODEC_MASK = 0x06
_NO_OWNER = bytes(8)
_PAGE = 256  # index/record keys read per items() call while listing
_BATCH_OPS = 30000  # a batch of bulk writes (create_many, recover, purge) at most this big

CODECS = (None, "json", "pickle")
_CODEC_ID = {None: 0, "json": 1, "pickle": 2}


class Status(enum.Enum):
    """The state of a task."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


# One byte per status, in records, index and counter keys; never renumber (on disk).
_CODE = {Status.PENDING: 1, Status.RUNNING: 2, Status.SUCCESS: 3, Status.FAILED: 4}
_STATUS = {code: status for status, code in _CODE.items()}
_PENDING, _RUNNING, _SUCCESS, _FAILED = 1, 2, 3, 4


@dataclass(frozen=True)
class TaskState:
    """A task as stored: what ``get``/``list`` return and transitions produce.

    ``payload`` is bytes, or the decoded object in a store made with a codec.
    ``owner`` (not compared) is the hex token of the TaskStore running it
    (RUNNING tasks only; ``TaskStore.owner_info`` describes it)."""

    task_id: str
    status: Status
    updated_at: float  # epoch seconds, from the wall clock
    attempts: int  # how many times start() succeeded
    payload: Any
    error: str | None
    owner: str | None = field(default=None, compare=False)


_TaskList = list[TaskState]  # an alias: inside TaskStore, ``list`` is the method


class _Default(bytes):
    """The default payload of ``create``: b"" in a bytes store, None with a codec."""


_NO_PAYLOAD: Any = _Default()
T = TypeVar("T")
R = TypeVar("R")


class TasksFailedError(WalStateError):
    """``map`` finished every item it could, and some failed: ``failed`` maps
    each failed task id to its error. Everything else is recorded; a rerun
    of the same ``map`` retries the failed items (up to ``max_attempts``)."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = failed
        first = next(iter(failed.items()))
        super().__init__(f"{len(failed)} task(s) failed; first: {first[0]!r}: {first[1]}")


# A record as stored, before its payload is decoded.
@dataclass
class _Rec:
    code: int
    attempts: int
    updated_at: float
    payload: bytes
    codec: int
    error: str | None
    owner: bytes

    def encode(self, task_id: object = "?") -> bytes:
        flags = self.codec << _CODEC_SHIFT
        error = b""
        if self.error is not None:
            flags |= _HAS_ERROR
            error = self.error.encode("utf-8", "surrogatepass")
        header = RECORD_HEADER.pack(FORMAT_VERSION, self.code, flags, self.attempts,
                                    self.updated_at, len(self.payload), self.owner)
        if len(header) + len(self.payload) + len(error) > MAX_VALUE:
            raise ValueError(
                f"task {task_id!r}: payload + error is {len(self.payload) + len(error)} bytes; "
                f"the limit is {MAX_VALUE - len(header)} (the engine's 64 MiB value limit)")
        return b"".join((header, self.payload, error))


def _decode_rec(task_id: object, raw: bytes) -> _Rec:
    raw = bytes(raw)
    if not raw:
        raise ValueError(f"task {task_id!r}: empty record")
    version = raw[0]
    if version == FORMAT_VERSION and len(raw) >= RECORD_HEADER.size:
        _, code, flags, attempts, updated_at, n, owner = RECORD_HEADER.unpack_from(raw)
        start = RECORD_HEADER.size
    elif version == 1 and len(raw) >= _RECORD_HEADER_V1.size:
        _, code, flags, attempts, updated_at, n = _RECORD_HEADER_V1.unpack_from(raw)
        owner, start = _NO_OWNER, _RECORD_HEADER_V1.size
    elif version not in (1, FORMAT_VERSION):
        raise ValueError(f"task {task_id!r}: unknown record version {version}")
    else:
        raise ValueError(f"task {task_id!r}: record of {len(raw)} bytes is too short")
    end = start + n
    cid = (flags & _CODEC_MASK) >> _CODEC_SHIFT
    if code not in _STATUS or end > len(raw) or cid > 2:
        raise ValueError(f"task {task_id!r}: malformed record")
    error = raw[end:].decode("utf-8", "surrogatepass") if flags & _HAS_ERROR else None
    return _Rec(code, attempts, updated_at, raw[start:end], cid, error, owner)


def _id_bytes(task_id: object) -> bytes:
    if not isinstance(task_id, str):
        raise TypeError(f"task id must be a str, not {type(task_id).__name__}")
    if not task_id:
        raise ValueError("task id must be a non-empty str")
    try:
        raw = task_id.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"task id {task_id!r} is not encodable as UTF-8: {e}") from None
    if len(raw) > MAX_ID_BYTES:
        raise ValueError(
            f"task id is {len(raw)} bytes in UTF-8; the limit is {MAX_ID_BYTES} "
            f"(the engine's {MAX_KEY}-byte key limit minus the TaskStore prefix)"
        )
    return raw


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, str):
        raise TypeError("payload must be bytes (or a buffer), not str")
    try:
        return bytes(memoryview(payload))  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"payload must be bytes (or a buffer), not {type(payload).__name__}"
        ) from None


def decode_payload(raw: bytes, codec_id: int) -> Any:
    """A stored payload as an object: bytes (codec 0), JSON (1) or pickle (2)."""
    if codec_id == 1:
        return json.loads(raw)
    if codec_id == 2:
        return pickle.loads(raw)
    return raw


def _record_key(raw_id: bytes) -> bytes:
    return _RECORDS + raw_id


def _index_key(status: Status, raw_id: bytes) -> bytes:
    return _INDEX + bytes((_CODE[status],)) + raw_id


_IDX = {code: _INDEX + bytes((code,)) for code in _STATUS}
_CNT = {code: _COUNTS + bytes((code,)) for code in _STATUS}


def _after(key: bytes) -> bytes:
    """The smallest key greater than ``key``."""
    return key + b"\x00"


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    # Prefixes here never end in 0xff.
    return prefix[:-1] + bytes((prefix[-1] + 1,))


def error_text(exc: BaseException) -> str:
    """What a failed task records of an exception: ``Type: message``."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def describe_key(key: bytes) -> str | None:
    """A TaskStore key, readably (``walstate dump``); None for other keys."""
    if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 1:
        return None
    kind, rest = key[len(KEY_PREFIX):len(KEY_PREFIX) + 1], key[len(KEY_PREFIX) + 1:]

    def ident(raw: bytes) -> str:
        try:
            return repr(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return "0x" + raw.hex()

    if kind == b"r":
        return f"task {ident(rest)} record"
    if kind == b"s" and rest and rest[0] in _STATUS:
        return f"task {ident(rest[1:])} index {_STATUS[rest[0]].name}"
    if kind == b"n":
        if rest == b"\x00":
            return "tasks counters-kept"
        if len(rest) == 1 and rest[0] in _STATUS:
            return f"tasks count {_STATUS[rest[0]].name}"
    if kind == b"o":
        return f"tasks owner {rest.hex()}"
    return None


# -- owners ------------------------------------------------------------------------

_HOST = socket.gethostname()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_BOOT = _boot_id()


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, from
    /proc/<pid>/stat), None if there is no such live process (zombies count as
    gone). Where /proc is missing: 0 for a pid that exists, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


_MY_START = process_start(os.getpid())

# Tokens of the TaskStores of this process (an owner in this process is alive while
# its store exists and its engine is open).
_LIVE: weakref.WeakValueDictionary[bytes, TaskStore] = weakref.WeakValueDictionary()


class RunningTask:
    """The handle ``TaskStore.run`` yields: ``payload`` is the cursor (the last
    one recorded), ``progress(payload)`` records a new one, ``result`` (when
    set) is the payload ``finish`` records at the end of the block."""

    _UNSET: Any = object()

    def __init__(self, store: TaskStore, state: TaskState) -> None:
        self._store = store
        self.state = state
        self.result: Any = RunningTask._UNSET

    @property
    def task_id(self) -> str:
        return self.state.task_id

    @property
    def payload(self) -> Any:
        return self.state.payload

    @property
    def attempts(self) -> int:
        return self.state.attempts

    def progress(self, payload: Any) -> TaskState:
        """Records ``payload`` as the new cursor (RUNNING -> RUNNING)."""
        self.state = self._store.progress(self.state.task_id, payload)
        return self.state

    def heartbeat(self) -> None:
        """Tells ``recover(stale_after=...)`` that this task's owner is alive."""
        self._store.heartbeat()


class TaskStore:
    """Task records in an engine, under their own key prefix (``KEY_PREFIX``).

    ``db`` is an open :class:`walstate.Engine` (or anything with its ``get``,
    ``put``, ``items`` and ``batch``). ``codec``: None (payloads are bytes),
    ``"json"`` or ``"pickle"`` (payloads are objects, encoded on the way in,
    decoded on the way out; the codec is recorded with each payload).
    ``max_attempts`` (None: no limit): a task that has been started that many
    times is not retried any more -- ``retry`` refuses it and ``recover``
    leaves it FAILED -- and keeps its last error.

    Transitions return the new :class:`TaskState`; they raise ``KeyError``
    for an unknown task, :class:`InvalidTransitionError` for an illegal
    transition (nothing is written), ``TypeError``/``ValueError`` for a bad
    id or payload.

    Thread-safe: transitions are ordered by a lock of this store, held while
    a transition reads its record and appends its WAL record but not while
    the write waits for the disk, so that threads share fsyncs. Use one
    TaskStore per engine in a process.
    """

    def __init__(self, db: Any, *, codec: str | None = None,
                 max_attempts: int | None = None) -> None:
        if codec not in _CODEC_ID:
            raise ValueError(f"codec must be one of None, 'json', 'pickle', not {codec!r}")
        if max_attempts is not None and (isinstance(max_attempts, bool)
                                         or not isinstance(max_attempts, int)
                                         or max_attempts < 1):
            raise ValueError(f"max_attempts must be a positive int or None, not "
                             f"{max_attempts!r}")
        self._db = db
        self.codec = codec
        self.max_attempts = max_attempts
        self._codec_id = _CODEC_ID[codec]
        self._mu = threading.RLock()
        self._token = os.urandom(8)
        self._owner_written = False
        self._owner_pending = False
        from .engine import Engine

        # The engine's split commit (append now, wait for the fsync after the lock);
        # anything else (a wrapper) gets plain batches under the lock.
        self._split = isinstance(db, Engine)

    # -- encoding ---------------------------------------------------------

    def _encode_payload(self, payload: Any) -> tuple[bytes, int]:
        cid = self._codec_id
        if payload is _NO_PAYLOAD:
            payload = b"" if cid == 0 else None
        if cid == 0:
            return _payload_bytes(payload), 0
        if cid == 1:
            try:
                return json.dumps(payload, separators=(",", ":")).encode(), 1
            except (TypeError, ValueError) as e:
                raise TypeError(f"payload is not JSON-serializable: {e}") from None
        try:
            return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL), 2
        except Exception as e:  # noqa: BLE001 - any pickling failure is a bad payload
            raise TypeError(f"payload cannot be pickled: {e}") from None

    def _state(self, task_id: str, rec: _Rec) -> TaskState:
        payload: Any = rec.payload
        if self._codec_id != 0:
            payload = decode_payload(rec.payload, rec.codec)
        owner = None if rec.owner == _NO_OWNER else rec.owner.hex()
        return TaskState(task_id, _STATUS[rec.code], rec.updated_at, rec.attempts, payload,
                         rec.error, owner)

    def _read(self, raw_id: bytes, task_id: object = "?") -> _Rec | None:
        raw = self._db.get(_RECORDS + raw_id)
        return None if raw is None else _decode_rec(task_id, raw)

    # -- reading ---------------------------------------------------------

    def get(self, task_id: str) -> TaskState | None:
        """The task's current state, or None if there is no such task."""
        rec = self._read(_id_bytes(task_id), task_id)
        return None if rec is None else self._state(task_id, rec)

    def list(self, status: Status | None = None) -> Iterator[TaskState]:
        """Iterate the tasks in id order, only those with ``status`` if given.

        With a status only the index entries of that status are read, never
        every task. Keys are read in pages, so changing tasks while iterating
        (e.g. starting each PENDING task) is fine; a task whose status changed
        after its page was read is skipped when filtering.
        """
        if status is None:
            return self._list_all()
        if not isinstance(status, Status):
            raise TypeError(f"status must be a Status or None, not {type(status).__name__}")
        return self._list_status(status)

    def _list_all(self) -> Iterator[TaskState]:
        for key, raw in self._scan(_RECORDS):
            task_id = key[len(_RECORDS):].decode("utf-8")
            yield self._state(task_id, _decode_rec(task_id, raw))

    def _list_status(self, status: Status) -> Iterator[TaskState]:
        prefix = _IDX[_CODE[status]]
        for key, _ in self._scan(prefix):
            task_id = key[len(prefix):].decode("utf-8")
            state = self.get(task_id)
            if state is not None and state.status is status:
                yield state

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        # Page through items() rather than holding one iterator open: the
        # engine does not promise what an iterator sees of concurrent writes.
        start, stop = prefix, _prefix_end(prefix)
        while True:
            page = []
            rows = self._db.items(start, stop)
            try:
                for key, value in rows:
                    page.append((bytes(key), value))
                    if len(page) == _PAGE:
                        break
            finally:
                close = getattr(rows, "close", None)  # end its read transaction now
                if close is not None:
                    close()
            yield from page
            if len(page) < _PAGE:
                return
            start = _after(page[-1][0])

    def counts(self) -> dict[Status, int]:
        """``{Status.PENDING: n, ...}`` for every status, from the counters (O(1))."""
        if self._db.get(_COUNTS_KEPT) is None:  # a store no transition has touched since
            return {_STATUS[c]: n for c, n in self._scan_counts().items()}
        return {status: self._count(code) for status, code in _CODE.items()}

    def _count(self, code: int) -> int:
        raw = self._db.get(_CNT[code])
        return 0 if raw is None else _COUNT.unpack(bytes(raw))[0]

    def _scan_counts(self) -> dict[int, int]:
        return {code: sum(1 for _ in self._scan(_IDX[code])) for code in _STATUS}

    def owner_info(self, token: str | bytes) -> dict[str, Any] | None:
        """What the store knows of an owner (``TaskState.owner``): host, pid,
        start, boot, heartbeat; ``alive`` (it can still record transitions: a
        live TaskStore of this process on an open engine) and
        ``process_alive`` (its process still runs); None if unknown."""
        raw_token = bytes.fromhex(token) if isinstance(token, str) else bytes(token)
        info = self._owner_record(raw_token)
        if info is None:
            return None
        pid = info.get("pid")
        same = info.get("host") == _HOST and info.get("boot") == _BOOT
        proc = same and isinstance(pid, int) and process_start(pid) == info.get("start")
        return {**info, "alive": self._owner_alive(raw_token, info), "process_alive": proc}

    def _owner_record(self, token: bytes) -> dict[str, Any] | None:
        raw = self._db.get(_OWNERS + token)
        if raw is None:
            return None
        try:
            info = json.loads(bytes(raw))
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _owner_alive(self, token: bytes, info: dict[str, Any] | None) -> bool:
        """Whether the owner can still record transitions of its tasks: only a
        TaskStore of this process whose engine is open can -- this process
        holds the directory's write lock, so no other process can write here
        (whether or not it still runs: its engine was closed or it died)."""
        if token == self._token:
            return not getattr(self._db, "_closed", False)
        if info is None or info.get("pid") != os.getpid() or info.get("host") != _HOST \
                or info.get("boot") != _BOOT or info.get("start") != _MY_START:
            return False
        store = _LIVE.get(token)
        return store is not None and not getattr(store._db, "_closed", False)

    # -- writing ---------------------------------------------------------

    def _owner_ops(self, ops: list[tuple[bytes, bytes | None]], now: float,
                   force: bool = False) -> None:
        """Adds this store's owner record to ``ops`` (a start's batch), once
        (``force``: again, with a new heartbeat)."""
        if self._owner_written and not force:
            return
        self._owner_pending = True
        pid = os.getpid()
        info = {"host": _HOST, "pid": pid, "start": process_start(pid), "boot": _BOOT,
                "heartbeat": now}
        ops.append((_OWNERS + self._token, json.dumps(info, sort_keys=True).encode()))

    def _commit(self, ops: list[tuple[bytes, bytes | None]], delta: dict[int, int]) -> int | None:
        """Appends ``ops`` plus the counter changes ``delta`` as one record. Called
        with ``self._mu`` held; returns the LSN the caller must ``_wait`` for
        after releasing it (None: already durable per the engine's sync)."""
        db = self._db
        if any(delta.values()):
            if db.get(_COUNTS_KEPT) is None:  # the first counted transition: all four
                counts = self._scan_counts()
                ops.append((_COUNTS_KEPT, b""))
                delta = {code: delta.get(code, 0) for code in _STATUS}
                changed = list(_STATUS)
            else:
                changed = [code for code, d in delta.items() if d]
                counts = {code: self._count(code) for code in changed}
            for code in changed:
                n = counts[code] + delta[code]
                if n < 0:  # a bug, never a user error: refuse to store it
                    raise AssertionError(f"task count of {_STATUS[code].name} below 0")
                ops.append((_CNT[code], _COUNT.pack(n)))
        try:
            if self._split:
                lsn = db._commit_batch(ops, wait=False)  # noqa: SLF001
            else:
                with db.batch() as b:
                    for k, v in ops:
                        if v is None:
                            b.delete(k)
                        else:
                            b.put(k, v)
                lsn = None
            if self._owner_pending:
                self._owner_written = True
                _LIVE[self._token] = self
        finally:
            self._owner_pending = False
        return lsn

    def _wait(self, lsn: int | None) -> None:
        if lsn is not None:
            self._db._acknowledge(lsn)  # noqa: SLF001

    def _move(self, raw_id: bytes, old: _Rec | None, new: _Rec | None,
              ops: list[tuple[bytes, bytes | None]], delta: dict[int, int],
              task_id: object = "?") -> None:
        """The ops of one task's change (``new`` None: removed) into ``ops``."""
        if old is not None and (new is None or old.code != new.code):
            ops.append((_IDX[old.code] + raw_id, None))
            delta[old.code] = delta.get(old.code, 0) - 1
        if new is None:
            ops.append((_RECORDS + raw_id, None))
            return
        if old is None or old.code != new.code:
            ops.append((_IDX[new.code] + raw_id, b""))
            delta[new.code] = delta.get(new.code, 0) + 1
        ops.append((_RECORDS + raw_id, new.encode(task_id)))

    def _write_one(self, task_id: str, raw_id: bytes, old: _Rec | None,
                   new: _Rec) -> int | None:
        ops: list[tuple[bytes, bytes | None]] = []
        delta: dict[int, int] = {}
        if new.code == _RUNNING and (old is None or old.code != _RUNNING):
            self._owner_ops(ops, new.updated_at)
        self._move(raw_id, old, new, ops, delta, task_id)
        return self._commit(ops, delta)

    # -- transitions -----------------------------------------------------

    def create(self, task_id: str, payload: Any = _NO_PAYLOAD) -> TaskState:
        """Create a PENDING task with ``attempts`` 0; the payload defaults to b""
        (None in a store with a codec).

        Raises InvalidTransitionError if a task with this id exists (in any status).
        """
        raw_id = _id_bytes(task_id)
        data, cid = self._encode_payload(payload)
        with self._mu:
            old = self._read(raw_id, task_id)
            if old is not None:
                raise self._illegal(self._state(task_id, old), "create", "no task with this id")
            new = _Rec(_PENDING, 0, time.time(), data, cid, None, _NO_OWNER)
            lsn = self._write_one(task_id, raw_id, None, new)
        self._wait(lsn)
        return self._state(task_id, new)

    def create_many(self, ids: Iterable[str], payload: Any = _NO_PAYLOAD) -> _TaskList:
        """Create a PENDING task for each id that does not exist yet, all in one
        atomic record; ids that exist (or repeat) are left alone. Returns the
        created tasks, in the order given."""
        raws = []
        seen: set[bytes] = set()
        for task_id in ids:
            raw_id = _id_bytes(task_id)
            if raw_id not in seen:
                seen.add(raw_id)
                raws.append((task_id, raw_id))
        data, cid = self._encode_payload(payload)
        created = []
        with self._mu:
            now = time.time()
            ops: list[tuple[bytes, bytes | None]] = []
            delta: dict[int, int] = {}
            for task_id, raw_id in raws:
                if self._db.get(_RECORDS + raw_id) is None:
                    new = _Rec(_PENDING, 0, now, data, cid, None, _NO_OWNER)
                    self._move(raw_id, None, new, ops, delta, task_id)
                    created.append(self._state(task_id, new))
            lsn = self._commit(ops, delta) if ops else None
        self._wait(lsn)
        return created

    def start(self, task_id: str) -> TaskState:
        """PENDING -> RUNNING, ``attempts`` + 1, owned by this store; keeps the
        payload (the cursor)."""
        return self._transition(task_id, "start", _PENDING, _RUNNING, attempts=1)

    def progress(self, task_id: str, payload: Any) -> TaskState:
        """RUNNING -> RUNNING with a new payload: the cursor to resume from."""
        if payload is None:
            raise TypeError("progress() needs a payload (the cursor to resume from)")
        return self._transition(task_id, "progress", _RUNNING, _RUNNING, payload=payload)

    def finish(self, task_id: str, payload: Any = None) -> TaskState:
        """RUNNING -> SUCCESS; the payload (the result) defaults to the last one."""
        return self._transition(task_id, "finish", _RUNNING, _SUCCESS, payload=payload)

    def fail(self, task_id: str, error: str, payload: Any = None) -> TaskState:
        """RUNNING -> FAILED with an error message; the payload defaults to the last one."""
        if not isinstance(error, str):
            raise TypeError(f"error must be a str, not {type(error).__name__}")
        return self._transition(task_id, "fail", _RUNNING, _FAILED, payload=payload,
                                error=error)

    def retry(self, task_id: str) -> TaskState:
        """FAILED -> PENDING, keeping attempts and payload (the error is cleared).
        Refused (InvalidTransitionError) once ``attempts`` reached ``max_attempts``."""
        return self._transition(task_id, "retry", _FAILED, _PENDING)

    def release(self, task_id: str) -> TaskState:
        """RUNNING -> PENDING, keeping attempts and payload: give a task back
        unfinished (what ``run`` does on KeyboardInterrupt)."""
        return self._transition(task_id, "release", _RUNNING, _PENDING)

    @contextlib.contextmanager
    def run(self, task_id: str) -> Iterator[RunningTask]:
        """``with tasks.run(id) as t:`` starts the task; the block's normal end
        finishes it (payload: ``t.result`` when set, else the last cursor); an
        exception fails it with the exception's text (``Type: message``) and
        propagates; KeyboardInterrupt/SystemExit release it back to PENDING."""
        handle = RunningTask(self, self.start(task_id))
        try:
            yield handle
        except Exception as exc:
            self.fail(task_id, error=error_text(exc))
            raise
        except BaseException:
            self.release(task_id)
            raise
        result = None if handle.result is RunningTask._UNSET else handle.result
        handle.state = self.finish(task_id, payload=result)

    def heartbeat(self) -> None:
        """Records that this store's owner is alive now (one write): what
        ``recover(stale_after=...)`` looks at besides each task's last transition.
        Nothing to do before this store started a task."""
        with self._mu:
            if not self._owner_written:
                return
            ops: list[tuple[bytes, bytes | None]] = []
            self._owner_ops(ops, time.time(), force=True)
            lsn = self._commit(ops, {})
        self._wait(lsn)

    def recover(self, *, stale_after: float | None = None) -> _TaskList:
        """Put RUNNING tasks whose owner is gone back to PENDING, keeping payload
        and attempts; returns them (as they are now), in id order.

        An owner is gone when its process exited (or is another boot's or
        another host's) or its engine was closed; the tasks of a live owner --
        this store's own, another thread's -- are left alone, so ``recover``
        may run at any time. With ``stale_after`` (seconds) also the tasks whose
        heartbeat is older: neither a transition of the task nor its owner's
        ``heartbeat()`` in that time (``stale_after=0``: every RUNNING task, as
        in version 1, for a caller that knows no worker is left). A task that
        reached ``max_attempts`` goes to FAILED instead (and is not returned).
        Everything is one atomic record (per ~10k tasks); dead owners' records
        are removed with it.
        """
        if stale_after is not None and (isinstance(stale_after, bool) or not isinstance(
                stale_after, (int, float)) or stale_after < 0):
            raise ValueError(f"stale_after must be a number of seconds >= 0 or None, not "
                             f"{stale_after!r}")
        running = [key[len(_IDX[_RUNNING]):] for key, _ in self._scan(_IDX[_RUNNING])]
        recovered: list[TaskState] = []
        alive: dict[bytes, tuple[bool, float]] = {}
        dead_owners: set[bytes] = set()
        with self._mu:
            now = time.time()
            ops: list[tuple[bytes, bytes | None]] = []
            delta: dict[int, int] = {}
            for raw_id in running:
                task_id = raw_id.decode("utf-8")
                old = self._read(raw_id, task_id)
                if old is None or old.code != _RUNNING:
                    continue
                if old.owner not in alive:
                    info = self._owner_record(old.owner)
                    is_alive = old.owner != _NO_OWNER and self._owner_alive(old.owner, info)
                    beat = float(info.get("heartbeat", 0)) if info else 0.0
                    alive[old.owner] = (is_alive, beat)
                    if not is_alive and info is not None:
                        dead_owners.add(old.owner)
                is_alive, beat = alive[old.owner]
                if is_alive and (stale_after is None
                                 or now - max(beat, old.updated_at) < stale_after):
                    continue
                if self.max_attempts is not None and old.attempts >= self.max_attempts:
                    new = _Rec(_FAILED, old.attempts, now, old.payload, old.codec,
                               f"abandoned after {old.attempts} attempt(s) (max_attempts "
                               f"{self.max_attempts}): its owner is gone", _NO_OWNER)
                else:
                    new = _Rec(_PENDING, old.attempts, now, old.payload, old.codec, None,
                               _NO_OWNER)
                    recovered.append(self._state(task_id, new))
                self._move(raw_id, old, new, ops, delta, task_id)
                if len(ops) >= _BATCH_OPS:
                    self._wait(self._commit(ops, delta))
                    ops, delta = [], {}
            for token in dead_owners:
                ops.append((_OWNERS + token, None))
            lsn = self._commit(ops, delta) if ops else None
        self._wait(lsn)
        return recovered

    def purge(self, status: Status | Iterable[Status] | None = None, *,
              older_than: float | None = None, batch_size: int = 1000) -> int:
        """Remove finished tasks: SUCCESS and FAILED (or only ``status``), only
        those last changed more than ``older_than`` seconds ago when given.
        Works in atomic records of at most ``batch_size`` tasks (counters
        included), so it never holds the store for long; returns how many
        were removed."""
        if status is None:
            statuses = [Status.SUCCESS, Status.FAILED]
        elif isinstance(status, Status):
            statuses = [status]
        else:
            statuses = list(status)
        for s in statuses:
            if not isinstance(s, Status):
                raise TypeError(f"status must be a Status, not {type(s).__name__}")
            if s not in (Status.SUCCESS, Status.FAILED):
                raise ValueError(f"purge removes finished tasks only (SUCCESS, FAILED), "
                                 f"not {s.name}")
        if older_than is not None and (isinstance(older_than, bool) or not isinstance(
                older_than, (int, float)) or older_than < 0):
            raise ValueError(f"older_than must be a number of seconds >= 0 or None, not "
                             f"{older_than!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
        removed = 0
        for s in statuses:
            prefix = _IDX[_CODE[s]]
            ids = (key[len(prefix):] for key, _ in self._scan(prefix))
            while True:
                chunk = [raw for _, raw in zip(range(batch_size), ids, strict=False)]
                if not chunk:
                    break
                with self._mu:
                    cutoff = None if older_than is None else time.time() - older_than
                    ops: list[tuple[bytes, bytes | None]] = []
                    delta: dict[int, int] = {}
                    for raw_id in chunk:
                        old = self._read(raw_id)
                        if old is None or old.code != _CODE[s]:
                            continue
                        if cutoff is not None and old.updated_at > cutoff:
                            continue
                        self._move(raw_id, old, None, ops, delta)
                        removed += 1
                    lsn = self._commit(ops, delta) if ops else None
                self._wait(lsn)
        return removed

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, processes: int | None = None,
            key: Callable[[T], str] = str, chunksize: int | None = None, retries: int = 0,
            context: str | None = None) -> list[R]:
        """Run ``fn(item)`` for every item in ``processes`` worker processes
        (default: one per CPU) and return the results in item order.

        Each item is a task with id ``key(item)``; ``fn`` and the items must be
        picklable (``fn`` a module-level function). This process records every
        transition -- start before an item is sent, finish with the pickled
        result in the payload -- in batches shared by all workers; workers
        need no engine. An item whose task finished successfully is not run
        again: its recorded result is returned. Rerunning the same ``map``
        after a crash of this process or of a worker runs each unfinished item
        again (and FAILED ones, up to ``max_attempts``) and never one that
        finished. ``fn`` runs at least once per item and may run again after a
        crash: make it idempotent. An item whose ``fn`` raised (or whose worker
        died, alone) is retried ``retries`` times in this call; what still
        failed raises :class:`TasksFailedError` at the end, everything else
        recorded. KeyboardInterrupt stops the workers, records what finished,
        gives the unfinished items back (PENDING) and propagates.

        ``context``: the multiprocessing start method, "forkserver" (the
        default where available) or "spawn" -- never "fork", so that threads
        of this process are safe.
        """
        from ._taskpool import run_map

        return run_map(self, fn, items, processes=processes, key=key, chunksize=chunksize,
                       retries=retries, context=context)

    # -- internals -------------------------------------------------------

    def _transition(self, task_id: str, name: str, required: int, to: int, *,
                    attempts: int = 0, payload: Any = None,
                    error: str | None = None) -> TaskState:
        raw_id = _id_bytes(task_id)
        data = None if payload is None else self._encode_payload(payload)
        with self._mu:
            old = self._read(raw_id, task_id)
            if old is None:
                raise KeyError(task_id)
            if old.code != required:
                raise self._illegal(self._state(task_id, old), name, _STATUS[required].name)
            if (name == "retry" and self.max_attempts is not None
                    and old.attempts >= self.max_attempts):
                raise self._illegal(self._state(task_id, old), name,
                                    f"fewer than max_attempts={self.max_attempts} attempts; "
                                    f"it has {old.attempts}")
            now = time.time()
            owner = (old.owner if to == _RUNNING and required == _RUNNING else
                     self._token if to == _RUNNING else _NO_OWNER)
            new = _Rec(to, old.attempts + attempts, now,
                       old.payload if data is None else data[0],
                       old.codec if data is None else data[1], error, owner)
            lsn = self._write_one(task_id, raw_id, old, new)
        self._wait(lsn)
        return self._state(task_id, new)

    @staticmethod
    def _illegal(state: TaskState, transition: str, required: str) -> InvalidTransitionError:
        err = InvalidTransitionError(
            f"task {state.task_id!r} is {state.status.name}: cannot {transition} "
            f"(requires {required}); nothing was written"
        )
        err.task_id = state.task_id  # type: ignore[attr-defined]
        err.status = state.status  # type: ignore[attr-defined]
        err.transition = transition  # type: ignore[attr-defined]
        return err

