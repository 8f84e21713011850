"""`walstate checkpoint DIR` on a directory a running writer holds: it asks
that writer through its control channel (DIR/CONTROL, walstate/control.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import walstate
from walstate import control
from walstate.layout import Layout

# A writer under steady durable writes: prints each acknowledged key, flushed.
WRITER = r"""
import sys, walstate
db = walstate.open(sys.argv[1], sync="always", checkpoint_timeout=3600)
print("OPEN", flush=True)
i = 0
while True:
    db.put(b"k%08d" % i, b"v%d" % i)
    print(i, flush=True)
    i += 1
"""


def walstate_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstate.ops.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def start_writer(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "OPEN", p.stderr.read()
    return p


def acked(p: subprocess.Popen, at_least: int = 0) -> int:
    """SIGKILLs the writer once it acknowledged ``at_least`` puts; the number
    of puts it acknowledged."""
    last = -1
    while last + 1 < at_least:
        last = int(p.stdout.readline())
    p.kill()
    out, _ = p.communicate(timeout=30)
    lines = [x for x in out.split("\n") if x.strip().isdigit()]
    return int(lines[-1]) + 1 if lines else last + 1


def test_checkpoints_of_a_running_writer_then_nothing_is_lost(tmp_path: Path) -> None:
    d = tmp_path / "db"
    w = start_writer(d)
    try:
        ids, lsns = [], []
        for _ in range(50):
            r = walstate_cli("checkpoint", str(d), "--json")
            assert r.returncode == 0, r.stderr
            info = json.loads(r.stdout)
            ids.append(info["id"])
            lsns.append(info["lsn"])
            assert info["reason"] == "manual"
        assert ids == sorted(set(ids)) and lsns == sorted(lsns)
        assert lsns[-1] > lsns[0]  # the writer kept writing meanwhile
        r = walstate_cli("checkpoint", str(d))  # the human-readable form
        assert r.returncode == 0 and r.stdout.startswith(f"checkpoint {ids[-1] + 1}:")
    finally:
        n = acked(w)
    assert n > 0
    assert (d / "CONTROL").exists()  # a crash leaves the socket behind
    with walstate.open(d) as db:
        assert db.info()["last_checkpoint"].id >= ids[-1]
        for i in range(n):
            assert db.get(b"k%08d" % i) == b"v%d" % i
    assert not (d / "CONTROL").exists()  # a clean close removes it


def test_a_stale_channel_neither_blocks_nor_answers(tmp_path: Path) -> None:
    d = tmp_path / "db"
    n = acked(start_writer(d), at_least=100)
    lay = Layout(str(d))
    assert stat.S_ISSOCK(os.lstat(d / "CONTROL").st_mode)
    with pytest.raises(control.NoAnswer):
        control.request(lay.root, "checkpoint", timeout=5)
    # no writer: the command opens, checkpoints and closes as before
    r = walstate_cli("checkpoint", str(d), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["id"] >= 1
    with walstate.open(d) as db:  # the next writer replaces the stale socket
        assert db.get(b"k%08d" % (n - 1)) == b"v%d" % (n - 1)
        assert control.request(lay.root, "sync", timeout=5)["ok"]


def test_a_writer_that_does_not_answer_is_reported_not_waited_for(tmp_path: Path) -> None:
    d = tmp_path / "db"
    w = start_writer(d)
    os.kill(w.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = walstate_cli("checkpoint", str(d), "--timeout", "1")
        took = time.monotonic() - t0
        assert r.returncode == 1
        assert "did not answer" in r.stderr and str(w.pid) in r.stderr
        assert took < 30
    finally:
        os.kill(w.pid, signal.SIGCONT)
        acked(w)


def test_bad_timeout_is_bad_usage(tmp_path: Path) -> None:
    walstate.open(tmp_path / "db").close()
    for bad in ("0", "-1", "nan", "inf", "soon"):
        r = walstate_cli("checkpoint", str(tmp_path / "db"), "--timeout", bad)
        assert r.returncode == 2 and "--timeout" in r.stderr, (bad, r.stderr)


def test_requests_in_process_and_a_failed_checkpoint_is_reported(tmp_path: Path) -> None:
    d = tmp_path / "db"
    with walstate.open(d) as db:
        db.put(b"a", b"1")
        root = Layout(str(d)).root
        reply = control.request(root, "checkpoint", timeout=10)
        assert reply["ok"] and reply["result"]["id"] == 1
        info = control.request(root, "info", timeout=10)["result"]
        assert info["path"] == db.path and info["last_checkpoint"]["id"] == 1
        assert control.request(root, "sync", timeout=10)["result"] == db.sync()
        bad = control.request(root, "drop-everything", timeout=10)
        assert not bad["ok"] and "unknown control request" in bad["error"]
        db._fail(walstate.EngineFailedError("injected"))  # the writer's own failure
        r = walstate_cli("checkpoint", str(d))
        assert r.returncode == 1 and "EngineFailedError" in r.stderr


@pytest.mark.parametrize("dir_mode, sock_mode", [(0o755, 0o600), (0o775, 0o660),
                                                  (0o777, 0o666), (0o700, 0o600)])
def test_only_who_may_write_the_directory_may_connect(tmp_path: Path, dir_mode: int,
                                                      sock_mode: int) -> None:
    d = tmp_path / "db"
    d.mkdir()
    os.chmod(d, dir_mode)
    with walstate.open(d):
        assert stat.S_IMODE(os.lstat(d / "CONTROL").st_mode) == sock_mode


def test_read_only_opens_make_no_channel(tmp_path: Path) -> None:
    d = tmp_path / "db"
    walstate.open(d).close()
    with walstate.open(d, read_only=True):
        assert not (d / "CONTROL").exists()
