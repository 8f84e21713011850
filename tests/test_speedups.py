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


def test_encode_batch_matches_the_python_encoder():
    ops = [(b"k1", b"v" * 300), (b"k2", None), (b"k" * 511, b""), (b"x", b"\x00" * 70000)]
    assert _speedups.encode_batch(ops) == codec.encode_batch(ops)
    assert _speedups.encode_batch([]) == codec.encode_batch([])
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


NO_SPEEDUPS = """
import sys, tempfile
sys.modules["walstate._speedups"] = None  # as if the extension had not been built
import walstate
from walstate import engine, recovery
assert engine._speedups is None and recovery._impl is recovery.IMPLS["py"]
d = sys.argv[1]
with walstate.open(d, sync="always") as db:
    db.put(b"a", b"1")
    with db.batch() as b:
        b.put(b"b", b"2")
        b.delete(b"a")
    db.checkpoint()
    db.put(b"c", b"3")
    assert db.get(b"b") == b"2" and db.get(b"a") is None and db.get(b"c") == b"3"
    db._abandon()
with walstate.open(d) as db:
    assert db.get(b"c") == b"3" and db.get(b"b") == b"2" and db.get(b"a") is None
with walstate.open(d) as db:  # a clean reopen: the lazy session, then a write
    db.put(b"d", b"4")
print("ok")
"""


