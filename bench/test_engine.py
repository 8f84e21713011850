"""The engine beside sqlite3 (WAL mode) and py-lmdb doing the same work.

Groups (baseline = py-lmdb unless said otherwise; "sqlite3" rows for scale):
  put-durable    put returning after fdatasync: walstate sync=always, lmdb sync, sqlite FULL
  put-none       non-durable puts: walstate sync=none, lmdb nosync, sqlite NORMAL
  get-snapshot   random gets of checkpointed keys
  get-memtable   random gets of keys written since the last checkpoint (baseline: a dict)
  batch1000      1000 puts in one atomic durable batch / transaction
  items          a full ordered scan of 20k keys
  recovery       open + first get with 50k un-checkpointed records (baseline: a Python
                 replay of the same framed records from a raw log)
Run: pytest bench/test_engine.py --benchmark-only
Put latency percentiles with and without a concurrent checkpoint: test_put_latency.
"""

from __future__ import annotations

import os
import random
import sqlite3
import statistics
import struct
import threading
import time

import crc32c
import lmdb
import pytest
from conftest import record

import walstate

rnd = random.Random(7)
KEYS = [rnd.randbytes(16) for _ in range(20000)]
VAL = rnd.randbytes(100)


def _lmdb(d: str, sync: bool) -> lmdb.Environment:
    return lmdb.open(os.path.join(d, "lmdb"), map_size=1 << 30, sync=sync, metasync=sync)


def _walstate_with_keys(d: str, checkpoint: bool) -> walstate.Engine:
    """A sync="none" engine holding KEYS, in the snapshot or in memory."""
    db = walstate.open(os.path.join(d, "ws"), sync="none")
    with db.batch() as b:
        for k in KEYS:
            b.put(k, VAL)
    if checkpoint:
        db.checkpoint()
    return db


def _sqlite(d: str, sync: str) -> sqlite3.Connection:
    con = sqlite3.connect(os.path.join(d, "s.db"), isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={sync}")
    con.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB)")
    return con


@pytest.mark.parametrize("who", ["walstate", "baseline", "sqlite3"])
@pytest.mark.parametrize("durable", [True, False])
def test_put(benchmark, bench_dir, who, durable):
    n = 300 if durable else 20000
    keys = KEYS[:n]
    if who == "walstate":
        db = walstate.open(os.path.join(bench_dir, "ws"), sync="always" if durable else "none")
        put = db.put

        def run():
            for k in keys:
                put(k, VAL)
        benchmark.pedantic(run, rounds=3)
        db._abandon()
    elif who == "baseline":
        env = _lmdb(bench_dir, durable)

        def run():
            for k in keys:
                with env.begin(write=True) as txn:
                    txn.put(k, VAL)
        benchmark.pedantic(run, rounds=3)
        env.close()
    else:
        con = _sqlite(bench_dir, "FULL" if durable else "NORMAL")

        def run():
            for k in keys:
                con.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, VAL))
        benchmark.pedantic(run, rounds=3)
        con.close()
    record("put-durable" if durable else "put-none", who, n, benchmark)


@pytest.mark.parametrize("who", ["walstate", "baseline", "sqlite3"])
def test_get_snapshot(benchmark, bench_dir, who):
    order = list(KEYS)
    rnd.shuffle(order)
    if who == "walstate":
        db = _walstate_with_keys(bench_dir, checkpoint=True)
        get = db.get
        benchmark.pedantic(lambda: [get(k) for k in order], rounds=5)
        db.close()
    elif who == "baseline":
        env = _lmdb(bench_dir, False)
        with env.begin(write=True) as txn:
            for k in KEYS:
                txn.put(k, VAL)

        def run():
            for k in order:
                with env.begin() as txn:
                    txn.get(k)
        benchmark.pedantic(run, rounds=5)
        env.close()
    else:
        con = _sqlite(bench_dir, "NORMAL")
        con.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", [(k, VAL) for k in KEYS])
        q = "SELECT v FROM kv WHERE k = ?"
        benchmark.pedantic(lambda: [con.execute(q, (k,)).fetchone() for k in order], rounds=5)
        con.close()
    record("get-snapshot", who, len(order), benchmark)


@pytest.mark.parametrize("who", ["walstate", "baseline"])
def test_get_memtable(benchmark, bench_dir, who):
    order = list(KEYS)
    rnd.shuffle(order)
    if who == "walstate":
        db = _walstate_with_keys(bench_dir, checkpoint=False)
        get = db.get
        benchmark.pedantic(lambda: [get(k) for k in order], rounds=5)
        db._abandon()
    else:
        d = dict.fromkeys(KEYS, VAL)
        get = d.get
        benchmark.pedantic(lambda: [get(k) for k in order], rounds=5)
    record("get-memtable", who, len(order), benchmark)


