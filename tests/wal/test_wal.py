"""The C write-ahead log through walstate.wal: round trips, how a damaged log
ends (clean / torn / corruption), segments, cut, concurrency, group commit,
fault injection and kill points."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import crc32c as oracle
import pytest
from conftest import SMALL_SEGMENT, SYSTEM_ID, build_wal, corrupt, payload_for, read_wal

from walstate import codec
from walstate._native import ffi, lib
from walstate.errors import (
    ClosedError,
    CorruptionError,
    DiskFullError,
    EngineFailedError,
    MismatchError,
)
from walstate.wal import Wal, WalReader, cut, list_segments, segment_name

REC_HDR = 28
SEG_HDR = 64


def open_wal(d, **kw) -> Wal:
    kw.setdefault("system_id", SYSTEM_ID)
    kw.setdefault("segment_size", SMALL_SEGMENT)
    return Wal(str(d), **kw)


def offsets(written, first_off: int = SEG_HDR) -> list[int]:
    """Byte offsets of records packed into one segment from ``first_off``."""
    out, off = [], first_off
    for _, _, p in written:
        out.append(off)
        off += REC_HDR + len(p)
    return out


# ---- round trip ---------------------------------------------------------------

def mixed_ops(n: int):
    """(type, payload, decoded ops) of PUT / DELETE / BATCH records."""
    out = []
    for i in range(n):
        key = b"key-%d" % i
        if i % 3 == 0:
            value = payload_for(i, 20 + i % 50)
            payload = struct.pack("<H", len(key)) + key + value
            out.append((codec.PUT, payload, [(key, value)], (key, value)))
        elif i % 3 == 1:
            out.append((codec.DELETE, key, [(key, None)], None))
        else:
            ops = [(b"b%d" % j, None if j % 2 else b"v" * j) for j in range(i % 7 + 1)]
            out.append((codec.BATCH, codec.encode_batch(ops), ops, None))
    return out


@pytest.mark.parametrize("style", ["sync_each", "sync_end", "close_only"])
def test_round_trip_in_every_sync_style(wal_dir, style) -> None:
    ops = mixed_ops(300)
    w = open_wal(wal_dir)
    lsns = []
    for rtype, payload, _, kv in ops:
        lsn = w.put(*kv) if kv else w.append(rtype, payload)
        lsns.append(lsn)
        if style == "sync_each":
            assert w.sync() == lsn
            assert w.stats()["durable_lsn"] == lsn
    if style == "sync_end":
        assert w.sync() == lsns[-1]
    w.close()
    assert lsns == list(range(1, len(ops) + 1))

    got, end, recs = read_wal(wal_dir, system_id=SYSTEM_ID)
    assert end.status == "clean" and end.rc == 0
    assert end.last_lsn == len(ops)
    assert [(r.lsn, r.type, r.payload) for r in recs] == [
        (lsn, t, p) for lsn, (t, p, _, _) in zip(lsns, ops, strict=True)]
    for r, (_, _, decoded, _) in zip(recs, ops, strict=True):
        assert list(codec.decode(r.type, r.payload)) == decoded
    if style == "sync_each":
        assert [r.synced_lsn for r in recs] == [lsn - 1 for lsn in lsns]
    else:
        assert {r.synced_lsn for r in recs} == {0}


def test_reader_from_lsn_skips_earlier_records(wal_dir) -> None:
    written = build_wal(wal_dir, 50, size=300, segment_size=4096)
    for start in (1, 2, 17, 49, 50, 51):
        got, end, _ = read_wal(wal_dir, from_lsn=start)
        assert got == written[start - 1:]
        assert end.status == "clean"


def test_use_after_close_is_a_clear_error(wal_dir) -> None:
    w = open_wal(wal_dir)
    w.close()
    w.close()  # idempotent
    for call in (lambda: w.put(b"k", b"v"), lambda: w.append(codec.DELETE, b"k"), w.sync,
                 w.flush, w.stats):
        with pytest.raises(ClosedError):
            call()


def test_bad_arguments_raise_value_error(wal_dir) -> None:
    w = open_wal(wal_dir)
    with pytest.raises(ValueError):
        w.append(0, b"type 0 is invalid")
    with pytest.raises(ValueError):
        w.put(b"", b"empty key")
    assert w.put(b"k", b"v") == 1, "a refused record does not consume an LSN"
    w.close()
    with pytest.raises(ValueError):
        open_wal(wal_dir, segment_size=100)


# ---- torn tails ---------------------------------------------------------------

def test_truncated_last_record_at_every_offset_recovers_prefix(wal_dir) -> None:
    """Zeros after the last record at every byte: a torn tail or a clean end. The
    same bytes with the file cut short there instead (a truncate, a partial copy:
    no crash makes a segment shorter than its header's size) are damage: the
    records before are read, and the end says the segment is cut short."""
    written = build_wal(wal_dir, 4, size=40, sync="each")
    path = wal_dir / segment_name(1)
    pristine = path.read_bytes()
    start = offsets(written)[-1]
    reclen = REC_HDR + 40
    for k in range(reclen + 1):
        kept = pristine[start:start + k]
        for mode in ("truncate", "zero"):
            data = pristine[:start + k]
            if mode == "zero":
                data += bytes(len(pristine) - len(data))
            path.write_bytes(data)
            got, end, _ = read_wal(wal_dir)
            ctx = (k, mode, end)
            if mode == "truncate":
                assert got == (written if k == reclen else written[:3]), ctx
                assert end.status == "error" and end.rc == lib.WAL_ESHORT, ctx
                assert end.offset == (start + reclen if k == reclen else start), ctx
                assert end.segment == 1 and end.path == str(path), ctx
            elif k == reclen:
                assert got == written and end.status == "clean", ctx
            elif any(kept):
                assert got == written[:3], ctx
                assert end.status == "torn", ctx
                assert end.offset == start and end.segment == 1, ctx
                assert end.expected_lsn == 4, ctx
                assert end.cut_bytes == len(kept.rstrip(b"\0")), ctx
                assert end.path == str(path), ctx
            else:
                assert got == written[:3] and end.status == "clean", ctx


def test_zero_filled_record_tail_is_torn(wal_dir) -> None:
    written = build_wal(wal_dir, 5, size=100)
    path = wal_dir / segment_name(1)
    last = offsets(written)[-1]
    corrupt(path, last + REC_HDR, "zero", 100)  # header landed, payload did not
    got, end, _ = read_wal(wal_dir)
    assert got == written[:4]
    header = path.read_bytes()[last:last + REC_HDR]
    assert end.status == "torn" and end.offset == last
    assert end.cut_bytes == len(header.rstrip(b"\0")), "up to the last non-zero byte"


def test_wholly_zeroed_last_record_is_a_clean_end(wal_dir) -> None:
    written = build_wal(wal_dir, 5, size=100)
    corrupt(wal_dir / segment_name(1), offsets(written)[-1], "zero", REC_HDR + 100)
    got, end, _ = read_wal(wal_dir)
    assert got == written[:4] and end.status == "clean" and end.last_lsn == 4


@pytest.mark.parametrize("n", [1, 7, 27, 28, 29, 100, 5000])
def test_garbage_after_last_record_is_torn(wal_dir, n) -> None:
    written = build_wal(wal_dir, 5, size=60)
    end_off = offsets(written)[-1] + REC_HDR + 60
    corrupt(wal_dir / segment_name(1), end_off, "garbage", n, seed=n)
    got, end, _ = read_wal(wal_dir)
    assert got == written
    assert end.status == "torn" and end.offset == end_off and end.cut_bytes == n


def test_garbage_over_last_record_is_torn(wal_dir) -> None:
    written = build_wal(wal_dir, 5, size=60)
    last = offsets(written)[-1]
    corrupt(wal_dir / segment_name(1), last + 10, "garbage", 40)
    got, end, _ = read_wal(wal_dir)
    assert got == written[:4]
    assert end.status == "torn" and end.offset == last


def test_open_on_torn_tail_raises_corruption(wal_dir) -> None:
    written = build_wal(wal_dir, 5, size=60)
    end_off = offsets(written)[-1] + REC_HDR + 60
    corrupt(wal_dir / segment_name(1), end_off, "garbage", 10)
    with pytest.raises(CorruptionError):
        open_wal(wal_dir)
    # nothing was changed by the refused open
    got, end, _ = read_wal(wal_dir)
    assert got == written and end.status == "torn"


# ---- corruption ---------------------------------------------------------------

# byte offsets inside a record: crc, length, lsn, synced_lsn, type, reserved, payload
FIELDS = {"crc": 1, "length": 5, "lsn": 9, "synced_lsn": 17, "type": 24, "reserved": 26,
          "payload": 40}


@pytest.mark.parametrize("field", FIELDS)
def test_bad_record_before_durable_records_is_corruption(wal_dir, field) -> None:
    written = build_wal(wal_dir, 10, size=40, sync="each")
    path = wal_dir / segment_name(1)
    bad = offsets(written)[3]
    corrupt(path, bad + FIELDS[field], "flip", bit=3)
    got, end, _ = read_wal(wal_dir)
    assert got == written[:3]
    assert end.status == "error" and end.rc == lib.WAL_ECORRUPT
    assert end.path == str(path)
    assert end.offset == bad and end.segment == 1 and end.expected_lsn == 4
    with pytest.raises(CorruptionError) as ei:
        end.raise_error()
    assert ei.value.path == str(path) and ei.value.offset == bad and ei.value.lsn == 4
    assert f"offset {bad}" in str(ei.value)


def test_bad_last_record_is_torn(wal_dir) -> None:
    written = build_wal(wal_dir, 10, size=40, sync="each")
    last = offsets(written)[-1]
    corrupt(wal_dir / segment_name(1), last + 40, "flip")
    got, end, _ = read_wal(wal_dir)
    assert got == written[:9] and end.status == "torn" and end.offset == last


def test_bad_record_before_records_that_never_knew_it_durable_is_torn(wal_dir) -> None:
    """The synced_lsn rule: valid records after a bad one prove corruption only if
    they were written after the bad one was synced; without any sync they may be
    the rest of a write the crash tore, so it is a torn tail."""
    written = build_wal(wal_dir, 10, size=40, sync="close")
    bad = offsets(written)[3]
    corrupt(wal_dir / segment_name(1), bad + 40, "flip")
    got, end, _ = read_wal(wal_dir)
    assert got == written[:3]
    assert end.status == "torn" and end.offset == bad


def test_bad_record_in_a_non_last_segment_is_corruption(wal_dir) -> None:
    written = build_wal(wal_dir, 40, size=500, segment_size=4096, sync="close")
    segs = list_segments(wal_dir)
    assert len(segs) >= 3
    first2 = [w for w in written if segs[1][0] <= w[0] < segs[2][0]]
    bad = offsets(first2)[2]
    corrupt(segs[1][1], bad + 100, "flip")
    got, end, _ = read_wal(wal_dir)
    assert got == written[:first2[2][0] - 1]
    assert end.status == "error" and end.rc == lib.WAL_ECORRUPT
    assert end.path == segs[1][1] and end.offset == bad and end.segment == segs[1][0]
    assert end.later_segments == len(segs) - 2


def test_segment_of_another_system_id_is_rejected(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    wa = build_wal(a, 40, size=500, segment_size=4096, system_id=SYSTEM_ID)
    build_wal(b, 40, size=500, segment_size=4096, system_id=SYSTEM_ID + 1)
    # reading with another system_id
    got, end, _ = read_wal(a, system_id=SYSTEM_ID + 1)
    assert got == [] and end.status == "error" and end.rc == lib.WAL_EMISMATCH
    assert end.found_system_id == SYSTEM_ID
    with pytest.raises(MismatchError, match=str(SYSTEM_ID)):
        end.raise_error()
    with pytest.raises(MismatchError):
        open_wal(a, system_id=SYSTEM_ID + 1, segment_size=4096)
    # a segment copied in from another data directory, same name and LSNs
    segs_a, segs_b = list_segments(a), list_segments(b)
    assert [s for s, _ in segs_a] == [s for s, _ in segs_b]
    Path(segs_a[1][1]).write_bytes(Path(segs_b[1][1]).read_bytes())
    got, end, _ = read_wal(a, system_id=SYSTEM_ID)
    assert got == wa[:segs_a[1][0] - 1]
    assert end.status == "error" and end.rc == lib.WAL_EMISMATCH
    assert end.path == segs_a[1][1] and end.found_system_id == SYSTEM_ID + 1


def test_missing_middle_segment_is_corruption(wal_dir) -> None:
    written = build_wal(wal_dir, 40, size=500, segment_size=4096)
    segs = list_segments(wal_dir)
    assert len(segs) >= 4
    os.unlink(segs[1][1])
    got, end, _ = read_wal(wal_dir)
    assert got == written[:segs[1][0] - 1]
    assert end.status == "error" and end.rc == lib.WAL_ECORRUPT
    assert end.path == segs[2][1] and end.offset == 0 and end.expected_lsn == segs[1][0]


def test_first_segment_above_from_lsn_is_a_gap(wal_dir) -> None:
    written = build_wal(wal_dir, 40, size=500, segment_size=4096)
    segs = list_segments(wal_dir)
    os.unlink(segs[0][1])
    got, end, _ = read_wal(wal_dir, from_lsn=1)
    assert got == [] and end.status == "error" and end.rc == lib.WAL_EGAP
    with pytest.raises(MismatchError):
        end.raise_error()
    got, end, _ = read_wal(wal_dir, from_lsn=segs[1][0])
    assert got == written[segs[1][0] - 1:] and end.status == "clean"


def test_unknown_format_version_is_rejected(wal_dir) -> None:
    build_wal(wal_dir, 3)
    path = wal_dir / segment_name(1)
    b = bytearray(path.read_bytes())
    struct.pack_into("<I", b, 8, 2)
    struct.pack_into("<I", b, 60, oracle.crc32c(bytes(b[:60])))
    path.write_bytes(b)
    got, end, _ = read_wal(wal_dir)
    assert got == [] and end.status == "error" and end.rc == lib.WAL_EVERSION


@pytest.mark.parametrize("where", [0, 8, 16, 24, 40, 48, 60])
def test_bad_segment_header_is_corruption(wal_dir, where) -> None:
    build_wal(wal_dir, 3)
    corrupt(wal_dir / segment_name(1), where, "flip", bit=1)
    got, end, _ = read_wal(wal_dir)
    assert got == [] and end.status == "error" and end.rc == lib.WAL_ECORRUPT
    assert end.offset == 0 and end.path == str(wal_dir / segment_name(1))


# ---- segments -------------------------------------------------------------------

def test_segment_rollover(wal_dir) -> None:
    written = build_wal(wal_dir, 400, size=1000, sync="close")
    segs = list_segments(wal_dir)
    assert len(segs) >= 6
    got, end, recs = read_wal(wal_dir)
    assert got == written and end.status == "clean" and end.segments == len(segs)
    firsts = [s for s, _ in segs]
    for (first, path), nxt in zip(segs, [*firsts[1:], None], strict=True):
        assert Path(path).name == segment_name(first)
        assert os.path.getsize(path) == SMALL_SEGMENT
        inside = [r for r in recs if r.segment == first]
        assert inside[0].lsn == first and inside[0].offset == SEG_HDR
        if nxt is not None:
            assert inside[-1].lsn == nxt - 1
        for r in inside:  # a record never straddles a segment boundary
            assert r.offset + REC_HDR + len(r.payload) <= SMALL_SEGMENT


def test_oversized_record_gets_one_oversized_segment(wal_dir) -> None:
    big = payload_for(7, 1 << 20)
    w = open_wal(wal_dir)
    assert w.append(codec.DELETE, b"small-1") == 1
    assert w.append(codec.DELETE, big) == 2
    assert w.append(codec.DELETE, b"small-3") == 3
    w.close()
    segs = list_segments(wal_dir)
    assert [s for s, _ in segs] == [1, 2, 3]
    assert os.path.getsize(segs[1][1]) == SEG_HDR + REC_HDR + len(big)
    assert os.path.getsize(segs[2][1]) == SMALL_SEGMENT
    got, end, recs = read_wal(wal_dir)
    assert [p for _, _, p in got] == [b"small-1", big, b"small-3"]
    assert [r.segment for r in recs] == [1, 2, 3]
    assert end.status == "clean"
    w = open_wal(wal_dir)  # reopening after it works and continues
    assert w.append(codec.DELETE, big) == 4
    w.close()
    assert [r[0] for r in read_wal(wal_dir)[0]] == [1, 2, 3, 4]


def test_lsn_jump_via_min_next_lsn(wal_dir) -> None:
    written = build_wal(wal_dir, 5)
    w = open_wal(wal_dir, min_next_lsn=100)
    assert w.append(codec.DELETE, b"after-jump") == 100
    w.close()
    w = open_wal(wal_dir, min_next_lsn=50)  # below next: no effect
    assert w.append(codec.DELETE, b"continues") == 101
    w.close()
    assert [s for s, _ in list_segments(wal_dir)] == [1, 100]
    got, end, _ = read_wal(wal_dir)
    assert got == [*written, (100, codec.DELETE, b"after-jump"), (101, codec.DELETE, b"continues")]
    assert end.status == "clean"
    got, end, _ = read_wal(wal_dir, from_lsn=7)
    assert [g[0] for g in got] == [100, 101] and end.status == "clean"


def test_fresh_log_starts_at_min_next_lsn(wal_dir) -> None:
    w = open_wal(wal_dir, min_next_lsn=1000)
    assert w.put(b"k", b"v") == 1000
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert [g[0] for g in got] == [1000] and end.status == "clean"


# ---- cut ------------------------------------------------------------------------

def test_cut_keeps_the_bytes_and_the_log_reopens(wal_dir) -> None:
    written = build_wal(wal_dir, 5, size=60)
    path = wal_dir / segment_name(1)
    end_off = offsets(written)[-1] + REC_HDR + 60
    garbage = corrupt(path, end_off, "garbage", 123)
    _, end, _ = read_wal(wal_dir)
    assert end.status == "torn"
    assert cut(str(wal_dir), end.segment, end.offset) == end.cut_bytes == 123
    broken = wal_dir / f"{segment_name(1)}.{end_off}.broken"
    assert broken.read_bytes() == garbage
    assert path.read_bytes()[end_off:] == bytes(os.path.getsize(path) - end_off)
    got, end, _ = read_wal(wal_dir)
    assert got == written and end.status == "clean"
    w = open_wal(wal_dir)
    assert w.append(codec.DELETE, b"after-cut") == 6
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert got == [*written, (6, codec.DELETE, b"after-cut")] and end.status == "clean"


def test_cut_at_corruption_sets_later_segments_aside(wal_dir) -> None:
    written = build_wal(wal_dir, 40, size=500, segment_size=4096)
    segs = list_segments(wal_dir)
    seg2 = [w for w in written if segs[1][0] <= w[0] < segs[2][0]]
    bad = offsets(seg2)[1]
    corrupt(segs[1][1], bad, "flip")
    _, end, _ = read_wal(wal_dir)
    assert end.status == "error" and end.offset == bad
    sizes = sum(os.path.getsize(p) for _, p in segs[2:])
    nbytes = cut(str(wal_dir), end.segment, end.offset)
    assert nbytes >= sizes + 1
    assert list_segments(wal_dir) == segs[:2]
    for _, p in segs[2:]:
        assert os.path.exists(p + ".broken")
    keep = seg2[0][0]
    got, end, _ = read_wal(wal_dir)
    assert got == written[:keep] and end.status == "clean"
    w = open_wal(wal_dir, segment_size=4096)
    assert w.append(codec.DELETE, b"after-cut") == keep + 1
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert got[-1] == (keep + 1, codec.DELETE, b"after-cut") and end.status == "clean"


def test_cut_at_segment_start_sets_the_whole_segment_aside(wal_dir) -> None:
    written = build_wal(wal_dir, 40, size=500, segment_size=4096)
    segs = list_segments(wal_dir)
    corrupt(segs[1][1], SEG_HDR + 50, "flip")
    _, end, _ = read_wal(wal_dir)
    assert end.status == "error" and end.offset == SEG_HDR and end.segment == segs[1][0]
    cut(str(wal_dir), end.segment, end.offset)
    assert list_segments(wal_dir) == segs[:1]
    got, end, _ = read_wal(wal_dir)
    assert got == written[:segs[1][0] - 1] and end.status == "clean"
    w = open_wal(wal_dir, segment_size=4096)
    w.append(codec.DELETE, b"x" * 500)
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert len(got) == segs[1][0] and end.status == "clean"


# ---- concurrency ----------------------------------------------------------------

def test_threads_get_distinct_increasing_lsns(wal_dir) -> None:
    """8 threads appending + syncing through the C API (one output cell each)."""
    w = open_wal(wal_dir)
    per: dict[int, list[int]] = {}
    errors: list[int] = []

    def run(t: int) -> None:
        cell, dur = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        out = per[t] = []
        for i in range(100):
            p = b"t%d-%d|" % (t, i) + b"." * 200
            rc = lib.wal_append(w._h, codec.DELETE, p, len(p), ffi.NULL, 0, cell)
            rc = rc or lib.wal_sync(w._h, cell[0], dur)
            if rc:
                errors.append(rc)
                return
            assert dur[0] >= cell[0]
            out.append(cell[0])

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    w.close()
    for out in per.values():
        assert out == sorted(out) and len(set(out)) == len(out)
    lsns = [lsn for out in per.values() for lsn in out]
    assert sorted(lsns) == list(range(1, 801))
    got, end, _ = read_wal(wal_dir)
    assert end.status == "clean" and len(list_segments(wal_dir)) >= 3
    disk = {lsn: p for lsn, _, p in got}
    for t, out in per.items():
        for i, lsn in enumerate(out):
            assert disk[lsn].startswith(b"t%d-%d|" % (t, i))


def test_concurrent_put_returns_its_own_lsn(wal_dir) -> None:
    w = open_wal(wal_dir)
    real = w._put
    other: dict[str, int] = {}

    def interleaved(*args):
        # This thread's C call has returned; before it reads its LSN (it needs
        # the GIL back), another thread's put runs to completion.
        rc = real(*args)
        if not other:
            other["lsn"] = 0
            th = threading.Thread(target=lambda: other.update(lsn=w.put(b"b", b"2")))
            th.start()
            th.join()
        return rc

    w._put = interleaved
    mine = w.put(b"a", b"1")
    w.close()
    assert other["lsn"] == 2
    assert mine == 1


def test_group_commit_shares_fsyncs(wal_dir) -> None:
    w = open_wal(wal_dir, segment_size=1 << 24)
    base = w.stats()["fsyncs"]

    def run(t: int) -> None:
        for i in range(200):
            w.put(b"k%d" % t, b"v%d" % i * 10)
            w.sync()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    st = w.stats()
    w.close()
    fsyncs = st["fsyncs"] - base
    assert st["durable_lsn"] == 1600 and st["appends"] == 1600
    assert 0 < fsyncs < 1600 * 3 // 4, f"{fsyncs} fdatasyncs for 1600 synced appends"
    assert sum(st["fsync_hist"]) == st["fsyncs"]


# ---- fault injection ------------------------------------------------------------

def test_eio_on_fdatasync_poisons_the_log(wal_dir, hooks) -> None:
    w = open_wal(wal_dir)
    for i in range(3):
        w.put(b"k%d" % i, b"durable")
    w.sync()
    hooks.fault("fdatasync", 1, errno.EIO)
    lsn = w.put(b"k3", b"not acknowledged")
    with pytest.raises(EngineFailedError):
        w.sync()
    assert w.poisoned() and w.stats()["poisoned"] == -errno.EIO
    assert w.stats()["durable_lsn"] == 3
    with pytest.raises(EngineFailedError):
        w.put(b"k4", b"refused")
    with pytest.raises(EngineFailedError):
        w.sync()
    with pytest.raises(EngineFailedError):
        w.close()
    assert hooks.calls("fdatasync") == 1, "a failed fdatasync is never retried"
    hooks.clear()
    got, end, _ = read_wal(wal_dir)
    assert [g[0] for g in got][:3] == [1, 2, 3] and end.status == "clean"
    w = open_wal(wal_dir)
    nxt = w.put(b"k5", b"after reopen")
    w.sync()
    w.close()
    assert nxt == len(got) + 1 and lsn == 4
    got2, end, _ = read_wal(wal_dir)
    assert got2 == [*got, (nxt, codec.PUT, struct.pack("<H", 2) + b"k5after reopen")]


def test_short_write_poisons_and_leaves_a_torn_tail(wal_dir, hooks) -> None:
    w = open_wal(wal_dir)
    written = []
    for i in range(3):
        p = payload_for(i, 80)
        written.append((w.append(codec.DELETE, p), codec.DELETE, p))
    w.sync()
    hooks.fault("write", 1, 0)
    w.append(codec.DELETE, payload_for(3, 80))
    with pytest.raises(EngineFailedError):
        w.sync()
    assert w.poisoned()
    with pytest.raises(EngineFailedError):
        w.append(codec.DELETE, b"refused")
    with pytest.raises(EngineFailedError):
        w.close()
    hooks.clear()
    got, end, _ = read_wal(wal_dir)
    assert got == written
    assert end.status == "torn" and end.offset == offsets(written)[-1] + REC_HDR + 80
    assert end.cut_bytes == (REC_HDR + 80) // 2
    with pytest.raises(CorruptionError):
        open_wal(wal_dir)
    cut(str(wal_dir), end.segment, end.offset)
    w = open_wal(wal_dir)
    assert w.append(codec.DELETE, b"after cut") == 4
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert got == [*written, (4, codec.DELETE, b"after cut")] and end.status == "clean"


def test_enospc_at_segment_creation_does_not_poison(wal_dir, hooks) -> None:
    w = open_wal(wal_dir, segment_size=4096)
    hooks.fault("fallocate", 1, errno.ENOSPC, persistent=True)
    written = []
    with pytest.raises(DiskFullError) as ei:
        for i in range(100):
            p = payload_for(i, 500)
            written.append((w.append(codec.DELETE, p), codec.DELETE, p))
    assert ei.value.errno == errno.ENOSPC
    assert len(written) == (4096 - SEG_HDR) // (REC_HDR + 500)
    assert hooks.calls("fallocate") == 1
    with pytest.raises(DiskFullError):  # still full: still a clean error
        w.append(codec.DELETE, b"x" * 500)
    assert not w.poisoned() and w.stats()["poisoned"] == 0
    assert [p.name for p in wal_dir.iterdir() if p.name != "LAST"] == [segment_name(1)], \
        "no segment, no .tmp"
    # what was acknowledged before is whole, synced and readable
    assert w.stats()["durable_lsn"] == len(written)
    got, end, _ = read_wal(wal_dir)
    assert got == written and end.status == "clean"
    hooks.clear()
    p = payload_for(99, 500)
    lsn = w.append(codec.DELETE, p)
    assert lsn == len(written) + 1, "the failed appends consumed no LSN"
    written.append((lsn, codec.DELETE, p))
    w.sync()
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert got == written and end.status == "clean"


@pytest.mark.parametrize("op", ["fdatasync", "write"])
def test_enospc_that_poisons_raises_engine_failed(wal_dir, hooks, op) -> None:
    w = open_wal(wal_dir)
    w.put(b"k", b"v")
    w.sync()
    hooks.fault(op, 1, errno.ENOSPC)
    w.put(b"k", b"w")
    try:
        with pytest.raises(EngineFailedError):
            w.sync()
    finally:
        hooks.clear()
        assert w.poisoned()
        with pytest.raises(EngineFailedError):
            w.close()


# ---- removal --------------------------------------------------------------------

def test_remove_below_removes_only_whole_segments_below(wal_dir) -> None:
    w = open_wal(wal_dir, segment_size=4096)
    written = []
    for i in range(70):
        p = payload_for(i, 500)
        written.append((w.append(codec.DELETE, p), codec.DELETE, p))
    w.sync()
    segs = list_segments(wal_dir)
    assert len(segs) >= 8
    assert w.remove_below(0) == (0, 0)
    assert w.remove_below(segs[0][0]) == (0, 0), "segment 1 still holds LSNs above 1"
    size2 = os.path.getsize(segs[0][1]) + os.path.getsize(segs[1][1])
    assert w.remove_below(segs[2][0] - 1) == (size2, 2)
    assert list_segments(wal_dir) == segs[2:]
    size3 = os.path.getsize(segs[2][1])
    assert w.remove_below(segs[3][0]) == (size3, 1)
    assert list_segments(wal_dir) == segs[3:]
    got, end, _ = read_wal(wal_dir, from_lsn=segs[3][0])
    assert got == written[segs[3][0] - 1:] and end.status == "clean"
    # everything below a huge LSN: never the current segment
    _, nsegs = w.remove_below(1 << 60)
    assert nsegs == len(segs) - 4
    assert list_segments(wal_dir) == segs[-1:]
    assert w.stats()["seg_first_lsn"] == segs[-1][0]
    lsn = w.append(codec.DELETE, b"after removal")
    w.close()
    got, end, _ = read_wal(wal_dir, from_lsn=segs[-1][0])
    assert got[-1] == (lsn, codec.DELETE, b"after removal") and end.status == "clean"


def test_remove_below_never_removes_the_only_segment(wal_dir) -> None:
    w = open_wal(wal_dir)
    for i in range(10):
        w.put(b"k", b"v%d" % i)
    assert w.remove_below(1 << 60) == (0, 0)
    w.close()
    assert len(read_wal(wal_dir)[0]) == 10


# ---- kill points ------------------------------------------------------------------

KP_SIZE = 496  # record = 524 bytes: 7 per 4096-byte segment
KP_PER_SEG = (4096 - SEG_HDR) // (REC_HDR + KP_SIZE)

KILL_CHILD = textwrap.dedent("""
    import sys
    import walstate._hooks  # arms WALSTATE_KILLPOINT
    from walstate.wal import Wal
    d, n, remove = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    w = Wal(d, system_id=int(sys.argv[4]), segment_size=4096)
    for i in range(n):
        lsn = w.append(2, (b"%08d" % i) * 62)
        w.sync()
        print(lsn, flush=True)
    if remove:
        w.remove_below(remove)
    w.close()
    print("closed", flush=True)
""")


def kp_payload(i: int) -> bytes:
    return (b"%08d" % i) * 62


def run_child(script: str, args: list[str], env_extra: dict[str, str], cwd,
              timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("point, nth, unreported", [
    ("append_after_write", 5, 1),           # written, the sync never returned
    ("append_after_fdatasync", 5, 1),       # durable, never reported
    ("rotate_after_sync", 1, 0),
    ("rotate_after_create", 1, 0),
    ("segment_create_before_rename", 2, 0),  # the 1st is the log's first segment
    ("segment_create_after_rename", 2, 0),
])
def test_kill_point_leaves_a_readable_prefix(tmp_path, wal_dir, point, nth, unreported) -> None:
    res = run_child(KILL_CHILD, [str(wal_dir), "30", "0", str(SYSTEM_ID)],
                    {"WALSTATE_KILLPOINT": f"{point}:{nth}"}, tmp_path)
    assert res.returncode == -signal.SIGKILL, res.stderr
    reported = [int(x) for x in res.stdout.split()]
    assert reported == list(range(1, len(reported) + 1))
    if point.startswith(("rotate", "segment")):
        assert len(reported) == KP_PER_SEG
    tmps = [p for p in os.listdir(wal_dir) if p.endswith(".seg.tmp")]
    # a next segment's file made ahead (spare-*.tmp) may be there at any point
    spares = [p for p in os.listdir(wal_dir) if p.startswith("spare-") and p.endswith(".tmp")]
    if point == "segment_create_before_rename":  # made here, or made ahead
        assert len(tmps) + len(spares) >= 1 and len(tmps) <= 1
    else:
        assert not tmps
    got, end, _ = read_wal(wal_dir)
    assert end.status == "clean", end
    assert len(got) == len(reported) + unreported
    assert got == [(i + 1, codec.DELETE, kp_payload(i)) for i in range(len(got))]
    # the log reopens where it stopped (a half-created segment's .tmp is removed)
    w = open_wal(wal_dir, segment_size=4096)
    assert w.append(codec.DELETE, b"after kill") == len(got) + 1
    w.close()
    assert not [p for p in os.listdir(wal_dir) if p.endswith(".tmp")]
    got2, end, _ = read_wal(wal_dir)
    assert got2 == [*got, (len(got) + 1, codec.DELETE, b"after kill")]
    assert end.status == "clean"


@pytest.mark.parametrize("point, nth", [("remove_before_unlink", 2),
                                        ("remove_after_fsync", 1)])
def test_kill_during_removal_leaves_a_contiguous_log(tmp_path, wal_dir, point, nth) -> None:
    n, below = 40, 30
    res = run_child(KILL_CHILD, [str(wal_dir), str(n), str(below), str(SYSTEM_ID)],
                    {"WALSTATE_KILLPOINT": f"{point}:{nth}"}, tmp_path)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert [int(x) for x in res.stdout.split()] == list(range(1, n + 1))
    got, end, _ = read_wal(wal_dir)
    assert end.status == "clean"
    first = got[0][0]
    assert got == [(i + 1, codec.DELETE, kp_payload(i)) for i in range(first - 1, n)]
    if point == "remove_before_unlink":
        assert first == KP_PER_SEG + 1, "exactly the oldest segment went"
    else:
        assert first == (below // KP_PER_SEG) * KP_PER_SEG + 1
    w = open_wal(wal_dir, segment_size=4096)
    assert w.append(codec.DELETE, b"after kill") == n + 1
    w.close()


THREADS_CHILD = textwrap.dedent("""
    import sys, threading
    import walstate._hooks  # arms WALSTATE_SYNC_TRACE
    from walstate._native import ffi, lib
    from walstate.wal import Wal
    w = Wal(sys.argv[1], system_id=int(sys.argv[2]), segment_size=65536)
    h, lock = w._h, threading.Lock()
    def run(t):
        # straight to the C layer: one output cell per thread
        cell, dur = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        i = 0
        while True:
            p = (b"t%d-%d|" % (t, i)).ljust(100, b".")
            rc = lib.wal_append(h, 2, p, len(p), ffi.NULL, 0, cell)
            rc = rc or lib.wal_sync(h, cell[0], dur)
            if rc:
                print("error", rc, flush=True)
                return
            with lock:
                sys.stdout.write("%d %d %d\\n" % (cell[0], t, i))
                sys.stdout.flush()
            i += 1
    for t in range(8):
        threading.Thread(target=run, args=(t,), daemon=True).start()
    threading.Event().wait()
""")


def test_sigkill_while_8_threads_sync_loses_no_reported_lsn(tmp_path, wal_dir) -> None:
    trace = tmp_path / "sync.trace"
    env = dict(os.environ, WALSTATE_SYNC_TRACE=str(trace))
    proc = subprocess.Popen([sys.executable, "-c", THREADS_CHILD, str(wal_dir), str(SYSTEM_ID)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(lines) < 1500 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err
    lines += rest.splitlines(keepends=True)
    reported = [tuple(map(int, x.split())) for x in lines if x.endswith("\n")]
    assert len(reported) >= 1500, (len(reported), err)
    lsns = [lsn for lsn, _, _ in reported]
    assert len(set(lsns)) == len(lsns)

    def check_all_reported_present() -> list:
        got, end, _ = read_wal(wal_dir, system_id=SYSTEM_ID)
        assert end.status in ("clean", "torn"), end
        assert [g[0] for g in got] == list(range(1, len(got) + 1))
        disk = {lsn: p for lsn, _, p in got}
        for lsn, t, i in reported:
            assert disk[lsn] == (b"t%d-%d|" % (t, i)).ljust(100, b"."), lsn
        return got

    got = check_all_reported_present()
    assert len(list_segments(wal_dir)) >= 3, "the run should span segment rollovers"
    assert len(got) >= len(reported)

    # power loss: every segment keeps only its fdatasynced prefix
    durable: dict[str, int] = {}
    for line in trace.read_text().splitlines():
        name, off = line.split()
        durable[name] = max(durable.get(name, 0), int(off))
    for _, path in list_segments(wal_dir):
        keep = durable.get(os.path.basename(path), SEG_HDR)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(keep)
            f.write(bytes(size - keep))
    got = check_all_reported_present()
    _, end, _ = read_wal(wal_dir)
    assert end.status == "clean"


def test_reader_survives_a_concurrent_writer(wal_dir) -> None:
    """Reading while appending sees a prefix (clean or torn at the moving end)."""
    w = open_wal(wal_dir, segment_size=4096)
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            w.append(codec.DELETE, payload_for(i, 300))
            w.flush()
            i += 1

    th = threading.Thread(target=write)
    th.start()
    try:
        for _ in range(30):
            with WalReader(str(wal_dir)) as r:
                lsns = [rec.lsn for rec in r]
                end = r.end
            assert lsns == list(range(1, len(lsns) + 1))
            assert end.status in ("clean", "torn"), end
    finally:
        stop.set()
        th.join()
        w.close()


def _spares(d) -> list[str]:
    return sorted(p for p in os.listdir(d) if p.startswith("spare-") and p.endswith(".tmp"))


def test_the_next_segment_is_made_ahead_and_used_at_the_switch(wal_dir) -> None:
    seg = 64 * 1024
    w = open_wal(wal_dir, segment_size=seg)
    payload = b"p" * 1000
    lsn = 0
    while (lsn + 1) * (1000 + 28) < seg // 2 + 2000:  # past half the first segment
        lsn = w.append(codec.DELETE, payload)
    w.flush()
    deadline = time.monotonic() + 10
    while not _spares(wal_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
        lsn = w.append(codec.DELETE, payload)
    spares = _spares(wal_dir)
    assert len(spares) == 1, os.listdir(wal_dir)
    spare = os.path.join(wal_dir, spares[0])
    # allocated and zero-filled, no header: never mistaken for a segment
    with open(spare, "rb") as f:
        assert f.read() == bytes(seg)
    assert w.stats()["segments_created"] == 1
    while w.stats()["segments_created"] == 1:  # fill the first segment: the switch
        lsn = w.append(codec.DELETE, payload)
    assert not os.path.exists(spare)  # renamed into the new segment
    second = [p for _l, p in list_segments(wal_dir)][1]
    assert os.path.getsize(second) == seg
    w.close()
    assert not _spares(wal_dir)  # close removes an unused one
    got, end, _ = read_wal(wal_dir)
    assert end.status == "clean" and [r[0] for r in got] == list(range(1, lsn + 1))


def test_open_removes_a_leftover_spare_and_nothing_else(wal_dir) -> None:
    w = open_wal(wal_dir)
    w.append(codec.DELETE, b"x")
    w.close()
    stale = os.path.join(wal_dir, "spare-0123456789abcdef.tmp")
    other = os.path.join(wal_dir, "spare-notours.tmp")
    for p in (stale, other):
        with open(p, "wb") as f:
            f.write(bytes(4096))
    w = open_wal(wal_dir)
    assert not os.path.exists(stale) and os.path.exists(other)
    assert w.append(codec.DELETE, b"y") == 2
    w.close()
