"""Task states on top of the engine: long-running jobs that resume after a crash.

A task is PENDING, RUNNING, SUCCESS or FAILED::

    create ──> PENDING ──start──> RUNNING ──finish──> SUCCESS
                  ^                │  │ ^
                  └──recover()─────┘  │ └─progress (new payload: a resumable cursor)
                                      └──fail──> FAILED

Every transition is exactly one atomic write (one ``put`` or one ``batch``, so
one WAL record): after any crash a task is either before or after a
transition, never in between. An illegal transition raises
:class:`~walstate.errors.InvalidTransitionError` and writes nothing.

The resume loop: a worker that dies (SIGKILL, power loss) anywhere in it
continues, after ``recover()``, from the last ``progress`` that returned::

    import walstate
    from walstate.tasks import Status, TaskStore

    with walstate.open("state") as db:
        tasks = TaskStore(db)
        for n in range(3):
            if tasks.get(f"job-{n}") is None:
                tasks.create(f"job-{n}", payload=b"0")
        tasks.recover()                            # RUNNING when we died -> PENDING
        for task in tasks.list(status=Status.PENDING):
            task = tasks.start(task.task_id)       # attempts += 1
            step = int(task.payload)               # the cursor: where to resume
            while step < 10:
                step += 1                          # ... one unit of real work ...
                tasks.progress(task.task_id, payload=b"%d" % step)
            tasks.finish(task.task_id, payload=b"done")

Layout (all keys under ``KEY_PREFIX``, so a TaskStore shares an engine with
other data): ``PREFIX b"r" id`` holds the record; ``PREFIX b"s" <status byte>
id`` is an empty index entry, so that ``list(status=...)`` reads only the
tasks with that status, in id order (UTF-8 byte order is code point order).
A record is ``RECORD_HEADER`` (version, status, flags, attempts, updated_at,
payload length) + payload + error (UTF-8, present when flags bit 0 is set).
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import InvalidTransitionError

__all__ = ["Status", "TaskState", "TaskStore", "InvalidTransitionError"]

KEY_PREFIX = b"\x00walstate.tasks\x00"
_RECORDS = KEY_PREFIX + b"r"
_INDEX = KEY_PREFIX + b"s"
MAX_KEY = 511  # the engine's (LMDB's) key limit
MAX_VALUE = 64 * 1024 * 1024  # the engine's value limit
# The index key is the longer one: prefix + status byte + id.
MAX_ID_BYTES = MAX_KEY - len(_INDEX) - 1

FORMAT_VERSION = 1
# version u8, status u8, flags u8, attempts u32, updated_at f64, payload length u32
RECORD_HEADER = struct.Struct("<BBBIdI")
_HAS_ERROR = 0x01
_PAGE = 256  # index/record keys read per items() call while listing


class Status(enum.Enum):
    """The state of a task."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


# One byte per status, in records and index keys; never renumber (on disk).
_CODE = {Status.PENDING: 1, Status.RUNNING: 2, Status.SUCCESS: 3, Status.FAILED: 4}
_STATUS = {code: status for status, code in _CODE.items()}


@dataclass(frozen=True)
class TaskState:
    """A task as stored: what ``get``/``list`` return and transitions produce."""

    task_id: str
    status: Status
    updated_at: float  # epoch seconds, from the wall clock; informative only
    attempts: int  # how many times start() succeeded
    payload: bytes
    error: str | None


_TaskList = list[TaskState]  # an alias: inside TaskStore, ``list`` is the method


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


def _encode(state: TaskState) -> bytes:
    flags = 0
    error = b""
    if state.error is not None:
        flags |= _HAS_ERROR
        error = state.error.encode("utf-8", "surrogatepass")
    header = RECORD_HEADER.pack(
        FORMAT_VERSION, _CODE[state.status], flags, state.attempts, state.updated_at,
        len(state.payload),
    )
    record = b"".join((header, state.payload, error))
    if len(record) > MAX_VALUE:
        raise ValueError(
            f"task {state.task_id!r}: payload + error is {len(record) - len(header)} bytes; "
            f"the limit is {MAX_VALUE - len(header)} (the engine's 64 MiB value limit)"
        )
    return record


def _decode(task_id: str, raw: bytes) -> TaskState:
    raw = bytes(raw)
    if len(raw) < RECORD_HEADER.size:
        raise ValueError(f"task {task_id!r}: record of {len(raw)} bytes is too short")
    version, code, flags, attempts, updated_at, n = RECORD_HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise ValueError(f"task {task_id!r}: unknown record version {version}")
    end = RECORD_HEADER.size + n
    if code not in _STATUS or end > len(raw):
        raise ValueError(f"task {task_id!r}: malformed record")
    error = raw[end:].decode("utf-8", "surrogatepass") if flags & _HAS_ERROR else None
    return TaskState(task_id, _STATUS[code], updated_at, attempts, raw[RECORD_HEADER.size:end],
                     error)


def _record_key(raw_id: bytes) -> bytes:
    return _RECORDS + raw_id


def _index_key(status: Status, raw_id: bytes) -> bytes:
    return _INDEX + bytes((_CODE[status],)) + raw_id


def _after(key: bytes) -> bytes:
    """The smallest key greater than ``key``."""
    return key + b"\x00"


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    # Prefixes here never end in 0xff.
    return prefix[:-1] + bytes((prefix[-1] + 1,))


