"""Static damage, swept and counted: a torn tail at every byte of the last
record, zero tails, a bit flip in every record of the log, damaged and
missing snapshots, a snapshot older or newer than the WAL, a segment from
another directory, a missing segment.

The rule (docs/FORMAT.md, "How a log ends"): damage at the tail of the last
segment is cut and reported, and the directory opens with every record
before it; damage anywhere else makes open fail loudly (CorruptionError or
MismatchError) -- never an empty or shortened database without an error.
test_engine_api.py checks one instance of several of these; this file
sweeps them. The default run samples; ``--run-slow`` sweeps every record.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from conftest import corrupt
from enginehelpers import child_env

import walstate
from walstate.layout import not_files
from walstate.wal import WalReader, list_segments

KiB = 1024
SEG = 64 * KiB
OPTS = {"segment_size": SEG, "max_wal_size": 64 * 1024 * KiB, "checkpoint_timeout": 3600.0}
LOUD = (walstate.CorruptionError, walstate.MismatchError)


def items(db) -> dict[bytes, bytes]:
    return dict(db.items())


def records(path: str):
    """(lsn, segment path, offset, record bytes) of every record, in order."""
    wal = os.path.join(path, "wal")
    segs = dict(list_segments(wal))
    with WalReader(wal) as r:
        return [(x.lsn, segs[x.segment], x.offset, 28 + len(x.payload)) for x in r]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A directory whose state lives only in its WAL (3+ segments, written under
    sync="always", never checkpointed, not closed); its records; and
    ``states[i]``, the state before record i (``states[-1]``: after all)."""
    root = tmp_path_factory.mktemp("damage")
    path = str(root / "db")
    db = walstate.open(path, **OPTS)
    rng = random.Random(4)
    ops: dict[int, tuple[bytes, bytes]] = {}
    for _i in range(420):
        k, v = b"key%03d" % rng.randrange(300), rng.randbytes(rng.randrange(1, 700))
        ops[db.put(k, v)] = (k, v)
    db._abandon()
    recs = records(path)
    assert len({r[1] for r in recs}) >= 3 and recs[-1][0] == max(ops)
    states = []
    cur: dict[bytes, bytes] = {}
    for lsn, *_rest in recs:
        states.append(dict(cur))
        if lsn in ops:
            cur[ops[lsn][0]] = ops[lsn][1]
    states.append(dict(cur))
    assert len(states) == len(recs) + 1 and sum(1 for r in recs if r[0] in ops) == 420
    return path, recs, states


def _copy(src: str, work: str, name: str) -> str:
    dst = os.path.join(work, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=not_files)
    return dst


def _moved(path: str, src: str, p: str) -> str:
    return os.path.join(path, os.path.relpath(p, src))


# ---- the tail --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["zero", "garbage"])
def test_torn_last_record_at_every_byte_is_cut_and_the_rest_kept(crashed, tmp_path, how):
    src, recs, states = crashed
    _lsn, seg, off, size = recs[-1]
    counts: Counter = Counter()
    for cut in range(off, off + size):
        path = _copy(src, str(tmp_path), "t")
        p = _moved(path, src, seg)
        end = off + size
        if how == "zero":
            corrupt(p, cut, "zero", n=end - cut)
        else:
            corrupt(p, cut, "garbage", n=end - cut, seed=cut)
        with walstate.open(path, **OPTS) as db:
            got = items(db)
            cutb = db.info()["recovery"]["truncated_bytes"]
        assert got == states[-2], f"{how} at byte {cut - off} of the last record"
        counts["cut" if cutb else "clean"] += 1
        with walstate.open(path, **OPTS) as db:     # the cut is done once
            assert items(db) == states[-2]
            assert db.info()["recovery"]["truncated_bytes"] == 0
        counts["states"] += 1
    print(how, dict(counts))
    assert counts["states"] == size
    if how == "garbage":
        assert counts["cut"] == size


