"""Continuous archiving to a real S3 store (SeaweedFS) and restore anywhere."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from enginehelpers import child_env, state, wait_for

import walstate
from walstate.archive import list_base_backups, list_pieces
from walstate.archivestore import open_store
from walstate.ops import cli

HERE = os.path.dirname(os.path.abspath(__file__))
WRITER = os.path.join(HERE, "writer.py")
SEG = 1 << 16
INTERVAL = 0.3


def cli_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def indices(path: str | Path) -> list[int]:
    with walstate.open(path, read_only=True) as db:
        out = []
        for k, v in db.items():
            i = int(k[1:])
            assert v == b"%d" % i + b"." * 100
            out.append(i)
    return sorted(out)


class Writer:
    """The writer subprocess and what it acknowledged: (index, lsn, time)."""

    def __init__(self, path: Path, url: str, env: dict[str, str], interval: float = INTERVAL,
                 pause: float = 0.0, seg: int = SEG) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, WRITER, str(path), url, str(interval), str(pause), str(seg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=child_env(env))
        self.acks: list[tuple[int, int, float]] = []
        self._lock = threading.Lock()
        first = self.proc.stdout.readline()
        assert first.strip() == "READY", first + self.proc.stderr.read()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 3:
                with self._lock:
                    self.acks.append((int(parts[0]), int(parts[1]), float(parts[2])))

    def snapshot(self) -> list[tuple[int, int, float]]:
        with self._lock:
            return list(self.acks)

    def kill(self) -> float:
        self.proc.send_signal(signal.SIGKILL)
        t = time.time()
        self.proc.wait()
        self._t.join(10)
        return t

    def wait_acks(self, n: int, timeout: float = 30) -> None:
        assert wait_for(lambda: len(self.snapshot()) >= n, timeout=timeout), \
            self.proc.stderr.read() if self.proc.poll() is not None else "slow writer"


def check_prefix(got: list[int]) -> None:
    assert got == list(range(len(got))), "the restore is not a prefix of the history"


# ---- the basics ---------------------------------------------------------------------
def test_archive_at_creation_restores_without_base_backup(bucket: str, tmp_path: Path,
                                                          capsys) -> None:
    d = tmp_path / "d"
    model = {}
    with walstate.open(d, archive=bucket, archive_interval=0.1, segment_size=SEG,
                       max_wal_size=2 * SEG) as db:
        for i in range(3000):
            k, v = b"k%08d" % i, b"%d" % i + b"." * 100
            db.put(k, v)
            model[k] = v
        db.delete(b"k00000007")
        del model[b"k00000007"]
        assert db._checkpointer.archiver.wait_archived()
        a = db.info()["archive"]
        assert a["url"] == bucket and not a["failing"] and a["last_error"] is None
        assert a["archived_lsn"] == db.info()["durable_lsn"]
        assert a["lag_bytes"] == 0 and a["lag_seconds"] < 1.0
    shutil.rmtree(d)  # nothing but the archive is left
    rc, out, err = cli_main(capsys, "restore", bucket, str(tmp_path / "r"), "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["base_backup"] is None and res["timeline"] == 1
    with walstate.open(tmp_path / "r") as r:
        assert state(r) == model
        r.put(b"new", b"write")  # a normal directory
    rc, out, _ = cli_main(capsys, "archive", "ls", bucket, "--json")
    ls = json.loads(out)
    assert rc == 0 and ls["timelines"][0]["first_lsn"] == 1
    assert ls["timelines"][0]["holes"] == []
    rc, out, _ = cli_main(capsys, "archive", "verify", bucket)
    assert rc == 0, out


def test_bad_url_bucket_or_credentials_never_hang(weed, s3env, tmp_path: Path,
                                                  monkeypatch) -> None:
    with pytest.raises(walstate.ConfigError, match="bucket"):
        walstate.open(tmp_path / "a", archive="s3:///x")
    t0 = time.monotonic()
    with walstate.open(tmp_path / "b", archive="s3://no-such-bucket-here/x",
                       archive_interval=0.1) as db:
        assert time.monotonic() - t0 < 5
        db.put(b"k", b"v")  # writers go on
        assert wait_for(lambda: db.info()["archive"]["failing"], timeout=20)
        assert "does not exist" in db.info()["archive"]["last_error"]
    name = "creds-" + str(os.getpid())
    weed.create_bucket(name)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with walstate.open(tmp_path / "c", archive=f"s3://{name}/x", archive_interval=0.1) as db:
        db.put(b"k", b"v")
        assert wait_for(lambda: db.info()["archive"]["failing"], timeout=20)
        assert "credentials" in db.info()["archive"]["last_error"]
    assert time.monotonic() - t0 < 60
    rc = subprocess.run([sys.executable, "-m", "walstate.ops.cli", "doctor",
                         str(tmp_path / "c")], capture_output=True, text=True,
                        env=child_env(), timeout=60)
    assert rc.returncode == 1 and "credentials" in rc.stdout


# ---- SIGKILL the writer, lose the machine, restore from the bucket -------------------------
def _kill_and_restore(bucket: str, tmp_path: Path, env: dict, rng: random.Random,
                      n: int) -> None:
    d = tmp_path / f"d{n}"
    w = Writer(d, bucket, env)
    w.wait_acks(50)
    time.sleep(rng.uniform(0.8, 2.5))
    t_kill = w.kill()
    acks = w.snapshot()
    shutil.rmtree(d)
    dest = tmp_path / f"r{n}"
    p = subprocess.run([sys.executable, "-m", "walstate.ops.cli", "restore", bucket,
                        str(dest), "--json"], capture_output=True, text=True,
                       env=child_env(env), timeout=120)
    assert p.returncode == 0, p.stderr
    got = indices(dest)
    check_prefix(got)
    must = [i for i, _lsn, t in acks if t <= t_kill - (INTERVAL + 0.5)]
    assert len(got) >= len(must), (len(got), len(must), len(acks))
    shutil.rmtree(dest)


def test_sigkill_writer_restore_from_bucket(weed, s3env, tmp_path: Path) -> None:
    rng = random.Random(14)
    for n in range(3):
        name = f"kill{os.getpid()}-{n}"
        weed.create_bucket(name)
        _kill_and_restore(f"s3://{name}/a", tmp_path, s3env, rng, n)


@pytest.mark.slow
def test_sigkill_writer_restore_from_bucket_50(weed, s3env, tmp_path: Path) -> None:
    rng = random.Random(1414)
    for n in range(50):
        name = f"killslow{os.getpid()}-{n}"
        weed.create_bucket(name)
        _kill_and_restore(f"s3://{name}/a", tmp_path, s3env, rng, n)


# ---- the store goes away while writers run ---------------------------------------------
def test_store_stopped_and_killed_while_writers_run(weed, bucket: str, tmp_path: Path) -> None:
    d = tmp_path / "d"
    db = walstate.open(d, archive=bucket, archive_interval=0.2, segment_size=SEG,
                       max_wal_size=2 * SEG, checkpoint_timeout=0.5)
    stop = threading.Event()
    worst = [0.0]
    model: dict[bytes, bytes] = {}
    mu = threading.Lock()

    def writer(t: int) -> None:
        i = 0
        while not stop.is_set():
            k, v = b"t%d-%06d" % (t, i), b"x" * 50
            t0 = time.monotonic()
            db.put(k, v)
            worst[0] = max(worst[0], time.monotonic() - t0)
            with mu:
                model[k] = v
            i += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert not db.info()["archive"]["failing"]
        weed.pause()  # SIGSTOP: requests hang
        try:
            assert wait_for(lambda: db.info()["archive"]["failing"], timeout=30)
            assert db.info()["archive"]["lag_seconds"] > 1.0
        finally:
            weed.resume()
        weed.kill()  # SIGKILL mid-whatever; restart on the same dir and ports
        time.sleep(1.0)
        a = db.info()["archive"]
        assert a["failing"] and a["lag_bytes"] > 0
        weed.start()
        assert wait_for(lambda: not db.info()["archive"]["failing"]
                        and db.info()["archive"]["lag_seconds"] < 2.0, timeout=60), \
            db.info()["archive"]
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert worst[0] < 1.0, f"a writer blocked for {worst[0]:.2f} s"
    assert db._checkpointer.archiver.wait_archived(timeout=60)
    db.close()
    shutil.rmtree(d)
    rc = cli.main(["restore", bucket, str(tmp_path / "r")])
    assert rc == 0
    with walstate.open(tmp_path / "r", read_only=True) as r:
        assert state(r) == model
    assert cli.main(["archive", "verify", bucket]) == 0


def test_directory_store_never_publishes_partial_objects(tmp_path: Path, capsys) -> None:
    """A directory archive is written tmp + fsync + rename: a writer killed
    mid-upload leaves at most a *.tmp file, which nothing reads."""
    arch = tmp_path / "arch"
    d = tmp_path / "d"
    with walstate.open(d, archive=str(arch), archive_interval=0.05, segment_size=SEG) as db:
        for i in range(2000):
            db.put(b"k%08d" % i, b"%d" % i + b"." * 100)
        assert db._checkpointer.archiver.wait_archived()
        top = db.info()["last_lsn"]
    pieces = list_pieces(open_store(str(arch)))
    p = pieces[-1]
    fake = arch / (p.key.rsplit(".", 1)[0].replace(f"{p.last:016x}", f"{p.last + 99:016x}")
                   + ".chunk.123.tmp")
    fake.write_bytes(b"WSARCPC2\x00\x00")  # a partial upload
    rc, out, err = cli_main(capsys, "restore", str(arch), str(tmp_path / "r"), "--json")
    assert rc == 0, err
    assert json.loads(out)["lsn"] >= top - 1
    assert cli.main(["archive", "verify", str(arch)]) == 0


# ---- point in time ------------------------------------------------------------------------
def test_to_time_and_to_lsn_while_the_writer_goes_on(bucket: str, s3env, tmp_path: Path,
                                                     capsys) -> None:
    d = tmp_path / "d"
    w = Writer(d, bucket, s3env, pause=0.001)
    try:
        w.wait_acks(300)
        time.sleep(1.5)
        acks = w.snapshot()
        # a time between two acknowledgements, in the past by more than the interval
        pick = acks[len(acks) // 2]
        T = pick[2] + 0.0005
        time.sleep(INTERVAL + 0.5)
        rc, out, err = cli_main(capsys, "restore", bucket, str(tmp_path / "t"), "--to-time",
                                str(T), "--json")
        assert rc == 0, err
        got = indices(tmp_path / "t")
        check_prefix(got)
        must = {i for i, _l, t in acks if t <= T - INTERVAL}
        never = {i for i, _l, t in acks if t > T}
        assert must <= set(got) and not (never & set(got)), (len(must), len(got), len(never))
        # --to-lsn: exactly the writes up to that LSN
        lsn = acks[len(acks) // 3][1]
        rc, out, err = cli_main(capsys, "restore", bucket, str(tmp_path / "l"), "--to-lsn",
                                str(lsn), "--json")
        assert rc == 0, err
        assert json.loads(out)["lsn"] == lsn
        assert indices(tmp_path / "l") == [i for i, ll, _t in acks if ll <= lsn]
        # the newest: everything acknowledged more than the interval ago
        t_now = time.time()
        rc, out, err = cli_main(capsys, "restore", bucket, str(tmp_path / "n"))
        assert rc == 0, err
        got = indices(tmp_path / "n")
        check_prefix(got)
        assert len(got) >= len([a for a in w.snapshot() if a[2] <= t_now - INTERVAL - 0.5])
    finally:
        w.kill()


# ---- base backups, timelines, prune, verify ---------------------------------------------------
def test_base_backups_timelines_prune_verify(bucket: str, s3env, tmp_path: Path,
                                             capsys) -> None:
    d = tmp_path / "d"
    model: dict[bytes, bytes] = {}
    db = walstate.open(d, archive=bucket, archive_interval=0.05, segment_size=SEG,
                       max_wal_size=2 * SEG)
    try:
        for rnd in range(3):
            for i in range(1500):
                k, v = b"k%08d" % (rnd * 1500 + i), b"r%d" % rnd
                db.put(k, v)
                model[k] = v
            db.checkpoint()
            p = subprocess.run([sys.executable, "-m", "walstate.ops.cli", "backup", str(d),
                                bucket, "--json"], capture_output=True, text=True,
                               env=child_env(s3env), timeout=120)
            assert p.returncode == 0, p.stderr
        for i in range(200):
            db.put(b"late%d" % i, b"1")
            model[b"late%d" % i] = b"1"
        assert db._checkpointer.archiver.wait_archived()
        first_lsn = db.info()["last_lsn"]
    finally:
        db.close()
    store = open_store(bucket)
    backups = list_base_backups(store)
    assert len(backups) == 3
    rc, out, err = cli_main(capsys, "restore", bucket, str(tmp_path / "r"), "--json")
    res = json.loads(out)
    assert rc == 0 and res["base_backup"] == backups[-1]["prefix"], err
    with walstate.open(tmp_path / "r", read_only=True) as r:
        assert state(r) == model
    # prune: dry run by default, then --apply; the newest kept backup still restores
    rc, out, _ = cli_main(capsys, "archive", "prune", bucket, "--keep", "1", "--json")
    plan = json.loads(out)
    assert rc == 0 and not plan["apply"] and len(plan["delete_backups"]) == 2
    assert len(list_base_backups(store)) == 3
    rc, out, _ = cli_main(capsys, "archive", "prune", bucket, "--keep", "1", "--apply")
    assert rc == 0 and len(list_base_backups(store)) == 1
    rc, out, err = cli_main(capsys, "restore", bucket, str(tmp_path / "r2"))
    assert rc == 0, err
    with walstate.open(tmp_path / "r2", read_only=True) as r:
        assert state(r) == model
    # a restored copy written to with the same archive gets a timeline of its own
    with walstate.open(tmp_path / "r2", archive=bucket, archive_interval=0.05) as r:
        r.put(b"copy", b"only")
        assert r._checkpointer.archiver.wait_archived()
        assert r.info()["archive"]["timeline"] == 2
    with walstate.open(d, archive=bucket, archive_interval=0.05) as db:  # the original
        db.put(b"orig", b"only")
        assert db._checkpointer.archiver.wait_archived()
        assert db.info()["archive"]["timeline"] == 1
    rc, out, _ = cli_main(capsys, "archive", "ls", bucket, "--json")
    ls = json.loads(out)
    assert [t["timeline"] for t in ls["timelines"]] == [1, 2]
    assert ls["timelines"][1]["parent"] == 1 and ls["timelines"][1]["branch_lsn"] >= first_lsn
    assert cli_main(capsys, "restore", bucket, str(tmp_path / "t1"), "--timeline", "1")[0] == 0
    assert cli_main(capsys, "restore", bucket, str(tmp_path / "t2"), "--timeline", "2")[0] == 0
    # by default: the history written to most recently (here the original)
    assert cli_main(capsys, "restore", bucket, str(tmp_path / "t0"))[0] == 0
    with walstate.open(tmp_path / "t1", read_only=True) as r:
        assert r.get(b"orig") == b"only" and r.get(b"copy") is None
    with walstate.open(tmp_path / "t0", read_only=True) as r:
        assert r.get(b"orig") == b"only" and r.get(b"copy") is None
    with walstate.open(tmp_path / "t2", read_only=True) as r:
        assert r.get(b"copy") == b"only" and r.get(b"orig") is None
    assert cli_main(capsys, "archive", "verify", bucket)[0] == 0
    # damage one object: verify says so (exit 1)
    p = [x for x in list_pieces(store) if x.timeline == 1][-1]
    blob = bytearray(store.get(p.key))
    blob[-3] ^= 0x40
    store.put(p.key, bytes(blob))
    rc, out, _ = cli_main(capsys, "archive", "verify", bucket)
    assert rc == 1 and "damaged" in out


def test_base_backup_policy_and_another_systems_archive(bucket: str, tmp_path: Path) -> None:
    d = tmp_path / "d"
    with walstate.open(d, archive=bucket, archive_interval=0.05, segment_size=SEG,
                       archive_backup_bytes=SEG) as db:
        for i in range(3000):
            db.put(b"k%08d" % i, b"x" * 100)
        assert wait_for(lambda: db.info()["archive"]["base_backups"] >= 1, timeout=60), \
            db.info()["archive"]
    assert list_base_backups(open_store(bucket))
    with walstate.open(tmp_path / "other", archive=bucket, archive_interval=0.05) as db:
        db.put(b"k", b"v")
        assert wait_for(lambda: db.info()["archive"]["failing"], timeout=20)
        assert "belongs to system_id" in db.info()["archive"]["last_error"]


def test_archive_switched_on_later_takes_a_base_backup(bucket: str, tmp_path: Path,
                                                       capsys) -> None:
    """A directory whose early WAL is gone: the archive cannot start from the
    first record, so the writer takes a base backup by itself at once."""
    d = tmp_path / "d"
    model: dict[bytes, bytes] = {}
    with walstate.open(d, segment_size=SEG, max_wal_size=2 * SEG) as db:
        for i in range(3000):
            model[b"k%08d" % i] = b"old"
            db.put(b"k%08d" % i, b"old")
        db.checkpoint()
    with walstate.open(d, archive=bucket, archive_interval=0.05, segment_size=SEG) as db:
        for i in range(100):
            model[b"n%d" % i] = b"new"
            db.put(b"n%d" % i, b"new")
        assert wait_for(lambda: db.info()["archive"]["base_backups"] >= 1, timeout=60), \
            db.info()["archive"]
        for i in range(100):
            model[b"m%d" % i] = b"after"
            db.put(b"m%d" % i, b"after")
        assert db._checkpointer.archiver.wait_archived()
        assert db.info()["archive"]["holes"] == []
    shutil.rmtree(d)
    rc, out, err = cli_main(capsys, "restore", bucket, str(tmp_path / "r"), "--json")
    assert rc == 0, err
    assert json.loads(out)["base_backup"]
    with walstate.open(tmp_path / "r", read_only=True) as r:
        assert state(r) == model
