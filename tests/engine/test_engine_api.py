"""Every public call, option and error of the engine (docs/API.md), each
provoked for real: a second process for the lock, a size-limited tmpfs for a
full disk, fault injection for EIO, a process without CAP_DAC_OVERRIDE for
permissions, real damaged bytes for corruption."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from itertools import pairwise

import pytest
from enginehelpers import (
    KiB,
    MiB,
    broken_files,
    child_env,
    corrupt,
    data_end,
    put_record_size,
    segments,
    state,
    tree_digest,
)

import walstate
from walstate import _hooks

MAX_VALUE = 64 * MiB
SMALL = {"segment_size": 64 * KiB, "max_wal_size": 64 * KiB}


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "db")


@pytest.fixture(autouse=True)
def _no_faults():
    yield
    _hooks.clear()


def fill(db, n: int, prefix: bytes = b"k", size: int = 100) -> dict[bytes, bytes]:
    """n puts of fixed-size records k0000.. -> value; returns the model."""
    model = {}
    for i in range(n):
        k = prefix + b"%04d" % i
        v = (b"%04d" % i) * (size // 4)
        db.put(k, v)
        model[k] = v
    return model


# ---- data calls --------------------------------------------------------------
def test_open_creates_directory_and_put_get_delete_contains(path):
    assert not os.path.exists(path)
    with walstate.open(path) as db:
        assert os.path.isdir(path)
        l1 = db.put(b"a", b"1")
        assert type(l1) is int and l1 > 0
        assert db.get(b"a") == b"1" and b"a" in db
        assert db.get(b"b") is None and b"b" not in db
        assert db.get(b"b", b"default") == b"default"
        l2 = db.put(b"a", b"2")
        assert l2 > l1 and db.get(b"a") == b"2"
        l3 = db.delete(b"a")
        assert l3 > l2 and db.get(b"a") is None and b"a" not in db
        l4 = db.delete(b"never-existed")  # not an error
        assert l4 > l3
        db.put(b"empty", b"")
        assert db.get(b"empty") == b"" and b"empty" in db
        assert db.get(b"empty", b"default") == b""
    with walstate.open(path) as db:
        assert state(db) == {b"empty": b""}


def test_buffers_are_accepted_as_keys_and_values(path):
    with walstate.open(path) as db:
        db.put(bytearray(b"k1"), memoryview(b"v1"))
        db.put(memoryview(b"k2"), bytearray(b"v2"))
        assert db.get(bytearray(b"k1")) == b"v1" and type(db.get(b"k1")) is bytes
        assert memoryview(b"k2") in db
        with db.batch() as b:
            b.put(bytearray(b"k3"), memoryview(b"v3"))
            b.delete(memoryview(b"k1"))
        db.delete(bytearray(b"k2"))
        assert state(db) == {b"k3": b"v3"}


def test_boundary_sizes_are_accepted(path):
    big = b"\xab" * MAX_VALUE
    with walstate.open(path) as db:
        db.put(b"x" * 511, b"v")
        db.put(b"\x00", b"nul key")
        db.put(b"big", big)
        assert db.get(b"x" * 511) == b"v" and db.get(b"\x00") == b"nul key"
        assert db.get(b"big") == big
        db._abandon()  # the big record must come back from the WAL
    with walstate.open(path) as db:
        assert db.get(b"big") == big and db.get(b"x" * 511) == b"v"
    with walstate.open(path) as db:  # and from the snapshot
        assert db.get(b"big") == big


BAD_KEYS = [(b"", ValueError, "511"), (b"x" * 512, ValueError, "511"), ("str", TypeError, "key"),
            (None, TypeError, "key"), (17, TypeError, "key")]
BAD_VALUES = [("str", TypeError, "value"), (None, TypeError, "value"),
              (b"x" * (MAX_VALUE + 1), ValueError, "64")]


def _assert_nothing_written(db, before_records, before_state):
    assert db.stats()["wal_records"] == before_records
    assert state(db) == before_state


@pytest.mark.parametrize("key,exc,words", BAD_KEYS, ids=["empty", "512", "str", "none", "int"])
def test_bad_key_raises_and_writes_nothing(path, key, exc, words):
    with walstate.open(path) as db:
        db.put(b"keep", b"1")
        rec, st = db.stats()["wal_records"], state(db)
        calls = [lambda: db.put(key, b"v"), lambda: db.delete(key), lambda: db.get(key),
                 lambda: key in db]
        for call in calls:
            with pytest.raises(exc) as ei:
                call()
            assert words in str(ei.value)
            _assert_nothing_written(db, rec, st)
        for method in ("put", "delete"):
            with pytest.raises(exc):
                with db.batch() as b:
                    b.put(b"good", b"1")  # discarded with the rest of the batch
                    getattr(b, method)(*((key, b"v") if method == "put" else (key,)))
            _assert_nothing_written(db, rec, st)
        assert db.stats()["batches"] == 0


@pytest.mark.parametrize("value,exc,words", BAD_VALUES, ids=["str", "none", "64MiB+1"])
def test_bad_value_raises_and_writes_nothing(path, value, exc, words):
    with walstate.open(path) as db:
        db.put(b"keep", b"1")
        rec, st = db.stats()["wal_records"], state(db)
        with pytest.raises(exc) as ei:
            db.put(b"k", value)
        msg = str(ei.value)
        assert words in msg and (exc is TypeError or "67108864" in msg or "64 MiB" in msg)
        _assert_nothing_written(db, rec, st)
        with pytest.raises(exc):
            with db.batch() as b:
                b.put(b"good", b"1")
                b.put(b"k", value)
        _assert_nothing_written(db, rec, st)
    with walstate.open(path) as db:
        assert state(db) == {b"keep": b"1"}


def test_items_merges_snapshot_and_recent_writes_with_ranges(path):
    model = {}
    with walstate.open(path) as db:
        for i in range(0, 40, 2):
            k, v = b"k%02d" % i, b"snap%d" % i
            db.put(k, v)
            model[k] = v
        db.checkpoint()  # these now live in LMDB
        for i in range(0, 40, 3):
            k, v = b"k%02d" % i, b"mem%d" % i
            db.put(k, v)
            model[k] = v
        for i in (4, 6, 9, 12, 39):  # deletes hide snapshot keys; 39 never existed
            db.delete(b"k%02d" % i)
            model.pop(b"k%02d" % i, None)
        with db.batch() as b:
            b.put(b"a-first", b"1")
            b.put(b"z-last", b"2")
        model.update({b"a-first": b"1", b"z-last": b"2"})
        it = db.items()
        assert iter(it) is it  # an iterator, not a list
        ranges = [(None, None), (b"k05", b"k20"), (b"k04", None), (None, b"k12"),
                  (b"k10", b"k10"), (b"k30", b"k10"), (b"k", b"l"), (b"k121", b"k300"),
                  (b"\x00", b"\xff")]

        def check():
            assert state(db) == model
            for start, stop in ranges:
                want = sorted((k, v) for k, v in model.items()
                              if (start is None or k >= start) and (stop is None or k < stop))
                assert list(db.items(start, stop)) == want, (start, stop)
                assert list(db.items(start=start, stop=stop)) == want

        check()
        db.checkpoint()
        check()
    with walstate.open(path) as db:
        check()


def test_batch_is_one_atomic_record_invisible_until_exit(path):
    with walstate.open(path) as db:
        db.put(b"a", b"old")
        db.put(b"b", b"old")
        rec = db.stats()["wal_records"]
        seen_by_thread = []
        with db.batch() as b:
            b.put(b"x", b"1")
            b.delete(b"a")
            b.put(b"b", b"new")
            b.put(b"y", b"2")
            b.delete(b"y")        # operations apply in order
            b.delete(b"z")
            b.put(b"z", b"3")
            assert db.get(b"x") is None and db.get(b"a") == b"old" and b"z" not in db
            assert dict(db.items()) == {b"a": b"old", b"b": b"old"}
            t = threading.Thread(target=lambda: seen_by_thread.append(
                (db.get(b"x"), db.get(b"b"))))
            t.start()
            t.join()
        assert seen_by_thread == [(None, b"old")]
        assert type(b.lsn) is int and b.lsn > 0
        assert db.stats()["wal_records"] == rec + 1 and db.stats()["batches"] == 1
        want = {b"b": b"new", b"x": b"1", b"z": b"3"}
        assert state(db) == want
        lsn_after = db.put(b"after", b"1")
        assert lsn_after > b.lsn
        want[b"after"] = b"1"
        db._abandon()
    with walstate.open(path) as db:
        assert state(db) == want


def test_exception_inside_batch_discards_it(path):
    with walstate.open(path) as db:
        db.put(b"a", b"1")
        rec = db.stats()["wal_records"]
        with pytest.raises(RuntimeError, match="boom"):
            with db.batch() as b:
                b.put(b"x", b"1")
                b.delete(b"a")
                raise RuntimeError("boom")
        assert b.lsn is None
        assert db.stats()["wal_records"] == rec and db.stats()["batches"] == 0
        assert state(db) == {b"a": b"1"}
        db._abandon()
    with walstate.open(path) as db:
        assert state(db) == {b"a": b"1"}


def test_sync_returns_the_durable_lsn(path):
    with walstate.open(path, sync="none") as db:
        lsns = [db.put(b"k%d" % i, b"v") for i in range(20)]
        durable = db.sync()
        assert type(durable) is int and durable >= lsns[-1]
        assert db.info()["durable_lsn"] >= lsns[-1]
    with walstate.open(path, sync="always") as db:
        lsn = db.put(b"x", b"1")
        assert db.info()["durable_lsn"] >= lsn and db.sync() >= lsn


@pytest.mark.parametrize("sync", ["always", "interval", "none"])
def test_each_sync_mode_keeps_what_close_flushed(path, sync):
    with walstate.open(path, sync=sync, sync_interval=0.05) as db:
        model = fill(db, 200)
    with walstate.open(path) as db:
        assert state(db) == model


def test_sync_interval_flushes_in_the_background(path):
    with walstate.open(path, sync="interval", sync_interval=0.05) as db:
        lsn = db.put(b"k", b"v")
        assert wait_until(lambda: db.info()["durable_lsn"] >= lsn, 5.0), \
            "sync='interval' did not make the write durable within 100 intervals"
        db._abandon()
    with walstate.open(path) as db:
        assert db.get(b"k") == b"v"


def wait_until(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---- checkpoint, info, stats ----------------------------------------------------
def test_checkpoint_returns_checkpoint_info(path):
    t0 = time.time()
    with walstate.open(path, segment_size=64 * KiB, checkpoint_timeout=3600) as db:
        lsns = [db.put(b"k%02d" % i, b"v" * 3000) for i in range(40)]  # > 1 segment
        wal_before = db.info()["wal_bytes"]
        ci = db.checkpoint()
        assert isinstance(ci, walstate.CheckpointInfo)
        assert dataclasses.is_dataclass(ci)
        with pytest.raises(dataclasses.FrozenInstanceError):
            ci.id = 99
        assert type(ci.id) is int and ci.id >= 1
        assert ci.lsn == lsns[-1]
        assert ci.reason == "manual"
        assert t0 <= ci.started_at <= ci.finished_at <= time.time()
        assert ci.keys_written == 40
        assert ci.snapshot_bytes > 40 * 3000
        assert ci.wal_bytes_removed > 0 and db.info()["wal_bytes"] < wal_before
        assert db.info()["last_checkpoint"] == ci
        l2 = db.put(b"more", b"1")
        ci2 = db.checkpoint()
        assert ci2.id > ci.id and ci2.lsn == l2 and ci2.keys_written == 1
        st = db.stats()
        assert st["checkpoints"] >= 2 and st["checkpoint_seconds_total"] > 0
        db.put(b"after", b"1")
    with walstate.open(path) as db:
        last = db.info()["last_checkpoint"]
        assert last.reason == "shutdown" and last.id > ci2.id
        db.put(b"crash", b"1")
        db._abandon()
    with walstate.open(path) as db:
        last2 = db.info()["last_checkpoint"]
        assert last2.reason == "recovery" and last2.id > last.id
        assert db.get(b"crash") == b"1"


INFO_FIELDS = ["path", "system_id", "format_version", "last_lsn", "durable_lsn", "wal_bytes",
               "wal_segments", "snapshot_bytes", "last_checkpoint", "recovery"]
RECOVERY_FIELDS = ["from_lsn", "to_lsn", "records_replayed", "bytes_replayed", "seconds",
                   "truncated_bytes", "mode"]
STATS_FIELDS = ["puts", "deletes", "batches", "wal_records", "wal_bytes_written", "fsyncs",
                "checkpoints", "checkpoint_seconds_total"]


def test_info_has_every_contract_field(tmp_path, path):
    with walstate.open(path) as db:
        info = db.info()
        for f in INFO_FIELDS:
            assert f in info, f
        for f in RECOVERY_FIELDS:
            assert f in info["recovery"], f
        assert info["path"] == os.path.abspath(path)
        assert type(info["system_id"]) is int and type(info["format_version"]) is int
        assert info["last_checkpoint"] is None
        assert info["wal_segments"] >= 1 and info["wal_bytes"] > 0
        assert info["snapshot_bytes"] > 0
        sid = info["system_id"]
        lsns = [db.put(b"k%d" % i, b"v" * 50) for i in range(5)]
        info = db.info()
        assert info["last_lsn"] == lsns[-1] and info["durable_lsn"] >= lsns[-1]
        db._abandon()
    with walstate.open(path) as db:
        info = db.info()
        assert info["system_id"] == sid
        rec = info["recovery"]
        assert rec["records_replayed"] == 5 and rec["to_lsn"] == lsns[-1]
        assert rec["from_lsn"] <= lsns[0] and rec["bytes_replayed"] >= 5 * 50
        assert rec["truncated_bytes"] == 0 and rec["mode"] == "tolerate_tail"
        assert rec["seconds"] >= 0
    with walstate.open(str(tmp_path / "other"), recovery="strict") as other:
        assert other.info()["system_id"] != sid
        assert other.info()["recovery"]["mode"] == "strict"


def test_stats_count_since_open(path):
    with walstate.open(path) as db:
        st = db.stats()
        for f in STATS_FIELDS:
            assert st[f] == 0, f
        for i in range(3):
            db.put(b"k%d" % i, b"v")
        db.delete(b"k0")
        db.delete(b"k1")
        with db.batch() as b:
            b.put(b"x", b"1")
            b.delete(b"k2")
        st = db.stats()
        assert (st["puts"], st["deletes"], st["batches"], st["wal_records"]) == (3, 2, 1, 6)
        assert st["wal_bytes_written"] >= 6 * 28 and st["fsyncs"] >= 1
        db.checkpoint()
        st = db.stats()
        assert st["checkpoints"] == 1 and st["checkpoint_seconds_total"] > 0
    with walstate.open(path) as db:
        st = db.stats()
        assert (st["puts"], st["deletes"], st["batches"], st["checkpoints"]) == (0, 0, 0, 0)


# ---- close, context manager, config ----------------------------------------------
def test_close_is_idempotent_and_later_calls_raise_closed(path):
    db = walstate.open(path)
    db.put(b"a", b"1")
    pending = db.batch()
    db.close()
    db.close()
    calls = {
        "put": lambda: db.put(b"a", b"2"), "delete": lambda: db.delete(b"a"),
        "get": lambda: db.get(b"a"), "contains": lambda: b"a" in db,
        "items": lambda: list(db.items()), "batch": db.batch, "sync": db.sync,
        "checkpoint": db.checkpoint, "info": db.info, "stats": db.stats,
    }
    for name, call in calls.items():
        with pytest.raises(walstate.ClosedError):
            call()
            pytest.fail(name)
    with pytest.raises(walstate.ClosedError):
        with pending as b:
            b.put(b"late", b"1")
    with walstate.open(path) as db2:
        assert state(db2) == {b"a": b"1"}


def test_context_manager_closes_even_on_error(path):
    with pytest.raises(KeyError):
        with walstate.open(path) as db:
            db.put(b"a", b"1")
            raise KeyError("x")
    with pytest.raises(walstate.ClosedError):
        db.get(b"a")
    with walstate.open(path) as db:  # the lock was released
        assert db.get(b"a") == b"1"
        assert db.info()["last_checkpoint"].reason == "shutdown"


def test_config_defaults_match_the_contract():
    c = walstate.Config()
    assert (c.sync, c.sync_interval, c.checkpoint_timeout, c.max_wal_size,
            c.checkpoint_completion_target, c.segment_size, c.recovery, c.read_only,
            c.map_size) == ("always", 1.0, 300.0, 256 * MiB, 0.9, 16 * MiB, "tolerate_tail",
                            False, 1024 * MiB)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.sync = "none"
    assert walstate.Config(sync="none") == walstate.Config(sync="none")


def test_config_object_is_equivalent_to_options(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = walstate.Config(segment_size=64 * KiB, max_wal_size=1 * MiB, sync="none")
    for p, db in ((a, walstate.open(a, config=cfg)),
                  (b, walstate.open(b, segment_size=64 * KiB, max_wal_size=1 * MiB,
                                    sync="none"))):
        fill(db, 10)
        assert [os.path.getsize(s) for s in segments(p)] == [64 * KiB]
        db._abandon()  # sync="none": writes still in the buffer are lost
    for p in (a, b):
        with pytest.raises(walstate.ReadOnlyError):
            with walstate.open(p, config=walstate.Config(read_only=True)) as db:
                db.put(b"x", b"1")
    for p in (a, b):  # both lost the same unsynced writes, and recovery="strict" agrees
        corrupt(segments(p)[-1], 40 * KiB, "write", b"garbage")
        with pytest.raises(walstate.CorruptionError):
            walstate.open(p, config=walstate.Config(recovery="strict"))
        with pytest.raises(walstate.CorruptionError):
            walstate.open(p, recovery="strict")


BAD_OPTIONS = [
    ("sync", "sometimes"), ("sync", None), ("sync_interval", 0), ("sync_interval", -1.0),
    ("sync_interval", "1"), ("sync_interval", float("nan")), ("checkpoint_timeout", 0),
    ("checkpoint_timeout", -5), ("checkpoint_timeout", "300"), ("max_wal_size", 0),
    ("max_wal_size", -1), ("max_wal_size", "256M"), ("checkpoint_completion_target", -0.1),
    ("checkpoint_completion_target", 1.5), ("checkpoint_completion_target", "x"),
    ("segment_size", 0), ("segment_size", -1), ("segment_size", "16M"),
    ("recovery", "yolo"), ("recovery", None), ("read_only", "yes"), ("map_size", 0),
    ("map_size", -1), ("map_size", "1G"), ("max_recovery_seconds", -1),
    ("max_recovery_seconds", "x"), ("wal_buffer_size", 0), ("wal_buffer_size", "x"),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS,
                         ids=[f"{o}={v!r}" for o, v in BAD_OPTIONS])
def test_bad_option_raises_config_error_naming_it(path, option, value):
    with pytest.raises(walstate.ConfigError) as ei:
        walstate.open(path, **{option: value})
    assert option in str(ei.value)
    assert isinstance(ei.value, walstate.WalStateError)
    assert not os.path.exists(path)  # validated before anything was created
    with pytest.raises(walstate.ConfigError) as ei:
        walstate.Config(**{option: value})
    assert option in str(ei.value)


def test_unknown_option_is_refused(path):
    with pytest.raises((walstate.ConfigError, TypeError)) as ei:
        walstate.open(path, max_wal_bytes=1 << 20)
    assert "max_wal_bytes" in str(ei.value)
    assert not os.path.exists(path)


def test_map_size_grows_when_a_checkpoint_needs_more(path):
    rng = random.Random(3)
    with walstate.open(path, map_size=1 * MiB) as db:
        model = {b"k%05d" % i: rng.randbytes(1000) for i in range(3000)}
        for k, v in model.items():
            db.put(k, v)
        ci = db.checkpoint()
        assert ci.snapshot_bytes > 2 * MiB
        assert state(db) == model
    with walstate.open(path, map_size=1 * MiB) as db:
        assert state(db) == model


def test_an_open_iterator_does_not_block_growing_the_map(path):
    rng = random.Random(4)
    db = walstate.open(path, map_size=1 * MiB)
    it = None
    try:
        db.put(b"a", b"1")
        db.checkpoint()
        it = db.items()
        assert next(it) == (b"a", b"1")
        for i in range(3000):
            db.put(b"k%05d" % i, rng.randbytes(1000))
        t0 = time.monotonic()
        db.checkpoint()  # needs a bigger map while the iterator is open
        assert time.monotonic() - t0 < 5
        assert list(it) == []  # the iterator saw the state when it started
    finally:
        if it is not None:
            it.close()
        db.close()


def test_max_recovery_seconds_triggers_checkpoints(path):
    # replay is estimated at >= megabytes per second: 200 KB exceed 1 ms of replay
    with walstate.open(path, max_recovery_seconds=0.001) as db:
        for i in range(200):
            db.put(b"k%03d" % i, b"v" * 1000)
        assert wait_until(lambda: db.stats()["checkpoints"] >= 1, 10)
        assert db.info()["last_checkpoint"].reason == "wal_size"
    with walstate.open(path) as db:  # default: off -- 200 KB are far below max_wal_size
        for i in range(200):
            db.put(b"k%03d" % i, b"w" * 1000)
        time.sleep(1.2)
        assert db.stats()["checkpoints"] == 0


@pytest.mark.parametrize("target", [0.0, 0.5, 1.0])
def test_checkpoint_completion_target_values_all_complete(path, target):
    with walstate.open(path, checkpoint_completion_target=target, **SMALL) as db:
        model = fill(db, 1000, size=400)
        assert wait_until(lambda: db.stats()["checkpoints"] >= 2, 20)
        assert state(db) == model
    with walstate.open(path) as db:
        assert state(db) == model


# ---- LSNs ------------------------------------------------------------------------

@pytest.mark.parametrize("sync", ["always", "none"])
def test_lsns_strictly_increase_and_are_never_reused(path, sync):
    issued: list[int] = []

    def writes(db, n):
        for i in range(n):
            issued.append(db.put(b"k%d" % (i % 7), b"v%d" % len(issued)))
        issued.append(db.delete(b"k1"))
        with db.batch() as b:
            b.put(b"b", b"1")
        issued.append(b.lsn)

    opts = dict(sync=sync, **SMALL)
    db = walstate.open(path, **opts)
    writes(db, 10)
    db.checkpoint()
    writes(db, 10)
    db.close()
    for crash_kind in ("abandon", "abandon-after-checkpoint", "close", "abandon-empty"):
        db = walstate.open(path, **opts)
        assert db.info()["last_lsn"] < issued[-1] + (1 << 62)
        if crash_kind != "abandon-empty":
            writes(db, 30)
        if crash_kind == "abandon-after-checkpoint":
            db.checkpoint()
            writes(db, 3)
        if crash_kind == "close":
            db.close()
        else:
            db._abandon()  # under sync="none" the last LSNs handed out are lost
    db = walstate.open(path, **opts)
    writes(db, 2000)  # several segments and wal_size checkpoints
    db.close()
    db = walstate.open(path, **opts)
    writes(db, 1)
    db.close()
    assert all(type(x) is int and x > 0 for x in issued)
    assert all(a < b for a, b in pairwise(issued)), "LSNs not strictly increasing"


@pytest.mark.parametrize("sync", ["none", "interval"])
def test_lsn_of_a_write_lost_after_a_clean_close_is_not_reused(path, sync):
    with walstate.open(path, sync=sync, sync_interval=60) as db:
        db.put(b"a", b"1")
    db = walstate.open(path, sync=sync, sync_interval=60)
    lost = db.put(b"b", b"2")  # still in the WAL buffer
    db._abandon()
    with walstate.open(path, sync=sync) as db:
        assert db.get(b"b") is None
        assert db.put(b"c", b"3") > lost


# ---- read-only ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["closed", "crashed", "torn-tail"])
def test_read_only_open_changes_no_byte_and_refuses_writes(path, how):
    with walstate.open(path, **SMALL) as db:
        model = fill(db, 50)
        db.checkpoint()
        model.update(fill(db, 20, prefix=b"m"))
        db.delete(b"k0003")
        del model[b"k0003"]
        if how != "closed":
            db._abandon()
    if how == "torn-tail":
        seg = segments(path)[-1]
        corrupt(seg, data_end(seg), "write", b"\x01torn\xff")
    before = tree_digest(path)
    ro = walstate.open(path, read_only=True)
    try:
        assert state(ro) == model
        assert ro.get(b"k0001") == model[b"k0001"] and b"k0003" not in ro
        if how == "torn-tail":
            assert ro.info()["recovery"]["truncated_bytes"] == 6
        for call in (lambda: ro.put(b"x", b"1"), lambda: ro.delete(b"k0001"), ro.batch,
                     ro.checkpoint):
            with pytest.raises(walstate.ReadOnlyError):
                call()
        info, stats = ro.info(), ro.stats()
        assert info["last_lsn"] >= 70 and stats["wal_records"] == 0
    finally:
        ro.close()
    assert tree_digest(path) == before
    with walstate.open(path) as db:  # a writer then recovers the same state
        assert state(db) == model


def test_read_only_opens_coexist_within_one_process(path):
    with walstate.open(path) as db:
        db.put(b"a", b"1")
        with walstate.open(path, read_only=True) as ro:  # beside this process's writer
            assert ro.get(b"a") == b"1"
    with walstate.open(path, read_only=True) as ro1:
        with walstate.open(path, config=walstate.Config(read_only=True)) as ro2:
            assert state(ro1) == state(ro2) == {b"a": b"1"}


def test_read_only_open_of_missing_directory_creates_nothing(path):
    with pytest.raises((walstate.WalStateError, OSError)):
        walstate.open(path, read_only=True)
    assert not os.path.exists(path)


HOLDER = r"""
import sys, walstate
db = walstate.open(sys.argv[1])
for i in range(50):
    db.put(b"w%03d" % i, b"v%d" % i)
