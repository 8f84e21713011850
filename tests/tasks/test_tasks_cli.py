"""``walstate tasks DIR`` (counts, list, show, retry) and task keys in
``walstate dump``, run as a user runs them: the console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import walstate
from walstate.tasks import Status, TaskStore

REPO = Path(__file__).resolve().parents[2]


def walstate_cmd(*args, check=None):
    exe = shutil.which("walstate")
    cmd = [exe] if exe else [sys.executable, "-m", "walstate.ops.cli"]
    out = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    if check is not None:
        assert out.returncode == check, (out.stdout, out.stderr)
    return out


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "db"
    with walstate.open(path) as db:
        tasks = TaskStore(db, codec="json")
        tasks.create_many(["a", "b", "c", "d"], payload={"step": 0})
        with tasks.run("a") as t:
            t.progress({"step": 3})
        tasks.start("b")
        tasks.fail("b", error="ValueError: nope")
        tasks.start("c")
        tasks.fail("c", error="OSError: disk")
        TaskStore(db, codec="pickle").create("p", payload=("tuple", 1))
        TaskStore(db).create("raw", payload=b"\xff\x00")
    return path


def test_counts(store):
    out = walstate_cmd("tasks", store, check=0)
    lines = dict(line.split() for line in out.stdout.splitlines())
    assert lines == {"PENDING": "3", "RUNNING": "0", "SUCCESS": "1", "FAILED": "2", "total": "6"}
    counts = json.loads(walstate_cmd("tasks", store, "counts", "--json", check=0).stdout)
    assert counts == {"PENDING": 3, "RUNNING": 0, "SUCCESS": 1, "FAILED": 2}
    only = json.loads(walstate_cmd("tasks", store, "--status", "failed", "--json",
                                   check=0).stdout)
    assert only == {"FAILED": 2}


def test_list(store):
    out = walstate_cmd("tasks", store, "list", check=0).stdout.splitlines()
    assert [line.split()[:2] for line in out] == [
        ["SUCCESS", "a"], ["FAILED", "b"], ["FAILED", "c"], ["PENDING", "d"], ["PENDING", "p"],
        ["PENDING", "raw"]]
    assert "error: ValueError: nope" in out[1]
    rows = [json.loads(line) for line in walstate_cmd(
        "tasks", store, "list", "--status", "FAILED", "--json", check=0).stdout.splitlines()]
    assert [(r["task_id"], r["error"]) for r in rows] == [("b", "ValueError: nope"),
                                                          ("c", "OSError: disk")]
    limited = walstate_cmd("tasks", store, "list", "--limit", "2", check=0).stdout
    assert len(limited.splitlines()) == 2


def test_show_decodes_the_payload_per_its_codec(store):
    a = json.loads(walstate_cmd("tasks", store, "show", "a", "--json", check=0).stdout)
    assert a["status"] == "SUCCESS" and a["attempts"] == 1
    assert a["payload"] == {"codec": "json", "value": {"step": 3}}
    p = walstate_cmd("tasks", store, "show", "p", check=0).stdout
    assert "(pickle) ('tuple', 1)" in p
    raw = json.loads(walstate_cmd("tasks", store, "show", "raw", "--json", check=0).stdout)
    assert raw["payload"] == {"codec": "bytes", "size": 2, "text": None, "hex": "ff00"}
    undecoded = json.loads(walstate_cmd("tasks", store, "show", "p", "--raw", "--json",
                                        check=0).stdout)
    assert undecoded["payload"]["codec"] == "bytes"
    missing = walstate_cmd("tasks", store, "show", "zz", check=1)
    assert "no task 'zz'" in missing.stderr


def test_show_names_the_owner_of_a_running_task(tmp_path):
    path = tmp_path / "db"
    with walstate.open(path) as db:
        tasks = TaskStore(db)
        tasks.create("t1")
        tasks.start("t1")
    out = json.loads(walstate_cmd("tasks", path, "show", "t1", "--json", check=0).stdout)
    assert out["owner"]["pid"] == os.getpid() and out["owner"]["alive"] is False


def test_reading_changes_nothing_and_works_beside_a_writer(store):
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    with walstate.open(store) as db:  # a running writer holds the directory
        walstate_cmd("tasks", store, check=0)
        walstate_cmd("tasks", store, "list", check=0)
        locked = walstate_cmd("tasks", store, "retry", "--all", check=1)
        assert "pid" in locked.stderr  # LockedError names the holder
        assert TaskStore(db).counts()[Status.FAILED] == 2
    after_close = {p for p in store.rglob("*") if p.is_file()}
    assert set(before) <= after_close


def test_retry(store):
    out = walstate_cmd("tasks", store, "retry", "b", check=0)
    assert out.stdout.strip() == "retried b"
    with walstate.open(store, read_only=True) as db:
        state = TaskStore(db).get("b")
        assert (state.status, state.attempts, state.error) == (Status.PENDING, 1, None)
    out = walstate_cmd("tasks", store, "retry", "--all", "--json", check=0)
    assert json.loads(out.stdout) == {"retried": ["c"], "refused": {}}
    refused = walstate_cmd("tasks", store, "retry", "a", "zz", check=1)
    assert "cannot retry" in refused.stderr and "no such task" in refused.stderr


@pytest.mark.parametrize("args", [
    ["retry"], ["show"], ["show", "a", "b"], ["list", "a"], ["--status", "bogus"],
    ["explode"],
])
def test_bad_usage_is_exit_2_and_changes_nothing(store, args):
    with walstate.open(store, read_only=True) as db:
        before = list(db.items())
    walstate_cmd("tasks", store, *args, check=2)
    with walstate.open(store, read_only=True) as db:
        assert list(db.items()) == before


def test_missing_directory_is_exit_1(tmp_path):
    out = walstate_cmd("tasks", tmp_path / "nope", check=1)
    assert "nope" in out.stderr


def test_dump_prints_task_keys_readably(store):
    out = walstate_cmd("dump", store, check=0).stdout
    assert "task 'a' record" in out and "task 'b' index FAILED" in out
    assert "tasks count SUCCESS" in out
    ops = [op for line in walstate_cmd("dump", store, "--json", check=0).stdout.splitlines()
           for op in json.loads(line).get("ops", [])]
    assert "task 'a' index RUNNING" in {op.get("key_text") for op in ops}
