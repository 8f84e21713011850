"""TaskStore: transitions, illegal transitions write nothing, listing, recover, crashes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import walstate
from walstate.errors import InvalidTransitionError, WalStateError
from walstate.tasks import KEY_PREFIX, MAX_ID_BYTES, Status, TaskState, TaskStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path):
    db = walstate.open(tmp_path / "db")
    yield db
    db.close()


@pytest.fixture
def tasks(db):
    return TaskStore(db)


def dump(db):
    return list(db.items())


def wal_records(db):
    return db.stats()["wal_records"]


def in_status(tasks, task_id, status):
    """Create ``task_id`` and drive it to ``status`` through legal transitions."""
    tasks.create(task_id, payload=b"p0")
    if status is Status.PENDING:
        return
    tasks.start(task_id)
    tasks.progress(task_id, payload=b"p1")
    if status is Status.SUCCESS:
        tasks.finish(task_id)
    elif status is Status.FAILED:
        tasks.fail(task_id, error="boom")


# -- legal transitions -------------------------------------------------------


def test_create_is_pending_with_no_attempts(tasks):
    before = time.time()
    state = tasks.create("t1", payload=b"cursor")
    assert state == tasks.get("t1")
    assert state.task_id == "t1"
    assert state.status is Status.PENDING
    assert state.attempts == 0
    assert state.payload == b"cursor"
    assert state.error is None
    assert before <= state.updated_at <= time.time()


def test_create_payload_defaults_to_empty(tasks):
    assert tasks.create("t1").payload == b""


def test_create_accepts_any_buffer(tasks):
    assert tasks.create("a", payload=bytearray(b"xy")).payload == b"xy"
    assert tasks.create("b", payload=memoryview(b"zz")).payload == b"zz"
    assert type(tasks.get("a").payload) is bytes


def test_start_moves_pending_to_running_and_counts_attempts(tasks):
    tasks.create("t1", payload=b"c0")
    state = tasks.start("t1")
    assert (state.status, state.attempts, state.payload) == (Status.RUNNING, 1, b"c0")
    assert tasks.get("t1") == state


def test_progress_replaces_the_payload(tasks):
    tasks.create("t1")
    tasks.start("t1")
    for n in range(3):
        state = tasks.progress("t1", payload=b"%d" % n)
        assert (state.status, state.payload, state.attempts) == (Status.RUNNING, b"%d" % n, 1)
    assert tasks.get("t1").payload == b"2"


def test_finish_keeps_the_last_payload_by_default(tasks):
    tasks.create("t1")
    tasks.start("t1")
    tasks.progress("t1", payload=b"last")
    state = tasks.finish("t1")
    assert (state.status, state.payload, state.error) == (Status.SUCCESS, b"last", None)
    assert tasks.get("t1") == state


def test_finish_with_a_result_payload(tasks):
    tasks.create("t1")
    tasks.start("t1")
    assert tasks.finish("t1", payload=b"result").payload == b"result"
    assert tasks.get("t1").payload == b"result"


def test_fail_records_the_error_and_keeps_the_payload(tasks):
    tasks.create("t1")
    tasks.start("t1")
    tasks.progress("t1", payload=b"cur")
    state = tasks.fail("t1", error="disk on fire: ünïcode")
    assert (state.status, state.payload, state.error) == (
        Status.FAILED, b"cur", "disk on fire: ünïcode")
    assert tasks.get("t1") == state


def test_fail_with_a_payload(tasks):
    tasks.create("t1")
    tasks.start("t1")
    assert tasks.fail("t1", error="", payload=b"partial").payload == b"partial"
    assert tasks.get("t1").error == ""


def test_get_unknown_task_is_none(tasks):
    assert tasks.get("nope") is None


def test_every_transition_is_one_wal_record(db, tasks):
    steps = [
        lambda: tasks.create("t1", payload=b"x"),
        lambda: tasks.start("t1"),
        lambda: tasks.progress("t1", payload=b"y"),
        lambda: tasks.finish("t1"),
        lambda: tasks.create("t2"),
        lambda: tasks.start("t2"),
        lambda: tasks.fail("t2", error="e"),
        lambda: tasks.create("t3"),
        lambda: tasks.start("t3"),
        lambda: tasks.recover(stale_after=0),
    ]
    for step in steps:
        before = wal_records(db)
        step()
        assert wal_records(db) == before + 1


def test_updated_at_follows_the_wall_clock(tasks):
    t0 = time.time()
    a = tasks.create("t1")
    b = tasks.start("t1")
    assert t0 <= a.updated_at <= b.updated_at <= time.time()


# -- illegal transitions ------------------------------------------------------

LEGAL = {
    (Status.PENDING, "start"),
    (Status.RUNNING, "progress"),
    (Status.RUNNING, "finish"),
    (Status.RUNNING, "fail"),
}
CALLS = {
    "start": lambda tasks, tid: tasks.start(tid),
    "progress": lambda tasks, tid: tasks.progress(tid, payload=b"new"),
    "finish": lambda tasks, tid: tasks.finish(tid, payload=b"new"),
    "fail": lambda tasks, tid: tasks.fail(tid, error="new"),
    "create": lambda tasks, tid: tasks.create(tid, payload=b"new"),
}


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.name)
@pytest.mark.parametrize("transition", list(CALLS))
def test_illegal_transition_raises_and_writes_nothing(db, tasks, status, transition):
    in_status(tasks, "t1", status)
    if (status, transition) in LEGAL:
        CALLS[transition](tasks, "t1")
        return
    before_state, before_dump, before_records = tasks.get("t1"), dump(db), wal_records(db)
    with pytest.raises(InvalidTransitionError) as info:
        CALLS[transition](tasks, "t1")
    message = str(info.value)
    assert "'t1'" in message and status.name in message and transition in message
    assert isinstance(info.value, WalStateError)
    assert tasks.get("t1") == before_state
    assert dump(db) == before_dump
    assert wal_records(db) == before_records


def test_invalid_transition_error_is_exported():
    assert walstate.InvalidTransitionError is InvalidTransitionError


@pytest.mark.parametrize("transition", ["start", "progress", "finish", "fail"])
def test_unknown_task_is_key_error_and_writes_nothing(db, tasks, transition):
    tasks.create("other")
    before_dump, before_records = dump(db), wal_records(db)
    with pytest.raises(KeyError):
        CALLS[transition](tasks, "missing")
    assert dump(db) == before_dump
    assert wal_records(db) == before_records


@pytest.mark.parametrize(
    "bad_id, error",
    [
        ("", ValueError),
        ("x" * (MAX_ID_BYTES + 1), ValueError),
        ("é" * (MAX_ID_BYTES // 2 + 1), ValueError),  # counted in UTF-8 bytes
        ("\ud800", ValueError),  # a lone surrogate has no UTF-8 form
        (b"t1", TypeError),
        (None, TypeError),
        (7, TypeError),
    ],
    ids=["empty", "too-long", "too-long-utf8", "surrogate", "bytes", "none", "int"],
)
def test_bad_task_id_is_rejected_and_writes_nothing(db, tasks, bad_id, error):
    before = dump(db)
    with pytest.raises(error, match="task id"):
        tasks.create(bad_id)
    with pytest.raises(error, match="task id"):
        tasks.get(bad_id)
    assert dump(db) == before


def test_longest_task_id_fits(tasks):
    tid = "x" * MAX_ID_BYTES
    tasks.create(tid)
    tasks.start(tid)
    assert [t.task_id for t in tasks.list(status=Status.RUNNING)] == [tid]


@pytest.mark.parametrize("payload", ["text", 12, None])
def test_bad_payload_is_type_error_and_writes_nothing(db, tasks, payload):
    tasks.create("t1")
    tasks.start("t1")
    before = dump(db)
    with pytest.raises(TypeError, match="payload"):
        tasks.progress("t1", payload=payload)
    if payload is not None:
        with pytest.raises(TypeError, match="payload"):
            tasks.create("t2", payload=payload)
    assert dump(db) == before


def test_fail_needs_a_str_error(db, tasks):
    tasks.create("t1")
    tasks.start("t1")
    before = dump(db)
    with pytest.raises(TypeError, match="error"):
        tasks.fail("t1", error=b"bytes")
    assert dump(db) == before


# -- listing ---------------------------------------------------------------------


def test_list_many_tasks_in_id_order_and_by_status(db, tasks):
    rng = random.Random(4)
    ids = [f"task-{n:05d}" for n in range(2000)]
    shuffled = ids[:]
    rng.shuffle(shuffled)
    expected = {}
    for n, tid in enumerate(shuffled):
        tasks.create(tid, payload=b"%d" % n)
        status = rng.choice(list(Status))
        expected[tid] = status
        if status is not Status.PENDING:
            tasks.start(tid)
        if status is Status.SUCCESS:
            tasks.finish(tid)
        elif status is Status.FAILED:
            tasks.fail(tid, error="x")

    listed = list(tasks.list())
    assert [t.task_id for t in listed] == ids
    assert all(isinstance(t, TaskState) for t in listed)
    assert {t.task_id: t.status for t in listed} == expected
    for status in Status:
        want = [tid for tid in ids if expected[tid] is status]
        got = list(tasks.list(status=status))
        assert [t.task_id for t in got] == want
        assert all(t.status is status for t in got)
        assert got == [tasks.get(tid) for tid in want]


def test_list_by_status_reads_only_that_status(db):
    class CountingDB:
        """Forwards to the engine and counts the rows items() yields."""

        def __init__(self, db):
            self.db, self.rows = db, 0

        def __getattr__(self, name):
            return getattr(self.db, name)

        def items(self, start=None, stop=None):
            for row in self.db.items(start, stop):
                self.rows += 1
                yield row

    counting = CountingDB(db)
    tasks = TaskStore(counting)
    for n in range(1000):
        tasks.create(f"t{n:04d}")
    for tid in ("t0007", "t0500", "t0999"):
        tasks.start(tid)
    counting.rows = 0
    assert [t.task_id for t in tasks.list(status=Status.RUNNING)] == ["t0007", "t0500", "t0999"]
    assert counting.rows <= 3


def test_list_orders_unicode_ids_by_code_point(tasks):
    ids = ["b", "a", "é", "z", "日本", "a\x00b", "A", "~", "\U0001f600"]
    for tid in ids:
        tasks.create(tid)
    assert [t.task_id for t in tasks.list()] == sorted(ids)
    assert [t.task_id for t in tasks.list(status=Status.PENDING)] == sorted(ids)


def test_list_while_starting_each_pending_task(tasks):
    ids = [f"t{n:04d}" for n in range(700)]  # several pages
    for tid in ids:
        tasks.create(tid)
    seen = []
    for task in tasks.list(status=Status.PENDING):
        seen.append(task.task_id)
        tasks.start(task.task_id)
    assert seen == ids
    assert list(tasks.list(status=Status.PENDING)) == []
    assert [t.task_id for t in tasks.list(status=Status.RUNNING)] == ids


def test_store_ignores_and_keeps_other_keys(db, tasks):
    db.put(b"\x00", b"before")
    db.put(b"user-key", b"v")
    db.put(b"\xff" * 10, b"after")
    db.put(KEY_PREFIX[:-1], b"almost the prefix")
    tasks.create("t1")
    assert [t.task_id for t in tasks.list()] == ["t1"]
    assert [t.task_id for t in tasks.list(status=Status.PENDING)] == ["t1"]
    assert db.get(b"user-key") == b"v"
    assert all(key.startswith(KEY_PREFIX) or key in (b"\x00", b"user-key", b"\xff" * 10,
                                                     KEY_PREFIX[:-1])
               for key, _ in db.items())


def test_list_rejects_a_non_status(tasks):
    with pytest.raises(TypeError):
        tasks.list(status="PENDING")


# -- recover ----------------------------------------------------------------------


def test_recover_moves_running_back_to_pending_keeping_payload_and_attempts(tasks):
    for status in Status:
        in_status(tasks, status.name.lower(), status)
    tasks.create("running2")
    tasks.start("running2")
    before = {t.task_id: t for t in tasks.list()}
    assert tasks.recover() == []  # their owner (this store) is alive: left alone

    recovered = tasks.recover(stale_after=0)  # "no worker is left": every RUNNING one

    assert [t.task_id for t in recovered] == ["running", "running2"]
    for state in recovered:
        assert state == tasks.get(state.task_id)
        old = before[state.task_id]
        assert state.status is Status.PENDING
        assert (state.payload, state.attempts, state.error) == (old.payload, old.attempts, None)
    for tid in ("pending", "success", "failed"):
        assert tasks.get(tid) == before[tid]
    assert list(tasks.list(status=Status.RUNNING)) == []
    assert [t.task_id for t in tasks.list(status=Status.PENDING)] == [
        "pending", "running", "running2"]
    assert tasks.recover() == []


def test_recovered_task_resumes_and_counts_a_second_attempt(tasks):
    tasks.create("t1")
    tasks.start("t1")
    tasks.progress("t1", payload=b"step-3")
    tasks.recover(stale_after=0)
    state = tasks.start("t1")
    assert (state.status, state.payload, state.attempts) == (Status.RUNNING, b"step-3", 2)


def test_recover_with_nothing_running_writes_nothing(db, tasks):
    in_status(tasks, "t1", Status.SUCCESS)
    before = wal_records(db)
    assert tasks.recover() == []
    assert wal_records(db) == before


def test_state_survives_reopen(tmp_path):
    with walstate.open(tmp_path / "db") as db:
        tasks = TaskStore(db)
        tasks.create("t1", payload=b"a")
        tasks.start("t1")
        tasks.progress("t1", payload=b"b")
        expected = tasks.get("t1")
    with walstate.open(tmp_path / "db") as db:
        assert TaskStore(db).get("t1") == expected


# -- threads ------------------------------------------------------------------------


def test_concurrent_starts_of_one_task_let_exactly_one_win(tasks):
    for n in range(50):
        tasks.create(f"t{n}")
    wins, losses = [], []

    def worker():
        for n in range(50):
            try:
                tasks.start(f"t{n}")
                wins.append(n)
            except InvalidTransitionError:
                losses.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(50))
    assert len(losses) == 3 * 50
    assert all(t.attempts == 1 for t in tasks.list(status=Status.RUNNING))


def test_concurrent_workers_on_different_tasks(tasks):
    def worker(w):
        for n in range(30):
            tid = f"w{w}-{n}"
            tasks.create(tid)
            tasks.start(tid)
            tasks.progress(tid, payload=b"half")
            tasks.finish(tid, payload=tid.encode())

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = list(tasks.list(status=Status.SUCCESS))
    assert len(done) == 120
    assert all(t.payload == t.task_id.encode() for t in done)


# -- crash: SIGKILL between (and during) transitions --------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys
    import walstate
    from walstate.tasks import TaskStore

    db = walstate.open(sys.argv[1], sync="always")
    tasks = TaskStore(db)

    def say(*fields):
        # One write per line (< PIPE_BUF): a line is never torn by the kill.
        os.write(1, (" ".join(fields) + "\\n").encode())

    def do(kind, tid, arg=""):
        say("intent", kind, tid, arg)
        if kind in ("create", "start"):
            getattr(tasks, kind)(tid)
        elif kind == "fail":
            tasks.fail(tid, error=arg)
        else:
            getattr(tasks, kind)(tid, payload=arg.encode())
        say("ack", kind, tid, arg)

    n = 0
    while True:
        tid = "t%05d" % n
        do("create", tid)
        do("start", tid)
        for step in (1, 2, 3):
            do("progress", tid, "cursor-%d" % step)
        if n % 3 == 0:
            do("finish", tid, "result-%d" % n)
        elif n % 3 == 1:
            do("fail", tid, "error-%d" % n)
        # else: stays RUNNING, as if its worker died
        n += 1
    """
)


