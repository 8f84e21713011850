"""wal/END, the end hint of a clean close (docs/FORMAT.md, "wal/END"): a reopen
reads only the end of the newest segment; a hint that does not match the log
(stale, garbage, lying) is ignored and the log scanned as without it; a
writable open removes it durably before its first append; a read-only open
changes nothing. No timing: the readers count the bytes they read."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys

import crc32c
import pytest
from conftest import SMALL_SEGMENT, SYSTEM_ID, build_wal, corrupt, read_wal

import walstate
from walstate import codec
from walstate.layout import not_files
from walstate.wal import Wal, WalReader, list_segments

END_HDR = struct.Struct("<8sII QQII QQQ")  # 64 bytes
SEG_HDR = 64
REC_HDR = 28


def end_path(wal_dir) -> str:
    return os.path.join(os.fspath(wal_dir), "END")


def encode_end(system_id: int, seg: int, salt: int, end: int, last_lsn: int, last_off: int,
               marks=(), *, version: int = 1, nmarks: int | None = None) -> bytes:
    b = END_HDR.pack(b"WALSTEND", version, len(marks) if nmarks is None else nmarks,
                     system_id, seg, salt, 0, end, last_lsn, last_off)
    for lsn, off in marks:
        b += struct.pack("<QQ", lsn, off)
    return b + struct.pack("<I", crc32c.crc32c(b))


def decode_end(b: bytes) -> dict:
    magic, version, n, sid, seg, salt, res, end, last_lsn, last_off = END_HDR.unpack_from(b)
    assert magic == b"WALSTEND" and version == 1 and res == 0
    assert len(b) == 64 + 16 * n + 4
    assert struct.unpack_from("<I", b, len(b) - 4)[0] == crc32c.crc32c(b[:-4])
    marks = [struct.unpack_from("<QQ", b, 64 + 16 * i) for i in range(n)]
    return {"system_id": sid, "seg": seg, "salt": salt, "end": end, "last_lsn": last_lsn,
            "last_off": last_off, "marks": marks}


def salt_of(seg_path) -> int:
    with open(seg_path, "rb") as f:
        return struct.unpack_from("<I", f.read(64), 60)[0]


def read(wal_dir, from_lsn: int = 0, hint: bool = True, system_id: int = 0):
    with WalReader(os.fspath(wal_dir), system_id, from_lsn, end_hint=hint) as r:
        recs = [(x.lsn, x.type, x.payload, x.segment, x.offset) for x in r]
        return recs, r.end


def same_as_full_scan(wal_dir, from_lsn: int = 0, system_id: int = 0):
    """Reads with and without the hint; asserts the same records and end."""
    got, end = read(wal_dir, from_lsn, True, system_id)
    want, full = read(wal_dir, from_lsn, False, system_id)
    assert got == want
    for f in ("status", "rc", "last_lsn", "expected_lsn", "segment", "offset", "path",
              "cut_bytes", "later_segments"):
        if f == "last_lsn" and end.end_hint == "used":
            continue  # records below the start point were not read
        assert getattr(end, f) == getattr(full, f), f
    return end, full


def tree(path) -> dict[str, str]:
    """Every file under path with its content hash (and size)."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---- the C log: writing and using the hint ----------------------------------------------------

def test_clean_close_writes_an_end_hint_naming_the_last_record(wal_dir) -> None:
    written = build_wal(wal_dir, 300, size=100)
    segs = list_segments(wal_dir)
    h = decode_end(open(end_path(wal_dir), "rb").read())
    last_seg, last_path = segs[-1]
    assert h["system_id"] == SYSTEM_ID and h["seg"] == last_seg
    assert h["salt"] == salt_of(last_path) and h["last_lsn"] == written[-1][0]
    recs, _ = read(wal_dir, hint=False)
    assert h["last_off"] == recs[-1][4] and h["end"] == recs[-1][4] + REC_HDR + 100
    lsns = [m[0] for m in h["marks"]]
    offs = [m[1] for m in h["marks"]]
    assert lsns == sorted(set(lsns)) and offs == sorted(set(offs)) and h["marks"]
    by_lsn = {r[0]: r[4] for r in recs}
    assert all(by_lsn[lsn] == off for lsn, off in h["marks"])   # marks are real records
    assert all(last_seg < lsn < h["last_lsn"] for lsn in lsns)


