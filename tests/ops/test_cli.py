"""The walstate command against real directories: exit codes, --json, --help."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import walstate
from walstate.wal import list_segments

CLI = [sys.executable, "-m", "walstate.ops.cli"]


def run(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def make_db(path: Path, n: int = 50, close: bool = True) -> walstate.Engine:
    db = walstate.open(path, segment_size=65536)
    for i in range(n):
        db.put(b"key%04d" % i, b"v" * i)
    db.delete(b"key0001")
    with db.batch() as b:
        b.put(b"a", b"1")
        b.delete(b"key0002")
    if close:
        db.close()
    return db


def crashed_db(path: Path, n: int = 200) -> None:
    """A directory whose WAL still holds its records (the writer 'crashed')."""
    db = make_db(path, n, close=False)
    db._abandon()


@pytest.mark.parametrize("cmd", ["info", "dump", "verify", "checkpoint", "bench", "demo"])
def test_every_command_has_help(cmd: str) -> None:
    p = run(cmd, "--help")
    assert "usage" in p.stdout.lower()


def test_help_lists_commands() -> None:
    out = run("--help").stdout
    for cmd in ("info", "dump", "verify", "checkpoint", "bench", "demo"):
        assert cmd in out


def test_bad_usage_exits_2() -> None:
    assert run("frobnicate", check=2).returncode == 2
    assert run("info", check=2).returncode == 2


def test_missing_directory_exits_1(tmp_path: Path) -> None:
    p = run("info", str(tmp_path / "nope"), check=1)
    assert "nope" in p.stderr


def test_info_json_matches_engine(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    info = json.loads(run("info", str(tmp_path / "db"), "--json").stdout)
    with walstate.open(tmp_path / "db", read_only=True) as db:
        expect = db.info()
    for k in ("system_id", "format_version", "last_lsn", "wal_segments"):
        assert info[k] == expect[k]
    assert info["last_checkpoint"]["reason"] == "shutdown"
    assert info["locked"] is False


def test_info_human_readable(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    out = run("info", str(tmp_path / "db")).stdout
    assert "system_id" in out and "last_checkpoint" in out and "shutdown" in out


def test_info_changes_nothing_and_shows_lock_holder(tmp_path: Path) -> None:
    d = tmp_path / "db"
    make_db(d)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, walstate; db = walstate.open(sys.argv[1]); "
         "db.put(b'x', b'y'); print('ready', flush=True); time.sleep(60)", str(d)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
        info = json.loads(run("info", str(d), "--json").stdout)
        after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
        assert info["locked"] is True
        assert info["lock_holder"]["pid"] == child.pid
        assert before == after
    finally:
        child.kill()
        child.wait()


def test_dump_lists_records(tmp_path: Path) -> None:
    crashed_db(tmp_path / "db", 20)
    p = run("dump", str(tmp_path / "db"))
    lines = p.stdout.splitlines()
    assert any("PUT" in line and "'key0003'" in line and "value 3 B" in line for line in lines)
    assert any("DELETE" in line and "'key0001'" in line for line in lines)
    assert any("BATCH" in line for line in lines)
    assert "clean end" in p.stderr


def test_dump_json_and_filters(tmp_path: Path) -> None:
    crashed_db(tmp_path / "db", 20)
    recs = [json.loads(x) for x in run("dump", str(tmp_path / "db"), "--json").stdout.splitlines()]
    data, end = recs[:-1], recs[-1]
    assert end["end"] == "clean"
    assert data[0]["type"] == "SESSION"  # every writable open starts with one
    data = data[1:]
    lsns = [r["lsn"] for r in data]
    assert lsns == sorted(lsns) and len(lsns) == 22
    some = [json.loads(x) for x in run("dump", str(tmp_path / "db"), "--json", "--from-lsn",
                                       str(lsns[5]), "--to-lsn", str(lsns[9])).stdout.splitlines()]
    assert [r["lsn"] for r in some[:-1]] == lsns[5:10]
    dels = [json.loads(x) for x in run("dump", str(tmp_path / "db"), "--json", "--type",
                                       "DELETE").stdout.splitlines()][:-1]
    assert [r["type"] for r in dels] == ["DELETE"]
    pref = [json.loads(x) for x in run("dump", str(tmp_path / "db"), "--json", "--key-prefix",
                                       "key001").stdout.splitlines()][:-1]
    assert len(pref) == 10


def test_verify_clean_exits_0(tmp_path: Path) -> None:
    make_db(tmp_path / "db")
    assert "OK" in run("verify", str(tmp_path / "db")).stdout


def _segment_with_records(d: Path) -> str:
    return list_segments(d / "wal")[0][1]


def test_verify_bit_flip_mid_log_exits_1_and_names_where(tmp_path: Path) -> None:
    d = tmp_path / "db"
    crashed_db(d, 200)
    seg = _segment_with_records(d)
    first_put = 64 + 28  # after the segment header and the open's SESSION record
    with open(seg, "r+b") as f:  # a byte inside the first put's payload
        f.seek(first_put + 28 + 5)
        b = f.read(1)
        f.seek(first_put + 28 + 5)
        f.write(bytes([b[0] ^ 0x10]))
    p = run("verify", str(d), check=1)
    assert os.path.basename(seg) in p.stdout and f"offset {first_put}," in p.stdout
    j = json.loads(run("verify", str(d), "--json", check=1).stdout)
    assert j["ok"] is False and j["problems"]


def test_verify_torn_tail_exits_1(tmp_path: Path) -> None:
    d = tmp_path / "db"
    crashed_db(d, 50)
    seg = list_segments(d / "wal")[-1][1]
    data = Path(seg).read_bytes()
    end = len(data.rstrip(b"\0"))
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(b"\x07" * 13)
    p = run("verify", str(d), check=1)
    assert "torn tail" in p.stdout


def test_verify_foreign_segment_exits_1(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    crashed_db(a, 10)
    crashed_db(b, 10)
    for _, seg in list_segments(a / "wal"):
        os.unlink(seg)
    for _, seg in list_segments(b / "wal"):
        shutil.copy(seg, a / "wal")
    p = run("verify", str(a), check=1)
    assert "system_id" in p.stdout


def test_verify_missing_segment_exits_1(tmp_path: Path) -> None:
    d = tmp_path / "db"
    db = walstate.open(d, segment_size=65536, max_wal_size=1 << 30)
    for i in range(3000):
        db.put(b"k%d" % i, b"x" * 100)
    db._abandon()
    segs = list_segments(d / "wal")
    assert len(segs) >= 3
    os.unlink(segs[1][1])
    p = run("verify", str(d), check=1)
    assert "WAL" in p.stdout


def test_checkpoint_command(tmp_path: Path) -> None:
    d = tmp_path / "db"
    crashed_db(d, 30)
    out = json.loads(run("checkpoint", str(d), "--json").stdout)
    assert out["reason"] == "manual" and out["id"] >= 1
    with walstate.open(d) as db:
        assert db.get(b"key0029") == b"v" * 29
        assert db.get(b"key0001") is None


def test_checkpoint_on_locked_directory_asks_the_writer(tmp_path: Path) -> None:
    d = tmp_path / "db"
    make_db(d)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, walstate; db = walstate.open(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(60)", str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        p = run("checkpoint", str(d))  # the running writer checkpoints (walstate/control.py)
        assert p.stdout.startswith("checkpoint ")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    time.sleep(0.05)
    run("checkpoint", str(d))