class TaskStore:
    """Task records in an engine, under their own key prefix (``KEY_PREFIX``).

    ``db`` is an open :class:`walstate.Engine` (anything with its ``get``,
    ``put``, ``items`` and ``batch``). Transitions return the new
    :class:`TaskState`; they raise ``KeyError`` for an unknown task,
    :class:`InvalidTransitionError` for an illegal transition (nothing is
    written), ``TypeError``/``ValueError`` for a bad id or payload.

    Thread-safe: a transition reads the record and then writes it, so
    transitions on the same task id are serialized by a lock of this store
    (one of a fixed set, chosen by id, so that writers of different tasks
    still share fsyncs). Use one TaskStore per engine in a process.
    """

    _N_LOCKS = 64

    def __init__(self, db: Any) -> None:
        self._db = db
        self._locks = [threading.Lock() for _ in range(self._N_LOCKS)]

    def _lock(self, task_id: str) -> threading.Lock:
        return self._locks[hash(task_id) % self._N_LOCKS]

    # -- reading ---------------------------------------------------------

    def get(self, task_id: str) -> TaskState | None:
        """The task's current state, or None if there is no such task."""
        raw = self._db.get(_record_key(_id_bytes(task_id)))
        return None if raw is None else _decode(task_id, raw)

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
            yield _decode(key[len(_RECORDS):].decode("utf-8"), raw)

    def _list_status(self, status: Status) -> Iterator[TaskState]:
        prefix = _INDEX + bytes((_CODE[status],))
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

    # -- transitions -----------------------------------------------------

    def create(self, task_id: str, payload: bytes = b"") -> TaskState:
        """Create a PENDING task with ``attempts`` 0.

        Raises InvalidTransitionError if a task with this id exists (in any status).
        """
        raw_id = _id_bytes(task_id)
        data = _payload_bytes(payload)
        with self._lock(task_id):
            old = self.get(task_id)
            if old is not None:
                raise self._illegal(old, "create", "no task with this id")
            new = TaskState(task_id, Status.PENDING, time.time(), 0, data, None)
            self._write(raw_id, None, new)
        return new

    def start(self, task_id: str) -> TaskState:
        """PENDING -> RUNNING, ``attempts`` + 1; keeps the payload (the cursor)."""
        return self._transition(task_id, "start", Status.PENDING, Status.RUNNING,
                                attempts=1)

    def progress(self, task_id: str, payload: bytes) -> TaskState:
        """RUNNING -> RUNNING with a new payload: the cursor to resume from."""
        if payload is None:
            raise TypeError("progress() needs a payload (the cursor to resume from)")
        return self._transition(task_id, "progress", Status.RUNNING, Status.RUNNING,
                                payload=payload)

    def finish(self, task_id: str, payload: bytes | None = None) -> TaskState:
        """RUNNING -> SUCCESS; the payload (the result) defaults to the last one."""
        return self._transition(task_id, "finish", Status.RUNNING, Status.SUCCESS,
                                payload=payload)

    def fail(self, task_id: str, error: str, payload: bytes | None = None) -> TaskState:
        """RUNNING -> FAILED with an error message; the payload defaults to the last one."""
        if not isinstance(error, str):
            raise TypeError(f"error must be a str, not {type(error).__name__}")
        return self._transition(task_id, "fail", Status.RUNNING, Status.FAILED,
                                payload=payload, error=error)

    def recover(self) -> _TaskList:
        """Put every RUNNING task back to PENDING, keeping payload and attempts.

        Call it once after open, before workers start, in the process that
        owns the tasks: a RUNNING task then can only be one whose worker died.
        Returns the recovered tasks as they are now (PENDING), in id order.
        Each task's move is its own atomic write.
        """
        running = [key[len(_INDEX) + 1:].decode("utf-8")
                   for key, _ in self._scan(_INDEX + bytes((_CODE[Status.RUNNING],)))]
        recovered = []
        for task_id in running:
            with self._lock(task_id):
                state = self.get(task_id)
                if state is None or state.status is not Status.RUNNING:
                    continue
                new = TaskState(task_id, Status.PENDING, time.time(), state.attempts,
                                state.payload, None)
                self._write(_id_bytes(task_id), state.status, new)
            recovered.append(new)
        return recovered

    # -- internals -------------------------------------------------------

    def _transition(self, task_id: str, name: str, required: Status, to: Status, *,
                    attempts: int = 0, payload: bytes | None = None,
                    error: str | None = None) -> TaskState:
        raw_id = _id_bytes(task_id)
        data = None if payload is None else _payload_bytes(payload)
        with self._lock(task_id):
            old = self.get(task_id)
            if old is None:
                raise KeyError(task_id)
            if old.status is not required:
                raise self._illegal(old, name, required.name)
            new = TaskState(task_id, to, time.time(), old.attempts + attempts,
                            old.payload if data is None else data, error)
            self._write(raw_id, old.status, new)
        return new

    def _write(self, raw_id: bytes, old: Status | None, new: TaskState) -> None:
        """Store ``new`` in one atomic write (the index moves with the record)."""
        record = _encode(new)  # may raise ValueError: before anything is written
        if old is new.status:
            self._db.put(_record_key(raw_id), record)
            return
        with self._db.batch() as b:
            if old is not None:
                b.delete(_index_key(old, raw_id))
            b.put(_index_key(new.status, raw_id), b"")
            b.put(_record_key(raw_id), record)

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