def test_newest_segment_cut_short_is_damage_not_a_clean_end(crashed, tmp_path):
    """The newest segment truncated (a partial copy, a truncate) at every record
    boundary of its last records and inside the last one: segments are
    preallocated to the size their header records, so no crash leaves this.
    strict and tolerate_tail refuse it (CorruptionError), `verify` exits 1, and
    point_in_time keeps every record before the cut, gives the segment its size
    back, and later opens in strict mode see the same state."""
    src, recs, states = crashed
    last_seg = recs[-1][1]
    idx = [i for i, r in enumerate(recs) if r[1] == last_seg]
    _lsn, _seg, off, size = recs[-1]
    cuts = [(recs[i][2], i) for i in idx[-6:]] + [(off + size, len(recs))]
    cuts += [(off + k, len(recs) - 1) for k in (1, 27, 28, size - 1)]
    counts: Counter = Counter()
    for at, kept in cuts:
        path = _copy(src, str(tmp_path), "s")
        p = _moved(path, src, last_seg)
        full = os.path.getsize(p)
        corrupt(p, at, "truncate")
        for mode in ("strict", "tolerate_tail"):
            with pytest.raises(walstate.CorruptionError, match="cut short"):
                walstate.open(path, recovery=mode, **OPTS)
        r = subprocess.run([sys.executable, "-m", "walstate.ops.cli", "verify", path],
                           capture_output=True, text=True, env=child_env())
        assert r.returncode == 1 and "cut short" in r.stdout, r.stdout
        assert os.path.getsize(p) == at  # refusing changed nothing
        with walstate.open(path, recovery="point_in_time", **OPTS) as db:
            assert items(db) == states[kept], (at, kept)
            assert "cut short" in db.info()["recovery"]["stopped_at"]["why"]
        assert not os.path.exists(p) or os.path.getsize(p) == full
        with walstate.open(path, recovery="strict", **OPTS) as db:
            assert items(db) == states[kept]
        counts["kept-prefix"] += 1
    print(dict(counts))
    assert counts["kept-prefix"] == len(cuts)