def test_reader_uses_the_hint_and_reads_only_the_end(wal_dir) -> None:
    written = build_wal(wal_dir, 300, size=100)
    end, full = same_as_full_scan(wal_dir, from_lsn=written[-1][0])
    assert end.end_hint == "used" and full.end_hint == "none"
    assert end.status == "clean"
    assert full.bytes_read >= SMALL_SEGMENT          # the zero tail too
    assert end.bytes_read <= SEG_HDR + REC_HDR + 100 + 8192
    # from the start: everything, but still not the zero tail
    end0, full0 = same_as_full_scan(wal_dir, from_lsn=0)
    assert end0.end_hint == "used" and end0.bytes_read < full0.bytes_read
    assert end0.last_lsn == full0.last_lsn == 300


def test_hinted_and_full_reads_agree_from_every_lsn(wal_dir) -> None:
    written = build_wal(wal_dir, 700, size=180)      # several segments
    assert len(list_segments(wal_dir)) > 2
    n = len(written)
    for from_lsn in sorted({0, 1, 2, n - 1, n, n + 1, n + 50, *random.Random(1).sample(
            range(1, n), 60)}):
        end, _ = same_as_full_scan(wal_dir, from_lsn=from_lsn)
        assert end.end_hint == "used"


def test_a_mark_below_from_lsn_bounds_what_is_read(wal_dir) -> None:
    build_wal(wal_dir, 400, size=100, segment_size=1 << 20, sync="end")
    h = decode_end(open(end_path(wal_dir), "rb").read())
    assert len(h["marks"]) >= 2
    mid_lsn, mid_off = h["marks"][len(h["marks"]) // 2]
    end, full = same_as_full_scan(wal_dir, from_lsn=mid_lsn + 3)
    assert end.end_hint == "used"
    assert end.bytes_read <= SEG_HDR + (h["end"] - mid_off) + 8192
    assert full.bytes_read >= 1 << 20


def test_writer_reopen_uses_the_hint_and_removes_it_before_appending(wal_dir) -> None:
    written = build_wal(wal_dir, 300, size=100)
    raw = open(end_path(wal_dir), "rb").read()
    before = decode_end(raw)
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SMALL_SEGMENT)
    try:
        st = w.stats()
        assert st["end_hint"] == "used"
        assert st["open_bytes_read"] < SMALL_SEGMENT // 4
        # nothing appended yet: END still says where the log ends, unchanged
        assert open(end_path(wal_dir), "rb").read() == raw
        assert st["next_lsn"] == len(written) + 1 and st["seg_end"] == before["end"]
        assert w.append(codec.DELETE, b"after") == len(written) + 1
        assert not os.path.exists(end_path(wal_dir))   # gone before that append
    finally:
        w.close()
    after = decode_end(open(end_path(wal_dir), "rb").read())
    assert after["last_lsn"] == len(written) + 1 and after["last_off"] == before["end"]
    assert after["marks"][:len(before["marks"])] == before["marks"]   # carried over
    got, end, _ = read_wal(wal_dir)
    assert [r[0] for r in got] == list(range(1, len(written) + 2)) and end.status == "clean"


def test_no_end_hint_without_a_record_in_the_segment(wal_dir) -> None:
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SMALL_SEGMENT)
    w.close()
    assert not os.path.exists(end_path(wal_dir))
    assert read(wal_dir)[1].status == "clean"


def test_a_failing_end_write_leaves_no_end_and_close_succeeds(wal_dir) -> None:
    from walstate import _hooks
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SMALL_SEGMENT)
    w.append(codec.DELETE, b"x")
    w.sync()
    _hooks.fault("rename", 1, persistent=True)
    try:
        w.close()
    finally:
        _hooks.clear()
    assert not os.path.exists(end_path(wal_dir))
    assert not os.path.exists(end_path(wal_dir) + ".tmp")
    assert read(wal_dir)[1].last_lsn == 1


