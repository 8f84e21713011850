"""Operating walstate: repair, doctor, backup, restore, WAL archiving, metrics
and the operational log lines, against real directories."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from enginehelpers import (
    apply_op,
    broken_files,
    child_env,
    corrupt,
    data_end,
    parse_writer_output,
    segments,
    state,
    tree_digest,
    wait_for,
    writer_cmd,
)

import walstate
from walstate.archivestore import open_store
from walstate.ops import cli
from walstate.wal import list_segments

CLI = [sys.executable, "-m", "walstate.ops.cli"]
SEG = 65536


def run(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                       env=child_env())
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The CLI in this process (faster than a subprocess)."""
    rc = cli.main(list(args))
    return rc, capsys.readouterr().out


def crashed(path: Path, n: int = 3000, **opts: object) -> dict[bytes, bytes]:
    """A directory whose writer died after n puts (several WAL segments)."""
    db = walstate.open(path, segment_size=SEG, max_wal_size=1 << 30, **opts)
    model = {}
    for i in range(n):
        k, v = b"k%05d" % i, b"v%d-" % i + b"x" * 90
        db.put(k, v)
        model[k] = v
    db._abandon()
    return model


def add_torn_tail(d: Path) -> None:
    seg = segments(str(d))[-1]
    corrupt(seg, data_end(seg), "write", b"\x07" * 13)


def flip_mid_log(d: Path) -> None:
    seg = segments(str(d))[1]
    corrupt(seg, 64 + 28 + 5, "flip")


def foreign_last_segment(tmp: Path, d: Path) -> None:
    other = tmp / "other"
    crashed(other, 3000)
    last = segments(str(d))[-1]
    os.unlink(last)
    shutil.copy(segments(str(other))[-1], last)


def repair_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    rc, out = main(capsys, "repair", *args, "--json")
    return rc, json.loads(out)


@pytest.mark.parametrize("cmd", ["repair", "doctor", "backup", "restore"])
def test_new_commands_have_help(cmd: str) -> None:
    assert "usage" in run(cmd, "--help").stdout.lower()
    assert cmd in run("--help").stdout


# ---- repair -------------------------------------------------------------------
def test_repair_clean_directory_exits_0(tmp_path: Path, capsys) -> None:
    crashed(tmp_path / "db", 100)
    rc, out = main(capsys, "repair", str(tmp_path / "db"))
    assert rc == 0 and "nothing to repair" in out
    rc, j = repair_json(capsys, str(tmp_path / "db"))
    assert rc == 0 and j["ok"] is True and j["findings"] == []


def test_repair_torn_tail_dry_run_changes_nothing_then_apply_cuts(tmp_path: Path,
                                                                  capsys) -> None:
    d = tmp_path / "db"
    model = crashed(d)
    add_torn_tail(d)
    before = tree_digest(str(d))
    rc, out = main(capsys, "repair", str(d))
    assert rc == 1 and "torn_tail" in out and "would: cut 13 bytes" in out
    assert tree_digest(str(d)) == before
    rc, j = repair_json(capsys, str(d), "--apply")
    assert rc == 0 and j["findings"][0]["kind"] == "torn_tail" and j["findings"][0]["applied"]
    assert broken_files(str(d))
    assert run("verify", str(d)).returncode == 0
    with walstate.open(d, recovery="strict") as db:
        assert state(db) == model


def test_repair_mid_log_bit_flip_needs_accept_data_loss(tmp_path: Path, capsys) -> None:
    d = tmp_path / "db"
    crashed(d)
    flip_mid_log(d)
    rc, j = repair_json(capsys, str(d))
    f = j["findings"][0]
    assert rc == 1 and f["kind"] == "corruption" and f["data_loss"] is True
    before = tree_digest(str(d))
    rc, j = repair_json(capsys, str(d), "--apply")
    assert rc == 1 and not j["findings"][0]["applied"]
    assert "accept-data-loss" in j["findings"][0]["result"]
    assert tree_digest(str(d)) == before
    rc, j = repair_json(capsys, str(d), "--apply", "--accept-data-loss")
    assert rc == 0 and j["findings"][0]["applied"]
    with walstate.open(d, recovery="strict") as db:
        got = state(db)
    # the valid prefix: every key before the damaged record, none after it (put i has
    # LSN i + 2: LSN 1 is the SESSION record of the writer's open)
    assert got and all(k < b"k%05d" % (f["lsn"] - 2) for k in got)
    assert len(got) == f["lsn"] - 2


