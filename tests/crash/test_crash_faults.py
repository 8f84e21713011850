"""Faults with counts: injected errors at the nth call (SQLite's method), a real
fsync EIO from a loop-mounted ext4 on a too-small tmpfs, a real full disk at
each phase, and clock jumps for checkpoint_timeout.

Every case ends with the same checks: the public operation raised a
documented error (a WalStateError or OSError) or completed; a failed engine
refuses writes with EngineFailedError while reads keep working; after the
fault is gone a reopen recovers a state that is a prefix of the attempted
writes holding every acknowledged one (walstate.testing's oracle).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter

import pytest

import walstate
from walstate import _hooks
from walstate.layout import not_files
from walstate.testing import History, check_recovered

KiB = 1024
SEG = 64 * KiB
OPTS = {"segment_size": SEG, "max_wal_size": 64 * 1024 * KiB, "checkpoint_timeout": 3600.0}
FAULT_OPS = tuple(_hooks.OPS)        # write fdatasync fallocate rename unlink open read
SCENARIOS = ("put", "batch", "sync", "checkpoint", "close", "open")
DOCUMENTED = (walstate.WalStateError, OSError)


def _fast_tmp() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="walstate-faults-", dir=base)


def items(db) -> dict[bytes, bytes]:
    return dict(db.items())


class Recorder:
    """The writes of one case, in the form the oracle of walstate.testing reads."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.seq = -1

    def write(self, db, op: tuple) -> None:
        import json

        from walstate.testing import _enc

        self.seq += 1
        seq = self.seq
        self.lines.append(f"A {seq} {json.dumps(_enc(op))}")
        try:
            if op[0] == "P":
                db.put(op[1], op[2])
            else:
                with db.batch() as b:
                    for o in op[1]:
                        b.put(o[1], o[2])
        except BaseException as exc:
            self.lines.append(f"F {seq} {type(exc).__name__}")
            raise
        self.lines.append(f"{'K' if db.config.sync == 'always' else 'R'} {seq}")

    def durable(self) -> None:
        self.lines.append(f"S {self.seq}")

    def history(self) -> History:
        return History.from_marks(self.lines)


@pytest.fixture(scope="module")
def template():
    """A closed directory with 30 keys, copied for every case."""
    root = _fast_tmp()
    path = os.path.join(root, "db")
    with walstate.open(path, **OPTS) as db:
        for i in range(30):
            db.put(b"base%02d" % i, b"b" * 100)
        base = items(db)
    yield path, base
    shutil.rmtree(root, ignore_errors=True)


def _puts(n: int, tag: str, size: int = 3000) -> list[tuple]:
    return [("P", b"%s%03d" % (tag.encode(), i), bytes([i % 251]) * size) for i in range(n)]


def run_case(template, op: str, nth: int, persistent: bool, scenario: str,
             work: str) -> tuple[bool, str]:
    """One injected fault. Returns (fired, outcome); asserts the contract."""
    src, base = template
    path = os.path.join(work, f"{scenario}-{op}-{nth}-{int(persistent)}")
    shutil.copytree(src, path, ignore=not_files)
    sync = "none" if scenario == "sync" else "always"
    rec = Recorder()
    _hooks.clear()
    db = None
    outcome = "completed"
    try:
        if scenario == "open":
            db = walstate.open(path, sync=sync, **OPTS)
            for o in _puts(30, "pre"):      # crosses a segment: replay reads 2 segments
                rec.write(db, o)
            db._abandon()
            db = None
            _hooks.fault(op, nth, errno.EIO, persistent)
            try:
                db = walstate.open(path, sync=sync, **OPTS)
            except DOCUMENTED as exc:
                outcome = type(exc).__name__
        else:
            db = walstate.open(path, sync=sync, **OPTS)
            if scenario in ("checkpoint", "close", "sync"):
                for o in _puts(30, "pre"):
                    rec.write(db, o)
            _hooks.fault(op, nth, errno.EIO, persistent)
            try:
                if scenario == "put":
                    for o in _puts(30, "put"):
                        rec.write(db, o)
                elif scenario == "batch":
                    for i in range(8):
                        rec.write(db, ("B", _puts(4, f"b{i}_", 2000)))
                elif scenario == "sync":
                    db.sync()
                    rec.durable()
                elif scenario == "checkpoint":
                    db.checkpoint()
                    rec.durable()
                else:
                    db.close()
                    rec.durable()
            except DOCUMENTED as exc:
                outcome = type(exc).__name__
        fired = _hooks.calls(op) >= nth
    finally:
        _hooks.clear()
    if db is not None and scenario != "close":
        if outcome == "EngineFailedError" or db.info()["failed"]:
            with pytest.raises(walstate.EngineFailedError):
                db.put(b"after", b"x")          # poisoned: writes refused until reopened
            for k, v in list(base.items())[:5]:
                assert db.get(k) == v           # reads keep working
            db._abandon()
        else:
            rec.write(db, ("P", b"after", b"x"))  # the fault is gone: writes work again
            if outcome != "completed":
                pass
            try:
                db.close()
                rec.durable()
            except DOCUMENTED:
                db._abandon()
    elif db is not None:
        db._abandon()
    with walstate.open(path, **OPTS) as db2:    # the fault is gone: the directory opens
        got = items(db2)
    bad, _k = check_recovered(base, rec.history(), got)
    assert bad is None, f"{scenario}/{op} nth={nth} persistent={persistent}: {bad}"
    shutil.rmtree(path, ignore_errors=True)
    return fired, outcome


