"""walstate._speedups.Hot: the engine's put and get in C, handing over to the
engine's Python paths for everything else (an append that would block, other
key types, errors); encode_batch."""

from __future__ import annotations

import threading
import time

import pytest

import walstate
from walstate import _speedups, codec
from walstate.wal import Wal, WalReader


class Calls:
    """The slow paths and ack of a Hot, recording how they were called."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def slow_put(self, *args: object) -> int:
        self.log.append(("put", *args))
        return -1

    def ack(self, lsn: int) -> int:
        self.log.append(("ack", lsn))
        return lsn

    def slow_get(self, *args: object) -> object:
        self.log.append(("get", *args))
        return "cold"


def test_hot_put_appends_and_stores_or_hands_over_to_the_slow_path(tmp_path):
    w = Wal(str(tmp_path), system_id=7, segment_size=8192, buffer_size=4096)
    c = Calls()
    hot = _speedups.Hot(c.slow_put, c.ack, c.slow_get)
    # not writable yet, and no log: the slow path, with the same arguments
    assert hot.put(b"a", b"x") == -1 and c.log == [("put", b"a", b"x")]
    put, h, sync = w.hot_args()
    hot.set_wal(put, h, sync)
    hot.writable = 1
    c.log.clear()
    assert hot.put(b"a", b"x" * 3000) == 1
    assert hot.table == {b"a": b"x" * 3000} and c.log == []
    assert hot.last_lsn == 1 and hot.puts == 1 and hot.wal_bytes == 28 + 2 + 1 + 3000
    # the buffer cannot take another 3000 bytes: would block, so the slow path;
    # nothing stored or appended here
    assert hot.put(b"b", b"y" * 3000) == -1
    assert c.log == [("put", b"b", b"y" * 3000)]
    assert hot.table == {b"a": b"x" * 3000} and w.stats()["next_lsn"] == 2
    assert w.put(b"b", b"y" * 3000) == 2  # the blocking path flushes and goes on
    c.log.clear()
    # everything out of the ordinary goes to the slow path, which raises there
    for args in [(b"", b"v"), (b"k" * 512, b"v"), (bytearray(b"k"), b"v"), (b"k", "v"),
                 (b"k",), (b"k", b"v", b"w")]:
        assert hot.put(*args) == -1
    assert [x[1:] for x in c.log] == [(b"", b"v"), (b"k" * 512, b"v"), (bytearray(b"k"), b"v"),
                                      (b"k", "v"), (b"k",), (b"k", b"v", b"w")]
    c.log.clear()
    hot.busy = 1  # a Python thread is inside the engine's lock
    assert hot.put(b"c", b"z") == -1 and c.log == [("put", b"c", b"z")]
    hot.busy = 0
    c.log.clear()
    hot.sync_always = 1  # a durable put: appended and fdatasynced here, no ack()
    assert hot.put(b"c", b"z") == 3 and c.log == [] and hot.table[b"c"] == b"z"
    assert w.stats()["durable_lsn"] == 3 and hot.in_sync == 0
    hot.set_wal(put, h, 0)  # without wal_sync: ack() waits instead
    assert hot.put(b"c", b"y") == 4 and c.log == [("ack", 4)]
    hot.set_wal(put, h, sync)
    hot.sync_always = 0
    hot.threshold = hot.wal_bytes - hot.frozen_bytes  # the next put passes it
    c.log.clear()
    assert hot.put(b"d", b"z") == 5 and c.log == [("ack", 5)]
    hot.set_wal(0, 0)
    assert hot.put(b"e", b"z") == -1  # no log: the slow path
    with pytest.raises(ValueError):
        hot.set_wal(0, 0, sync)
    w.close()
    with WalReader(str(tmp_path), 7, 1) as r:
        assert [x.lsn for x in r] == [1, 2, 3, 4, 5]


def test_hot_get_serves_the_table_and_hands_over_the_rest():
    c = Calls()
    hot = _speedups.Hot(c.slow_put, c.ack, c.slow_get)
    hot.table = {b"a": b"1", b"gone": None}
    assert hot.get(b"a") == b"1" and hot.get(b"a", 5) == b"1"
    assert hot.get(b"gone") is None and hot.get(b"gone", 5) == 5  # deleted since the checkpoint
    assert c.log == []
    assert hot.get(b"b", 7) == "cold" and hot.get(bytearray(b"a")) == "cold"
    assert hot.get() == "cold" and hot.get(b"a", 1, 2) == "cold"
    assert c.log == [("get", b"b", 7), ("get", bytearray(b"a")), ("get",), ("get", b"a", 1, 2)]
    hot.table = object()  # not a dict (the engine is closed): the slow path raises
    assert hot.get(b"a") == "cold"
    assert hot.get([]) == "cold"  # unhashable: the slow path says what is wrong
    with pytest.raises(ValueError):
        hot.set_wal(1, 0)


def test_encode_batch_round_trips_through_the_decoder():
    ops = [(b"k1", b"v" * 300), (b"k2", None), (b"k" * 511, b""), (b"x", b"\x00" * 70000)]
    assert _speedups.encode_batch([]) == b"\0\0\0\0"
    assert list(codec.decode(codec.BATCH, _speedups.encode_batch(ops))) == ops
    for bad in [[(b"k", 1)], [(b"", b"v")], [("k", b"v")], [(b"k", b"v", b"w")], [b"k"]]:
        with pytest.raises((TypeError, ValueError)):
            _speedups.encode_batch(bad)
    with pytest.raises(TypeError):
        _speedups.encode_batch(tuple(ops))


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
            if i % 7 == 0:  # the Python paths, interleaved with puts in C
                got.append(db.delete(b"k%d" % ((i + t) % 50)))
            if i % 11 == 0:
                with db.batch() as b:
                    b.put(b"k%d" % ((i + 3) % 50), b"batch-%d-%d" % (t, i))
                    b.delete(b"k%d" % ((i + 5) % 50))
                got.append(b.lsn)  # type: ignore[arg-type]

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(x for v in lsns.values() for x in v)
    assert len(set(every)) == len(every) and all(v == sorted(v) for v in lsns.values())
    before = dict(db.items())
    db.sync()
    db._abandon()  # recovery replays the log: it must give the same table
    with walstate.open(path) as again:
        assert dict(again.items()) == before


def test_sorted_items_orders_like_python_and_refuses_what_it_cannot_sort():
    import random

    rnd = random.Random(5)
    table: dict[bytes, bytes | None] = {}
    for _ in range(70000):  # more than one GIL hold (32768 items) in each phase
        n = rnd.choice([1, 2, 7, 8, 9, 16, 40])
        prefix = rnd.choice([b"", b"user:0000", b"\x00" * 8, b"\xff" * 9])
        table[prefix + rnd.randbytes(n)] = rnd.choice([None, b"", b"v" * rnd.randrange(50)])
    got = _speedups.sorted_items(table)
    assert got == sorted(table.items(), key=lambda kv: kv[0])
    assert _speedups.sorted_items({}) == []
    with pytest.raises(TypeError):
        _speedups.sorted_items({b"a": b"1", "b": b"2"})
    with pytest.raises(TypeError):
        _speedups.sorted_items([(b"a", b"1")])


def test_close_while_durable_puts_wait_for_fdatasync_in_c(tmp_path):
    """Durable puts wait for their fdatasync in C without the GIL; a close from
    another thread must wait for them before the log's handle goes (no crash),
    and every put that returned is there after a reopen."""
    path = str(tmp_path / "db")
    db = walstate.open(path, sync="always")
    acked: dict[int, int] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(5)

    def writer(t: int) -> None:
        started.wait()
        try:
            for i in range(1_000_000):
                db.put(b"t%d-%07d" % (t, i), b"v" * 100)
                acked[t] = i
        except walstate.ClosedError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    started.wait()
    while len(acked) < 4 or min(acked.values()) < 20:
        time.sleep(0.005)
    db.close()
    for t in threads:
        t.join()
    assert not errors, errors
    with walstate.open(path) as again:
        for t, last in acked.items():
            assert again.get(b"t%d-%07d" % (t, last)) == b"v" * 100
            assert again.get(b"t%d-%07d" % (t, 0)) == b"v" * 100


def test_batch_ops_collect_operations_and_hand_over_the_rest():
    c = Calls()
    b = _speedups.BatchOps(c.slow_put, c.slow_get, 4 + 7 + 1 + 3 + 7 + 1)  # room for two ops
    assert b.put(b"k", b"abc") is None and b.ops == [(b"k", b"abc")] and b.size == 4 + 11
    assert b.delete(b"d") is None and b.ops[-1] == (b"d", None) and b.size == 4 + 11 + 8
    assert c.log == []
    # over the record limit, other types, wrong arity, a finished batch: the slow paths
    assert b.put(b"x", b"") == -1 and b.delete(b"y") == "cold"
    b.size = 4
    for args in [(b"", b"v"), (b"k" * 512, b"v"), (bytearray(b"k"), b"v"), (b"k", "v"), (b"k",),
                 (b"k", None)]:
        assert b.put(*args) == -1
    assert b.delete(b"") == "cold" and b.delete(b"a", b"b") == "cold"
    b.done = 1
    assert b.put(b"k", b"v") == -1 and b.delete(b"k") == "cold"
    assert len(b.ops) == 2  # none of those were added
    assert [x[0] for x in c.log] == ["put", "get"] + ["put"] * 6 + ["get"] * 2 + ["put", "get"]


def test_engine_batch_errors_through_the_c_path(tmp_path):
    with walstate.open(str(tmp_path / "db"), sync="none") as db:
        with db.batch() as b:
            b.put(b"a", b"1")
            b.put(bytearray(b"b"), memoryview(b"2"))  # converted by the Python path
            b.delete(b"gone")
            with pytest.raises(TypeError):
                b.delete("str")
            with pytest.raises(ValueError, match="1..511"):
                b.put(b"", b"v")
            assert b._size == 4 + (7 + 2) * 2 + 7 + 4  # the refused ones not counted
        with pytest.raises(walstate.ClosedError):
            b.put(b"late", b"x")
        assert db.get(b"a") == b"1" and db.get(b"b") == b"2" and db.get(b"late") is None


def test_the_first_writes_after_a_clean_reopen_start_one_session(tmp_path):
    """After a clean close an open writes nothing; the first writes -- from
    several threads at once -- start the session (one SESSION record, synced)
    exactly once, and stats() counts only the writes."""
    path = str(tmp_path / "db")
    with walstate.open(path) as db:
        db.put(b"seed", b"0")
    wal = tmp_path / "db" / "wal"
    before = {p.name: p.read_bytes() for p in wal.iterdir()}
    db = walstate.open(path, sync="always")
    assert db.get(b"seed") == b"0"
    assert {p.name: p.read_bytes() for p in wal.iterdir()} == before  # nothing written
    start = threading.Barrier(4)

    def writer(t: int) -> None:
        start.wait()
        for i in range(50):
            db.put(b"t%d-%d" % (t, i), b"v")

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = db.stats()
    assert st["puts"] == 200 and st["wal_records"] == 200
    db.close()
    with WalReader(str(wal)) as r:
        types = [x.type for x in r]
    # one SESSION per session that wrote: the first one, and this one
    assert types.count(codec.SESSION) == 2 and types.count(codec.PUT) == 201
    with walstate.open(path, read_only=True) as ro:
        assert ro.get(b"t3-49") == b"v" and ro.get(b"seed") == b"0"


def test_every_c_file_is_built_by_every_build():
    """csrc/build_ffi.py (walstate._walc), fuzz/build.sh and .ci/asan.sh name
    the same files: every csrc/*.c once; setup.py and .ci/asan.sh build every
    csrc/speedups/*.c into walstate._speedups."""
    import ast
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "csrc" / "build_ffi.py").read_text()
    sources = ast.literal_eval(re.search(r"SOURCES = (\[[^\]]*\])", text).group(1))
    fuzz = re.search(r"SRC=\(([^)]*)\)", (repo / "fuzz" / "build.sh").read_text()).group(1)
    on_disk = sorted(p.name for p in (repo / "csrc").glob("*.c"))
    assert sorted(sources) == sorted(fuzz.split()) == on_disk
    assert len(set(sources)) == len(sources)
    assert 'glob.glob("csrc/speedups/*.c")' in (repo / "setup.py").read_text()
    assert '"$REPO"/csrc/speedups/*.c' in (repo / ".ci" / "asan.sh").read_text()
    assert list((repo / "csrc" / "speedups").glob("*.c"))