print("ready", flush=True)
sys.stdin.readline()
db.put(b"late", b"1")
db.close()
print("closed", flush=True)
"""


@pytest.fixture
def holder(path):
    """A second process holding ``path`` open for writing."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def _release(p):
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "closed"
    assert p.wait(timeout=30) == 0


def test_read_only_open_beside_a_writer_process(path, holder):
    before = tree_digest(path)
    with walstate.open(path, read_only=True) as ro:
        assert state(ro) == {b"w%03d" % i: b"v%d" % i for i in range(50)}
        with pytest.raises(walstate.ReadOnlyError):
            ro.put(b"x", b"1")
    assert tree_digest(path) == before
    _release(holder)
    with walstate.open(path, read_only=True) as ro:
        assert ro.get(b"late") == b"1"


def test_locked_error_names_the_holder_process(path, holder):
    with pytest.raises(walstate.LockedError) as ei:
        walstate.open(path)
    assert str(holder.pid) in str(ei.value)
    _release(holder)
    with walstate.open(path) as db:
        assert db.get(b"late") == b"1" and db.get(b"w049") == b"v49"


def test_second_open_in_the_same_process_is_refused(path, tmp_path):
    db = walstate.open(path)
    try:
        db.put(b"a", b"1")
        with pytest.raises(walstate.LockedError):
            walstate.open(path)
        with pytest.raises(walstate.LockedError):
            walstate.open(os.path.join(path, "..", "db"))
        os.symlink(path, tmp_path / "alias")
        with pytest.raises(walstate.LockedError):
            walstate.open(str(tmp_path / "alias"))
        assert db.get(b"a") == b"1"
        db.put(b"b", b"2")  # the refused opens did not disturb the holder
    finally:
        db.close()
    with walstate.open(str(tmp_path / "alias")) as db:
        assert state(db) == {b"a": b"1", b"b": b"2"}


