"""TaskStore.map: a process pool whose every transition is recorded -- results,
reruns, failures, dead workers, KeyboardInterrupt, and SIGKILL campaigns of the
engine's process and of its workers."""

from __future__ import annotations

import collections
import functools
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import taskwork

import walstate
from walstate import codec
from walstate.errors import InvalidTransitionError
from walstate.tasks import KEY_PREFIX, Status, TasksFailedError, TaskStore
from walstate.wal import WalReader, list_segments

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHILD = HERE / "mapchild.py"


@pytest.fixture
def db(tmp_path):
    db = walstate.open(tmp_path / "db")
    yield db
    db.close()


@pytest.fixture
def tasks(db):
    return TaskStore(db)


@pytest.fixture
def worklog(tmp_path):
    """taskwork.square_logged noting each execution in a file of this test, and
    the executions so far."""
    log = tmp_path / "executions"

    def executions():
        if not log.exists():
            return collections.Counter()
        return collections.Counter(int(line.split()[0]) for line in log.read_text().splitlines())
    executions.fn = functools.partial(taskwork.square_logged, log=str(log))
    return executions


def scan_counts(tasks):
    counts = dict.fromkeys(Status, 0)
    for t in tasks.list():
        counts[t.status] += 1
    return counts


def test_map_returns_results_in_item_order_and_records_them(tasks, worklog):
    items = list(range(300))
    random.Random(1).shuffle(items)
    results = tasks.map(worklog.fn, items, processes=3)
    assert [r[0] for r in results] == [x * x for x in items]
    assert len({pid for _, pid in results}) > 1  # really several worker processes
    assert os.getpid() not in {pid for _, pid in results}
    assert worklog() == collections.Counter(items)
    for x in items:
        state = tasks.get(str(x))  # key=str by default
        assert (state.status, state.attempts, state.error) == (Status.SUCCESS, 1, None)
        assert pickle.loads(state.payload)[0] == x * x  # the result is the payload
    assert tasks.counts() == scan_counts(tasks) == {
        Status.PENDING: 0, Status.RUNNING: 0, Status.SUCCESS: 300, Status.FAILED: 0}


def test_rerun_returns_recorded_results_and_runs_nothing_again(tasks, worklog):
    first = tasks.map(worklog.fn, range(100), processes=2)
    again = tasks.map(worklog.fn, range(100), processes=2)
    assert again == first
    assert worklog() == collections.Counter(range(100))
    # a longer list: only the new items run
    more = tasks.map(worklog.fn, range(150), processes=2)
    assert more[:100] == first and [r[0] for r in more[100:]] == [x * x for x in range(100, 150)]
    assert worklog() == collections.Counter(range(150))


def test_map_takes_key_and_positional_fn_and_items(tasks):
    out = tasks.map(taskwork.square, [2, 3], processes=1,
                    key=lambda x: f"sq-{x}")
    assert out == [4, 9]
    assert tasks.get("sq-3").status is Status.SUCCESS and tasks.get("3") is None
    assert tasks.map(taskwork.square, [], processes=2) == []


def test_map_with_a_codec_store(db):
    tasks = TaskStore(db, codec="json")
    assert tasks.map(taskwork.square, range(5), processes=2) == [0, 1, 4, 9, 16]
    assert tasks.get("4").payload == 16  # a codec store decodes the recorded result
    assert tasks.map(taskwork.square, range(5), processes=2) == [0, 1, 4, 9, 16]


def test_failures_are_recorded_and_raised_at_the_end_then_retried_by_a_rerun(tasks, worklog):
    with pytest.raises(TasksFailedError) as info:
        tasks.map(taskwork.fail_on_multiples_of_3, range(10), processes=2)
    assert sorted(info.value.failed) == ["0", "3", "6", "9"]
    assert info.value.failed["3"] == "ValueError: 3 is a multiple of 3"
    assert tasks.get("3").status is Status.FAILED
    assert tasks.get("3").error == "ValueError: 3 is a multiple of 3"
    assert tasks.get("4").status is Status.SUCCESS
    assert tasks.counts()[Status.FAILED] == 4 and tasks.counts()[Status.SUCCESS] == 6
    # the rerun runs the failed ones again (attempts counted), not the others
    with pytest.raises(TasksFailedError):
        tasks.map(taskwork.fail_on_multiples_of_3, range(10), processes=2)
    assert tasks.get("3").attempts == 2 and tasks.get("4").attempts == 1


def test_retries_within_one_call(tasks, tmp_path):
    fn = functools.partial(taskwork.fail_first_time, where=str(tmp_path))
    out = tasks.map(fn, ["a", "b"], processes=2, retries=1)
    assert out == ["A", "B"]
    assert [tasks.get(x).attempts for x in "ab"] == [2, 2]
    assert tasks.get("a").status is Status.SUCCESS


