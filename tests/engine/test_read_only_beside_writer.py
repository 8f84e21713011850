"""A read-only open beside a running writer process (issue 12, item 4): it shows
the state after one prefix of the history, the same one for as long as it is
open -- or raises StaleReadError once a checkpoint of the writer folded later
writes into the snapshot -- never a mix of two states; it retries a replay
whose segments a checkpoint removed, and follows the writer's growth of the
LMDB map.

The writer's key scheme makes a prefix checkable: batch i sets ``a = i`` and
adds key ``c<i>``, so the state after batch i has ``a == i`` and exactly the
keys ``c0..c<i>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from enginehelpers import child_env, tree_digest

import walstate

MiB = 1 << 20
OPTS = "sync='none', segment_size=64 * 1024, max_wal_size=192 * 1024, map_size=1 << 20"

STEADY = f"""
import os, sys, walstate
db = walstate.open(sys.argv[1], {OPTS})
with db.batch() as b:
    b.put(b"a", b"0")
    b.put(b"c%08d" % 0, os.urandom(300))
db.checkpoint()
print("ready", flush=True)
i = 0
while True:
    i += 1
    with db.batch() as b:
        b.put(b"a", b"%d" % i)
        b.put(b"c%08d" % i, os.urandom(300))
"""


def check_prefix(ro) -> int:
    """The batch number the view is at, asserting that it is one state."""
    a = int(ro.get(b"a"))
    keys = [k for k, _v in ro.items(start=b"c", stop=b"d")]
    assert keys == [b"c%08d" % i for i in range(a + 1)], (a, len(keys))
    assert int(ro.get(b"a")) == a
    return a


@pytest.fixture
def steady_writer(tmp_path):
    path = str(tmp_path / "db")
    p = subprocess.Popen([sys.executable, "-c", STEADY, path], stdout=subprocess.PIPE,
                         text=True, env=child_env())
    try:
        assert p.stdout.readline().strip() == "ready"
        yield path
    finally:
        p.kill()
        p.wait()


def _campaign(path: str, seconds: float) -> Counter:
    counts: Counter = Counter()
    deadline = time.monotonic() + seconds
    last_seen = -1
    while time.monotonic() < deadline:
        with walstate.open(path, read_only=True) as ro:
            counts["opens"] += 1
            view = None
            try:
                for _ in range(20):
                    a = check_prefix(ro)
                    assert view is None or a == view, "the view moved while open"
                    view = a
                    counts["consistent reads"] += 1
            except walstate.StaleReadError as exc:
                assert "reopen" in str(exc)
                counts["stale, reopened"] += 1
            if view is not None:
                assert view >= last_seen  # a later open never goes back
                last_seen = view
    return counts


def test_read_only_views_beside_a_checkpointing_writer(steady_writer):
    path = steady_writer
    counts = _campaign(path, 8.0)
    print(dict(counts))
    assert counts["opens"] >= 20 and counts["consistent reads"] >= 20
    assert counts["stale, reopened"] >= 1   # the writer's checkpoints did overtake views
    snap = os.path.join(path, "snapshot", "data.mdb")
    assert os.path.getsize(snap) > MiB, "the writer grew the map past its 1 MiB start"


@pytest.mark.slow
def test_read_only_views_beside_a_checkpointing_writer_long(steady_writer):
    counts = _campaign(steady_writer, 120.0)
    print(dict(counts))
    assert counts["opens"] >= 300


CONTROLLED = """
import os, sys, walstate
db = walstate.open(sys.argv[1], sync="none", segment_size=64 * 1024, max_wal_size=1 << 30,
                   checkpoint_timeout=3600.0, map_size=1 << 20)
n = 0
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "write":
        for _ in range(int(cmd[1])):
            n += 1
            with db.batch() as b:
                b.put(b"a", b"%d" % (n - 1))
                b.put(b"c%08d" % (n - 1), os.urandom(2000))
        db.sync()
    elif cmd[0] == "checkpoint":
        db.checkpoint()
    print("done", n, db.info()["map_size"], db.info()["wal_segments"], flush=True)
"""


def test_read_only_view_survives_a_checkpoint_that_grows_the_map(tmp_path):
    """The writer idle at batch N: a read-only open sees N; the writer's
    checkpoint then folds exactly that state, removes the segments the view was
    replayed from and grows the map (MDB_MAP_RESIZED for the reader): the view
    keeps reading the same state from the grown snapshot, changes no byte."""
    path = str(tmp_path / "db")
    p = subprocess.Popen([sys.executable, "-c", CONTROLLED, path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=child_env())

    def ask(cmd: str) -> list[int]:
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        out = p.stdout.readline().split()
        assert out[0] == "done", out
        return [int(x) for x in out[1:]]

    try:
        ask("write 50")
        ask("checkpoint")
        n, map0, _segs = ask("write 700")  # ~1.4 MiB since the checkpoint: many segments
        with walstate.open(path, read_only=True) as ro:
            assert check_prefix(ro) == n - 1
            _n, map1, segs = ask("checkpoint")
            assert map1 > map0, "the checkpoint grew the map"
            assert segs <= 2, "the checkpoint removed the segments the view read"
            before = tree_digest(path)
            for _ in range(3):
                assert check_prefix(ro) == n - 1
            assert ro.info()["snapshot_keys"] == n + 1  # and key a
            assert tree_digest(path) == before
            ask("write 5")    # later writes, not yet checkpointed: still the same view
            assert check_prefix(ro) == n - 1
            ask("checkpoint")  # folds them: the view cannot be served any more
            with pytest.raises(walstate.StaleReadError):
                check_prefix(ro)
        with walstate.open(path, read_only=True) as ro:
            assert check_prefix(ro) == n + 4
    finally:
        p.kill()
        p.wait()