@pytest.mark.parametrize("who", ["walstate", "baseline", "sqlite3"])
def test_batch1000(benchmark, bench_dir, who):
    keys = KEYS[:1000]
    if who == "walstate":
        db = walstate.open(os.path.join(bench_dir, "ws"))

        def run():
            with db.batch() as b:
                for k in keys:
                    b.put(k, VAL)
        benchmark.pedantic(run, rounds=10)
        db._abandon()
    elif who == "baseline":
        env = _lmdb(bench_dir, True)

        def run():
            with env.begin(write=True) as txn:
                for k in keys:
                    txn.put(k, VAL)
        benchmark.pedantic(run, rounds=10)
        env.close()
    else:
        con = _sqlite(bench_dir, "FULL")

        def run():
            con.execute("BEGIN")
            con.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", [(k, VAL) for k in keys])
            con.execute("COMMIT")
        benchmark.pedantic(run, rounds=10)
        con.close()
    record("batch1000", who, 1000, benchmark)


@pytest.mark.parametrize("who", ["walstate", "baseline"])
def test_items(benchmark, bench_dir, who):
    if who == "walstate":
        db = walstate.open(os.path.join(bench_dir, "ws"), sync="none")
        with db.batch() as b:
            for k in KEYS[:10000]:
                b.put(k, VAL)
        db.checkpoint()
        with db.batch() as b:  # half in the snapshot, half in memory
            for k in KEYS[10000:]:
                b.put(k, VAL)
        benchmark.pedantic(lambda: sum(1 for _ in db.items()), rounds=5)
        db.close()
    else:
        env = _lmdb(bench_dir, False)
        with env.begin(write=True) as txn:
            for k in KEYS:
                txn.put(k, VAL)

        def run():
            with env.begin() as txn:
                return sum(1 for _ in txn.cursor())
        benchmark.pedantic(run, rounds=5)
        env.close()
    record("items", who, len(KEYS), benchmark)


N_RECOVER = 50000


@pytest.mark.parametrize("who", ["walstate", "baseline"])
def test_recovery(benchmark, bench_dir, who):
    keys = [b"%016d" % i for i in range(N_RECOVER)]
    if who == "walstate":
        path = os.path.join(bench_dir, "ws")
        db = walstate.open(path, sync="none", max_wal_size=1 << 30)
        for k in keys:
            db.put(k, VAL)
        db.sync()
        db._abandon()

        def run():
            # read-only: replays every time without checkpointing
            with walstate.open(path, read_only=True) as d:
                d.get(keys[0])
        benchmark.pedantic(run, rounds=3)
    else:
        path = os.path.join(bench_dir, "raw.log")
        hdr = struct.Struct("<IIQ")
        with open(path, "wb") as f:
            for i, k in enumerate(keys):
                body = k + VAL
                f.write(hdr.pack(crc32c.crc32c(body), len(body), i) + body)

        def run():
            table = {}
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            while pos + 16 <= len(data):
                crc, n, _lsn = hdr.unpack_from(data, pos)
                body = data[pos + 16:pos + 16 + n]
                if crc32c.crc32c(body) != crc:
                    break
                table[body[:16]] = body[16:]
                pos += 16 + n
            return table.get(keys[0])
        benchmark.pedantic(run, rounds=3)
    record("recovery", who, N_RECOVER, benchmark)


def test_put_latency(bench_dir, capsys):
    """p50/p99 of durable puts, alone and while a checkpoint of many dirty keys runs."""
    db = walstate.open(os.path.join(bench_dir, "ws"), sync="always", max_wal_size=1 << 30)
    with db.batch() as b:
        for i in range(200000):
            b.put(b"dirty%010d" % i, VAL)

    def lat(n: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            db.put(b"lat%06d" % i, VAL)
            out.append(time.perf_counter() - t0)
        return out

    quiet = lat(500)
    t = threading.Thread(target=db.checkpoint)
    t.start()
    busy = lat(500)
    t.join()
    db.close()

    def pct(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[int(p) - 1] * 1e6

    with capsys.disabled():
        print(f"\nput latency us: alone p50 {pct(quiet, 50):.0f} p99 {pct(quiet, 99):.0f}; "
              f"during checkpoint p50 {pct(busy, 50):.0f} p99 {pct(busy, 99):.0f}")
    assert len(busy) == 500