def test_an_end_that_cannot_be_removed_fails_the_first_append(wal_dir) -> None:
    from walstate import _hooks
    build_wal(wal_dir, 5)
    raw = open(end_path(wal_dir), "rb").read()
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SMALL_SEGMENT)
    _hooks.fault("unlink", 1, persistent=True)
    try:
        with pytest.raises(OSError):
            w.append(codec.DELETE, b"refused")
    finally:
        _hooks.clear()
    assert open(end_path(wal_dir), "rb").read() == raw  # nothing appended, END intact
    assert w.append(codec.DELETE, b"now") == 6  # the next append removes it first
    assert not os.path.exists(end_path(wal_dir))
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert [r[0] for r in got] == [1, 2, 3, 4, 5, 6] and end.status == "clean"


def test_a_writable_open_that_appends_nothing_leaves_the_hint(wal_dir) -> None:
    build_wal(wal_dir, 20, size=80)
    raw = open(end_path(wal_dir), "rb").read()
    for _ in range(3):
        w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SMALL_SEGMENT)
        assert w.stats()["end_hint"] == "used"
        w.sync()  # nothing to sync: no append, END stays
        w.close()
        assert open(end_path(wal_dir), "rb").read() == raw


def test_cut_removes_the_hint_first(wal_dir) -> None:
    from walstate.wal import cut
    written = build_wal(wal_dir, 10, size=50)
    recs, _ = read(wal_dir, hint=False)
    cut(str(wal_dir), recs[5][3], recs[5][4])
    assert not os.path.exists(end_path(wal_dir))
    got, end = read(wal_dir)
    assert [r[0] for r in got] == [r[0] for r in written[:5]] and end.end_hint == "none"


# ---- hints that do not match ------------------------------------------------------------------

def test_a_stale_hint_after_appends_is_ignored(wal_dir) -> None:
    written = build_wal(wal_dir, 50, size=60)
    stale = open(end_path(wal_dir), "rb").read()
    more = build_wal(wal_dir, 5, size=60)            # an END-unaware writer would do this
    open(end_path(wal_dir), "wb").write(stale)
    end, _ = same_as_full_scan(wal_dir, from_lsn=40)
    assert end.end_hint == "ignored" and end.last_lsn == len(written) + len(more)
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SMALL_SEGMENT)
    try:
        assert w.stats()["end_hint"] == "ignored"
        assert w.stats()["next_lsn"] == len(written) + len(more) + 1
    finally:
        w.close()


def test_a_stale_hint_naming_an_older_segment_is_ignored(wal_dir) -> None:
    build_wal(wal_dir, 20, size=60)
    stale = open(end_path(wal_dir), "rb").read()
    build_wal(wal_dir, 600, size=200)                # rotates: the hinted segment is old
    assert len(list_segments(wal_dir)) > 1
    open(end_path(wal_dir), "wb").write(stale)
    end, _ = same_as_full_scan(wal_dir, from_lsn=10)
    assert end.end_hint == "ignored" and end.last_lsn == 620


def test_a_hint_with_garbage_after_its_end_is_ignored(wal_dir) -> None:
    written = build_wal(wal_dir, 20, size=60)
    h = decode_end(open(end_path(wal_dir), "rb").read())
    seg = list_segments(wal_dir)[-1][1]
    for at in (h["end"], h["end"] + 4000, h["end"] + 8191):
        shutil.copy(seg, seg + ".orig")
        corrupt(seg, at, "garbage", 1)
        end, full = same_as_full_scan(wal_dir, from_lsn=15)
        assert end.end_hint == "ignored" and end.status == full.status == "torn"
        os.replace(seg + ".orig", seg)
    assert read(wal_dir)[1].end_hint == "used" and written


@pytest.mark.parametrize("lie", ["salt", "end_past_file", "end_early", "end_late", "last_lsn",
                                 "last_off", "seg_missing", "seg_older", "mark_off", "mark_lsn",
                                 "marks_unsorted", "too_many_marks", "version", "system_id",
                                 "earlier_record"])
