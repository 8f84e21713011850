"""Crashes for real: SIGKILL of a writer process at random moments, at named
kill points inside checkpoints and recovery, and simulated power loss (every
WAL segment cut back to its last fdatasync, garbage after it). Plus the
automatic checkpoint triggers and the bound on WAL size.

The writer (``enginehelpers.py writer``) reports each operation before it
starts ("A") and after it returned ("K") on stdout; the parent checks that
the recovered state is the state after a prefix of the attempted operations
that contains every acknowledged one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from enginehelpers import (
    FakeClock,
    KiB,
    MiB,
    apply_op,
    broken_files,
    child_env,
    data_end,
    digest,
    matching_prefixes,
    op_from_json,
    parse_writer_output,
    segments,
    state,
    wait_for,
    writer_cmd,
)

import walstate

# the parent opens with the writer's sizes too: an open creates a segment of its own
# segment_size, which the next writer would fill before rotating
OPEN_OPTS = {"segment_size": 64 * KiB, "max_wal_size": 256 * KiB}
WRITER_OPTS = {**OPEN_OPTS, "vmax": 1500, "nkeys": 400}


class Victim:
    """A writer process whose stdout is drained by a thread (so that it never
    blocks on a full pipe and dies at a random point of its own work)."""

    def __init__(self, path: str, env: dict[str, str] | None = None, **options: object):
        self.options = options
        self.proc = subprocess.Popen(writer_cmd(path, **options), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=child_env(env))
        self.chunks: list[bytes] = []
        self.ready = threading.Event()
        self.err = b""
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        self._te = threading.Thread(target=self._drain_err, daemon=True)
        self._te.start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.chunks.append(line)
            if line.startswith(b"R "):
                self.ready.set()
        self.ready.set()

    def _drain_err(self) -> None:
        self.err = self.proc.stderr.read()

    def kill(self) -> dict:
        """SIGKILLs the writer (it must still be running) and returns what it said."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait()
        self._t.join()
        self._te.join()
        assert alive and rc == -signal.SIGKILL, (
            f"the writer died by itself (rc {rc}): {self.err.decode(errors='replace')[-3000:]}")
        return self.output()

    def output(self) -> dict:
        self._t.join()
        self._te.join()
        return parse_writer_output(b"".join(self.chunks).decode(), **self.options)


def check_recovered(base: dict, out: dict, got: dict, *, need: int) -> int:
    """Asserts ``got`` is base after a prefix of the attempts that holds the
    first ``need`` of them; returns the prefix length."""
    ops = [op for _seq, op in out["attempts"]]
    assert [s for s, _ in out["attempts"]] == list(range(len(ops)))
    fits = [n for n in matching_prefixes(base, ops, got) if n >= need]
    assert fits, (f"recovered state is not base + a prefix of the {len(ops)} attempted "
                  f"operations containing the {need} required ones")
    return fits[-1]


def kill_campaign(path: str, kills: int, seed: int, *, sync: str = "always",
                  sync_every: int = 0, **writer_options: object) -> Counter:
    rng = random.Random(seed)
    base: dict[bytes, bytes] = {}
    max_durable_lsn = 0
    seen = Counter()
    for rnd in range(kills):
        v = Victim(path, seed=seed * 100003 + rnd, sync=sync, sync_every=sync_every,
                   **{**WRITER_OPTS, **writer_options})
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.3))  # often during start-up or recovery
        else:
            assert v.ready.wait(60), "the writer did not open the directory within 60 s"
            time.sleep(rng.uniform(0.0, 0.25))
        out = v.kill()
        if out["ready"] is not None:  # the writer recovered what we verified last
            assert out["ready"] == digest(base), f"round {rnd}: the writer's recovery differs"
        acked = out["acked"]
        assert sorted(acked) == list(range(len(acked)))
        if sync == "always":
            need = len(acked)
            durable = list(acked.values())
        else:
            need = max(out["synced"]) + 1 if out["synced"] else 0
            durable = [acked[s] for s in range(need)]
        assert all(lsn > max_durable_lsn for lsn in durable), "an LSN was reused"
        assert durable == sorted(durable)
        max_durable_lsn = max([max_durable_lsn, *durable])
        writable = rnd % 4 == 3
        db = walstate.open(path, read_only=not writable, **OPEN_OPTS)
        try:
            got = state(db)
            n = check_recovered(base, out, got, need=need)
            seen["kills"] += 1
            seen["acked"] += len(acked)
            seen["in_flight_kept"] += n > len(acked)
            seen["lost_unsynced"] += n < len(acked)
            seen["killed_before_ready"] += out["ready"] is None
            last = db.info()["last_checkpoint"]
            seen["checkpoint_id"] = last.id if last else 0
        finally:
            db.close()
        base = got
    return seen