def test_the_engine_works_without_the_speedups_extension(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", NO_SPEEDUPS, str(tmp_path / "db")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_format_constants_come_from_wal_format_h():
    """The sizes and limits are defined once (csrc/wal_format.h): the cffi module
    and the speedups module give the same values, under the same names."""
    from walstate._native import lib

    names = [n for n in dir(_speedups) if n.startswith("WAL_")]
    assert set(names) == {
        "WAL_REC_HDR_SIZE", "WAL_REC_MAX_PAYLOAD", "WAL_TYPE_PUT", "WAL_TYPE_DELETE",
        "WAL_TYPE_BATCH", "WAL_PUT_HDR_SIZE", "WAL_BATCH_HDR_SIZE", "WAL_BATCH_OP_HDR_SIZE",
        "WAL_BATCH_OP_PUT", "WAL_BATCH_OP_DELETE", "WAL_MAX_KEY", "WAL_MAX_VALUE"}
    for n in names:
        assert getattr(_speedups, n) == getattr(lib, n), n
    assert (lib.WAL_REC_HDR_SIZE, lib.WAL_SEG_HDR_SIZE, lib.WAL_PUT_HDR_SIZE) == (28, 64, 2)
    assert (lib.WAL_MAX_KEY, lib.WAL_MAX_VALUE) == (codec.MAX_KEY, codec.MAX_VALUE)
    assert (lib.WAL_MAX_KEY, lib.WAL_MAX_VALUE) == (511, 64 << 20)
    assert (lib.WAL_TYPE_SHUTDOWN, lib.WAL_TYPE_SESSION) == (codec.SHUTDOWN, codec.SESSION)
    assert (lib.WAL_TYPE_SHUTDOWN, lib.WAL_TYPE_SESSION) == (0x81, 0x82)
    assert (lib.WAL_BATCH_OP_PUT, lib.WAL_BATCH_OP_DELETE) == (codec.OP_PUT, codec.OP_DELETE)
    assert lib.WAL_BATCH_HDR_SIZE == 4 and lib.WAL_BATCH_OP_HDR_SIZE == 7
    assert lib.WAL_REC_MAX_PAYLOAD == codec.MAX_RECORD == 1 << 30
    assert (lib.WAL_END_HDR_SIZE, lib.WAL_END_MARKS, lib.WAL_END_TAIL_CHECK) == (64, 64, 8192)
    assert lib.WAL_SEG_HDR_CRC_OFF == 60


def test_hot_and_batch_ops_take_keywords_like_the_contract():
    c = Calls()
    hot = _speedups.Hot(c.slow_put, c.ack, c.slow_get)
    hot.table = {b"a": b"1"}
    assert hot.get(key=b"a") == b"1" and hot.get(b"a", default=5) == b"1"
    assert hot.get(key=b"zz", default=5) == "cold" and hot.put(key=b"k", value=b"v") == -1
    assert hot.put(b"k", value=b"v") == -1
    # the slow paths get the arguments by position, as if given so
    assert c.log == [("get", b"zz", 5), ("put", b"k", b"v"), ("put", b"k", b"v")]
    b = _speedups.BatchOps(c.slow_put, c.slow_get, 1 << 20)
    assert b.put(key=b"k", value=b"v") is None and b.delete(key=b"d") is None
    assert b.put(b"k2", value=b"v2") is None
    assert b.ops == [(b"k", b"v"), (b"d", None), (b"k2", b"v2")]
    for call, match in [(lambda: hot.get(b"a", dflt=1), "'dflt'"),
                        (lambda: hot.get(kee=b"a"), "'kee'"),
                        (lambda: hot.put(b"k", val=b"v"), "'val'"),
                        (lambda: hot.put(b"k", key=b"v"), "multiple values for argument 'key'"),
                        (lambda: hot.put(value=b"v"), "missing required argument 'key'"),
                        (lambda: hot.get(b"a", 1, default=2), "multiple values"),
                        (lambda: hot.get(b"a", 1, 2, default=2), "at most 2 arguments"),
                        (lambda: b.put(b"k", v=b"v"), "'v'"),
                        (lambda: b.delete(k=b"k"), "'k'"),
                        (lambda: b.delete(b"k", key=b"k"), "multiple values")]:
        with pytest.raises(TypeError, match=match):
            call()


def test_engine_calls_take_keywords(tmp_path):
    """db.put(key=, value=), db.get(key, default=), db.delete(key=) and a batch's
    put/delete by keyword work as by position, through walstate.open."""
    path = str(tmp_path / "db")
    with walstate.open(path, sync="none") as db:
        assert db.put(key=b"k", value=b"v") > 0
        assert db.put(b"k2", value=b"v2") > 0
        assert db.get(key=b"k") == b"v" and db.get(b"k2", default=1) == b"v2"
        assert db.get(key=b"a", default=5) == 5 and db.get(b"a", 5) == 5
        assert db.get(b"a", default=None) is None
        assert db.delete(key=b"k2") > 0 and db.get(b"k2", default=0) == 0
        with db.batch() as b:
            b.put(key=b"b1", value=b"x")
            b.put(b"b2", value=b"y")
            b.delete(key=b"k")
        assert db.get(b"b1") == b"x" and db.get(key=b"b2") == b"y" and db.get(b"k") is None
        # by keyword through the slow paths too (a buffer key, a limit)
        assert db.put(key=bytearray(b"m"), value=memoryview(b"w")) > 0
        assert db.get(key=bytearray(b"m"), default=1) == b"w"
        with pytest.raises(ValueError, match="1..511"):
            db.put(key=b"", value=b"v")
        for call, name in [(lambda: db.get(b"k", defualt=1), "defualt"),
                           (lambda: db.put(key=b"k", val=b"v"), "val"),
                           (lambda: db.put(k=b"k", value=b"v"), "'k'"),
                           (lambda: db.delete(kye=b"k"), "kye")]:
            with pytest.raises(TypeError, match=name):
                call()
        with db.batch() as b:
            with pytest.raises(TypeError, match="'vlaue'"):
                b.put(key=b"x", vlaue=b"y")
            with pytest.raises(TypeError, match="'ky'"):
                b.delete(ky=b"x")
            b.put(key=b"after", value=b"1")
    with walstate.open(path, sync="none") as db:  # the keyword writes were logged
        assert db.get(b"k") is None and db.get(key=b"b1") == b"x" and db.get(b"m") == b"w"
        assert db.get(b"after") == b"1" and db.get(b"x") is None


def test_every_c_file_is_built_by_every_build():
    """csrc/build_ffi.py (walstate._walc), fuzz/build.sh and .ci/asan.sh name
    the same files: every csrc/*.c once; setup.py and .ci/asan.sh build every
    csrc/speedups/*.c into walstate._speedups."""
    import ast
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "csrc" / "build_ffi.py").read_text()
    sources = ast.literal_eval(re.search(r"SOURCES = (\[[^\]]*\])", text).group(1))
    fuzz = re.search(r"SRC=\(([^)]*)\)", (repo / "fuzz" / "build.sh").read_text()).group(1)
    on_disk = sorted(p.name for p in (repo / "csrc").glob("*.c"))
    assert sorted(sources) == sorted(fuzz.split()) == on_disk
    assert len(set(sources)) == len(sources)
    assert 'glob.glob("csrc/speedups/*.c")' in (repo / "setup.py").read_text()
    assert '"$REPO"/csrc/speedups/*.c' in (repo / ".ci" / "asan.sh").read_text()
    assert list((repo / "csrc" / "speedups").glob("*.c"))
