"""WalReader.iter_batches (replay's bulk path) yields exactly what the record
iterator yields, and ends the same way, on clean, torn and corrupt logs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import SYSTEM_ID, build_wal, corrupt, read_wal

from walstate.wal import WalReader, list_segments


def read_batches(wal_dir: Path, from_lsn: int, max_records: int):
    out = []
    with WalReader(os.fspath(wal_dir), SYSTEM_ID, from_lsn) as r:
        for data, lsns, types, offs, lens in r.iter_batches(max_records):
            assert len(lsns) == len(types) == len(offs) == len(lens) <= max_records
            for lsn, t, o, n in zip(lsns, types, offs, lens, strict=True):
                out.append((lsn, t, data[o:o + n]))
        end = r.end
    return out, end


@pytest.mark.parametrize("max_records", [1, 7, 1000])
@pytest.mark.parametrize("from_lsn", [0, 1, 333, 2000])
def test_batches_equal_records_across_segments(wal_dir: Path, max_records: int,
                                               from_lsn: int) -> None:
    written = build_wal(wal_dir, 900, size=150, sync="end")
    assert len(list_segments(wal_dir)) > 2
    recs, end, _ = read_wal(wal_dir, SYSTEM_ID, from_lsn)
    got, bend = read_batches(wal_dir, from_lsn, max_records)
    assert got == recs == [w for w in written if w[0] >= from_lsn]
    assert (bend.status, bend.last_lsn) == (end.status, end.last_lsn) == ("clean", 900)


@pytest.mark.parametrize("how", ["torn", "corrupt"])
def test_batches_stop_where_records_stop(wal_dir: Path, how: str) -> None:
    build_wal(wal_dir, 300, size=100, sync="each")
    seg = list_segments(wal_dir)[-1][1]
    _, _, recs = read_wal(wal_dir, SYSTEM_ID)
    last_seg = [r for r in recs if r.segment == recs[-1].segment]
    victim = last_seg[-1] if how == "torn" else last_seg[len(last_seg) // 2]
    corrupt(seg, victim.offset + 30, "flip")
    expect, end, _ = read_wal(wal_dir, SYSTEM_ID)
    got, bend = read_batches(wal_dir, 0, 64)
    assert got == expect
    assert (bend.status, bend.rc, bend.offset) == (end.status, end.rc, end.offset)
    assert end.status == ("torn" if how == "torn" else "error")