def test_max_attempts_leaves_a_task_failed_with_its_last_error(db, worklog):
    tasks = TaskStore(db, max_attempts=2)
    for n in (1, 2):
        with pytest.raises(TasksFailedError):
            tasks.map(taskwork.fail_on_multiples_of_3, [3, 4], processes=1)
        assert tasks.get("3").attempts == n
    with pytest.raises(TasksFailedError) as info:  # exhausted: not run again
        tasks.map(taskwork.fail_on_multiples_of_3, [3, 4], processes=1)
    assert tasks.get("3").attempts == 2
    assert info.value.failed == {"3": "ValueError: 3 is a multiple of 3"}
    with pytest.raises(InvalidTransitionError, match="max_attempts"):
        tasks.retry("3")


def test_a_worker_that_dies_fails_its_item_only(tasks):
    with pytest.raises(TasksFailedError) as info:
        tasks.map(taskwork.die_on_7, range(40), processes=2, chunksize=5)
    assert list(info.value.failed) == ["7"]
    assert "worker process died (exit code 3)" in info.value.failed["7"]
    states = {t.task_id: t.status for t in tasks.list()}
    assert [k for k, s in states.items() if s is not Status.SUCCESS] == ["7"]
    assert tasks.counts() == scan_counts(tasks)


@pytest.mark.parametrize("bad, error, match", [
    (dict(processes=0), ValueError, "processes"),
    (dict(processes=2.0), ValueError, "processes"),
    (dict(chunksize=0), ValueError, "chunksize"),
    (dict(retries=-1), ValueError, "retries"),
    (dict(context="fork"), ValueError, "context"),
    (dict(key=lambda x: 7), TypeError, "task id"),
    (dict(key=lambda x: "same"), ValueError, "same task id"),
])
def test_bad_arguments_are_refused_before_anything_is_written(db, tasks, bad, error, match):
    before = db.stats()["wal_records"]
    with pytest.raises(error, match=match):
        tasks.map(taskwork.square, range(3), **bad)
    assert db.stats()["wal_records"] == before
    assert list(tasks.list()) == []


def test_an_unpicklable_fn_is_refused(db, tasks):
    with pytest.raises(TypeError, match="picklable"):
        tasks.map(lambda x: x, range(3), processes=1)
    assert list(tasks.list()) == []


def test_map_refuses_items_running_under_a_live_owner(tasks):
    tasks.create("1")
    tasks.start("1")  # this store owns it, alive
    with pytest.raises(InvalidTransitionError, match="RUNNING"):
        tasks.map(taskwork.square, [1, 2], processes=1)


# -- crashes ---------------------------------------------------------------------------


def child_env(tmp_path, sleep="0"):
    env = dict(os.environ, TASKWORK_LOG=str(tmp_path / "executions"), TASKWORK_SLEEP=sleep)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def executions(tmp_path):
    log = tmp_path / "executions"
    lines = log.read_text().splitlines() if log.exists() else []
    return collections.Counter(int(line.split()[0]) for line in lines), lines


def history_of_finishes(path):
    """For each task id, how many WAL records ever moved it to SUCCESS: the WAL
    archive holds every segment a checkpoint removed (restored from it, whole,
    with `walstate restore`), the directory the rest."""
    marker = walstate.open(path, read_only=True)
    system_id = marker.system_id
    marker.close()
    restored = Path(str(path) + "-restored")
    shutil.rmtree(restored, ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "walstate.ops.cli", "restore",
                        str(path) + "-archive", str(restored)], capture_output=True, text=True,
                       env=child_env(Path(path).parent))
    assert p.returncode == 0, p.stderr
    merged = restored / "wal"
    # the archive starts at the first record (no base backup in so small a run)
    assert list_segments(merged)[0][0] == 1
    for _, seg in list_segments(Path(path) / "wal"):  # newer than the archive's copies
        shutil.copy(seg, merged / os.path.basename(seg))
    finishes = collections.Counter()
    prefix = KEY_PREFIX + b"s" + bytes((3,))  # the SUCCESS index entry is put once per finish
    with WalReader(str(merged), system_id, copy=True) as reader:
        for rec in reader:
            if rec.type in (codec.PUT, codec.BATCH):
                for key, value in codec.decode(rec.type, rec.payload):
                    if value is not None and key.startswith(prefix):
                        finishes[key[len(prefix):].decode()] += 1
        assert reader.end.status in ("clean", "torn"), reader.end
    shutil.rmtree(restored)
    return finishes


