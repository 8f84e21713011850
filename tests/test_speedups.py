"""walstate._speedups.put: the engine's put in C, falling back to the cffi path
whenever the append would block (full buffer, new segment)."""

from __future__ import annotations

import threading

import walstate
from walstate import _speedups
from walstate._native import lib
from walstate.wal import Wal, WalReader


def test_nowait_put_appends_and_stores_or_says_would_block(tmp_path):
    w = Wal(str(tmp_path), system_id=7, segment_size=8192, buffer_size=4096)
    fn, h = w.nowait_put_args()
    table: dict[bytes, bytes] = {}
    lsn = _speedups.put(fn, h, table, b"a", b"x" * 3000)
    assert lsn == 1 and table == {b"a": b"x" * 3000}
    # the buffer cannot take another 3000 bytes: would block, nothing stored or appended
    assert _speedups.put(fn, h, table, b"b", b"y" * 3000) == lib.WAL_EAGAIN
    assert table == {b"a": b"x" * 3000} and w.stats()["next_lsn"] == 2
    assert w.put(b"b", b"y" * 3000) == 2  # the blocking path flushes and goes on
    assert _speedups.put(fn, h, table, b"", b"v") == lib.WAL_EINVAL
    w.close()
    with WalReader(str(tmp_path), 7, 1) as r:
        assert [x.lsn for x in r] == [1, 2]


def test_engine_puts_through_both_paths_keep_commit_order(tmp_path):
    path = str(tmp_path / "db")
    # a 4 KiB buffer and 8 KiB segments: many appends take the blocking path
    db = walstate.open(path, sync="none", wal_buffer_size=4096, segment_size=8192,
                       max_wal_size=1 << 30)
    lsns: dict[int, list[int]] = {}

    def writer(t: int) -> None:
        got = lsns.setdefault(t, [])
        for i in range(300):
            got.append(db.put(b"k%d" % (i % 50), b"%d-%d-" % (t, i) + b"z" * (i % 700)))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(x for v in lsns.values() for x in v)
    assert len(set(every)) == 1200 and all(v == sorted(v) for v in lsns.values())
    before = dict(db.items())
    db.sync()
    db._abandon()  # recovery replays the log: it must give the same table
    with walstate.open(path) as again:
        assert dict(again.items()) == before