def test_sigkill_at_random_moments_loses_no_acknowledged_write(tmp_path):
    seen = kill_campaign(str(tmp_path / "db"), kills=36, seed=1)
    assert seen["kills"] == 36 and seen["acked"] > 36 * 50
    assert seen["checkpoint_id"] >= 10, seen  # checkpoints ran (and were killed) too


def test_sigkill_under_sync_none_keeps_a_prefix_with_every_synced_write(tmp_path):
    # big segments and buffer, rare checkpoints (segment switches and checkpoints sync
    # the WAL) and rare syncs: most kills lose the writes made since the last sync
    seen = kill_campaign(str(tmp_path / "db"), kills=12, seed=2, sync="none", sync_every=1000,
                         segment_size=16 * MiB, max_wal_size=64 * MiB, wal_buffer_size=8 * MiB)
    assert seen["kills"] == 12 and seen["lost_unsynced"] >= 3, seen


@pytest.mark.slow
def test_sigkill_campaign_1000_kills(tmp_path):
    seen = kill_campaign(str(tmp_path / "db"), kills=1000, seed=3)
    assert seen["kills"] == 1000


# ---- kill points inside a checkpoint ------------------------------------------------
CKPT_VICTIM = r"""
import sys
import walstate, walstate.checkpoint
from walstate import _hooks
from enginehelpers import op_to_json, run_op

walstate.checkpoint.CHUNK_KEYS = 2  # many chunks
path, point, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = walstate.open(path, segment_size=65536, checkpoint_timeout=3600)

def do(op):
    lsn = run_op(db, op)
    print("K", lsn, op_to_json(op), flush=True)

for i in range(30):
    do(("P", b"k%02d" % i, b"a%02d" % i * 700))
print("C1", db.checkpoint().id, flush=True)
for i in range(0, 30, 2):
    do(("P", b"k%02d" % i, b"b%02d" % i * 700))
for i in range(1, 30, 3):
    do(("D", b"k%02d" % i))
for i in range(20):
    do(("P", b"n%02d" % i, b"c%02d" % i * 700))
do(("B", [("P", b"batch", b"x"), ("D", b"k00"), ("P", b"k03", b"batched")]))
print("ARMED", flush=True)
_hooks.killpoint(point, nth)
db.checkpoint()
print("SURVIVED", flush=True)
"""

CKPT_POINTS = [("checkpoint_after_freeze", 1), ("checkpoint_chunk", 1), ("checkpoint_chunk", 2),
               ("checkpoint_chunk", 3), ("checkpoint_before_commit", 1),
               ("checkpoint_after_commit", 1), ("checkpoint_before_remove", 1),
               ("remove_before_unlink", 1), ("remove_after_fsync", 1),
               ("checkpoint_after_remove", 1)]


def parse_acks(stdout: str) -> tuple[dict, list[int]]:
    model: dict[bytes, bytes] = {}
    lsns = []
    for line in stdout.splitlines():
        if line.startswith("K "):
            _, lsn, op = line.split(" ", 2)
            apply_op(model, op_from_json(op))
            lsns.append(int(lsn))
    return model, lsns