def test_a_lying_hint_with_a_valid_crc_is_ignored(wal_dir, lie) -> None:
    build_wal(wal_dir, 700, size=100)                # 2 segments
    segs = list_segments(wal_dir)
    assert len(segs) == 2
    h = decode_end(open(end_path(wal_dir), "rb").read())
    recs, _ = read(wal_dir, hint=False)
    last = [r for r in recs if r[3] == h["seg"]]
    args = dict(system_id=h["system_id"], seg=h["seg"], salt=h["salt"], end=h["end"],
                last_lsn=h["last_lsn"], last_off=h["last_off"], marks=list(h["marks"]))
    kw = {}
    if lie == "salt":
        args["salt"] ^= 1
    elif lie == "end_past_file":
        args["end"] = SMALL_SEGMENT + 100
    elif lie == "end_early":
        args["end"] -= 1
    elif lie == "end_late":
        args["end"] += 1
    elif lie == "last_lsn":
        args["last_lsn"] -= 1
    elif lie == "last_off":
        args["last_off"] = last[-2][4]
    elif lie == "seg_missing":
        args["seg"] += 1
    elif lie == "seg_older":
        args["seg"], args["salt"] = segs[0][0], salt_of(segs[0][1])
    elif lie == "mark_off":
        args["marks"][0] = (args["marks"][0][0], args["marks"][0][1] + 1)
    elif lie == "mark_lsn":
        args["marks"][0] = (args["marks"][0][0] + 1, args["marks"][0][1])
    elif lie == "marks_unsorted":
        args["marks"] = [args["marks"][1], args["marks"][0], *args["marks"][2:]]
    elif lie == "too_many_marks":
        args["marks"] = [(h["seg"] + 1 + i, 100 + i) for i in range(65)]
    elif lie == "version":
        kw["version"] = 2
    elif lie == "system_id":
        args["system_id"] ^= 2
    elif lie == "earlier_record":   # a consistent hint, but records follow it
        prev = last[-4]
        args.update(end=prev[4] + REC_HDR + len(prev[2]), last_lsn=prev[0], last_off=prev[4],
                    marks=[m for m in args["marks"] if m[0] < prev[0]])
    data = encode_end(args["system_id"], args["seg"], args["salt"], args["end"],
                      args["last_lsn"], args["last_off"], args["marks"], **kw)
    open(end_path(wal_dir), "wb").write(data)
    from_lsn = h["marks"][1][0] + 1 if lie.startswith("mark") else h["last_lsn"] - 2
    end, full = same_as_full_scan(wal_dir, from_lsn=from_lsn, system_id=SYSTEM_ID)
    assert end.status == "clean" and end.last_lsn == full.last_lsn == h["last_lsn"]
    if lie not in ("mark_off", "mark_lsn"):     # a wrong mark below the start is harmless
        assert end.end_hint == "ignored", lie
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SMALL_SEGMENT)
    try:
        assert w.stats()["next_lsn"] == h["last_lsn"] + 1
        # an ignored hint goes at open; a used one stays until the first append
        assert os.path.exists(end_path(wal_dir)) == (w.stats()["end_hint"] == "used")
        w.append(codec.DELETE, b"after")
        assert not os.path.exists(end_path(wal_dir))
    finally:
        w.close()


def test_garbage_end_files_are_ignored(wal_dir) -> None:
    build_wal(wal_dir, 30, size=60)
    good = open(end_path(wal_dir), "rb").read()
    rng = random.Random(7)
    variants = [b"", b"WALSTEND", good[:-1], good + b"\0", rng.randbytes(len(good)),
                rng.randbytes(5000), bytes(len(good))]
    for i in range(len(good)):                       # every single-bit flip
        b = bytearray(good)
        b[i] ^= 1 << (i % 8)
        variants.append(bytes(b))
    for v in variants:
        open(end_path(wal_dir), "wb").write(v)
        end, _ = same_as_full_scan(wal_dir, from_lsn=25)
        assert end.end_hint == "ignored" and end.status == "clean" and end.last_lsn == 30
    os.mkdir(end_path(wal_dir) + "x")                # an unreadable END: a directory
    os.unlink(end_path(wal_dir))
    os.rename(end_path(wal_dir) + "x", end_path(wal_dir))
    end, _ = same_as_full_scan(wal_dir, from_lsn=25)
    assert end.end_hint == "ignored"
    os.rmdir(end_path(wal_dir))
    open(end_path(wal_dir), "wb").write(good)
    assert read(wal_dir, 25)[1].end_hint == "used"


