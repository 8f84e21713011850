"""Damage that recovery does not need must not block it, and the ways out keep
the longest valid prefix (issue 12, item 6).

- A bit flipped in a record below the checkpoint LSN (``repair`` calls it
  ``old_damage``): recovery reads from the checkpoint on, so every mode opens
  with every acknowledged write, also those after the checkpoint in the same
  segment, and the writer appends after them.
- The newest segment missing, or ``wal/LAST`` garbage: strict and
  tolerate_tail refuse, point_in_time and ``repair --apply
  --accept-data-loss`` keep every record of the segments on disk, with a
  message that says what is wrong.

Every case is real file damage on a directory written through the public API
(sync="always", the process then abandoned as by SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from enginehelpers import child_env, corrupt

import walstate
from walstate.wal import WalReader, list_segments

KiB = 1024
OPTS = {"segment_size": 64 * KiB, "max_wal_size": 1 << 30, "checkpoint_timeout": 3600.0}


def items(db) -> dict[bytes, bytes]:
    return dict(db.items())


def records(path: str):
    """(lsn, segment path, offset, record bytes) of every record, in order."""
    wal = os.path.join(path, "wal")
    segs = dict(list_segments(wal))
    with WalReader(wal) as r:
        return [(x.lsn, segs[x.segment], x.offset, 28 + len(x.payload)) for x in r]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walstate.ops.cli", *args],
                          capture_output=True, text=True, env=child_env(), timeout=120)


def _copy(src: str, work: str, name: str) -> str:
    dst = os.path.join(work, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def after_checkpoint(tmp_path_factory):
    """600 puts over 3+ segments, a checkpoint, then 210 more puts (the state
    after the checkpoint lives only in the WAL), abandoned."""
    path = str(tmp_path_factory.mktemp("old") / "db")
    db = walstate.open(path, **OPTS)
    rng = random.Random(12)
    model: dict[bytes, bytes] = {}
    for i in range(600):
        k, v = b"k%04d" % i, rng.randbytes(rng.randrange(50, 300))
        db.put(k, v)
        model[k] = v
    cp = db.checkpoint().lsn
    for i in range(210):
        k, v = b"n%04d" % i, rng.randbytes(rng.randrange(1, 80))
        db.put(k, v)
        model[k] = v
    db._abandon()
    recs = records(path)
    cseg = next(r[1] for r in recs if r[0] == cp + 1)
    below = [r for r in recs if r[0] <= cp and r[1] == cseg]
    assert len(below) >= 20, "the checkpoint's segment holds records below it"
    return path, cp, recs, model


def _below(recs, cp: int):
    """The records at or below the checkpoint LSN in the segment where recovery
    starts (the one holding LSN cp + 1)."""
    cseg = next(r[1] for r in recs if r[0] == cp + 1)
    return [r for r in recs if r[0] <= cp and r[1] == cseg]


def test_bit_flip_below_the_checkpoint_blocks_nothing(after_checkpoint, tmp_path):
    src, cp, recs, model = after_checkpoint
    below = _below(recs, cp)
    rng = random.Random(3)
    picks = sorted({0, 1, len(below) // 2, len(below) - 2, len(below) - 1}
                   | set(rng.sample(range(len(below)), 5)))
    counts: Counter = Counter()
    for j in picks:
        lsn, seg, off, size = below[j]
        work = _copy(src, str(tmp_path), "f")
        p = os.path.join(work, "wal", os.path.basename(seg))
        corrupt(p, off + rng.randrange(size), "flip")
        for mode in ("strict", "tolerate_tail", "point_in_time"):
            path = _copy(work, str(tmp_path), "m")
            with walstate.open(path, recovery=mode, **OPTS) as db:
                assert items(db) == model, (lsn, mode)
                assert db.info()["recovery"]["truncated_bytes"] == 0
                db.put(b"after", b"1")
            with walstate.open(path, recovery="strict", **OPTS) as db:
                assert items(db) == {**model, b"after": b"1"}
            counts["opened"] += 1
        r = cli("repair", "--apply", "--accept-data-loss", work)   # nothing to cut
        assert r.returncode == 0 and "old_damage" in r.stdout, r.stdout
        with walstate.open(work, recovery="strict", **OPTS) as db:
            assert items(db) == model
        counts["repair-kept-all"] += 1
    print(dict(counts))
    assert counts["opened"] == 3 * len(picks) and counts["repair-kept-all"] == len(picks)


def test_bit_flip_after_the_checkpoint_is_still_loud(after_checkpoint, tmp_path):
    """Passing over old damage never passes over a record recovery needs: the
    record at checkpoint + 1 and later ones flipped stay CorruptionError, and
    point_in_time keeps exactly the records before the flipped one."""
    src, cp, recs, model = after_checkpoint
    idx = [i for i, r in enumerate(recs) if r[0] in (cp + 1, cp + 2, cp + 100)]
    assert len(idx) == 3
    for i in idx:
        lsn, seg, off, _size = recs[i]
        path = _copy(src, str(tmp_path), "a")
        corrupt(os.path.join(path, "wal", os.path.basename(seg)), off + 9, "flip")
        for mode in ("strict", "tolerate_tail"):
            with pytest.raises(walstate.CorruptionError) as ei:
                walstate.open(path, recovery=mode, **OPTS)
            assert ei.value.lsn == lsn
        with walstate.open(path, recovery="point_in_time", **OPTS) as db:
            got = items(db)
        kept = lsn - cp - 1   # puts after the checkpoint that come before the flip
        assert got == {k: v for k, v in model.items()
                       if k.startswith(b"k") or int(k[1:]) < kept}


def _many_segments(path: str) -> dict[int, dict[bytes, bytes]]:
    """3000 puts over several segments, abandoned; {lsn: state after it}."""
    db = walstate.open(path, **OPTS)
    states: dict[int, dict[bytes, bytes]] = {}
    cur: dict[bytes, bytes] = {}
    for i in range(3000):
        k, v = b"c%03d" % (i % 700), b"%d" % i * 20
        lsn = db.put(k, v)
        cur[k] = v
        states[lsn] = dict(cur)
    db._abandon()
    return states


@pytest.mark.parametrize("damage", ["newest-missing", "last-garbage", "last-empty"])
def test_damaged_end_keeps_every_intact_segment(tmp_path, damage):
    base = str(tmp_path / "base")
    states = _many_segments(base)
    segs = list_segments(os.path.join(base, "wal"))
    assert len(segs) >= 4
    if damage == "newest-missing":
        os.unlink(segs[-1][1])
        keep_upto = segs[-1][0] - 1
        what = "is missing"
    else:
        with open(os.path.join(base, "wal", "LAST"), "w") as f:
            f.write("" if damage == "last-empty" else "not hex at all\n")
        keep_upto = max(states)
        what = "wal/LAST is unreadable"
    for mode in ("strict", "tolerate_tail"):
        with pytest.raises(walstate.CorruptionError, match=what) as ei:
            walstate.open(base, recovery=mode, **OPTS)
        assert "offset 0, expected LSN 0" not in str(ei.value)
    r = cli("verify", base)
    assert r.returncode == 1 and what in r.stdout, r.stdout
    # point_in_time keeps every record of the segments on disk
    path = _copy(base, str(tmp_path), "pitr")
    with walstate.open(path, recovery="point_in_time", **OPTS) as db:
        assert items(db) == states[keep_upto]
        stopped = db.info()["recovery"]["stopped_at"]
        assert what in stopped["why"] and "expected LSN 0" not in stopped["why"]
        assert not [n for n in os.listdir(os.path.join(path, "wal")) if n.endswith(".broken")]
    with walstate.open(path, recovery="strict", **OPTS) as db:
        assert items(db) == states[keep_upto]
    # and so does repair
    path = _copy(base, str(tmp_path), "rep")
    r = cli("repair", "--json", path)
    assert r.returncode == 1
    (f,) = json.loads(r.stdout)["findings"]
    assert what in f["detail"] and f["data_loss"]
    r = cli("repair", "--apply", "--accept-data-loss", path)
    assert r.returncode == 0, r.stdout + r.stderr
    with walstate.open(path, recovery="strict", **OPTS) as db:
        assert items(db) == states[keep_upto]