@pytest.mark.parametrize("point,nth", CKPT_POINTS, ids=[f"{p}:{n}" for p, n in CKPT_POINTS])
def test_kill_inside_checkpoint_loses_nothing(tmp_path, point, nth):
    path = str(tmp_path / "db")
    r = subprocess.run([sys.executable, "-c", CKPT_VICTIM, path, point, str(nth)],
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert "ARMED" in r.stdout and "SURVIVED" not in r.stdout, r.stderr
    assert r.returncode == -signal.SIGKILL, r.stderr
    model, lsns = parse_acks(r.stdout)
    assert len(lsns) == 30 + 15 + 10 + 20 + 1
    for _ in range(2):  # recovery, and a second open after it, give the same state
        with walstate.open(path, recovery="strict") as db:
            assert state(db) == model
            assert db.info()["last_checkpoint"].id >= 1
            assert db.put(b"after", b"1") > max(lsns)
            db.delete(b"after")


# ---- kill points inside recovery ----------------------------------------------------
RECOVERY_VICTIM = r"""
import sys
import walstate, walstate.checkpoint
walstate.checkpoint.CHUNK_KEYS = 3
db = walstate.open(sys.argv[1], segment_size=65536)
print("SURVIVED", flush=True)
"""

RECOVERY_POINTS = ["recovery_after_replay", "checkpoint_after_freeze", "checkpoint_chunk:2",
                   "checkpoint_before_commit", "checkpoint_after_commit",
                   "checkpoint_before_remove", "checkpoint_after_remove"]


def _dirty_directory(path: str, tail: str) -> dict:
    """A directory that needs replay: checkpointed once, then writes, then a crash."""
    rng = random.Random(7)
    db = walstate.open(path, segment_size=64 * KiB)
    model = {}
    for i in range(60):
        db.put(b"k%03d" % i, rng.randbytes(900))
    db.checkpoint()
    for _ in range(300):
        k = b"k%03d" % rng.randrange(120)
        if rng.random() < 0.2:
            db.delete(k)
        else:
            db.put(k, rng.randbytes(rng.randrange(1500)))
    with db.batch() as b:
        b.put(b"batch", b"1")
        b.delete(b"k001")
    model = state(db)
    db._abandon()
    if tail == "torn":
        seg = segments(path)[-1]
        with open(seg, "r+b") as f:
            f.seek(data_end(seg))
            f.write(b"\x5a" * 77)
    return model


@pytest.mark.parametrize("tail", ["clean", "torn"])
@pytest.mark.parametrize("point", RECOVERY_POINTS)
def test_kill_inside_recovery_then_recover_again(tmp_path, point, tail):
    path = str(tmp_path / "db")
    model = _dirty_directory(path, tail)
    # killed at the point, then a second recovery killed too (after its replay)
    for kp in (point, "recovery_after_replay"):
        r = subprocess.run([sys.executable, "-c", RECOVERY_VICTIM, path], capture_output=True,
                           text=True, timeout=120, env=child_env({"WALSTATE_KILLPOINT": kp}))
        assert r.returncode == -signal.SIGKILL and "SURVIVED" not in r.stdout, r.stderr
    with walstate.open(path, segment_size=64 * KiB) as db:
        assert state(db) == model
        assert bool(broken_files(path)) == (tail == "torn")  # the first recovery cut it
    with walstate.open(path, recovery="strict") as db:
        assert state(db) == model


@pytest.mark.parametrize("point", ["recovery_after_cut"])
def test_every_listed_python_kill_point_fires(tmp_path, point):
    path = str(tmp_path / "db")
    _dirty_directory(path, "torn")
    code = RECOVERY_VICTIM.replace('print("SURVIVED"', 'db.put(b"x", b"1")\nprint("SURVIVED"')
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       timeout=120, env=child_env({"WALSTATE_KILLPOINT": point}))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr[-2000:])


# ---- kill points of the C log while writing -----------------------------------------------
C_POINTS = ["append_after_write", "append_after_fdatasync", "rotate_after_sync",
            "rotate_after_create", "segment_create_before_rename",
            "segment_create_after_rename"]


@pytest.mark.parametrize("point", C_POINTS)
def test_kill_inside_the_log_loses_no_acknowledged_write(tmp_path, point):
    path = str(tmp_path / "db")
    base: dict[bytes, bytes] = {}
    for rnd, nth in enumerate((2, 5)):
        v = Victim(path, env={"WALSTATE_KILLPOINT": f"{point}:{nth}"}, seed=rnd, **WRITER_OPTS)
        assert v.proc.wait(timeout=120) == -signal.SIGKILL, "the kill point never fired"
        out = v.output()
        with walstate.open(path, recovery="strict", **OPEN_OPTS) as db:
            got = state(db)
        check_recovered(base, out, got, need=len(out["acked"]))
        base = got


# ---- simulated power loss --------------------------------------------------------------
def _power_loss(path: str, trace: str, pre_end: dict[str, int], rng: random.Random) -> int:
    """Cuts every segment back to what was fdatasynced and puts garbage after the
    log's end; returns the truncated_bytes recovery should report."""
    durable = dict(pre_end)
    if os.path.exists(trace):
        with open(trace) as f:
            for line in f:
                name, off = line.split()
                durable[name] = max(durable.get(name, 0), int(off))
    segs = segments(path)
    garbage = bytes(rng.randrange(1, 256) for _ in range(200))
    expect = 0
    for i, seg in enumerate(segs):
        name = os.path.basename(seg)
        keep = durable.get(name, 64)  # a new segment's header is fsynced before rename
        size = os.path.getsize(seg)
        with open(seg, "r+b") as f:
            f.seek(keep)
            f.write(b"\0" * max(size - keep, 0))
            if i == len(segs) - 1:
                f.seek(keep)
                f.write(garbage)
        # a torn first record sets the whole segment aside (docs/FORMAT.md, cutting)
        expect = os.path.getsize(seg) if keep <= 64 else len(garbage)
    return expect