# ---- mismatch -----------------------------------------------------------------------
def _make(p, n=5, crash=True, **opts):
    db = walstate.open(p, **opts)
    model = fill(db, n, prefix=os.path.basename(p).encode())
    if crash:
        db._abandon()
    else:
        db.close()
    return model


def test_snapshot_of_another_directory_is_a_mismatch(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make(a, crash=False)
    _make(b, crash=False)
    shutil.rmtree(os.path.join(a, "snapshot"))
    shutil.copytree(os.path.join(b, "snapshot"), os.path.join(a, "snapshot"))
    for ro in (False, True):
        with pytest.raises(walstate.MismatchError):
            walstate.open(a, read_only=ro)


def test_wal_segment_of_another_directory_is_a_mismatch(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make(a)
    _make(b)
    sa, sb = segments(a), segments(b)
    assert [os.path.basename(s) for s in sa] == [os.path.basename(s) for s in sb]
    shutil.copyfile(sb[-1], sa[-1])
    before = tree_digest(a)
    for mode in ("tolerate_tail", "strict", "point_in_time"):
        with pytest.raises(walstate.MismatchError):
            walstate.open(a, recovery=mode)
    assert tree_digest(a) == before


def test_gap_between_snapshot_and_wal_is_a_mismatch(path):
    _make(path, n=1500, segment_size=64 * KiB, max_wal_size=64 * MiB)
    segs = segments(path)
    assert len(segs) >= 3
    os.unlink(segs[0])
    with pytest.raises(walstate.MismatchError):
        walstate.open(path)


def test_unknown_format_version_is_a_mismatch(path):
    _make(path, crash=False)
    marker = os.path.join(path, "WALSTATE")
    with open(marker) as f:
        m = json.load(f)
    m["format_version"] = 99
    with open(marker, "w") as f:
        json.dump(m, f)
    with pytest.raises(walstate.MismatchError):
        walstate.open(path)


# ---- corruption and recovery modes ------------------------------------------------------
RS = put_record_size(b"k0000", b"0000" * 25)  # bytes of one fill() record
# the first fill() record follows the segment header and the SESSION record (LSN 1)
# that every writable open appends (docs/FORMAT.md)
FIRST = 64 + 28


def _crashed_log(path, n=60, **opts):
    """n records k0000.. written under sync="always" and never checkpointed."""
    db = walstate.open(path, max_wal_size=64 * MiB, **opts)
    model = fill(db, n)
    lsns = db.info()["last_lsn"]
    db._abandon()
    return model, lsns


def _prefix(model, n):
    return dict(list(model.items())[:n])


def test_bit_flip_mid_log_is_corruption_with_path_offset_lsn(path):
    model, last = _crashed_log(path)
    seg = segments(path)[0]
    off = FIRST + 24 * RS  # the 25th put (LSN 26)
    corrupt(seg, off + 28 + 3, "flip")
    before = tree_digest(path)
    for mode in ("tolerate_tail", "strict"):
        with pytest.raises(walstate.CorruptionError) as ei:
            walstate.open(path, recovery=mode)
        e = ei.value
        assert os.path.samefile(e.path, seg) and e.offset == off and e.lsn == 26
    assert tree_digest(path) == before  # refusing to open changed nothing


def test_point_in_time_keeps_the_prefix_before_corruption(path):
    model, last = _crashed_log(path)
    seg = segments(path)[0]
    off = FIRST + 24 * RS
    end = data_end(seg)
    corrupt(seg, off + 28 + 3, "flip")
    with walstate.open(path, recovery="point_in_time") as db:
        assert state(db) == _prefix(model, 24)
        assert db.info()["recovery"]["truncated_bytes"] == end - off
        assert broken_files(path)
        lsn = db.put(b"new", b"1")
        assert lsn > last  # LSNs 25..60 were handed out before: never reused
    for mode in ("strict", "tolerate_tail", "point_in_time"):
        with walstate.open(path, recovery=mode) as db:
            assert state(db) == {**_prefix(model, 24), b"new": b"1"}
            assert db.info()["recovery"]["truncated_bytes"] == 0


def test_corruption_in_an_earlier_segment_cuts_the_later_ones(path):
    model, last = _crashed_log(path, n=1500, segment_size=64 * KiB)
    segs = segments(path)
    assert len(segs) >= 3
    corrupt(segs[0], FIRST + 10 * RS + 30, "flip")  # the 11th put (LSN 12)
    for mode in ("tolerate_tail", "strict"):
        with pytest.raises(walstate.CorruptionError) as ei:
            walstate.open(path, recovery=mode)
        assert os.path.samefile(ei.value.path, segs[0]) and ei.value.lsn == 12
    with walstate.open(path, recovery="point_in_time") as db:
        assert state(db) == _prefix(model, 10)
        assert db.info()["recovery"]["truncated_bytes"] > 0
        assert len(broken_files(path)) >= len(segs)  # the cut bytes + every later segment
        assert db.put(b"new", b"1") > last
    with walstate.open(path, recovery="strict") as db:
        assert state(db) == {**_prefix(model, 10), b"new": b"1"}


@pytest.mark.parametrize("tail", ["garbage", "torn-record"])
def test_torn_tail_per_recovery_mode(tmp_path, tail):
    def make(p):
        model, _ = _crashed_log(p, n=30)
        seg = segments(p)[-1]
        end = data_end(seg)
        assert end == FIRST + 30 * RS
        if tail == "garbage":
            corrupt(seg, end, "write", b"\x07" * 100)
            return model, seg, end, 100
        corrupt(seg, end - 10, "write", b"\0" * 10)  # the last record's end never landed
        return _prefix(model, 29), seg, end - RS, RS - 10

    p = str(tmp_path / "strict")
    _, seg, off, cut = make(p)
    before = tree_digest(p)
    with pytest.raises(walstate.CorruptionError) as ei:
        walstate.open(p, recovery="strict")
    assert os.path.samefile(ei.value.path, seg) and ei.value.offset == off
    assert tree_digest(p) == before
    for mode in ("tolerate_tail", "point_in_time"):
        p = str(tmp_path / mode)
        want, seg, off, cut = make(p)
        with walstate.open(p, recovery=mode) as db:
            assert state(db) == want
            assert db.info()["recovery"]["truncated_bytes"] == cut
            assert broken_files(p)
        for again in ("strict", "tolerate_tail", "point_in_time"):
            with walstate.open(p, recovery=again) as db:
                assert state(db) == want
                assert db.info()["recovery"]["truncated_bytes"] == 0


# ---- permissions --------------------------------------------------------------------------
SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
PERM_CHILD = r"""
import json, os, sys, walstate
target, probe_dir, ro_check = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
out = {}
try:
    open(os.path.join(probe_dir, "probe"), "w").close()
    out["caps_dropped"] = False
except PermissionError:
    out["caps_dropped"] = True
try:
    walstate.open(target).close()
    out["error"] = None
except BaseException as e:
    out["error"] = type(e).__name__
    out["message"] = str(e)
    out["is_oserror"] = isinstance(e, OSError)
if ro_check:
    with walstate.open(target, read_only=True) as db:
        out["ro_value"] = db.get(b"k0001").decode()
print(json.dumps(out))
"""


@pytest.mark.parametrize("where", ["root", "wal", "snapshot", "new-under-readonly-parent"])
def test_permission_error_names_the_path_and_changes_nothing(tmp_path, path, where):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    with walstate.open(path) as db:
        fill(db, 10)
    if where == "new-under-readonly-parent":
        bad = target = str(tmp_path / "ro-parent")
        os.mkdir(bad)
        target = os.path.join(bad, "newdb")
    else:
        bad = path if where == "root" else os.path.join(path, where)
        target = path
    os.chmod(bad, 0o500)
    try:
        before = tree_digest(str(tmp_path))
        r = subprocess.run([*SETPRIV, sys.executable, "-c", PERM_CHILD, target, bad,
                            "1" if where == "root" else "0"], env=child_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["caps_dropped"], "setpriv did not drop CAP_DAC_OVERRIDE"
        assert out["error"] == "PermissionError" and out["is_oserror"], out
        assert bad in out["message"], out["message"]
        if where == "root":
            assert out["ro_value"] == "0001" * 25  # read-only needs only read access
        assert tree_digest(str(tmp_path)) == before
    finally:
        os.chmod(bad, 0o755)


# ---- EIO and a full disk ---------------------------------------------------------------------
@pytest.mark.parametrize("op", ["fdatasync", "write"])
def test_eio_fails_the_engine_until_reopened(path, op):
    db = walstate.open(path)
    try:
        model = fill(db, 30)
        db.checkpoint()
        model.update(fill(db, 10, prefix=b"m"))
        _hooks.fault(op, 1, errno.EIO)
        with pytest.raises(walstate.EngineFailedError):
            db.put(b"doomed", b"x")
        _hooks.clear()
        for call in (lambda: db.put(b"a", b"1"), lambda: db.delete(b"k0001"), db.batch,
                     db.checkpoint):
            with pytest.raises(walstate.EngineFailedError):
                call()
        got = state(db)  # reads still work
        got.pop(b"doomed", None)
        assert got == model
        assert db.get(b"k0005") == model[b"k0005"] and b"m0003" in db
        assert db.info()["last_lsn"] > 0 and db.stats()["puts"] >= 40
    finally:
        try:
            db.close()
        except walstate.WalStateError:
            pass
    with walstate.open(path) as db:
        got = state(db)
        assert got.pop(b"doomed", b"x") == b"x"  # durability was unknown: either is fine
        assert got == model
        db.put(b"after", b"1")  # writes work again
    with walstate.open(path) as db:
        assert db.get(b"after") == b"1"


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 4 MiB tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_then_space_freed(small_tmpfs):
    path = os.path.join(small_tmpfs, "db")
    filler = os.path.join(small_tmpfs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\xff" * (3 * MiB))
    db = walstate.open(path, segment_size=64 * KiB, max_wal_size=64 * KiB)
    acked = {}
    rng = random.Random(1)
    try:
        with pytest.raises(walstate.DiskFullError) as ei:
            for i in range(20000):
                k, v = b"k%05d" % i, rng.randbytes(200)
                db.put(k, v)
                acked[k] = v
        e = ei.value
        assert isinstance(e, OSError) and e.errno == errno.ENOSPC
        assert 50 < len(acked) < 20000
        assert state(db) == acked  # reads keep working
        assert all(db.get(k) == v for k, v in acked.items())
        os.unlink(filler)
        for i in range(100):  # writes succeed again once space is freed
            k, v = b"after%03d" % i, rng.randbytes(200)
            db.put(k, v)
            acked[k] = v
        db.checkpoint()
        assert state(db) == acked
    finally:
        try:
            db.close()
        except walstate.WalStateError:
            db._abandon()
    with walstate.open(path) as db:
        assert state(db) == acked


# ---- threads ------------------------------------------------------------------------------------
def test_threads_put_get_batch_items_concurrently(path):
    nthreads, nops = 8, 250
    db = walstate.open(path, **SMALL)
    models: list[dict[bytes, bytes]] = [{} for _ in range(nthreads)]
    lsns: list[list[int]] = [[] for _ in range(nthreads)]
    errors: list[BaseException] = []
    start = threading.Barrier(nthreads)

    def worker(t: int) -> None:
        rng = random.Random(t)
        model = models[t]
        pre = b"t%d-" % t
        try:
            start.wait()
            for i in range(nops):
                k = pre + b"%02d" % rng.randrange(30)
                r = rng.random()
                if r < 0.5:
                    v = b"%d:%d:" % (t, i) + rng.randbytes(rng.randrange(400))
                    lsns[t].append(db.put(k, v))
                    model[k] = v
                elif r < 0.6:
                    lsns[t].append(db.delete(k))
                    model.pop(k, None)
                elif r < 0.75:
                    with db.batch() as b:
                        for j in range(rng.randrange(1, 5)):
                            kk = pre + b"%02d" % rng.randrange(30)
                            if rng.random() < 0.8:
                                vv = b"%d:%d:%d" % (t, i, j)
                                b.put(kk, vv)
                                model[kk] = vv
                            else:
                                b.delete(kk)
                                model.pop(kk, None)
                    lsns[t].append(b.lsn)
                elif r < 0.9:
                    assert db.get(k) == model.get(k)  # read your own writes
                else:
                    mine = dict(db.items(pre, b"t%d." % t))
                    assert mine == model
                    keys = [kv[0] for kv in db.items()]
                    assert keys == sorted(set(keys))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, errors[0]
        want = {k: v for m in models for k, v in m.items()}
        assert state(db) == want
        every = [x for ls in lsns for x in ls]
        assert len(set(every)) == len(every)
        assert all(a < b for ls in lsns for a, b in pairwise(ls))
        assert db.stats()["checkpoints"] >= 1  # checkpoints ran beside the writers
    finally:
        db.close()
    with walstate.open(path) as db:
        assert state(db) == want