def kill_campaign(tmp_path, kills, n_items, seed, sleep):
    """SIGKILL the engine's process (mostly) or one of its workers at random
    instants while it maps, ``kills`` times; then let it finish and check.
    ``sleep``: seconds of "work" per item, enough that the runs between kills
    (0.1-1.5 s each, the start included) do not finish the map early."""
    rng = random.Random(seed)
    path = tmp_path / "db"
    env = child_env(tmp_path, sleep=str(sleep))
    done = killed_parent = killed_worker = 0
    while killed_parent + killed_worker < kills:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(path), str(n_items), "4"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + rng.uniform(0.1, 1.5)
        target_worker = rng.random() < 0.3
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is not None:  # it finished before the kill
            out, err = proc.communicate()
            assert proc.returncode == 0, err.decode()
            done += 1
            break
        if target_worker:
            _, lines = executions(tmp_path)
            pids = {int(line.split()[1]) for line in lines[-50:]}
            alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
            if alive:
                os.kill(rng.choice(alive), signal.SIGKILL)
                killed_worker += 1
                time.sleep(rng.uniform(0, 0.3))  # let it notice, then kill it too
        proc.kill()
        proc.communicate()
        killed_parent += 1
    # the last run, to the end
    out = subprocess.run([sys.executable, str(CHILD), str(path), str(n_items), "4"], env=env,
                         capture_output=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == b"done", out.stderr.decode()

    with walstate.open(path, read_only=True) as db:
        tasks = TaskStore(db)
        states = {t.task_id: t for t in tasks.list()}
        counts = tasks.counts()
    assert sorted(states) == [f"item-{x:06d}" for x in range(n_items)]
    for x in range(n_items):
        state = states[f"item-{x:06d}"]
        assert state.status is Status.SUCCESS, state
        assert pickle.loads(state.payload)[0] == x * x
    assert counts == {Status.PENDING: 0, Status.RUNNING: 0, Status.SUCCESS: n_items,
                      Status.FAILED: 0}
    # every item finished exactly once in the records; ran at least once, and at
    # most once per recorded attempt (a start is durable before its item is sent)
    finishes = history_of_finishes(path)
    assert finishes == {f"item-{x:06d}": 1 for x in range(n_items)}
    runs, _ = executions(tmp_path)
    for x in range(n_items):
        assert 1 <= runs[x] <= states[f"item-{x:06d}"].attempts
    with walstate.open(path) as db:  # and recover() finds nothing left RUNNING
        assert TaskStore(db).recover() == []
    reran = sum(1 for x in range(n_items) if runs[x] > 1)
    print(f"{killed_parent} engine kills, {killed_worker} worker kills, {done} early ends; "
          f"{reran} of {n_items} items ran more than once, "
          f"{sum(runs.values()) - n_items} extra executions")
    return killed_parent, killed_worker


def test_sigkill_campaign_short(tmp_path):
    parent, worker = kill_campaign(tmp_path, kills=10, n_items=1000, seed=7, sleep=0.04)
    assert parent >= 5


@pytest.mark.slow
def test_sigkill_campaign_200_kills_5000_items(tmp_path):
    parent, worker = kill_campaign(tmp_path, kills=200, n_items=5000, seed=11, sleep=0.15)
    assert parent >= 150 and worker >= 20


def test_keyboard_interrupt_records_what_finished_and_gives_back_the_rest(tmp_path):
    path = tmp_path / "db"
    env = child_env(tmp_path, sleep="0.002")
    proc = subprocess.Popen([sys.executable, str(CHILD), str(path), "3000", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until some items are recorded finished
        time.sleep(0.1)
        if not (path / "WALSTATE").exists():
            continue
        try:
            with walstate.open(path, read_only=True) as ro:  # beside the writer
                if TaskStore(ro).counts()[Status.SUCCESS] > 0:
                    break
        except walstate.WalStateError:
            continue
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert out.startswith(b"interrupted"), out
    with walstate.open(path) as db:
        tasks = TaskStore(db)
        counts = tasks.counts()
        assert counts[Status.RUNNING] == 0  # given back, not left to recover()
        assert counts[Status.SUCCESS] > 0 and counts[Status.FAILED] == 0
        assert counts == scan_counts(tasks)
        done = {t.task_id for t in tasks.list(status=Status.SUCCESS)}
    runs_before, _ = executions(tmp_path)
    rerun = subprocess.run([sys.executable, str(CHILD), str(path), "3000", "2"],
                           env=dict(env, TASKWORK_SLEEP="0"), capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    runs_after, _ = executions(tmp_path)
    for tid in done:  # what finished before the interrupt did not run again
        x = int(tid.split("-")[1])
        assert runs_after[x] == runs_before[x]
