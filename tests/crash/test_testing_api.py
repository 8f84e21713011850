"""walstate.testing as users see it: crash_check on an application's own
workload (here: walstate.tasks), its argument checks, and
``walstate crashtest``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import walstate.testing as wt
from walstate.tasks import Status, TaskStore

pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("gcc") is None,
                                reason="the tracer is an LD_PRELOAD library built with gcc")


def task_workload(db, rng):
    """An application's workload: tasks created, run with progress, finished.
    It starts as the application would after a crash (chained runs begin on a
    crash state of the previous one): recover, then create what is missing."""
    tasks = TaskStore(db)
    tasks.recover()
    base = rng.randrange(1000)
    for n in range(6):
        if tasks.get(f"job-{base}-{n}") is None:
            tasks.create(f"job-{base}-{n}", payload=b"0")
    for task in list(tasks.list(status=Status.PENDING)):
        tasks.start(task.task_id)
        for step in range(rng.randrange(1, 4)):
            tasks.progress(task.task_id, payload=b"%d" % (step + 1))
        if rng.random() < 0.3:
            tasks.fail(task.task_id, error="boom")
        else:
            tasks.finish(task.task_id, payload=b"done")


@pytest.fixture
def started(tmp_path):
    """An initialised directory to start from (so both runs write and crash)."""
    import walstate

    path = str(tmp_path / "start")
    walstate.open(path, segment_size=64 * 1024).close()
    return path


def test_crash_check_on_an_application_workload(tmp_path, started):
    res = wt.crash_check(task_workload, runs=2, seed=3, states_per_run=8,
                         workdir=str(tmp_path), recovery_kill_every=12, start=started)
    print(res.summary())
    assert res.ok, res.summary()
    assert res.runs == 2 and res.chained_runs == 1
    assert res.ops_attempted >= 2 * 6 * 2 and res.ops_acknowledged == res.ops_attempted
    assert res.crash_states >= 16 and res.recoveries >= 2 * res.crash_states - 20
    assert res.recovery_kills >= 1
    assert "failures: 0" in res.summary()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("crashcheck-")]


ACCOUNTS = (b"acct:alice", b"acct:bob")


def transfer_workload(db, rng, transfers, *, atomic, total=200):
    """A bank: ``transfers`` transfers between two accounts holding ``total``;
    with ``atomic=False`` each is two puts (the planted bug), else one batch."""
    bal = {k: int(db.get(k, b"%d" % (total // 2))) for k in ACCOUNTS}
    for _ in range(transfers):
        src, dst = rng.sample(ACCOUNTS, 2)
        amount = rng.randrange(1, 10)
        bal[src] -= amount
        bal[dst] += amount
        if atomic:
            with db.batch() as b:
                b.put(src, b"%d" % bal[src])
                b.put(dst, b"%d" % bal[dst])
        else:
            db.put(src, b"%d" % bal[src])
            db.put(dst, b"%d" % bal[dst])


def failing_workload(db, rng, n):
    for i in range(n):
        db.put(b"k%d" % i, b"v")
    raise ZeroDivisionError("the application's own bug")


def conserved(total=200):
    checked = []

    def check(db):
        got = [db.get(k) for k in ACCOUNTS]
        if got != [None, None]:  # before the first write nothing is there yet
            assert sum(int(v or b"%d" % (total // 2)) for v in got) == total, got
        checked.append(got)

    return check, checked


def test_crash_check_runs_the_users_check_with_workload_arguments(tmp_path, capfd):
    check, checked = conserved()
    res = wt.crash_check(transfer_workload, runs=2, seed=5, states_per_run=4,
                         workdir=str(tmp_path), args=(6,), kwargs={"atomic": True},
                         check=check, recovery_kill_every=0)
    assert res.ok, res.summary()
    assert res.ops_attempted == 2 * 6  # the arguments reached the child
    # every state that opened (each is recovered twice; one never initialised is not)
    assert len(checked) == res.recoveries // 2 and len(checked) >= 4
    # recovery's messages (torn tails cut...) went to logging, not to stderr
    assert "recovery" not in capfd.readouterr().err


def test_crash_check_finds_a_two_puts_transfer_through_the_check(tmp_path):
    check, _checked = conserved()
    res = wt.crash_check(transfer_workload, runs=1, seed=5, states_per_run=40,
                         workdir=str(tmp_path), args=(8,), kwargs={"atomic": False},
                         check=check, recovery_kill_every=0, keep_failures=False)
    assert not res.ok
    kinds = {f.kind for f in res.failures}
    assert kinds == {"check"}, res.summary()   # the engine's oracle held every time
    f = res.failures[0]
    assert "AssertionError" in f.detail and "in check" in f.traceback


def test_a_failing_workload_is_reported_as_the_users_failure(tmp_path):
    res = wt.crash_check(failing_workload, runs=1, seed=2, states_per_run=6,
                         workdir=str(tmp_path), args=(5,), chain=False,
                         recovery_kill_every=0, keep_failures=False)
    assert [f.kind for f in res.failures] == ["workload"], res.summary()
    f = res.failures[0]
    assert "ZeroDivisionError: the application's own bug" in f.detail
    assert "not a crash" in f.detail
    assert "in failing_workload" in f.traceback and "raise ZeroDivisionError" in f.traceback
    assert res.ops_attempted == 5 and res.crash_states >= 6  # its writes were still checked


def test_crash_check_refuses_what_cannot_run_in_a_subprocess():
    with pytest.raises(ValueError, match="module-level"):
        wt.crash_check(lambda db, rng: None, runs=1)

    def local(db, rng):
        pass

    with pytest.raises(ValueError, match="module-level"):
        wt.crash_check(local, runs=1)
    with pytest.raises(ValueError, match="flavors"):
        wt.crash_check(task_workload, runs=1, flavors=("melted",))
    with pytest.raises(ValueError):
        wt.crash_check(task_workload, runs=0)
    with pytest.raises(ValueError, match="picklable"):
        wt.crash_check(task_workload, runs=1, args=(lambda: 0,))
    with pytest.raises(ValueError, match="check"):
        wt.crash_check(task_workload, runs=1, check="not callable")


def test_oracle_accepts_prefixes_and_rejects_holes():
    h = wt.History.from_marks([
        'A 0 ["P", "61", "31"]', "K 0",
        'A 1 ["B", [["P", "62", "32"], ["D", "61"]]]', "K 1",
        'A 2 ["P", "63", "33"]',                      # in flight at the crash
    ])
    assert h.acknowledged == 2
    full = {b"b": b"2", b"c": b"3"}
    assert wt.check_recovered({}, h, {b"b": b"2"}) == (None, 2)
    assert wt.check_recovered({}, h, full) == (None, 3)
    bad, _ = wt.check_recovered({}, h, {b"a": b"1"})           # batch lost
    assert "lost acknowledged" in bad
    bad, _ = wt.check_recovered({}, h, {b"a": b"1", b"b": b"2"})  # torn batch
    assert "no prefix" in bad
    bad, _ = wt.check_recovered({}, h, {b"b": b"2", b"x": b"?"})  # invented value
    assert "extra" in bad


def test_crashtest_command_prints_the_counts(tmp_path, capsys):
    rc = wt.crashtest_main([str(tmp_path / "ct"), "--runs", "2", "--states", "4",
                            "--seed", "12"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "seed 12" in out and "crash states" in out and "failures: 0" in out
    rc = wt.crashtest_main([str(tmp_path / "ct"), "--runs", "1", "--states", "3",
                            "--seed", "12", "--json", "--sync", "none"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["failures"] == [] and res["crash_states"] >= 3


def test_crashtest_bad_usage_exits_2(capsys):
    assert wt.crashtest_main(["--runs", "0"]) == 2
    assert wt.crashtest_main(["--bogus"]) == 2


def test_walstate_crashtest_on_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "walstate.ops.cli", "crashtest", "--help"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "--runs" in p.stdout
    p = subprocess.run([sys.executable, "-m", "walstate.ops.cli", "crashtest", str(tmp_path),
                        "--runs", "1", "--states", "3", "--seed", "4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "failures: 0" in p.stdout
