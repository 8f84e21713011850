"""The first open of a directory, cut short in every way a user can cut it:
SIGKILL at each step of the creation (kill points), a power cut after every
prefix of its file operations (the power-loss simulator), a clean failure at
each step (an I/O error, a full disk, a map_size the machine cannot map) --
for a missing and for an existing empty directory. Whatever is left, the next
open redoes the creation, and ``doctor``/``repair`` describe it as such
(issue 12, item 1). Also: SIGKILL at random instants of ``open`` and
``close``, after which every directory opens with every acknowledged write.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import walstate
from walstate import _hooks
from walstate.testing import crashsim

CLI = [sys.executable, "-m", "walstate.ops.cli"]
CREATE_STEPS = ("create_snapshot_dir", "create_snapshot_env", "create_snapshot_meta",
                "create_before_marker", "segment_create_before_rename",
                "segment_create_after_rename", "append_after_write", "append_after_fdatasync")
OPEN = "import sys, walstate; walstate.open(sys.argv[1], segment_size=65536).close()"


def _target(tmp_path, existing: bool) -> str:
    path = str(tmp_path / "db")
    if existing:
        os.mkdir(path)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def assert_redone(path: str) -> None:
    """The next open succeeds on an empty database that keeps what is written."""
    with walstate.open(path, segment_size=65536) as db:
        assert dict(db.items()) == {}
        assert db.info()["recovery"]["truncated_bytes"] == 0
        db.put(b"k", b"v")
        with db.batch() as b:
            b.put(b"k2", b"v2")
    with walstate.open(path) as db:
        assert dict(db.items()) == {b"k": b"v", b"k2": b"v2"}
        assert db.info()["recovery"]["clean_shutdown"] is True
    assert os.path.exists(os.path.join(path, "WALSTATE"))


# ---- SIGKILL at each step --------------------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True], ids=["missing", "empty"])
@pytest.mark.parametrize("step", CREATE_STEPS)
def test_sigkill_at_each_creation_step_then_open_redoes_it(tmp_path, step, existing):
    path = _target(tmp_path, existing)
    env = dict(os.environ, WALSTATE_KILLPOINT=step)
    p = subprocess.run([sys.executable, "-c", OPEN, path], env=env, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    marked = os.path.exists(os.path.join(path, "WALSTATE"))
    assert marked == (step.startswith(("segment", "append"))), sorted(os.listdir(path))
    if not marked:
        # doctor and repair describe the interrupted creation and exit 0: open redoes it
        d = cli("doctor", path)
        assert d.returncode == 0, d.stdout + d.stderr
        assert "WARN  path" in d.stdout and "creation was cut short" in d.stdout, d.stdout
        r = cli("repair", path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "interrupted_creation" in r.stdout and "next open" in r.stdout, r.stdout
        r = cli("repair", "--apply", "--json", path)
        assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stdout
    assert_redone(path)


def test_a_lost_marker_over_data_is_refused_by_open_doctor_and_repair(tmp_path):
    """The one unmarked directory that open must refuse: it holds a user's data."""
    path = str(tmp_path / "db")
    with walstate.open(path) as db:
        db.put(b"precious", b"1")
    os.unlink(os.path.join(path, "WALSTATE"))
    before = sorted(os.listdir(path))
    with pytest.raises(walstate.CorruptionError, match="marker .* is missing"):
        walstate.open(path)
    d = cli("doctor", path)
    assert d.returncode == 1 and "FAIL  path" in d.stdout and "refuses" in d.stdout, d.stdout
    r = cli("repair", "--apply", path)
    assert r.returncode == 1 and "marker_missing" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(path)) == before


# ---- a clean failure at each step ------------------------------------------------------------

class _FailNth:
    """Makes the nth call (counting across the patched os functions) raise EIO."""

    NAMES = ("mkdir", "open", "fsync", "write", "pwrite", "rename", "ftruncate")

    def __init__(self, monkeypatch, nth: int) -> None:
        self.nth, self.calls, self.failed = nth, 0, None
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, fn):
        def call(*args, **kw):
            self.calls += 1
            if self.calls == self.nth:
                self.failed = name
                raise OSError(errno.EIO, f"injected failure of os.{name}")
            return fn(*args, **kw)
        return call


@pytest.mark.parametrize("existing", [False, True], ids=["missing", "empty"])
def test_an_io_error_at_each_step_of_the_creation_then_open_redoes_it(tmp_path, existing,
                                                                      monkeypatch):
    failed_at = []
    for nth in range(1, 200):
        os.mkdir(tmp_path / str(nth))
        path = _target(tmp_path / str(nth), existing)
        with monkeypatch.context() as m:
            f = _FailNth(m, nth)
            try:
                walstate.open(path, segment_size=65536).close()
                done = f.failed is None
            except (OSError, walstate.WalStateError):
                done = False
        if done:
            break
        failed_at.append(f.failed)
        assert_redone(path)
        shutil.rmtree(tmp_path / str(nth))
    else:
        pytest.fail("the creation never completed")
    print(f"failures injected at {len(failed_at)} calls: {failed_at}")
    assert {"mkdir", "open", "fsync", "rename"} <= set(failed_at)


