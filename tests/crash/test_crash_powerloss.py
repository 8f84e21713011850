"""Simulated power loss (walstate.testing.crashsim + the oracle of walstate.testing).

The workload runs in a child process under the LD_PRELOAD tracer; crash
states are rebuilt from the trace (durable only, random subset of unsynced
writes, last write torn at 512-byte sectors, grown space zero/garbage,
undone directory entries) and each is recovered and checked. The default
run keeps a slice; ``--run-slow`` runs the full campaign (its seed is
printed; WALSTATE_CRASH_SEED=N reproduces one).

The SIGKILL campaigns and the sync-trace power loss of test_engine_crash.py
are not repeated here: this suite is the one that drops unsynced data of
LMDB and of directory entries too.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest

import walstate
from walstate.testing import crash_check, crashsim, mixed_workload

pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("gcc") is None,
                                reason="the tracer is an LD_PRELOAD library built with gcc")


def _seed(default: int) -> int:
    return int(os.environ.get("WALSTATE_CRASH_SEED", default))


@pytest.fixture
def started(tmp_path) -> str:
    """A closed directory holding a little data: the campaigns start from it
    (crashes inside the very first open: test_power_loss_while_creating_the_directory)."""
    path = str(tmp_path / "start")
    with walstate.open(path, segment_size=64 * 1024) as db:
        for i in range(20):
            db.put(b"key%03d" % i, b"v%d" % i)
    return path


# ---- the simulator itself ---------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys
    root = sys.argv[1]
    def w(name, data, sync=False, flags=os.O_CREAT | os.O_WRONLY):
        fd = os.open(os.path.join(root, name), flags, 0o644)
        os.write(fd, data)
        if sync:
            os.fsync(fd)
        os.close(fd)
    def fsync_dir(d):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY); os.fsync(fd); os.close(fd)
    w("synced", b"A" * 1000, sync=True)
    fsync_dir(root)
    w("unsynced", b"B" * 100)                      # data never synced (entry is, below)
    w("grown", b"C" * 1000, sync=True)
    w("tmp", b"E" * 10, sync=True)
    fsync_dir(root)
    fd = os.open(os.path.join(root, "grown"), os.O_WRONLY)
    os.pwrite(fd, b"D" * 1500, 1000)               # grows the file by 1500, unsynced
    os.close(fd)
    os.rename(os.path.join(root, "tmp"), os.path.join(root, "renamed"))   # no dir fsync
    w("late", b"F" * 10, sync=True)                # data synced, entry never
""")


def test_simulator_builds_each_flavor_as_specified(tmp_path):
    root = tmp_path / "world"
    root.mkdir()
    lib = crashsim.build_preload()
    trace = str(tmp_path / "trace")
    env = dict(os.environ, **crashsim.preload_env(lib, str(root), trace, str(tmp_path / "m")))
    subprocess.run([sys.executable, "-c", CHILD, str(root)], env=env, check=True)
    tr = crashsim.Trace(trace)
    assert not tr.truncated
    kinds = {crashsim.NAMES[e.type] for e in tr.events}
    assert {"OPEN", "WRITE", "FSYNC", "RENAME", "CLOSE"} <= kinds
    # the live directory is untouched by the simulation
    assert sorted(os.listdir(root)) == ["grown", "late", "renamed", "synced", "unsynced"]
    out = {}
    for st in crashsim.crash_states(tr, str(root), {}, str(tmp_path / "states"), [len(tr)],
                                    rng=random.Random(3)):
        out[st.flavor] = (crashsim.read_tree(st.path), st.info)
    dur = out["durable"][0]
    assert dur["synced"] == b"A" * 1000
    assert dur["unsynced"] == b""                     # entry durable, data not
    assert "late" not in dur                          # data durable, entry not
    assert dur["grown"] == b"C" * 1000                # the unsynced growth is gone
    assert "tmp" in dur and "renamed" not in dur      # the rename is undone
    assert out["zeros"][0]["grown"] == b"C" * 1000 + bytes(1500)
    garbage = out["garbage"][0]["grown"]
    assert garbage[:1000] == b"C" * 1000 and len(garbage) == 2500
    assert garbage[1000:] != bytes(1500) and garbage[1000:] != b"D" * 1500
    torn, info = out["torn"]
    assert info["torn"]["sectors"] == 4               # 1000..2500 spans 4 sectors
    grown = torn["grown"]
    assert grown[:1000] == b"C" * 1000
    assert len(grown) in (1000, 1024, 1536, 2048, 2500)   # ends at a kept sector's end
    bounds = [1000, 1024, 1536, 2048, 2500]
    for a, b in itertools.pairwise(bounds):             # each sector all new or all absent
        assert grown[a:b] in (b"D" * (b - a), bytes(b - a), b""), (a, b)
    assert "renamed" in torn and "tmp" not in torn    # torn keeps the directory ops
    # subset: every file is one of its possible versions
    sub = out["subset"][0]
    assert sub["synced"] == b"A" * 1000
    assert sub.get("unsynced", b"") in (b"", b"B" * 100)


