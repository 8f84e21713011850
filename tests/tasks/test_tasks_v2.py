"""TaskStore, version 2: retry, counts, create_many, run, owners and heartbeats,
max_attempts, purge, codecs, and stores written before counters existed."""

from __future__ import annotations

import gc
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import walstate
from walstate.errors import InvalidTransitionError
from walstate.tasks import KEY_PREFIX, RunningTask, Status, TaskState, TaskStore, describe_key

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path):
    db = walstate.open(tmp_path / "db")
    yield db
    db.close()


@pytest.fixture
def tasks(db):
    return TaskStore(db)


def records(db):
    return db.stats()["wal_records"]


def scan_counts(tasks):
    counts = dict.fromkeys(Status, 0)
    for t in tasks.list():
        counts[t.status] += 1
    return counts


def failed(tasks, tid, error="boom"):
    tasks.create(tid, payload=b"cursor")
    tasks.start(tid)
    return tasks.fail(tid, error=error)


# -- retry ----------------------------------------------------------------------


def test_retry_moves_failed_to_pending_keeping_attempts_and_payload(db, tasks):
    failed(tasks, "t1")
    before = records(db)
    state = tasks.retry("t1")
    assert records(db) == before + 1
    assert (state.status, state.attempts, state.payload, state.error) == (
        Status.PENDING, 1, b"cursor", None)
    assert tasks.get("t1") == state
    assert tasks.start("t1").attempts == 2


@pytest.mark.parametrize("status", [Status.PENDING, Status.RUNNING, Status.SUCCESS])
def test_retry_of_a_task_that_did_not_fail_is_refused(db, tasks, status):
    tasks.create("t1")
    if status is not Status.PENDING:
        tasks.start("t1")
    if status is Status.SUCCESS:
        tasks.finish("t1")
    before = records(db), tasks.get("t1")
    with pytest.raises(InvalidTransitionError, match="cannot retry"):
        tasks.retry("t1")
    assert (records(db), tasks.get("t1")) == before
    with pytest.raises(KeyError):
        tasks.retry(task_id="missing")


def test_max_attempts_stops_retry_and_keeps_the_last_error(db):
    tasks = TaskStore(db, max_attempts=2)
    failed(tasks, "t1", error="first")
    tasks.retry("t1")
    tasks.start("t1")
    tasks.fail("t1", error="second")
    before = records(db)
    with pytest.raises(InvalidTransitionError, match="max_attempts=2"):
        tasks.retry("t1")
    assert records(db) == before
    state = tasks.get("t1")
    assert (state.status, state.attempts, state.error) == (Status.FAILED, 2, "second")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_max_attempts_and_codec_are_refused(db, bad):
    with pytest.raises(ValueError, match="max_attempts"):
        TaskStore(db, max_attempts=bad)
    with pytest.raises(ValueError, match="codec"):
        TaskStore(db, codec="yaml")


# -- counts ------------------------------------------------------------------------


def test_counts_follow_every_transition(tasks):
    assert tasks.counts() == dict.fromkeys(Status, 0)
    tasks.create_many([f"t{n}" for n in range(6)])
    for n in range(5):
        tasks.start(f"t{n}")
    tasks.finish("t0")
    tasks.fail("t1", error="x")
    tasks.fail("t2", error="x")
    tasks.retry("t2")
    tasks.release("t3")
    assert tasks.counts() == scan_counts(tasks) == {
        Status.PENDING: 3, Status.RUNNING: 1, Status.SUCCESS: 1, Status.FAILED: 1}
    tasks.purge()
    assert tasks.counts() == scan_counts(tasks) == {
        Status.PENDING: 3, Status.RUNNING: 1, Status.SUCCESS: 0, Status.FAILED: 0}


def test_counts_read_no_task(db):
    class CountingDB:
        """Forwards to the engine and counts the rows items() yields and the gets."""

        def __init__(self, db):
            self.db, self.rows, self.gets = db, 0, 0

        def __getattr__(self, name):
            return getattr(self.db, name)

        def get(self, key, default=None):
            self.gets += 1
            return self.db.get(key, default)

        def items(self, start=None, stop=None):
            for row in self.db.items(start, stop):
                self.rows += 1
                yield row

    counting = CountingDB(db)
    tasks = TaskStore(counting)
    tasks.create_many([f"t{n}" for n in range(2000)])
    counting.rows = counting.gets = 0
    assert tasks.counts()[Status.PENDING] == 2000
    assert counting.rows == 0 and counting.gets <= 5