def test_power_loss_keeps_every_acknowledged_write(tmp_path):
    path = str(tmp_path / "db")
    rng = random.Random(11)
    base: dict[bytes, bytes] = {}
    for rnd in range(6):
        pre_end = ({os.path.basename(s): data_end(s) for s in segments(path)}
                   if os.path.exists(path) else {})
        trace = str(tmp_path / f"trace{rnd}")
        v = Victim(path, env={"WALSTATE_SYNC_TRACE": trace}, seed=rnd, sync="always",
                   **WRITER_OPTS)
        assert v.ready.wait(60)
        time.sleep(rng.uniform(0.1, 0.4))
        out = v.kill()
        assert out["acked"], "nothing was acknowledged before the kill"
        assert os.path.exists(trace), "no sync trace was written"
        cut = _power_loss(path, trace, pre_end, rng)
        with walstate.open(path, **OPEN_OPTS) as db:
            got = state(db)
            assert db.info()["recovery"]["truncated_bytes"] == cut
        check_recovered(base, out, got, need=len(out["acked"]))
        base = got


# ---- checkpoints by themselves; the WAL stays bounded -------------------------------------
def test_checkpoint_fires_on_max_wal_size(tmp_path):
    clock = FakeClock()  # never advances: no timeout checkpoint
    with walstate.open(str(tmp_path / "db"), clock=clock, max_wal_size=64 * KiB,
                       segment_size=64 * KiB, checkpoint_timeout=60) as db:
        for i in range(20):  # ~20 KiB: below the threshold
            db.put(b"k%03d" % i, b"v" * 1000)
        time.sleep(1.3)
        assert db.stats()["checkpoints"] == 0
        for i in range(20, 90):
            db.put(b"k%03d" % i, b"v" * 1000)
        assert wait_for(lambda: db.stats()["checkpoints"] >= 1, 10)
        assert db.info()["last_checkpoint"].reason == "wal_size"


def test_checkpoint_fires_on_timeout_with_a_fake_clock(tmp_path):
    clock = FakeClock()
    with walstate.open(str(tmp_path / "db"), clock=clock, checkpoint_timeout=60) as db:
        ckpt = db._checkpointer
        first = db.put(b"a", b"1")
        clock.advance(59)
        ckpt.wake()
        time.sleep(1.3)
        assert db.stats()["checkpoints"] == 0
        clock.advance(2)
        ckpt.wake()
        assert wait_for(lambda: db.stats()["checkpoints"] == 1, 10)
        last = db.info()["last_checkpoint"]
        assert last.reason == "timeout" and last.lsn == first
        clock.advance(120)  # nothing written since: no checkpoint
        ckpt.wake()
        time.sleep(1.3)
        assert db.stats()["checkpoints"] == 1
        lsn = db.put(b"b", b"2")
        clock.advance(61)
        ckpt.wake()
        assert wait_for(lambda: db.stats()["checkpoints"] == 2, 10)
        last = db.info()["last_checkpoint"]
        assert last.reason == "timeout" and last.lsn == lsn


def write_and_watch_wal(db, max_wal: int, seg: int) -> int:
    """Writes 20 x max_wal; asserts the WAL on disk stays <= 2 x max_wal + 2
    segments throughout; returns the peak."""
    bound = 2 * max_wal + 2 * seg
    rng = random.Random(5)
    written = peak = i = 0
    while written < 20 * max_wal:
        db.put(b"k%05d" % (i % 3000), rng.randbytes(1000))
        written += 1000 + 40
        i += 1
        if i % 16 == 0:
            wal = db.info()["wal_bytes"]
            peak = max(peak, wal)
            assert wal <= bound, f"WAL on disk {wal} > {bound} after {written} bytes"
    return peak


@pytest.mark.parametrize("sync", ["always", "none"])
def test_wal_on_disk_stays_bounded(tmp_path, sync):
    max_wal, seg = 256 * KiB, 64 * KiB
    with walstate.open(str(tmp_path / "db"), max_wal_size=max_wal, segment_size=seg,
                       sync=sync) as db:
        peak = write_and_watch_wal(db, max_wal, seg)
        st = db.stats()
        assert st["checkpoints"] >= 10, st
        assert db.info()["last_checkpoint"].reason == "wal_size"
        assert peak > max_wal // 2  # the bound was measured while the WAL was busy


def test_wal_stays_bounded_when_checkpoints_are_slow(tmp_path, monkeypatch):
    from walstate.snapshot import Snapshot

    write = Snapshot.write

    def slow_write(self, items, meta, durable=False):  # an LMDB disk 50 ms per transaction
        time.sleep(0.05)
        return write(self, items, meta, durable)

    monkeypatch.setattr(Snapshot, "write", slow_write)
    max_wal, seg = 256 * KiB, 64 * KiB
    with walstate.open(str(tmp_path / "db"), sync="none", max_wal_size=max_wal,
                       segment_size=seg) as db:
        write_and_watch_wal(db, max_wal, seg)
