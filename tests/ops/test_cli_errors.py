"""The walstate command as a user meets its errors, run as a subprocess: exit
codes (0 success, 1 a failure the command reports, 2 bad usage), one-line
messages and no tracebacks, a quiet exit on a closed pipe, maintenance
commands that never create a database, and verify/doctor agreeing with open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import walstate

CLI = [sys.executable, "-m", "walstate.ops.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stderr, p.stderr
    assert "Traceback" not in p.stdout, p.stdout


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "db"
    db = walstate.open(path)
    for i in range(3000):
        db.put(b"key%05d" % i, b"v" * 100)
    db._abandon()  # the records stay in the WAL: dump has something to print
    return path


@pytest.mark.parametrize("args,what", [
    (["dump", "{db}", "--from-lsn", "-5"], "--from-lsn"),
    (["dump", "{db}", "--from-lsn", str(10 ** 23)], "--from-lsn"),
    (["dump", "{db}", "--from-lsn", "abc"], "--from-lsn"),
    (["dump", "{db}", "--to-lsn", "-1"], "--to-lsn"),
    (["dump", "{db}", "--type", "FOO"], "FOO"),
    (["doctor", "{db}", "--map-size", "-1"], "--map-size"),
    (["doctor", "{db}", "--max-wal-size", "0"], "--max-wal-size"),
    (["restore", "{db}", "{db}-r", "--to-lsn", "-3"], "--to-lsn"),
    (["nosuchcommand"], "nosuchcommand"),
    ([], "COMMAND"),
])
def test_bad_usage_exits_2_naming_it(db_dir, args, what):
    p = run(*[a.format(db=db_dir) for a in args])
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert what in p.stderr
    no_traceback(p)


def test_dump_type_is_case_insensitive_and_filters(db_dir):
    p = run("dump", db_dir, "--type", "session", "--json")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    recs = [x for x in lines if "lsn" in x and "type" in x]
    assert recs and all(x["type"] == "SESSION" for x in recs)


@pytest.mark.parametrize("json_flag", [False, True])
def test_a_closed_pipe_ends_quietly(db_dir, json_flag):
    args = ["dump", str(db_dir)] + (["--json"] if json_flag else [])
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert rc == 141, (rc, err)  # as a tool killed by SIGPIPE
    assert err == "", err


def test_failures_the_command_reports_exit_1_in_one_line(tmp_path):
    for args in (["info", tmp_path / "missing"], ["verify", tmp_path / "missing"],
                 ["dump", tmp_path / "missing"], ["checkpoint", tmp_path / "missing"]):
        p = run(*args)
        assert p.returncode == 1, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        no_traceback(p)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("content", ["non-empty", "empty"])
def test_checkpoint_never_creates_a_database(tmp_path, content):
    d = tmp_path / "photos"
    d.mkdir()
    if content == "non-empty":
        (d / "holiday.jpg").write_bytes(b"\xff\xd8" * 100)
    before = sorted(os.listdir(d))
    p = run("checkpoint", d)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "not a walstate directory" in p.stderr
    no_traceback(p)
    assert sorted(os.listdir(d)) == before  # nothing created


def test_checkpoint_of_a_database_still_works(tmp_path):
    path = tmp_path / "db"
    with walstate.open(path) as db:
        db.put(b"k", b"v")
    p = run("checkpoint", path, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["lsn"] >= 1


def test_backup_onto_a_full_disk_is_a_one_line_failure(tmp_path, tmpfs):
    src = tmp_path / "db"
    with walstate.open(src) as db:
        for i in range(400):
            db.put(b"k%05d" % i, os.urandom(10_000))
    dest = tmpfs("1m") / "backup"
    p = run("backup", src, dest)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    no_traceback(p)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def _other_version(path: Path) -> None:
    marker = path / "WALSTATE"
    m = json.loads(marker.read_bytes())
    m["format_version"] = 99
    marker.write_text(json.dumps(m))


def test_verify_and_doctor_fail_where_open_refuses(tmp_path):
    path = tmp_path / "db"
    with walstate.open(path) as db:
        db.put(b"k", b"v")
    _other_version(path)
    with pytest.raises(walstate.MismatchError):
        walstate.open(path)
    p = run("verify", path)
    assert p.returncode == 1 and "format version 99" in p.stdout, (p.stdout, p.stderr)
    p = run("doctor", path, "--json")
    assert p.returncode == 1, p.stdout
    checks = json.loads(p.stdout)["checks"]
    assert any(c["status"] == "FAIL" and "format version 99" in c["detail"] for c in checks)


def test_doctor_has_an_open_check(tmp_path):
    path = tmp_path / "db"
    with walstate.open(path) as db:
        db.put(b"k", b"v")
    p = run("doctor", path, "--json")
    assert p.returncode == 0, p.stdout
    checks = {c["name"]: c for c in json.loads(p.stdout)["checks"]}
    assert checks["open"]["status"] == "OK"


@pytest.mark.parametrize("closed", [True, False])
def test_wal_end_that_is_a_directory_never_fails_an_open(tmp_path, closed):
    """docs/FORMAT.md: a bad end hint never makes an open fail. A directory
    named wal/END is not a hint: opens, appends and closes leave it alone."""
    path = tmp_path / "db"
    db = walstate.open(path)
    db.put(b"a", b"1")
    if closed:
        db.close()
    else:
        db._abandon()
    end = path / "wal" / "END"
    if end.exists():
        end.unlink()
    end.mkdir()
    (end / "note").write_text("someone's file")
    p = run("verify", path)
    assert p.returncode == 0, p.stdout
    with walstate.open(path) as db:  # writable: would have removed a hint
        assert db.get(b"a") == b"1"
        db.put(b"b", b"2")
    with walstate.open(path) as db:
        assert db.get(b"b") == b"2"
    assert (end / "note").read_text() == "someone's file"
    p = run("doctor", path, "--json")
    checks = {c["name"]: c for c in json.loads(p.stdout)["checks"]}
    assert checks["open"]["status"] == "OK"
    assert checks["wal"]["status"] == "WARN" and "END" in checks["wal"]["detail"]