def model(events):
    """Task states after ``events``, then recover(): id -> (status, attempts, payload, error)."""
    states = {}
    for kind, tid, arg in events:
        status, attempts, payload, error = states.get(tid, (None, 0, b"", None))
        if kind == "create":
            states[tid] = (Status.PENDING, 0, b"", None)
        elif kind == "start":
            states[tid] = (Status.RUNNING, attempts + 1, payload, None)
        elif kind == "progress":
            states[tid] = (Status.RUNNING, attempts, arg.encode(), None)
        elif kind == "finish":
            states[tid] = (Status.SUCCESS, attempts, arg.encode(), None)
        elif kind == "fail":
            states[tid] = (Status.FAILED, attempts, payload, arg)
    return {
        tid: (Status.PENDING, *rest) if status is Status.RUNNING else (status, *rest)
        for tid, (status, *rest) in states.items()
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_then_recover_restores_every_acknowledged_running_task(tmp_path, seed):
    path = tmp_path / "db"
    kill_after = random.Random(seed).randrange(60, 400)  # lines, i.e. ~30-200 transitions
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    try:
        while len(lines) < kill_after:
            line = proc.stdout.readline()
            assert line, f"child died early: {proc.stderr.read().decode()}"
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        # Not communicate(): it would skip what readline() already buffered.
        rest = proc.stdout.read()
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Everything the child wrote before it died was acknowledged before it died.
    lines += [line for line in rest.splitlines(keepends=True) if line.endswith(b"\n")]

    acked, inflight = [], None
    for line in lines:
        tag, kind, tid, *arg = line.decode().rstrip("\n").split(" ")
        event = (kind, tid, arg[0] if arg else "")
        if tag == "intent":
            inflight = event
        else:
            assert event == inflight
            acked.append(event)
            inflight = None

    with walstate.open(path) as db:
        tasks = TaskStore(db)
        recovered = tasks.recover()
        actual = {
            t.task_id: (t.status, t.attempts, t.payload, t.error) for t in tasks.list()
        }
        assert list(tasks.list(status=Status.RUNNING)) == []

    # The durable state is the acknowledged transitions, plus at most the one in flight.
    candidates = [model(acked)] + ([model(acked + [inflight])] if inflight else [])
    assert actual in candidates

    # Spelled out: a task acknowledged as RUNNING is PENDING again, with its last
    # acknowledged progress payload (unless it is the one whose next write was in flight).
    last = {}
    for kind, tid, arg in acked:
        last[tid] = (kind, arg if kind == "progress" else last.get(tid, ("", ""))[1])
    running = [tid for tid, (kind, _) in last.items() if kind in ("start", "progress")]
    assert running, "the kill came before any task was running; raise kill_after"
    recovered_ids = {t.task_id for t in recovered}
    for tid in running:
        if inflight and inflight[1] == tid:
            continue
        state = actual[tid]
        assert state[0] is Status.PENDING and tid in recovered_ids
        assert state[2] == last[tid][1].encode()
        assert state[1] == 1



# -- stateful: TaskStore against a plain dict model, with crash and reopen ----------

IDS = st.sampled_from(["a", "b", "c", "a\x00", "é", "z" * 40])
PAYLOADS = st.binary(max_size=64)


def scan_counts(db):
    """Counts by status from a scan of every record (what counts() must equal)."""
    counts = dict.fromkeys(Status, 0)
    for t in TaskStore(db).list():
        counts[t.status] += 1
    return counts


class TaskMachine(RuleBasedStateMachine):
    """Random transitions, legal or not; crash (abandon) and reopen between them.

    Under sync="always" every transition that returned is durable, so after a
    crash the store equals the model; counts() (counters kept in each
    transition's record) equals a scan and the model after every step;
    recover() moves exactly the model's RUNNING tasks whose owner is gone
    (started before the last reopen) back to PENDING, and recover(stale_after=0)
    every RUNNING one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="walstate-tasks-")
        self.path = os.path.join(self.dir, "db")
        self.db = walstate.open(self.path, sync="always", segment_size=64 * 1024,
                                max_wal_size=64 * 1024)
        self.tasks = TaskStore(self.db)
        self.model: dict[str, tuple[Status, int, bytes, str | None]] = {}
        self.mine: set[str] = set()  # RUNNING tasks started by the current store

    def teardown(self) -> None:
        try:
            self.db.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def attempt(self, tid, required, call, new):
        """Run ``call``; legal iff the model has ``tid`` in ``required`` status."""
        old = self.model.get(tid)
        legal = old is not None and old[0] is required if required else old is None
        before = wal_records(self.db)
        if legal:
            state = call()
            self.model[tid] = new(old)
            assert (state.status, state.attempts, state.payload, state.error) == self.model[tid]
            assert wal_records(self.db) == before + 1
        else:
            with pytest.raises(KeyError if old is None else InvalidTransitionError):
                call()
            assert wal_records(self.db) == before

    @rule(tid=IDS, payload=PAYLOADS)
    def create(self, tid, payload):
        self.attempt(tid, None, lambda: self.tasks.create(tid, payload=payload),
                     lambda old: (Status.PENDING, 0, payload, None))

    @rule(tids=st.lists(IDS, max_size=4), payload=PAYLOADS)
    def create_many(self, tids, payload):
        before = wal_records(self.db)
        fresh = list(dict.fromkeys(t for t in tids if t not in self.model))
        created = self.tasks.create_many(tids, payload=payload)
        assert [t.task_id for t in created] == fresh
        for tid in fresh:
            self.model[tid] = (Status.PENDING, 0, payload, None)
        assert wal_records(self.db) == before + (1 if fresh else 0)

    @rule(tid=IDS)
    def start(self, tid):
        self.attempt(tid, Status.PENDING, lambda: self.tasks.start(tid),
                     lambda old: (Status.RUNNING, old[1] + 1, old[2], None))
        if self.model.get(tid, (None,))[0] is Status.RUNNING:
            self.mine.add(tid)

    @rule(tid=IDS, payload=PAYLOADS)
    def progress(self, tid, payload):
        self.attempt(tid, Status.RUNNING, lambda: self.tasks.progress(tid, payload=payload),
                     lambda old: (Status.RUNNING, old[1], payload, None))

    @rule(tid=IDS, payload=st.none() | PAYLOADS)
    def finish(self, tid, payload):
        self.attempt(tid, Status.RUNNING, lambda: self.tasks.finish(tid, payload=payload),
                     lambda old: (Status.SUCCESS, old[1], old[2] if payload is None else payload,
                                  None))

    @rule(tid=IDS, error=st.text(max_size=20))
    def fail(self, tid, error):
        self.attempt(tid, Status.RUNNING, lambda: self.tasks.fail(tid, error=error),
                     lambda old: (Status.FAILED, old[1], old[2], error))

    @rule(tid=IDS)
    def retry(self, tid):
        self.attempt(tid, Status.FAILED, lambda: self.tasks.retry(tid),
                     lambda old: (Status.PENDING, old[1], old[2], None))

    @rule(tid=IDS)
    def release(self, tid):
        self.attempt(tid, Status.RUNNING, lambda: self.tasks.release(tid),
                     lambda old: (Status.PENDING, *old[1:]))

    @rule(everything=st.booleans())
    def recover(self, everything):
        running = sorted(tid for tid, m in self.model.items() if m[0] is Status.RUNNING
                         and (everything or tid not in self.mine))
        got = self.tasks.recover(stale_after=0) if everything else self.tasks.recover()
        assert [t.task_id for t in got] == running
        for tid in running:
            self.model[tid] = (Status.PENDING, *self.model[tid][1:])

    @rule(status=st.sampled_from([None, Status.SUCCESS, Status.FAILED]))
    def purge(self, status):
        gone = [tid for tid, m in self.model.items()
                if m[0] in ((Status.SUCCESS, Status.FAILED) if status is None else (status,))]
        assert self.tasks.purge(status, batch_size=2) == len(gone)
        for tid in gone:
            del self.model[tid]

    @rule(crash=st.booleans())
    def reopen(self, crash):
        if crash:
            self.db._abandon()  # as a killed process would: no flush, no checkpoint
        else:
            self.db.close()
        self.db = walstate.open(self.path, sync="always", segment_size=64 * 1024,
                                max_wal_size=64 * 1024)
        self.tasks = TaskStore(self.db)
        self.mine = set()

    @rule()
    def checkpoint(self):
        self.db.checkpoint()

    @invariant()
    def store_equals_model(self):
        listed = {t.task_id: (t.status, t.attempts, t.payload, t.error)
                  for t in self.tasks.list()}
        assert listed == self.model
        assert [t.task_id for t in self.tasks.list()] == sorted(self.model)
        for status in Status:
            assert [t.task_id for t in self.tasks.list(status=status)] == sorted(
                tid for tid, m in self.model.items() if m[0] is status)
        # One record and one index entry per task: no stale index entry left behind.
        stop = KEY_PREFIX[:-1] + bytes((KEY_PREFIX[-1] + 1,))
        keys = [k for k, _ in self.db.items(KEY_PREFIX, stop)]
        assert sum(k[len(KEY_PREFIX):][:1] in (b"r", b"s") for k in keys) == 2 * len(self.model)

    @invariant()
    def counts_equal_a_scan(self):
        model = dict.fromkeys(Status, 0)
        for m in self.model.values():
            model[m[0]] += 1
        assert self.tasks.counts() == scan_counts(self.db) == model


TaskMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_task_store_against_a_model = TaskMachine.TestCase