def test_power_loss_campaign_sync_always(tmp_path, started):
    res = crash_check(mixed_workload, runs=3, seed=_seed(101), states_per_run=8,
                      workdir=str(tmp_path), start=started, recovery_kill_every=7)
    print(res.summary())
    assert res.ok, res.summary()
    assert res.crash_states >= 3 * 8 and res.ops_acknowledged > 50
    assert set(res.states_by_flavor) == set(crashsim.FLAVORS)
    assert res.recovery_kills >= 2 and res.chained_runs == 2


def test_power_loss_campaign_sync_none_and_interval(tmp_path, started):
    for sync, seed in (("none", 202), ("interval", 203)):
        res = crash_check(mixed_workload, runs=2, seed=_seed(seed), states_per_run=8,
                          options={"sync": sync, "sync_interval": 0.01},
                          workdir=str(tmp_path), start=started, recovery_kill_every=0)
        print(res.summary())
        assert res.ok, res.summary()
        assert res.crash_states >= 16


def lying_workload(db, rng):
    """Claims every put durable (K marks) while the engine runs sync="none"."""
    db._always = True
    for i in range(60):
        db.put(b"lie%03d" % i, rng.randbytes(200))


def test_the_oracle_catches_writes_acknowledged_before_they_were_durable(tmp_path, started):
    res = crash_check(lying_workload, runs=1, seed=5, states_per_run=10,
                      options={"sync": "none"}, workdir=str(tmp_path), start=started,
                      recovery_kill_every=0, keep_failures=False)
    kinds = {f.kind for f in res.failures}
    assert kinds == {"oracle"}, res.summary()
    assert any("lost acknowledged writes" in f.detail for f in res.failures)


def no_fsync_workload(db, rng):
    """A broken engine: the log's sync returns without writing or fdatasyncing."""
    eng = db.engine
    eng._wal.sync = lambda lsn=0: lsn
    put, handle, _sync = eng._wal.hot_args()
    eng._hot.set_wal(put, handle, 0)  # puts in C then wait through _wal.sync
    for i in range(40):
        db.put(b"nofsync%03d" % i, rng.randbytes(300))


def test_the_oracle_catches_an_engine_that_skips_fdatasync(tmp_path, started):
    res = crash_check(no_fsync_workload, runs=1, seed=6, states_per_run=10,
                      workdir=str(tmp_path), start=started, recovery_kill_every=0,
                      keep_failures=False)
    assert res.failures, res.summary()
    assert all(f.kind == "oracle" and "lost acknowledged writes" in f.detail
               for f in res.failures), res.summary()


def idle_workload(db, rng):
    """Opens and closes: the trace is the creation of the directory."""


def test_power_loss_while_creating_the_directory(tmp_path):
    """Crash points all through the first open (found: once the marker was durable
    but not the first segment, the next open started the WAL 2^32 LSNs up and,
    after that process crashed too, every open failed with MismatchError)."""
    res = crash_check(idle_workload, runs=1, seed=9, states_per_run=60, workdir=str(tmp_path),
                      recovery_kill_every=0, chain=False, keep_failures=False)
    assert res.crash_states >= 60
    assert res.ok, res.summary()


def test_sigkill_after_an_interrupted_first_open_keeps_the_directory_openable(tmp_path):
    """The same failure through SIGKILL only (its exact reproduction)."""
    path = str(tmp_path / "db")
    code = "import sys, walstate; walstate.open(sys.argv[1])"
    env = dict(os.environ, WALSTATE_KILLPOINT="segment_create_before_rename")
    p = subprocess.run([sys.executable, "-c", code, path], env=env)
    assert p.returncode == -9
    code2 = ("import os, signal, sys, walstate\n"
             "db = walstate.open(sys.argv[1]); db.put(b'acked', b'1')\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code2, path]).returncode == -9
    with walstate.open(path) as db:
        assert db.get(b"acked") == b"1"


# ---- the full campaign (opt-in) ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sync,runs", [("always", 200), ("none", 100), ("interval", 60)])
def test_power_loss_full_campaign(tmp_path, started, sync, runs):
    seed = _seed(random.randrange(1 << 30))
    print(f"\npower-loss campaign sync={sync}: seed {seed} (WALSTATE_CRASH_SEED={seed})")
    res = crash_check(mixed_workload, runs=runs, seed=seed, states_per_run=12,
                      options={"sync": sync, "sync_interval": 0.01}, workdir=str(tmp_path),
                      start=started)
    print(res.summary())
    assert res.ok, res.summary()