def test_repair_foreign_last_segment_moved_aside(tmp_path: Path, capsys) -> None:
    d = tmp_path / "db"
    crashed(d)
    foreign_last_segment(tmp_path, d)
    name = os.path.basename(segments(str(d))[-1])
    rc, j = repair_json(capsys, str(d))
    f = j["findings"][0]
    assert rc == 1 and f["kind"] == "foreign_segment" and f["data_loss"] is False
    assert "system_id" in f["detail"]
    rc, j = repair_json(capsys, str(d), "--apply")
    assert rc == 0
    assert name + ".broken" in broken_files(str(d))
    assert run("verify", str(d)).returncode == 0


def test_repair_missing_segment_is_a_gap(tmp_path: Path, capsys) -> None:
    d = tmp_path / "db"
    crashed(d)
    os.unlink(segments(str(d))[2])
    rc, j = repair_json(capsys, str(d))
    f = j["findings"][0]
    assert rc == 1 and f["kind"] == "gap" and "missing" in f["detail"]
    rc, j = repair_json(capsys, str(d), "--apply", "--accept-data-loss")
    assert rc == 0
    with walstate.open(d, recovery="strict") as db:
        assert db.get(b"k00000") is not None


def test_repair_stale_snapshot_is_not_fixable(tmp_path: Path, capsys) -> None:
    d = tmp_path / "db"
    db = walstate.open(d, segment_size=SEG, max_wal_size=1 << 30)
    for i in range(100):
        db.put(b"a%d" % i, b"x" * 100)
    db.checkpoint()
    db.close()
    shutil.copytree(d / "snapshot", tmp_path / "old_snapshot")
    db = walstate.open(d, segment_size=SEG, max_wal_size=1 << 30)
    for i in range(3000):
        db.put(b"b%d" % i, b"x" * 100)
    db.checkpoint()
    db.close()
    shutil.rmtree(d / "snapshot")
    shutil.copytree(tmp_path / "old_snapshot", d / "snapshot")
    rc, j = repair_json(capsys, str(d), "--apply", "--accept-data-loss")
    f = j["findings"][0]
    assert rc == 1 and f["kind"] == "stale_snapshot" and not f["applied"]
    assert "restore from a backup" in f["result"]