@pytest.mark.parametrize("existing", [False, True], ids=["missing", "empty"])
def test_a_full_disk_at_each_step_of_the_creation_then_space_freed(tmpfs, existing):
    root = str(tmpfs("1m"))
    outcomes = []
    for leave in [*range(0, 64 * 1024, 16 * 1024), *range(64 * 1024, 256 * 1024, 4096)]:
        path = os.path.join(root, "db")
        if existing:
            os.mkdir(path)
        ballast = os.path.join(root, "ballast")
        st = os.statvfs(root)
        with open(ballast, "wb") as f:
            left = max(st.f_bavail * st.f_frsize - leave, 0)
            while left > 0:
                try:
                    left -= f.write(b"\xa5" * min(left, 1 << 16))
                    f.flush()
                except OSError:
                    break
        try:
            walstate.open(path, segment_size=65536).close()
            outcomes.append("ok")
        except walstate.DiskFullError as exc:
            outcomes.append(sorted(os.listdir(path)) if os.path.isdir(path) else "-")
            assert exc.errno == errno.ENOSPC and ("full" in str(exc) or "No space" in str(exc))
        os.unlink(ballast)
        assert_redone(path)
        shutil.rmtree(path)
    print(f"full disk with 0..256 KiB left: {outcomes}")
    assert "ok" in outcomes and outcomes[0] != "ok"
    assert len({str(o) for o in outcomes if o != "ok"}) >= 2  # failed at different steps


@pytest.mark.parametrize("existing", [False, True], ids=["missing", "empty"])
def test_a_map_size_the_machine_cannot_map_leaves_a_directory_that_opens(tmp_path, existing):
    path = _target(tmp_path, existing)
    with pytest.raises(walstate.ConfigError, match="map_size") as ei:
        walstate.open(path, map_size=1 << 50)
    assert ei.value.option == "map_size"
    # refused before anything changed: the directory is as it was
    assert os.listdir(path) == [] if existing else not os.path.exists(path)
    d = cli("doctor", path)
    assert d.returncode == 0 and ("exists (empty" if existing else "does not exist") in d.stdout, \
        d.stdout
    assert_redone(path)


# ---- a power cut after every prefix of the creation's file operations ------------------------

def _trace_creation(tmp_path, existing: bool):
    world = os.path.realpath(tmp_path / "world")
    os.makedirs(world)
    path = os.path.join(world, "db")
    if existing:
        os.mkdir(path)
    initial = crashsim.read_tree(world)
    lib = crashsim.build_preload()
    trace = str(tmp_path / "trace")
    env = dict(os.environ, **crashsim.preload_env(lib, world, trace, str(tmp_path / "marks")))
    subprocess.run([sys.executable, "-c", OPEN, path], env=env, check=True)
    return crashsim.Trace(trace), world, initial


def _power_loss_at_prefixes(tmp_path, existing: bool, whole: bool) -> tuple[int, int]:
    """Every prefix of the traced first open(+close): each crash state opens empty."""
    tr, world, initial = _trace_creation(tmp_path, existing)
    names = [crashsim.NAMES[e.type] for e in tr.events]
    marker = next(i for i, e in enumerate(tr.events)
                  if names[i] == "RENAME" and e.path.endswith("WALSTATE.tmp"))
    # default run: through the marker and the first segment, durable and torn
    last = len(tr) if whole else min(len(tr), marker + 12)
    flavors = crashsim.FLAVORS if whole else ("durable", "torn")
    n = 0
    for st in crashsim.crash_states(tr, world, initial, str(tmp_path / "states"),
                                    list(range(last + 1)), flavors, random.Random(7)):
        p = os.path.join(st.path, "db")
        if os.path.isdir(p):
            try:
                assert_redone(p)
            except Exception as exc:
                raise AssertionError(f"power cut after {st.events} events ({st.flavor}): "
                                     f"{sorted(crashsim.read_tree(st.path))}: {exc!r}") from exc
        n += 1
        shutil.rmtree(st.path)
    return n, last


@pytest.mark.parametrize("existing", [False, True], ids=["missing", "empty"])
def test_power_loss_after_every_prefix_of_the_creation(tmp_path, existing):
    n, last = _power_loss_at_prefixes(tmp_path, existing, whole=False)
    print(f"{n} crash states over the first {last} file operations")
    assert n > last


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True], ids=["missing", "empty"])
def test_power_loss_after_every_prefix_of_open_and_close_every_flavor(tmp_path, existing):
    n, last = _power_loss_at_prefixes(tmp_path, existing, whole=True)
    print(f"{n} crash states over all {last} file operations of open+close")
    assert n > 2 * last