def test_zero_tail_after_any_record_opens_with_that_prefix(crashed, tmp_path):
    """Zeros from a record boundary on, in the last segment: a clean end there."""
    src, recs, states = crashed
    last_seg = recs[-1][1]
    idx = [i for i, r in enumerate(recs) if r[1] == last_seg]
    for i in idx[:: max(len(idx) // 12, 1)]:
        path = _copy(src, str(tmp_path), "z")
        p = _moved(path, src, last_seg)
        off = recs[i][2]
        corrupt(p, off, "zero", n=os.path.getsize(p) - off)
        with walstate.open(path, **OPTS) as db:
            assert items(db) == states[i]
            assert db.info()["recovery"]["truncated_bytes"] == 0


# ---- bit flips -------------------------------------------------------------------------------

def flip_case(src: str, recs, states, i: int, work: str, rng: random.Random) -> str:
    """Flips one bit in record i; returns the verdict, asserting the rule."""
    path = _copy(src, work, "f")
    _lsn, seg, off, size = recs[i]
    p = _moved(path, src, seg)
    corrupt(p, off + rng.randrange(size), "flip", bit=rng.randrange(8))
    is_tail = i == len(recs) - 1
    if is_tail:
        with walstate.open(path, **OPTS) as db:       # the last record: a torn tail
            assert items(db) == states[i]
        return "tail-cut"
    for mode in ("tolerate_tail", "strict"):
        with pytest.raises(LOUD) as ei:
            walstate.open(path, recovery=mode, **OPTS)
        if isinstance(ei.value, walstate.CorruptionError):
            assert ei.value.lsn == recs[i][0], (i, ei.value)
    with walstate.open(path, recovery="point_in_time", **OPTS) as db:
        assert items(db) == states[i]               # exactly the records before it
    return "loud"


def _flip_sweep(crashed, tmp_path, indices) -> Counter:
    src, recs, states = crashed
    rng = random.Random(17)
    counts: Counter = Counter()
    for i in indices:
        counts[flip_case(src, recs, states, i, str(tmp_path), rng)] += 1
    return counts


def test_bit_flip_in_records_across_the_log(crashed, tmp_path):
    _src, recs, _states = crashed
    n = len(recs)
    firsts = [i for i in range(n) if i == 0 or recs[i][1] != recs[i - 1][1]]
    lasts = [i - 1 for i in firsts[1:]] + [n - 1]
    idx = sorted(set(range(0, n, 23)) | set(firsts) | set(lasts) | {n - 2})
    counts = _flip_sweep(crashed, tmp_path, idx)
    print(dict(counts))
    assert counts["loud"] == len(idx) - 1 and counts["tail-cut"] == 1


@pytest.mark.slow
def test_bit_flip_in_every_record(crashed, tmp_path):
    counts = _flip_sweep(crashed, tmp_path, range(len(crashed[1])))
    print(dict(counts))
    assert counts["tail-cut"] == 1


def test_damage_in_the_zero_fill_and_header(crashed, tmp_path):
    src, recs, states = crashed
    segs = [p for _l, p in list_segments(os.path.join(src, "wal"))]
    counts: Counter = Counter()
    for si, seg in enumerate(segs):
        last = [r for r in recs if r[1] == seg][-1]
        end = last[2] + last[3]
        size = os.path.getsize(seg)
        assert size - end > 2, "no zero fill after the last record"
        for where, off in (("fill", (end + size) // 2), ("header", 10), ("header-crc", 61)):
            path = _copy(src, str(tmp_path), "h")
            corrupt(_moved(path, src, seg), off, "flip")
            if where == "fill" and si == len(segs) - 1:
                with walstate.open(path, **OPTS) as db:   # garbage after the last record
                    assert items(db) == states[-1]
                    assert db.info()["recovery"]["truncated_bytes"] > 0
                counts["cut"] += 1
            else:
                with pytest.raises(LOUD):
                    walstate.open(path, **OPTS)
                counts["loud"] += 1
    print(dict(counts))
    assert counts["loud"] == 3 * len(segs) - 1


# ---- missing and foreign segments ---------------------------------------------------------

def test_missing_first_or_middle_segment_is_loud(crashed, tmp_path):
    """Loud in tolerate_tail and strict; point_in_time may keep the records
    before the hole (and report what it cut) -- never anything else."""
    src, recs, states = crashed
    segs = [p for _l, p in list_segments(os.path.join(src, "wal"))]
    counts: Counter = Counter()
    for seg in segs[:-1]:
        for mode in ("tolerate_tail", "strict", "point_in_time"):
            path = _copy(src, str(tmp_path), "m")
            os.unlink(_moved(path, src, seg))
            if mode != "point_in_time":
                with pytest.raises(LOUD):
                    walstate.open(path, recovery=mode, **OPTS)
                counts["loud"] += 1
                continue
            try:
                db = walstate.open(path, recovery=mode, **OPTS)
            except LOUD:
                counts["loud"] += 1
                continue
            before = sum(1 for r in recs if r[1] < seg)   # segment names sort by LSN
            with db:
                assert items(db) == states[before]
                assert db.info()["recovery"]["truncated_bytes"] > 0
            counts["pitr-prefix"] += 1
    print(dict(counts))
    assert counts["loud"] >= 2 * (len(segs) - 1)


def test_missing_last_segment_is_loud(crashed, tmp_path):
    src, _recs, _states = crashed
    segs = [p for _l, p in list_segments(os.path.join(src, "wal"))]
    path = _copy(src, str(tmp_path), "m")
    os.unlink(_moved(path, src, segs[-1]))
    with pytest.raises(LOUD):
        walstate.open(path, **OPTS)


def test_segment_from_another_directory_is_a_mismatch(crashed, tmp_path):
    src, _recs, _states = crashed
    other = str(tmp_path / "other")
    db = walstate.open(other, **OPTS)
    for i in range(420):
        db.put(b"o%03d" % i, b"x" * 300)
    db._abandon()
    segs = [p for _l, p in list_segments(os.path.join(src, "wal"))]
    osegs = [p for _l, p in list_segments(os.path.join(other, "wal"))]
    n = 0
    for seg in segs:
        path = _copy(src, str(tmp_path), "x")
        dst = _moved(path, src, seg)
        foreign = min(osegs, key=lambda p: abs(len(p) - len(seg)))
        shutil.copyfile(foreign, dst)
        for mode in ("tolerate_tail", "strict", "point_in_time"):
            with pytest.raises(LOUD):
                walstate.open(path, recovery=mode, **OPTS)
            n += 1
    assert n == 3 * len(segs)


# ---- the snapshot ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A closed directory whose state is in the snapshot (5000 keys, many pages),
    plus copies of its snapshot and WAL taken at the first of two checkpoints."""
    root = tmp_path_factory.mktemp("snap")
    path = str(root / "db")
    db = walstate.open(path, **OPTS)
    for i in range(5000):
        db.put(b"key%05d" % i, b"v%d" % i)
    db.checkpoint()
    first = items(db)
    old_snap = str(root / "old-snapshot")
    old_wal = str(root / "old-wal")
    shutil.copytree(os.path.join(path, "snapshot"), old_snap, ignore=not_files)
    shutil.copytree(os.path.join(path, "wal"), old_wal, ignore=not_files)
    for i in range(3000):
        db.put(b"key%05d" % i, b"second%d" % i)
    db.checkpoint()
    db.close()
    with walstate.open(path, read_only=True) as ro:
        final = items(ro)
    assert final != first
    return path, first, final, old_snap, old_wal


OPEN_AND_COUNT = """
import sys, walstate
try:
    with walstate.open(sys.argv[1], segment_size=65536) as db:
        print("opened", sum(1 for _ in db.items()))
except walstate.WalStateError as exc:
    print(type(exc).__name__)
"""


def _open_truncated(src: str, work: str, cut: int) -> tuple[int, str]:
    """Opens a copy whose data.mdb is cut to ``cut`` bytes, in a child process
    (a damaged LMDB file can kill its reader with SIGBUS)."""
    import subprocess
    import sys

    path = _copy(src, work, f"s{cut}")
    corrupt(os.path.join(path, "snapshot", "data.mdb"), cut, "truncate")
    p = subprocess.run([sys.executable, "-c", OPEN_AND_COUNT, path], capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout.strip()


def test_truncated_snapshot_header_or_slack_is_loud_or_complete(checkpointed, tmp_path):
    src, _first, final, _os, _ow = checkpointed
    size = os.path.getsize(os.path.join(src, "snapshot", "data.mdb"))
    counts: Counter = Counter()
    for cut in (0, 100, 4096, size - 1):
        rc, out = _open_truncated(src, str(tmp_path), cut)
        assert rc == 0, f"the process died (signal {-rc}) opening data.mdb cut to {cut}"
        assert out in ("CorruptionError", f"opened {len(final)}"), (cut, out)
        counts[out.split()[0]] += 1
    print(dict(counts))
    assert counts["CorruptionError"] >= 3


def test_snapshot_truncated_inside_its_pages_is_corruption_not_sigbus(checkpointed, tmp_path):
    """(Found: LMDB read its mapping past the end of the file and the process died
    of SIGBUS.)"""
    src = checkpointed[0]
    size = os.path.getsize(os.path.join(src, "snapshot", "data.mdb"))
    for cut in (8192, size // 4, size // 2):
        rc, out = _open_truncated(src, str(tmp_path), cut)
        assert (rc, out) == (0, "CorruptionError"), f"cut to {cut}: exit {rc}, {out!r}"


def test_missing_snapshot_is_corruption(checkpointed, tmp_path):
    src = checkpointed[0]
    path = _copy(src, str(tmp_path), "ms")
    os.unlink(os.path.join(path, "snapshot", "data.mdb"))
    with pytest.raises(walstate.CorruptionError):
        walstate.open(path, **OPTS)
    path = _copy(src, str(tmp_path), "ms2")
    shutil.rmtree(os.path.join(path, "snapshot"))
    with pytest.raises(walstate.WalStateError):
        walstate.open(path, **OPTS)
    assert not os.path.exists(os.path.join(path, "snapshot", "data.mdb"))


def test_snapshot_older_than_the_wal_is_loud_or_complete(checkpointed, tmp_path):
    src, _first, final, old_snap, _ow = checkpointed
    path = _copy(src, str(tmp_path), "o")
    shutil.rmtree(os.path.join(path, "snapshot"))
    shutil.copytree(old_snap, os.path.join(path, "snapshot"), ignore=not_files)
    try:
        db = walstate.open(path, **OPTS)
    except walstate.MismatchError:
        return          # the WAL between the two checkpoints was removed: a gap
    with db:
        assert items(db) == final


def test_snapshot_newer_than_the_wal_never_goes_back(checkpointed, tmp_path):
    src, _first, final, _os, old_wal = checkpointed
    path = _copy(src, str(tmp_path), "n")
    shutil.rmtree(os.path.join(path, "wal"))
    shutil.copytree(old_wal, os.path.join(path, "wal"), ignore=not_files)
    try:
        db = walstate.open(path, **OPTS)
    except (walstate.MismatchError, walstate.CorruptionError):
        return
    with db:
        assert items(db) == final   # nothing older replayed over the newer snapshot
        lsn = db.put(b"after", b"1")
        assert lsn > db.info()["last_checkpoint"].lsn