def test_counters_are_in_the_transitions_record(db, tasks):
    tasks.create("t1")
    before = records(db)
    tasks.start("t1")
    assert records(db) == before + 1  # record, index and counters: one WAL record


def test_a_store_written_before_counters_gets_them_from_a_scan(db):
    """Records of format 1 (no owner, no codec, no counters) are read, and the
    first transition adds counters that match a scan."""
    header = struct.Struct("<BBBIdI")
    for n, code in enumerate([1, 1, 2, 3, 4]):
        raw = f"old{n}".encode()
        db.put(KEY_PREFIX + b"r" + raw, header.pack(1, code, 0, 1, 1.0, 1) + b"p")
        db.put(KEY_PREFIX + b"s" + bytes((code,)) + raw, b"")
    tasks = TaskStore(db)
    assert tasks.get("old2") == TaskState("old2", Status.RUNNING, 1.0, 1, b"p", None)
    assert tasks.counts() == scan_counts(tasks)  # before any counter exists: a scan
    tasks.create("new")
    assert db.get(KEY_PREFIX + b"n\x00") is not None
    assert tasks.counts() == scan_counts(tasks) == {
        Status.PENDING: 3, Status.RUNNING: 1, Status.SUCCESS: 1, Status.FAILED: 1}
    assert [t.task_id for t in tasks.recover()] == ["old2"]  # no owner recorded: gone
    assert tasks.counts() == scan_counts(tasks)


# -- create_many ------------------------------------------------------------------------


def test_create_many_is_one_record_and_leaves_existing_ids_alone(db, tasks):
    tasks.create("b", payload=b"mine")
    tasks.start("b")
    before = records(db)
    created = tasks.create_many(["a", "b", "c", "a"], payload=b"seed")
    assert records(db) == before + 1
    assert [t.task_id for t in created] == ["a", "c"]
    assert all(t.status is Status.PENDING and t.payload == b"seed" for t in created)
    assert tasks.get("b").status is Status.RUNNING and tasks.get("b").payload == b"mine"
    before = records(db)
    assert tasks.create_many(["a", "b"]) == []  # idempotent: nothing written
    assert records(db) == before


def test_create_many_checks_every_id_before_writing(db, tasks):
    before = records(db)
    with pytest.raises(TypeError, match="task id"):
        tasks.create_many(["ok", 7])
    with pytest.raises(ValueError, match="task id"):
        tasks.create_many(ids=["ok", ""])
    assert records(db) == before and tasks.get("ok") is None


def test_create_many_of_many_ids(tasks):
    ids = [f"job-{n:05d}" for n in range(20000)]
    assert len(tasks.create_many(ids)) == 20000
    assert tasks.counts()[Status.PENDING] == 20000


# -- run ----------------------------------------------------------------------------------


def test_run_finishes_on_normal_exit(tasks):
    tasks.create("t1", payload=b"0")
    with tasks.run("t1") as t:
        assert isinstance(t, RunningTask)
        assert (t.task_id, t.payload, t.attempts) == ("t1", b"0", 1)
        assert tasks.get("t1").status is Status.RUNNING
        for step in (b"1", b"2"):
            t.progress(step)
        assert t.payload == b"2" and tasks.get("t1").payload == b"2"
    state = tasks.get("t1")
    assert (state.status, state.payload) == (Status.SUCCESS, b"2")
    assert t.state == state


def test_run_records_t_result_as_the_final_payload(tasks):
    tasks.create("t1")
    with tasks.run(task_id="t1") as t:
        t.progress(payload=b"cursor")
        t.result = b"answer"
    assert tasks.get("t1").payload == b"answer"


def test_run_fails_with_the_exceptions_text_and_propagates(tasks):
    tasks.create("t1")
    with pytest.raises(ZeroDivisionError):
        with tasks.run("t1") as t:
            t.progress(b"half")
            1 / 0  # noqa: B018
    state = tasks.get("t1")
    assert (state.status, state.payload, state.error) == (
        Status.FAILED, b"half", "ZeroDivisionError: division by zero")