# ---- the engine -------------------------------------------------------------------------------

def fill(path, n=2000, **opts):
    opts.setdefault("segment_size", 1 << 20)
    with walstate.open(path, sync="none", **opts) as db:
        for i in range(n):
            db.put(b"k%06d" % i, b"v" * 100)
        db.checkpoint()
    return n


def test_engine_reopen_after_a_clean_close_uses_the_hint(tmp_path) -> None:
    path = str(tmp_path / "db")
    n = fill(path)
    wal = os.path.join(path, "wal")
    assert os.path.exists(end_path(wal))
    raw = open(end_path(wal), "rb").read()
    for _ in range(3):                               # reopens without writes keep using it
        with walstate.open(path) as db:
            rec = db.info()["recovery"]
            assert rec["end_hint"] == "used" and rec["end"] == "clean"
            assert rec["wal_bytes_read"] < (1 << 20) // 8
            assert db._wal.stats()["end_hint"] == "used"
            assert db._wal.stats()["open_bytes_read"] < (1 << 20) // 8
            assert db.get(b"k%06d" % (n - 1)) == b"v" * 100
            # a session that only reads writes nothing: END and the log unchanged
            assert db.stats()["wal_records"] == 0
            assert open(end_path(wal), "rb").read() == raw
        assert open(end_path(wal), "rb").read() == raw
    with walstate.open(path) as db:  # the first write removes END, then writes
        db.put(b"k%06d" % 0, b"w")
        assert not os.path.exists(end_path(wal))
    assert os.path.exists(end_path(wal))
    with walstate.open(path, recovery="strict") as db:   # strict reads every byte
        rec = db.info()["recovery"]
        assert rec["end_hint"] == "none" and rec["wal_bytes_read"] >= 1 << 20
        assert db._wal.stats()["end_hint"] == "used"      # after recovery checked it all
        db.put(b"new", b"1")
    with walstate.open(path) as db:
        assert db.get(b"new") == b"1" and db.info()["recovery"]["end_hint"] == "used"


def test_read_only_open_uses_the_hint_and_changes_nothing(tmp_path) -> None:
    path = str(tmp_path / "db")
    fill(path)
    before = tree(path)
    with walstate.open(path, read_only=True) as db:
        assert db.info()["recovery"]["end_hint"] == "used"
        assert db.get(b"k000001") == b"v" * 100
    assert tree(path) == before
    assert os.path.exists(end_path(os.path.join(path, "wal")))


CHILD = """
import sys, walstate
path = sys.argv[1]
db = walstate.open(path, sync="always", segment_size=1 << 20)
db.put(b"second", b"2")
db.close()
"""


@pytest.mark.parametrize("point", ["end_hint_after_remove", "end_hint_before_rename"])
def test_sigkill_around_the_hint(tmp_path, point) -> None:
    """Killed right after the writable open removed END (before its first
    append), or while close writes it (END.tmp left)."""
    path = str(tmp_path / "db")
    fill(path, 500)
    env = dict(os.environ, WALSTATE_KILLPOINT=point)
    p = subprocess.run([sys.executable, "-c", CHILD, path], env=env)
    assert p.returncode == -9
    wal = os.path.join(path, "wal")
    assert not os.path.exists(end_path(wal))
    with walstate.open(path) as db:
        rec = db.info()["recovery"]
        assert rec["end_hint"] == "none"
        assert db.get(b"k000499") == b"v" * 100
        if point == "end_hint_before_rename":
            assert db.get(b"second") == b"2"
        assert not os.path.exists(end_path(wal) + ".tmp")
        db.put(b"third", b"3")
    with walstate.open(path) as db:
        assert db.info()["recovery"]["end_hint"] == "used"
        assert db.get(b"third") == b"3"