def sweep(template, scenarios, ops, max_nth: int) -> Counter:
    """Injects at the 1st, 2nd, ... matching call until the operation completes
    without reaching it (or max_nth). Returns counts of outcomes."""
    counts: Counter = Counter()
    work = _fast_tmp()
    try:
        for scenario in scenarios:
            for op in ops:
                for persistent in (False, True):
                    for nth in range(1, max_nth + 1):
                        fired, outcome = run_case(template, op, nth, persistent, scenario, work)
                        counts["cases"] += 1
                        if not fired:
                            counts["completed_without_reaching_nth"] += 1
                            break
                        counts[f"{scenario}:{outcome}"] += 1
                        counts["fired"] += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_injected_errors_at_every_call_of_each_operation(template, scenario):
    counts = sweep(template, [scenario], FAULT_OPS, max_nth=4)
    print(dict(counts))
    assert counts["fired"] > 0
    assert counts["cases"] >= len(FAULT_OPS) * 2


@pytest.mark.slow
def test_injected_errors_full_sweep(template):
    counts = sweep(template, SCENARIOS, FAULT_OPS, max_nth=200)
    print(dict(counts))
    assert counts["fired"] > 100


def test_write_eio_poisons_and_nothing_is_acknowledged_after(template):
    """Threads writing when fdatasync fails: no put returns success after the
    failure, and every one that returned survives."""
    work = _fast_tmp()
    try:
        path = os.path.join(work, "db")
        shutil.copytree(template[0], path, ignore=not_files)
        db = walstate.open(path, **OPTS)
        acked: dict[bytes, bytes] = {}
        errors: list[BaseException] = []
        mu = threading.Lock()

        def writer(t: int) -> None:
            for i in range(200):
                k = b"t%d_%03d" % (t, i)
                try:
                    db.put(k, b"v" * 500)
                except walstate.WalStateError as exc:
                    with mu:
                        errors.append(exc)
                    return
                with mu:
                    acked[k] = b"v" * 500

        _hooks.fault("fdatasync", 20, errno.EIO, False)
        ts = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        _hooks.clear()
        assert errors and all(isinstance(e, walstate.EngineFailedError) for e in errors)
        with pytest.raises(walstate.EngineFailedError):
            db.put(b"x", b"y")
        db._abandon()
        with walstate.open(path, **OPTS) as db2:
            got = items(db2)
        missing = [k for k in acked if got.get(k) != acked[k]]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
        assert len(acked) >= 15  # the 20th fdatasync failed: earlier puts were acknowledged
    finally:
        _hooks.clear()
        shutil.rmtree(work, ignore_errors=True)


# ---- a real fsync EIO ------------------------------------------------------------------------

def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@pytest.fixture
def eio_ext4():
    """An ext4 image on a loop device whose backing file sits on a 24 MiB tmpfs
    (the image says 256 MiB): once the tmpfs is full, writeback fails and fsync
    returns EIO. Yields (mountpoint, ballast path, remount()): remount unmounts the
    file system (ext4 turned it read-only after the error), frees the tmpfs,
    checks the image with e2fsck and mounts it again."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    for tool in ("mkfs.ext4", "losetup", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    back = tempfile.mkdtemp(prefix="walstate-eio-back-")
    mnt = tempfile.mkdtemp(prefix="walstate-eio-")
    mounted = []
    try:
        r = _sh("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", back)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        mounted.append(back)
        img = os.path.join(back, "img")
        _sh("truncate", "-s", "256M", img)
        r = _sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img)
        if r.returncode:
            pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
        r = _sh("mount", "-o", "loop", img, mnt)
        if r.returncode:
            pytest.skip(f"cannot loop-mount ext4 here: {r.stderr.strip()}")
        mounted.append(mnt)
        ballast = os.path.join(back, "ballast")

        def remount() -> None:
            if _sh("umount", mnt).returncode:
                _sh("umount", "-l", mnt)
            mounted.remove(mnt)
            if os.path.exists(ballast):
                os.unlink(ballast)
            _sh("e2fsck", "-fy", img)
            r = _sh("mount", "-o", "loop", img, mnt)
            assert r.returncode == 0, r.stderr
            mounted.append(mnt)

        yield mnt, ballast, remount
    finally:
        for m in reversed(mounted):
            if _sh("umount", m).returncode:
                _sh("umount", "-l", m)
        shutil.rmtree(back, ignore_errors=True)
        shutil.rmtree(mnt, ignore_errors=True)


EIO_WRITER = """
import json, os, sys, walstate
path, fill_path = sys.argv[1], sys.argv[2]
db = walstate.open(path, segment_size=1 << 20, max_wal_size=1 << 26, checkpoint_timeout=3600.0)
acked, first, after_ok = [], None, []
for i in range(50):
    db.put(b"before%03d" % i, b"v" * 4000)
    acked.append("before%03d" % i)