def test_repair_on_directory_locked_by_live_process(tmp_path: Path) -> None:
    d = tmp_path / "db"
    crashed(d, 10)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, walstate; db = walstate.open(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(60)", str(d)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        p = run("repair", str(d), check=1)
        assert "locked" in p.stdout and str(child.pid) in p.stdout
        p = run("repair", str(d), "--apply", check=1)
        assert str(child.pid) in p.stderr
        p = run("doctor", str(d), check=1)
        assert any(line.startswith("FAIL") and "lock" in line and str(child.pid) in line
                   for line in p.stdout.splitlines())
    finally:
        child.kill()
        child.wait()


# ---- doctor -------------------------------------------------------------------
DOCTOR_CHECKS = ["path", "writable", "free_space", "filesystem", "lock", "lmdb_map",
                 "broken_files", "wal", "open", "archive"]


def test_doctor_clean_directory(tmp_path: Path, capsys) -> None:
    d = tmp_path / "db"
    crashed(d, 100)
    rc, out = main(capsys, "doctor", str(d), "--max-wal-size", str(1 << 20))
    assert rc == 0, out
    assert len(out.splitlines()) == len(DOCTOR_CHECKS)
    rc, out = main(capsys, "doctor", str(d), "--max-wal-size", str(1 << 20), "--json")
    j = json.loads(out)
    assert j["ok"] is True and [c["name"] for c in j["checks"]] == DOCTOR_CHECKS
    assert all(c["status"] in ("OK", "WARN") for c in j["checks"])


def test_doctor_path_that_can_be_created(tmp_path: Path, capsys) -> None:
    rc, out = main(capsys, "doctor", str(tmp_path / "new" / "db"), "--max-wal-size",
                   str(1 << 20))
    assert rc == 0 and "can be created" in out
    assert not (tmp_path / "new").exists()


def test_doctor_fails_on_too_little_space_and_bad_wal(tmp_path: Path, capsys) -> None:
    d = tmp_path / "db"
    crashed(d)
    rc, out = main(capsys, "doctor", str(d), "--max-wal-size", str(1 << 55), "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert rc == 1 and checks["free_space"]["status"] == "FAIL"
    flip_mid_log(d)
    rc, out = main(capsys, "doctor", str(d), "--max-wal-size", str(1 << 20), "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert rc == 1 and checks["wal"]["status"] == "FAIL" and "corruption" in checks["wal"]["detail"]


def test_doctor_warns_about_broken_files_and_torn_tail(tmp_path: Path, capsys) -> None:
    d = tmp_path / "db"
    crashed(d)
    add_torn_tail(d)
    rc, out = main(capsys, "doctor", str(d), "--max-wal-size", str(1 << 20), "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert rc == 0 and checks["wal"]["status"] == "WARN"
    walstate.open(d).close()  # cuts the tail into a .broken file
    rc, out = main(capsys, "doctor", str(d), "--max-wal-size", str(1 << 20), "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert rc == 0 and checks["broken_files"]["status"] == "WARN"
    assert ".broken" in checks["broken_files"]["detail"]


def test_doctor_names_filesystem_type(tmp_path: Path) -> None:
    from walstate.ops.doctor import filesystem_type

    fstype, mnt = filesystem_type(str(tmp_path / "not" / "yet"))
    assert fstype != "unknown" and str(tmp_path).startswith(mnt)


# ---- archiving ------------------------------------------------------------------
def _fill(db: walstate.Engine, start: int, n: int, model: dict | None = None,
          lsns: list | None = None) -> None:
    for i in range(start, start + n):
        k, v = b"k%05d" % (i % 4000), b"v%d-" % i + b"x" * 90
        lsn = db.put(k, v)
        if model is not None:
            model[k] = v
        if lsns is not None:
            lsns.append((lsn, k, v))


def _pieces(arch: Path) -> list:
    return walstate.archive.list_pieces(open_store(str(arch)))


def test_archiving_ships_before_removal(tmp_path: Path, capsys) -> None:
    d, arch = tmp_path / "db", tmp_path / "arch"
    model: dict = {}
    with walstate.open(d, segment_size=SEG, max_wal_size=1 << 30, archive_dir=arch,
                       archive_interval=0.05) as db:
        _fill(db, 0, 3000, model)
        before = [os.path.basename(p) for p in segments(str(d))]
        assert db._checkpointer.archiver.wait_archived()
        info = db.checkpoint()
        assert info.wal_segments_removed == len(before) - 1
        a = db.info()["archive"]
        assert a["failing"] is False and a["failures"] == 0
        assert a["url"] == str(arch) and a["archived_lsn"] == db.info()["durable_lsn"]
        last = db.info()["last_lsn"]
    pieces = _pieces(arch)
    # complete segments are consolidated: one object each
    assert sum(1 for p in pieces if p.kind == "seg") >= len(before) - 1
    assert pieces[0].first == 1 and max(p.last for p in pieces) >= last
    rc, _out = main(capsys, "restore", str(arch), str(tmp_path / "r"))
    assert rc == 0
    with walstate.open(tmp_path / "r") as r:
        assert state(r) == model


def test_archive_failure_keeps_segments_and_is_reported(tmp_path: Path, capsys,
                                                        caplog) -> None:
    d, arch = tmp_path / "db", tmp_path / "arch"
    arch.write_bytes(b"not a directory")  # mkdir/open in it fail
    caplog.set_level(logging.ERROR, logger="walstate")
    db = walstate.open(d, segment_size=SEG, max_wal_size=1 << 30, archive_dir=arch,
                       archive_interval=0.05)
    try:
        _fill(db, 0, 3000)
        before = segments(str(d))
        assert wait_for(lambda: db.info()["archive"]["failing"], timeout=10)
        assert db.checkpoint().wal_segments_removed == 0
        assert segments(str(d)) == before
        a = db.info()["archive"]
        assert a["failing"] and a["failures"] >= 1 and a["lag_bytes"] >= SEG
        assert a["lag_seconds"] > 0
        assert str(arch) in a["last_error"]
        assert any("archiving failed" in r.getMessage() for r in caplog.records)
        # what another process sees: info and doctor
        rc, out = main(capsys, "doctor", str(d), "--max-wal-size", str(1 << 20), "--json")
        checks = {c["name"]: c for c in json.loads(out)["checks"]}
        assert rc == 1 and checks["archive"]["status"] == "FAIL"
        assert json.loads(run("info", str(d), "--json").stdout)["archive"]["failing"] is True
        if importlib.util.find_spec("prometheus_client") is not None:
            from prometheus_client.parser import text_string_to_metric_families

            from walstate.ops import metrics

            server = metrics.serve(db, 0)
            try:
                text = urllib.request.urlopen(server.url, timeout=10).read().decode()
            finally:
                server.close()
            got = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
            assert got["walstate_archive_failing"] == 1
            assert got["walstate_archive_failures_total"] >= 1
            assert got["walstate_archive_lag_seconds"] > 0
            assert got["walstate_archive_lag_bytes"] >= SEG
        # the archive works again: shipping resumes by itself, then a checkpoint removes
        arch.unlink()
        _fill(db, 3000, 10)
        assert wait_for(lambda: not db.info()["archive"]["failing"], timeout=20)
        assert db._checkpointer.archiver.wait_archived()
        assert db.checkpoint().wal_segments_removed == len(before) - 1
        a = db.info()["archive"]
        assert a["failing"] is False and a["lag_bytes"] == 0
    finally:
        db.close()


def test_read_only_archive_dir_keeps_segment(tmp_path: Path) -> None:
    """As root, modes apply only without CAP_DAC_OVERRIDE: the writer runs in a
    child without it."""
    d, arch = tmp_path / "db", tmp_path / "arch"
    arch.mkdir()
    code = (
        "import json, os, sys, walstate\n"
        "db = walstate.open(sys.argv[1], segment_size=65536, max_wal_size=1 << 30, "
        "archive_dir=sys.argv[2], archive_interval=0.05)\n"
        "for i in range(3000): db.put(b'k%d' % i, b'x' * 100)\n"
        "import time\n"
        "while not db.info()['archive']['failing']: time.sleep(0.01)\n"
        "n = len(os.listdir(os.path.join(sys.argv[1], 'wal')))\n"
        "ck = db.checkpoint()\n"
        "print(json.dumps({'before': n, 'removed': ck.wal_segments_removed, "
        "'after': len(os.listdir(os.path.join(sys.argv[1], 'wal'))), "
        "'archive': db.info()['archive']}))\n"
        "db._abandon()\n")
    # the archive marker exists, then the directory becomes read-only
    walstate.archive.check_archive_dir(str(arch), _system_id_after_open(d), create=True)
    os.chmod(arch, 0o555)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: cannot drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    try:
        p = subprocess.run([*prefix, sys.executable, "-c", code, str(d), str(arch)],
                           capture_output=True, text=True, timeout=60, env=child_env())
    finally:
        os.chmod(arch, 0o755)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["removed"] == 0 and out["after"] == out["before"]
    assert out["archive"]["failing"] and "ermission" in out["archive"]["last_error"]
    assert _pieces(arch) == []


def _system_id_after_open(d: Path) -> int:
    with walstate.open(d, segment_size=SEG) as db:
        return db.system_id


def test_archive_lag_limit_stops_retaining_loudly(tmp_path: Path, caplog) -> None:
    d, arch = tmp_path / "db", tmp_path / "arch"
    arch.write_bytes(b"x")
    caplog.set_level(logging.ERROR, logger="walstate")
    with walstate.open(d, segment_size=SEG, max_wal_size=1 << 30, archive_dir=arch,
                       max_archive_lag_bytes=SEG, archive_interval=0.05) as db:
        _fill(db, 0, 3000)
        n = len(segments(str(d)))
        assert wait_for(lambda: db.info()["archive"]["failing"], timeout=10)
        assert db.checkpoint().wal_segments_removed == n - 1
        a = db.info()["archive"]
        assert a["abandoned"] is True and a["holes"] and a["holes"][0][0] == 1
    assert any(r.levelno == logging.CRITICAL and "ABANDONED" in r.getMessage()
               for r in caplog.records)


def test_archive_of_another_system_is_refused(tmp_path: Path) -> None:
    arch = tmp_path / "arch"
    with walstate.open(tmp_path / "a", segment_size=SEG, max_wal_size=1 << 30,
                       archive_dir=arch) as db:
        _fill(db, 0, 1000)
        db.checkpoint()
    with walstate.open(tmp_path / "b", segment_size=SEG, max_wal_size=1 << 30,
                       archive_dir=arch, archive_interval=0.05) as db:
        _fill(db, 0, 1000)
        assert wait_for(lambda: db.info()["archive"]["failing"], timeout=10)
        assert db.checkpoint().wal_segments_removed == 0
        assert "belongs to system_id" in db.info()["archive"]["last_error"]


def test_archive_options_are_validated() -> None:
    with pytest.raises(walstate.ConfigError, match="archive_dir"):
        walstate.Config(archive_dir=5)
    with pytest.raises(walstate.ConfigError, match="max_archive_lag_bytes"):
        walstate.Config(max_archive_lag_bytes=-1)
    with pytest.raises(walstate.ConfigError, match="archive"):
        walstate.Config(archive="ftp://x/y")
    with pytest.raises(walstate.ConfigError, match="bucket"):
        walstate.Config(archive="s3://")
    with pytest.raises(walstate.ConfigError, match="archive_interval"):
        walstate.Config(archive_interval=0)
    with pytest.raises(walstate.ConfigError, match="archive"):
        walstate.Config(archive="/a", archive_dir="/b")
    c = walstate.Config(archive_dir="s3://bucket/p/")
    assert c.archive == c.archive_dir == "s3://bucket/p"


# ---- backup and restore -----------------------------------------------------------
def _history(lsns: list, upto: int, base: dict | None = None) -> dict:
    model = dict(base or {})
    for lsn, k, v in lsns:
        if lsn > upto:
            break
        model[k] = v
    return model


def test_backup_and_restore_to_lsn_exactly(tmp_path: Path, capsys) -> None:
    d, arch, bk = tmp_path / "db", tmp_path / "arch", tmp_path / "bk"
    lsns: list = []
    db = walstate.open(d, segment_size=SEG, max_wal_size=1 << 30, archive_dir=arch,
                       archive_interval=0.05)
    try:
        _fill(db, 0, 2000, lsns=lsns)
        db.checkpoint()
        _fill(db, 2000, 1000, lsns=lsns)
        # LMDB allows one open per process: back up from another one
        res = json.loads(run("backup", str(d), str(bk), "--label", "nightly", "--json").stdout)
        assert res["lsn"] == lsns[-1][0] and res["label"] == "nightly"
        _fill(db, 3000, 6000, lsns=lsns)
        db.checkpoint()
    finally:
        db.close()
    info = json.loads(run("info", str(bk), "--json").stdout)
    assert info["backup_label"]["label"] == "nightly"
    assert info["backup_label"]["lsn"] == res["lsn"] == info["last_lsn"]
    with walstate.open(bk, read_only=True) as b:
        assert state(b) == _history(lsns, res["lsn"])
    targets = [res["lsn"] - 500, res["lsn"], res["lsn"] + 1, res["lsn"] + 4321]
    for i, n in enumerate(targets):
        dest = tmp_path / f"r{i}"
        rc, out = main(capsys, "restore", str(bk), str(dest), "--to-lsn", str(n), "--json")
        assert rc == 0 and json.loads(out)["lsn"] == n
        with walstate.open(dest) as r:
            assert state(r) == _history(lsns, n), n
            assert r.info()["recovery"]["to_lsn"] == n
        assert broken_files(str(dest)) == []
    # without a target: as far as the archive goes (a clean close shipped it all)
    rc, out = main(capsys, "restore", str(bk), str(tmp_path / "all"), "--json")
    far = json.loads(out)["lsn"]
    assert rc == 0 and res["lsn"] + 4321 < far and far >= lsns[-1][0]
    with walstate.open(tmp_path / "all") as r:
        assert state(r) == _history(lsns, far)


def test_restore_refuses_unreachable_targets(tmp_path: Path, capsys) -> None:
    d, arch, bk = tmp_path / "db", tmp_path / "arch", tmp_path / "bk"
    with walstate.open(d, segment_size=SEG, max_wal_size=1 << 30, archive_dir=arch) as db:
        _fill(db, 0, 2000)
        ck = db.checkpoint()
        _fill(db, 2000, 100)
        run("backup", str(d), str(bk))
    rc = cli.main(["restore", str(bk), str(tmp_path / "r1"), "--to-lsn", str(ck.lsn - 1)])
    assert rc == 1 and "older backup" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists() or os.listdir(tmp_path / "r1") == []
    rc = cli.main(["restore", str(bk), str(tmp_path / "r2"), "--to-lsn", str(10**9)])
    assert rc == 1 and "reach only" in capsys.readouterr().err
    # the destination must be new
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "x").write_text("x")
    assert main(capsys, "restore", str(bk), str(tmp_path / "r3"))[0] == 1


def test_restore_to_time_goes_by_backup_and_archive_times(tmp_path: Path, capsys) -> None:
    d, arch, bk = tmp_path / "db", tmp_path / "arch", tmp_path / "bk"
    lsns: list = []
    with walstate.open(d, segment_size=SEG, max_wal_size=1 << 30, archive_dir=arch,
                       archive_interval=0.05) as db:
        _fill(db, 0, 500, lsns=lsns)
        run("backup", str(d), str(bk))
        _fill(db, 500, 2000, lsns=lsns)
        time.sleep(0.3)
        t_mid = time.time()
        mid_lsn = lsns[-1][0]
        time.sleep(0.3)
        _fill(db, 2500, 3000, lsns=lsns)
        db.checkpoint()
    label = json.loads((bk / "BACKUP_LABEL").read_text())
    rc = cli.main(["restore", str(bk), str(tmp_path / "early"), "--to-time",
                   str(label["created_at"] - 10)])
    assert rc == 1 and "older backup" in capsys.readouterr().err
    rc, out = main(capsys, "restore", str(bk), str(tmp_path / "r"), "--to-time",
                   str(t_mid), "--archive-dir", str(arch), "--json")
    res = json.loads(out)
    assert rc == 0 and res["lsn"] == mid_lsn
    with walstate.open(tmp_path / "r") as r:
        assert state(r) == _history(lsns, res["lsn"])
    # straight from the archive too (no backup needed: it holds the WAL from LSN 1)
    rc, out = main(capsys, "restore", str(arch), str(tmp_path / "r2"), "--to-time",
                   str(t_mid), "--json")
    assert rc == 0 and json.loads(out)["lsn"] == mid_lsn


def test_restore_to_time_of_a_plain_copy(tmp_path: Path, capsys) -> None:
    """A plain copy of a data directory has no BACKUP_LABEL: its files' times say
    when its writes were made; --to-time before them is refused; nan is no time."""
    d = tmp_path / "db"
    with walstate.open(d, segment_size=SEG) as db:
        _fill(db, 0, 100)
    t_before = time.time() - 60
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    rc = cli.main(["restore", str(copy), str(tmp_path / "r"), "--to-time", str(t_before)])
    assert rc == 1 and "after --to-time" in capsys.readouterr().err
    rc = cli.main(["restore", str(copy), str(tmp_path / "r"), "--to-time", "nan"])
    assert rc == 2 and "not a time" in capsys.readouterr().err
    rc, _out = main(capsys, "restore", str(copy), str(tmp_path / "r3"), "--to-time",
                    str(time.time() + 1))
    assert rc == 0


def test_backup_copies_the_log_only_to_its_end(tmp_path: Path) -> None:
    d, bk = tmp_path / "db", tmp_path / "bk"
    with walstate.open(d, segment_size=16 << 20) as db:
        for i in range(9000):
            db.put(b"k%05d" % i, b"x" * 100)
        run("backup", str(d), str(bk))
        model = state(db)
    wal = sum(os.path.getsize(p) for _f, p in list_segments(bk / "wal"))
    assert wal < 2 << 20, wal  # not the preallocated 16 MiB
    with walstate.open(bk, read_only=True) as b:
        assert state(b) == model
    assert run("verify", str(bk)).returncode == 0
    # the backup's own record of its end catches a copy of it cut shorter still
    cut_copy = tmp_path / "cut"
    shutil.copytree(bk, cut_copy)
    _f, tail = list_segments(cut_copy / "wal")[-1]
    os.truncate(tail, os.path.getsize(tail) - 500)
    with pytest.raises(walstate.CorruptionError, match="records are missing|torn"):
        walstate.open(cut_copy, read_only=True, recovery="strict")
    # opened for writing, the backup becomes a live directory: the newest
    # segment gets its size back and the writer appends into it
    with walstate.open(bk) as b:
        assert state(b) == model
        b.put(b"after", b"1")
    _f, tail = list_segments(bk / "wal")[-1]
    assert os.path.getsize(tail) == 16 << 20
    with walstate.open(bk, read_only=True) as b:
        assert b.get(b"after") == b"1"


def test_backup_while_writer_process_writes(tmp_path: Path) -> None:
    d, arch, bk = tmp_path / "db", tmp_path / "arch", tmp_path / "bk"
    opts = {"segment_size": SEG, "max_wal_size": 2 * SEG, "archive_dir": str(arch),
            "checkpoint_timeout": 0.2, "seed": 7, "nkeys": 200, "vmax": 300}
    child = subprocess.Popen(writer_cmd(str(d), **opts), stdout=subprocess.PIPE, text=True,
                             env=child_env())
    out_lines: list[str] = []
    # drain the writer's output as it comes (a full pipe would stop the writer)
    reader = threading.Thread(target=lambda: out_lines.extend(child.stdout), daemon=True)
    try:
        first = child.stdout.readline()
        out_lines.append(first)
        assert first.startswith("R ")
        reader.start()
        assert wait_for(lambda: arch.exists() and len(_pieces(arch)) >= 2, timeout=30)
        p = run("backup", str(d), str(bk), "--label", "hot", "--json")
        res = json.loads(p.stdout)
        n = len(out_lines)
        assert wait_for(lambda: len(out_lines) > n + 50, timeout=30)  # it goes on past it
    finally:
        child.kill()
        child.wait()
        reader.join(10)
    hist = parse_writer_output("".join(out_lines), **opts)
    acked = hist["acked"]
    ops = dict(hist["attempts"])
    assert max(acked.values()) > res["lsn"] > res["checkpoint_lsn"] >= 0
    assert res["lsn"] in set(acked.values())  # the backup ends on a record
    model: dict = {}
    for seq in sorted(acked):
        if acked[seq] > res["lsn"]:
            break
        apply_op(model, ops[seq])
    with walstate.open(bk, read_only=True) as b:
        assert b.info()["last_lsn"] == res["lsn"]
        assert state(b) == model
    # and it restores, as a directory of its own, to the same state
    p = run("restore", str(bk), str(tmp_path / "r"), "--no-archive", "--json")
    assert json.loads(p.stdout)["lsn"] == res["lsn"]
    with walstate.open(tmp_path / "r") as r:
        assert state(r) == model
        r.put(b"after-restore", b"1")


def test_backup_of_missing_or_non_walstate_directory_exits_1(tmp_path: Path, capsys) -> None:
    (tmp_path / "plain").mkdir()
    assert main(capsys, "backup", str(tmp_path / "plain"), str(tmp_path / "b"))[0] == 1
    assert main(capsys, "backup", str(tmp_path / "nope"), str(tmp_path / "b"))[0] == 1


# ---- metrics -------------------------------------------------------------------
def test_metrics_endpoint_scraped_and_parsed(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from walstate.ops import metrics

    with walstate.open(tmp_path / "db") as db:
        server = metrics.serve(db, 0)
        try:
            for i in range(20):
                db.put(b"k%d" % i, b"v")
            db.delete(b"k1")
            with db.batch() as b:
                b.put(b"x", b"y")
            db.checkpoint()
            text = urllib.request.urlopen(server.url, timeout=10).read().decode()
            stats = db.stats()
        finally:
            server.close()
        fams = {f.name: f for f in text_string_to_metric_families(text)}

        def value(name: str, sample: str | None = None) -> float:
            return next(s.value for s in fams[name].samples
                        if s.name == (sample or name + "_total"))

        assert value("walstate_puts") == stats["puts"] == 20
        assert value("walstate_deletes") == 1 and value("walstate_batches") == 1
        assert value("walstate_fsyncs") == stats["fsyncs"]
        assert value("walstate_checkpoints") == 1
        assert fams["walstate_fsync_seconds"].type == "histogram"
        # the histogram covers every fsync of the log, the open's (SESSION record) too
        assert value("walstate_fsync_seconds", "walstate_fsync_seconds_count") == \
            stats["fsyncs"] + 1
        assert value("walstate_put_latency_seconds",
                     "walstate_put_latency_seconds_count") == 22
        assert value("walstate_checkpoint_duration_seconds",
                     "walstate_checkpoint_duration_seconds_count") == 1
        for g in ("walstate_wal_since_checkpoint_bytes", "walstate_estimated_replay_seconds",
                  "walstate_durable_lag_records"):
            assert fams[g].type == "gauge"
        # closed: the observer is gone (put is the C fast path again), the port is shut
        assert type(db.put) is type(len)
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url, timeout=2)


# ---- logs ----------------------------------------------------------------------
def test_slow_fsync_is_logged_off_the_write_path(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="walstate")
    with walstate.open(tmp_path / "db", slow_fsync_seconds=0.0) as db:
        db.put(b"k", b"v")
        db._checkpointer.wake()
        assert wait_for(lambda: any("fsync" in r.getMessage() and "longer than" in
                                    r.getMessage() for r in caplog.records), timeout=5)


def test_recovery_checkpoint_and_cut_are_logged(tmp_path: Path, caplog) -> None:
    d = tmp_path / "db"
    crashed(d, 200)
    add_torn_tail(d)
    caplog.set_level(logging.INFO, logger="walstate")
    walstate.open(d).close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "recovery: replaying" in text and "recovery: replayed" in text
    assert "cut torn tail" in text and "checkpoint 1 complete (recovery)" in text
