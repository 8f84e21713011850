"""ENOSPC for real: the log on a size-limited tmpfs (mounted here; we run as root).

A full disk shows up as a clean DiskFullError when a segment is created
(segments are preallocated, so a record never half-lands), nothing
acknowledged is lost, and appends resume once space is freed.
"""

from __future__ import annotations

import errno
import os

import pytest
from conftest import SYSTEM_ID, payload_for, read_wal

from walstate import codec
from walstate.errors import DiskFullError
from walstate.wal import Wal, list_segments

SEG = 256 * 1024
REC = 1000


def fill(path, nbytes: int | None = None) -> int:
    """Writes a filler file of real (non-zero) data, ``nbytes`` or until the disk is
    full; returns its size."""
    chunk = b"\xa5" * 65536
    written = 0
    with open(path, "wb", buffering=0) as f:
        while nbytes is None or written < nbytes:
            n = len(chunk) if nbytes is None else min(len(chunk), nbytes - written)
            try:
                written += f.write(chunk[:n])
            except OSError as exc:
                if exc.errno != errno.ENOSPC or nbytes is not None:
                    raise
                break
    return written


def test_full_tmpfs_fails_cleanly_at_segment_creation_and_resumes(tmpfs) -> None:
    root = tmpfs("2m")
    wal_dir = root / "wal"
    wal_dir.mkdir()
    filler = root / "filler"
    assert fill(filler, 512 * 1024) == 512 * 1024
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SEG, buffer_size=1 << 16)
    acked = []
    before = w.stats()
    with pytest.raises(DiskFullError) as ei:
        for i in range(10_000):
            before = w.stats()
            p = payload_for(i, REC)
            acked.append((w.append(codec.DELETE, p), codec.DELETE, p))
            if i % 10 == 0:
                w.sync()
    assert ei.value.errno == errno.ENOSPC
    assert len(acked) > 100
    # it failed where a new segment was needed, not inside one
    assert before["seg_end"] + 28 + REC > SEG
    segs = list_segments(wal_dir)
    assert [p.name for p in wal_dir.iterdir()
            if not p.name.endswith(".seg") and p.name != "LAST"] == [], \
        "no half-created segment (.tmp) is left behind"
    assert all(os.path.getsize(p) == SEG for _, p in segs)
    assert not w.poisoned() and w.stats()["poisoned"] == 0
    # still full: still the same clean error, no LSN consumed
    with pytest.raises(DiskFullError):
        w.append(codec.DELETE, payload_for(99_999, REC))
    # every acknowledged record is whole on disk, and synced by the rotation attempt
    assert w.stats()["durable_lsn"] == len(acked)
    got, end, _ = read_wal(wal_dir, system_id=SYSTEM_ID)
    assert got == acked
    assert end.status == "clean"

    os.unlink(filler)
    p = payload_for(len(acked), REC)
    lsn = w.append(codec.DELETE, p)
    assert lsn == len(acked) + 1
    acked.append((lsn, codec.DELETE, p))
    for i in range(300):  # and it goes on across more segments
        p = payload_for(len(acked) + i, REC)
        acked.append((w.append(codec.DELETE, p), codec.DELETE, p))
    w.sync()
    w.close()
    assert len(list_segments(wal_dir)) > len(segs)
    got, end, _ = read_wal(wal_dir, system_id=SYSTEM_ID)
    assert got == acked
    assert end.status == "clean"


def test_open_on_a_full_tmpfs_raises_disk_full_and_leaves_nothing(tmpfs) -> None:
    root = tmpfs("2m")
    wal_dir = root / "wal"
    wal_dir.mkdir()
    filler = root / "filler"
    fill(filler)
    with pytest.raises(DiskFullError):
        Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SEG)
    assert os.listdir(wal_dir) == []
    os.truncate(filler, 0)
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SEG)
    assert w.put(b"k", b"v") == 1
    w.close()
    got, end, _ = read_wal(wal_dir)
    assert [g[0] for g in got] == [1] and end.status == "clean"