with open(fill_path, "wb") as f:            # fill the tmpfs under the image
    try:
        while True:
            f.write(b"\\xa5" * (1 << 20)); f.flush()
    except OSError:
        pass
for i in range(4000):
    k = "during%04d" % i
    try:
        db.put(k.encode(), os.urandom(4000))
    except (walstate.WalStateError, OSError) as exc:
        first = first or "%s: %s" % (type(exc).__name__, exc)
        continue
    (after_ok if first else acked).append(k)
try:
    db.sync(); sync_after = "returned"
except walstate.WalStateError as exc:
    sync_after = type(exc).__name__
get_ok = db.get(b"before000") == b"v" * 4000
print(json.dumps({"acked": acked, "first": first, "after_ok": after_ok,
                  "sync_after": sync_after, "get_ok": get_ok}))
os._exit(0)                                  # no close: as if the machine died here
"""


def test_real_fsync_eio_poisons_the_engine_and_nothing_acknowledged_after(eio_ext4):
    import json
    import sys

    mnt, fill_path, remount = eio_ext4
    path = os.path.join(mnt, "db")
    p = subprocess.run([sys.executable, "-c", EIO_WRITER, path, fill_path],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"acknowledged {len(out['acked'])}; first error: {out['first']}")
    assert out["first"] is not None, "fsync never failed although the backing store was full"
    assert out["first"].startswith("EngineFailedError"), out["first"]
    assert not out["after_ok"], f"{len(out['after_ok'])} puts succeeded after the EIO"
    assert out["sync_after"] == "EngineFailedError"
    assert out["get_ok"]                                # reads keep working
    remount()
    with walstate.open(path) as db:
        missing = [k for k in out["acked"] if db.get(k.encode()) is None]
        assert not missing, f"{len(missing)} acknowledged writes lost: {missing[:3]}"


# ---- a real full disk at each phase --------------------------------------------------------

def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _ballast(path: str, leave: int) -> None:
    size = max(_free(os.path.dirname(path)) - leave, 0)
    with open(path, "wb") as f:
        while size > 0:
            n = min(size, 1 << 20)
            try:
                f.write(b"\xa5" * n)
                f.flush()
            except OSError:
                break
            size -= n




def full_disk_case(root: str, leave: int, counts: Counter) -> None:
    path = os.path.join(root, "db")
    ballast = os.path.join(root, "ballast")
    shutil.rmtree(path, ignore_errors=True)
    with walstate.open(path, **OPTS) as db:
        for i in range(20):
            db.put(b"seed%02d" % i, b"s" * 3000)
        expect = items(db)
    db = walstate.open(path, **OPTS)   # (a full disk at open: test_full_disk_at_open_...)
    _ballast(ballast, leave)
    phase = "none"
    pending: list[tuple] = []
    try:
        for r in range(12):
            phase = "put"
            for i in range(6):
                pending = [("P", b"k%02d_%d" % (r, i), os.urandom(3000))]
                db.put(*pending[0][1:])
                expect[pending[0][1]] = pending[0][2]
            phase = "batch"
            pending = [("P", b"b%02d_%d" % (r, i), os.urandom(1500)) for i in range(5)]
            with db.batch() as b:
                for o in pending:
                    b.put(o[1], o[2])
            expect.update({o[1]: o[2] for o in pending})
            phase = "big_put"
            pending = [("P", b"big%02d" % r, os.urandom(90 * KiB))]   # oversized segment
            db.put(*pending[0][1:])
            expect[pending[0][1]] = pending[0][2]
            pending = []
            phase = "checkpoint"
            db.checkpoint()
        phase = "close"
        db.close()
        counts["no_error"] += 1
        return
    except walstate.DiskFullError as exc:
        assert exc.errno == errno.ENOSPC
        counts[f"DiskFullError@{phase}"] += 1
    except walstate.EngineFailedError as exc:
        # the contract asks for DiskFullError on ENOSPC; EngineFailedError is
        # acceptable only if durability really is unknown -- counted and reported
        counts[f"EngineFailedError@{phase}"] += 1
        print(f"EngineFailedError at {phase} with {leave} bytes left: {exc}")
    # reads keep working; after freeing space writes succeed again
    if not db._closed:
        for k, v in list(expect.items())[:10]:
            assert db.get(k) == v
        for o in pending:                   # the failed write is not visible
            if o[1] not in expect:
                assert db.get(o[1]) is None, f"failed write {o[1]!r} visible at {phase}"
    os.unlink(ballast)
    if not db._closed and db.info()["failed"] is None:
        db.put(b"resumed", b"yes")
        expect[b"resumed"] = b"yes"
        db.checkpoint()
        db.close()
        counts["resumed_without_reopen"] += 1
    elif not db._closed:
        db._abandon()
    with walstate.open(path, **OPTS) as db2:
        got = items(db2)
    for o in pending:                       # the failed write: present or not, nothing else
        if o[1] in got and o[1] not in expect:
            expect[o[1]] = o[2]
    assert got == expect, f"state after a full disk at {phase} ({leave} bytes left)"


def test_full_disk_at_every_phase_then_space_freed(tmpfs):
    root = str(tmpfs("3m"))
    counts: Counter = Counter()
    for leave in range(0, 1600 * KiB, 48 * KiB):
        full_disk_case(root, leave, counts)
    print(dict(counts))
    hit = {k.split("@")[1] for k in counts if "@" in k}
    assert {"put", "checkpoint"} <= hit, counts
    assert not [k for k in counts if k.startswith("EngineFailedError")], counts


def test_full_disk_at_open_then_space_freed(tmpfs):
    """(Found: the LOCK file's write raised a plain OSError after the directory was
    registered as held, so every later open in the process raised LockedError.)"""
    root = str(tmpfs("1m"))
    path = os.path.join(root, "db")
    with walstate.open(path, segment_size=SEG) as db:
        db.put(b"a", b"1")
    ballast = os.path.join(root, "ballast")
    _ballast(ballast, 0)
    with pytest.raises(walstate.DiskFullError):
        walstate.open(path, segment_size=SEG)
    os.unlink(ballast)
    with walstate.open(path, segment_size=SEG) as db:
        assert db.get(b"a") == b"1"


# ---- clock jumps --------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _settle(db, n: int, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if db.stats()["checkpoints"] >= n:
            return True
        time.sleep(0.02)
    return False


def test_clock_jumps_backwards_and_forwards(tmp_path):
    clock = Clock()
    counts: Counter = Counter()
    with walstate.open(str(tmp_path / "db"), clock=clock, checkpoint_timeout=60.0) as db:
        ck = db._checkpointer
        for jump in (-1e6, -59.0, -3600.0):
            before = db.stats()["checkpoints"]
            db.put(b"k", b"%f" % jump)
            clock.t += jump              # backwards: no checkpoint storm, no hang
            ck.wake()
            time.sleep(0.3)
            assert db.stats()["checkpoints"] == before, f"checkpoint on backward jump {jump}"
            clock.t += 59.0              # 59 s after the jump: not yet
            ck.wake()
            time.sleep(0.3)
            assert db.stats()["checkpoints"] == before
            clock.t += 2.0               # 61 s after the jump: the timeout fires
            ck.wake()
            assert _settle(db, before + 1), f"no checkpoint 61 s after backward jump {jump}"
            counts["backward"] += 1
        for jump in (61.0, 1e6, 1e9):
            before = db.stats()["checkpoints"]
            db.put(b"k", b"%f" % jump)
            clock.t += jump              # forwards: exactly one checkpoint
            ck.wake()
            assert _settle(db, before + 1), f"no checkpoint after forward jump {jump}"
            ck.wake()
            time.sleep(0.3)
            assert db.stats()["checkpoints"] == before + 1, "more than one checkpoint"
            assert db.info()["last_checkpoint"].reason == "timeout"
            counts["forward"] += 1
        # after a forward jump the interval restarts from the checkpoint
        before = db.stats()["checkpoints"]
        db.put(b"k", b"last")
        clock.t += 30.0
        ck.wake()
        time.sleep(0.3)
        assert db.stats()["checkpoints"] == before
    print(dict(counts))
    with walstate.open(str(tmp_path / "db")) as db:
        assert db.get(b"k") == b"last"