def test_run_gives_the_task_back_on_keyboard_interrupt(tasks):
    tasks.create("t1")
    with pytest.raises(KeyboardInterrupt):
        with tasks.run("t1") as t:
            t.progress(b"half")
            raise KeyboardInterrupt
    state = tasks.get("t1")
    assert (state.status, state.payload, state.attempts) == (Status.PENDING, b"half", 1)


def test_run_of_a_task_that_is_not_pending(tasks):
    with pytest.raises(KeyError):
        with tasks.run("missing"):
            pass
    failed(tasks, "t1")
    with pytest.raises(InvalidTransitionError):
        with tasks.run("t1"):
            raise AssertionError("never entered")


# -- owners, recover at any time, heartbeats ------------------------------------------------


def test_recover_leaves_tasks_of_live_owners_alone(db, tasks):
    other = TaskStore(db)  # another worker thread's store, alive
    tasks.create_many(["mine", "theirs"])
    tasks.start("mine")
    other.start("theirs")
    assert tasks.recover() == [] and other.recover() == []
    running = tasks.get("mine")
    info = tasks.owner_info(running.owner)
    assert info["pid"] == os.getpid() and info["alive"] and info["process_alive"]
    assert info["host"] and info["start"] is not None and info["heartbeat"] > 0
    # the other worker is gone (its store dropped): its task comes back, not mine
    del other
    gc.collect()
    assert [t.task_id for t in tasks.recover()] == ["theirs"]
    assert tasks.get("mine").status is Status.RUNNING


def test_recover_during_work_in_threads(db, tasks):
    """Workers run tasks in threads while recover() runs again and again: it
    never takes a task from a live worker (which would make its finish fail)."""
    tasks.create_many([f"t{n}" for n in range(200)])
    errors = []
    stop = threading.Event()

    def worker(w):
        try:
            for n in range(w, 200, 4):
                with tasks.run(f"t{n}") as t:
                    t.progress(b"x")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def recoverer():
        while not stop.is_set():
            assert tasks.recover() == []

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    rec = threading.Thread(target=recoverer)
    rec.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    rec.join()
    assert errors == []
    assert tasks.counts()[Status.SUCCESS] == 200


def test_tasks_of_a_closed_engine_are_recovered(tmp_path):
    path = tmp_path / "db"
    with walstate.open(path) as db:
        first = TaskStore(db)
        first.create("t1")
        first.start("t1")
    with walstate.open(path) as db:
        # ``first`` still exists, but its engine is closed: it cannot finish t1
        assert [t.task_id for t in TaskStore(db).recover()] == ["t1"]
        assert first is not None