# ---- SIGKILL at random instants of open and close --------------------------------------------

CHILD = r"""
import json, os, sys, time
import walstate
path, mode = sys.argv[1], sys.argv[2]
opts = dict(segment_size=65536, max_wal_size=256 * 1024)
if mode == "close":
    db = walstate.open(path, **opts)
    n = int(sys.argv[3])
    for i in range(n):
        db.put(b"c%06d" % i, os.urandom(64))
        print("K", i, flush=True)   # acknowledged (sync="always")
    print("go", flush=True)
    db.close()
else:
    print("go", flush=True)
    db = walstate.open(path, **opts)
    print("opened", flush=True)
    db.close()
"""


def _prepare(base: str, mode: str, rng: random.Random) -> dict[bytes, bytes]:
    """The directory a scenario starts from, and what it must keep."""
    if mode == "missing":
        return {}
    os.makedirs(base)
    if mode == "empty":
        return {}
    # "data": written, then the writer crashed: open has a replay and a checkpoint to do
    code = ("import os, signal, sys, walstate\n"
            "db = walstate.open(sys.argv[1], segment_size=65536)\n"
            "for i in range(int(sys.argv[2])): db.put(b'd%06d' % i, b'%d' % i)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    n = rng.randrange(50, 1500)
    subprocess.run([sys.executable, "-c", code, base, str(n)], check=False)
    return {b"d%06d" % i: b"%d" % i for i in range(n)}


def _kill_campaign(tmp_path, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    modes = ("missing", "empty", "data", "close")
    counts = {m: 0 for m in modes}
    killed = 0
    for k in range(kills):
        mode = modes[k % len(modes)]
        path = str(tmp_path / f"k{k}" / "db")
        os.makedirs(os.path.dirname(path))
        if mode == "close":
            with walstate.open(path, segment_size=65536) as db:
                db.put(b"before", b"1")
            want = {b"before": b"1"}
        else:
            want = _prepare(path, mode, rng)
        args = [path, mode, str(rng.randrange(1, 400))]
        child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        acked = {}
        for line in child.stdout:  # type: ignore[union-attr]
            if line.startswith("K "):
                i = int(line.split()[1])
                acked[b"c%06d" % i] = None
            if line.startswith("go"):
                break
        time.sleep(rng.uniform(0, 0.03))   # a random instant of open or close
        child.send_signal(signal.SIGKILL)
        child.stdout.close()  # type: ignore[union-attr]
        rc = child.wait()
        killed += rc == -signal.SIGKILL
        with walstate.open(path) as db:
            got = dict(db.items())
        for key, value in want.items():
            assert got.get(key) == value, f"{mode} kill {k}: lost {key!r}"
        assert set(acked) <= set(got), f"{mode} kill {k}: lost acknowledged writes"
        counts[mode] += 1
        shutil.rmtree(os.path.dirname(path))
    counts["killed_in_flight"] = killed
    return counts


def test_sigkill_at_random_instants_of_open_and_close(tmp_path):
    counts = _kill_campaign(tmp_path, 20, seed=12)
    print(counts)
    assert counts["killed_in_flight"] >= 4, counts  # the rest finished before the kill


@pytest.mark.slow
def test_sigkill_at_300_random_instants_of_open_and_close_each(tmp_path):
    seed = int(os.environ.get("WALSTATE_CRASH_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    counts = _kill_campaign(tmp_path, 4 * 300, seed=seed)
    print(counts)
    assert counts["killed_in_flight"] >= 300, counts


def test_kill_points_cover_the_creation():
    assert set(CREATE_STEPS[:4]) <= set(_hooks.KILL_POINTS_PY)
    assert set(CREATE_STEPS[4:]) <= set(_hooks.KILL_POINTS_C)


def first_writes(db, rng):
    """The first open of the directory, then a few acknowledged writes."""
    for i in range(5):
        db.put(b"first%d" % i, rng.randbytes(50))


def test_power_loss_campaign_from_an_existing_empty_directory(tmp_path):
    """crash_check's oracle over the first open of an existing empty directory."""
    from walstate.testing import crash_check

    empty = tmp_path / "empty"
    empty.mkdir()
    res = crash_check(first_writes, runs=1, seed=21, states_per_run=30,
                      workdir=str(tmp_path), start=str(empty), recovery_kill_every=0,
                      chain=False, keep_failures=False)
    print(res.summary())
    assert res.ok, res.summary()
    assert res.crash_states >= 30 and res.ops_acknowledged == 5