def test_writes_after_a_stale_hint_are_recovered(tmp_path) -> None:
    """An END restored over a log that went on (an END-unaware writer, or a
    bad copy) is detected: every acknowledged write comes back."""
    path = str(tmp_path / "db")
    fill(path, 300)
    wal = os.path.join(path, "wal")
    stale = open(end_path(wal), "rb").read()
    db = walstate.open(path, sync="always", segment_size=1 << 20)
    for i in range(50):
        db.put(b"late%03d" % i, b"x" * 50)
    open(end_path(wal), "wb").write(stale)
    db._abandon()                                    # a crash: no close
    with walstate.open(path) as db:
        assert db.info()["recovery"]["end_hint"] == "ignored"
        assert all(db.get(b"late%03d" % i) == b"x" * 50 for i in range(50))


def test_copies_of_the_directory_at_each_step_open_with_everything_acknowledged(tmp_path):
    """Copies (a backup tool's, or what a power cut could leave when everything
    was synced) taken while closed, while open after the hint was removed, after
    synced writes, and mixes of an old END with newer segments."""
    path = str(tmp_path / "db")
    fill(path, 200, segment_size=64 * 1024)
    wal = os.path.join(path, "wal")
    copies = {"closed": shutil.copytree(path, str(tmp_path / "c-closed"), ignore=not_files)}
    stale_end = open(end_path(wal), "rb").read()
    db = walstate.open(path, sync="always", segment_size=64 * 1024)
    lock_pattern = shutil.ignore_patterns("LOCK")

    def no_lock(d, names):
        return lock_pattern(d, names) | not_files(d, names)
    copies["open"] = shutil.copytree(path, str(tmp_path / "c-open"), ignore=no_lock)
    acked = {}
    for i in range(120):                             # crosses segments
        db.put(b"a%03d" % i, b"y" * 1000)
        acked[b"a%03d" % i] = b"y" * 1000
        if i in (5, 119):
            c = shutil.copytree(path, str(tmp_path / f"c-{i}"), ignore=no_lock)
            copies[f"after{i}"] = c
            # the same copy with the END of the earlier close restored
            m = shutil.copytree(c, c + "-stale", ignore=not_files)
            open(end_path(os.path.join(m, "wal")), "wb").write(stale_end)
            copies[f"after{i}-stale"] = m
    db.close()
    copies["closed2"] = shutil.copytree(path, str(tmp_path / "c-closed2"), ignore=not_files)
    for name, c in copies.items():
        upto = 6 if name.startswith("after5") else 120 if name.startswith("after119") or \
            name == "closed2" else 0
        with walstate.open(c) as d:
            assert d.get(b"k000199") == b"v" * 100, name
            for i in range(upto):
                assert d.get(b"a%03d" % i) == b"y" * 1000, (name, i)
            hint = d.info()["recovery"]["end_hint"]
            if name.endswith("-stale"):
                assert hint == "ignored", name
            elif name.startswith("closed"):
                assert hint == "used", name
        with walstate.open(c) as d:                  # and again, after a clean close
            assert d.info()["recovery"]["end_hint"] == "used", name
            assert all(d.get(k) == v for k, v in list(acked.items())[:upto]), name


def small_workload(db, rng) -> None:
    for _ in range(rng.randrange(5, 30)):
        db.put(b"key%03d" % rng.randrange(40), rng.randbytes(rng.choice((10, 300, 3000))))
        if rng.random() < 0.1:
            db.checkpoint()


def test_power_loss_around_the_hint(tmp_path) -> None:
    """Simulated power cuts through an open that finds END (and removes it)
    and a close that writes it, chained: some runs start from a crash state."""
    if sys.platform != "linux" or shutil.which("gcc") is None:
        pytest.skip("the tracer is an LD_PRELOAD library built with gcc")
    from walstate.testing import crash_check
    start = str(tmp_path / "start")
    with walstate.open(start, segment_size=64 * 1024) as db:
        for i in range(20):
            db.put(b"key%03d" % i, b"v%d" % i)
    assert os.path.exists(end_path(os.path.join(start, "wal")))
    res = crash_check(small_workload, runs=3, seed=11, states_per_run=16,
                      workdir=str(tmp_path), start=start, recovery_kill_every=0)
    assert res.ok, res.summary()
    assert res.crash_states >= 30