def test_tasks_of_a_killed_process_are_recovered_and_its_owner_forgotten(tmp_path):
    path = tmp_path / "db"
    code = textwrap.dedent("""
        import sys, walstate
        from walstate.tasks import TaskStore
        db = walstate.open(sys.argv[1])
        tasks = TaskStore(db)
        tasks.create("t1"); tasks.start("t1"); tasks.progress("t1", b"cursor")
        print(tasks.get("t1").owner, flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    owner = proc.stdout.readline().decode().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with walstate.open(path) as db:
        tasks = TaskStore(db)
        info = tasks.owner_info(owner)
        assert info["pid"] == proc.pid and not info["alive"] and not info["process_alive"]
        [state] = tasks.recover()
        assert (state.task_id, state.status, state.payload) == ("t1", Status.PENDING, b"cursor")
        assert tasks.owner_info(owner) is None  # a dead owner's record goes with it


def test_stale_after_takes_tasks_whose_heartbeat_lapsed(db, tasks):
    tasks.create_many(["quiet", "busy"])
    tasks.start("quiet")
    tasks.start("busy")
    time.sleep(0.3)
    tasks.progress("busy", b"1")  # a transition is a heartbeat of its task
    assert [t.task_id for t in tasks.recover(stale_after=0.2)] == ["quiet"]
    tasks.start("quiet")
    time.sleep(0.3)
    tasks.heartbeat()  # the owner's heartbeat covers all its tasks
    assert tasks.recover(stale_after=0.2) == []
    with pytest.raises(ValueError, match="stale_after"):
        tasks.recover(stale_after=-1)


def test_a_lapsed_task_cannot_be_finished_by_its_old_owner(tasks):
    tasks.create("t1")
    tasks.start("t1")
    tasks.recover(stale_after=0)
    with pytest.raises(InvalidTransitionError):
        tasks.finish("t1")


def test_recover_fails_a_task_past_max_attempts(db):
    tasks = TaskStore(db, max_attempts=1)
    tasks.create_many(["a", "b"])
    tasks.start("a")
    assert tasks.recover(stale_after=0) == []
    state = tasks.get("a")
    assert state.status is Status.FAILED and "max_attempts 1" in state.error
    assert tasks.counts() == scan_counts(tasks)


# -- purge ------------------------------------------------------------------------------------


def test_purge_removes_finished_tasks_in_bounded_records(db, tasks):
    tasks.create_many([f"t{n:03d}" for n in range(25)])
    for n in range(20):
        tasks.start(f"t{n:03d}")
        if n % 2:
            tasks.finish(f"t{n:03d}")
        elif n < 16:
            tasks.fail(f"t{n:03d}", error="x")
    before = records(db)
    assert tasks.purge(status=Status.SUCCESS, batch_size=4) == 10
    assert records(db) == before + 3  # 10 tasks in records of at most 4
    assert tasks.purge() == 8  # FAILED too by default
    left = {t.task_id: t.status for t in tasks.list()}
    assert len(left) == 7 and set(left.values()) == {Status.PENDING, Status.RUNNING}
    assert tasks.counts() == scan_counts(tasks)
    assert tasks.purge() == 0


def test_purge_older_than(tasks):
    tasks.create_many(["old", "new"])
    for tid in ("old", "new"):
        tasks.start(tid)
    tasks.finish("old")
    time.sleep(0.3)
    tasks.finish("new")
    assert tasks.purge(older_than=0.2) == 1
    assert tasks.get("old") is None and tasks.get("new").status is Status.SUCCESS


@pytest.mark.parametrize("kwargs, error", [
    (dict(status=Status.PENDING), ValueError),
    (dict(status=Status.RUNNING), ValueError),
    (dict(status="SUCCESS"), TypeError),
    (dict(older_than=-1), ValueError),
    (dict(batch_size=0), ValueError),
])
def test_purge_refuses_bad_arguments_and_writes_nothing(db, tasks, kwargs, error):
    failed(tasks, "t1")
    before = records(db)
    with pytest.raises(error):
        tasks.purge(**kwargs)
    assert records(db) == before and tasks.get("t1") is not None


# -- codecs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["json", "pickle"])
def test_a_codec_store_takes_and_returns_objects(db, codec):
    tasks = TaskStore(db, codec=codec)
    tasks.create("t1", payload={"step": 0, "files": ["a", "b"]})
    assert tasks.get("t1").payload == {"step": 0, "files": ["a", "b"]}
    with tasks.run("t1") as t:
        t.progress({"step": t.payload["step"] + 1, "files": ["b"]})
    assert tasks.get("t1").payload == {"step": 1, "files": ["b"]}
    tasks.create("t2")  # no payload: None
    assert tasks.get("t2").payload is None
    # a bytes store reads the same records as bytes
    raw = TaskStore(db).get("t1").payload
    assert isinstance(raw, bytes) and raw


def test_json_codec_refuses_what_it_cannot_encode_and_writes_nothing(db):
    tasks = TaskStore(db, codec="json")
    before = records(db)
    with pytest.raises(TypeError, match="JSON"):
        tasks.create("t1", payload={1, 2})
    assert records(db) == before and tasks.get("t1") is None


def test_reopened_store_decodes_with_the_recorded_codec(tmp_path):
    path = tmp_path / "db"
    with walstate.open(path) as db:
        TaskStore(db, codec="pickle").create("t1", payload=(1, "two"))
        TaskStore(db, codec="json").create("t2", payload=[3])
    with walstate.open(path) as db:
        tasks = TaskStore(db, codec="json")
        assert tasks.get("t1").payload == (1, "two") and tasks.get("t2").payload == [3]


def test_describe_key():
    assert describe_key(KEY_PREFIX + b"rjob-1") == "task 'job-1' record"
    assert describe_key(KEY_PREFIX + b"s\x02job-1") == "task 'job-1' index RUNNING"
    assert describe_key(KEY_PREFIX + b"n\x03") == "tasks count SUCCESS"
    assert describe_key(KEY_PREFIX + b"o" + bytes(range(8))) == "tasks owner 0001020304050607"
    assert describe_key(b"user-key") is None
