"""``walstate bench``: put throughput beside sqlite3, LMDB (and RocksDB,
LevelDB when installed) and two raw Python loops, on this machine's disk.

Contenders run in alternation, several repetitions; the median is reported,
and every figure also as a ratio to a baseline measured in the same
repetition: durable contenders against a raw os.write + os.fdatasync loop,
non-durable ones against a raw os.write loop of the same framed records.
Workload: 16-byte keys, 100-byte random values, updates over a prefilled
key space.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

import crc32c as _crc

Runner = Callable[[str, list[tuple[bytes, bytes]]], float]


def _raw(durable: bool) -> Runner:
    def run(d: str, ops: list[tuple[bytes, bytes]]) -> float:
        fd = os.open(os.path.join(d, "raw.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        hdr = struct.Struct("<IIQ")
        t0 = time.perf_counter()
        for i, (k, v) in enumerate(ops):
            body = k + v
            os.write(fd, hdr.pack(_crc.crc32c(body), len(body), i) + body)
            if durable:
                os.fdatasync(fd)
        t = time.perf_counter() - t0
        os.close(fd)
        return t
    return run


def _walstate(sync: str) -> Runner:
    def run(d: str, ops: list[tuple[bytes, bytes]]) -> float:
        import walstate

        db = walstate.open(os.path.join(d, "ws"), sync=sync)
        put = db.put
        t0 = time.perf_counter()
        for k, v in ops:
            put(k, v)
        if sync == "none":
            pass
        t = time.perf_counter() - t0
        db._abandon()  # noqa: SLF001 - measure the writes, not the shutdown checkpoint
        return t
    return run


def _sqlite(sync: str) -> Runner:
    def run(d: str, ops: list[tuple[bytes, bytes]]) -> float:
        con = sqlite3.connect(os.path.join(d, "s.db"), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={sync}")
        con.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB)")
        t0 = time.perf_counter()
        for k, v in ops:
            con.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, v))
        t = time.perf_counter() - t0
        con.close()
        return t
    return run


def _lmdb(sync: bool) -> Runner:
    def run(d: str, ops: list[tuple[bytes, bytes]]) -> float:
        import lmdb

        env = lmdb.open(os.path.join(d, "l"), map_size=1 << 30, sync=sync, metasync=sync)
        t0 = time.perf_counter()
        for k, v in ops:
            with env.begin(write=True) as txn:
                txn.put(k, v)
        t = time.perf_counter() - t0
        env.close()
        return t
    return run


def _rocksdb(sync: bool) -> Runner:
    def run(d: str, ops: list[tuple[bytes, bytes]]) -> float:
        from rocksdict import Rdict, WriteOptions

        db = Rdict(os.path.join(d, "r"))
        wo = WriteOptions()
        wo.sync = sync
        db.set_write_options(wo)
        t0 = time.perf_counter()
        for k, v in ops:
            db[k] = v
        t = time.perf_counter() - t0
        db.close()
        return t
    return run


def _leveldb(sync: bool) -> Runner:
    def run(d: str, ops: list[tuple[bytes, bytes]]) -> float:
        import plyvel

        db = plyvel.DB(os.path.join(d, "p"), create_if_missing=True)
        t0 = time.perf_counter()
        for k, v in ops:
            db.put(k, v, sync=sync)
        t = time.perf_counter() - t0
        db.close()
        return t
    return run


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def contenders() -> tuple[list[tuple[str, bool, Runner]], list[str]]:
    """(name, durable, runner) of every contender here, and notes on the missing."""
    out: list[tuple[str, bool, Runner]] = [
        ("raw write+fdatasync", True, _raw(True)),
        ("walstate sync=always", True, _walstate("always")),
        ("sqlite3 WAL synchronous=FULL", True, _sqlite("FULL")),
        ("lmdb sync", True, _lmdb(True)),
        ("raw write", False, _raw(False)),
        ("walstate sync=none", False, _walstate("none")),
        ("sqlite3 WAL synchronous=NORMAL", False, _sqlite("NORMAL")),
        ("lmdb nosync", False, _lmdb(False)),
    ]
    notes = []
    if _available("rocksdict"):
        out += [("rocksdb sync", True, _rocksdb(True)), ("rocksdb nosync", False, _rocksdb(False))]
    else:
        notes.append("rocksdict not installed: RocksDB skipped (pip install 'walstate[bench]')")
    if _available("plyvel"):
        out += [("leveldb sync", True, _leveldb(True)), ("leveldb nosync", False, _leveldb(False))]
    else:
        notes.append("plyvel not installed: LevelDB skipped (pip install 'walstate[bench]')")
    return out, notes


def run(ops_durable: int, ops_fast: int, repeat: int, base: str | None) -> dict[str, Any]:
    rnd = random.Random(1)
    space = 100_000
    keys = [rnd.randbytes(16) for _ in range(space)]

    def workload(n: int) -> list[tuple[bytes, bytes]]:
        return [(keys[rnd.randrange(space)], rnd.randbytes(100)) for _ in range(n)]

    cont, notes = contenders()
    results: dict[str, list[float]] = {name: [] for name, _, _ in cont}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in cont}
    for _ in range(repeat):
        base_rate: dict[bool, float] = {}
        for name, durable, runner in cont:
            n = ops_durable if durable else ops_fast
            ops = workload(n)
            d = tempfile.mkdtemp(prefix="walstate-bench-", dir=base)
            try:
                secs = runner(d, ops)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            rate = n / secs
            if name.startswith("raw"):
                base_rate[durable] = rate
            results[name].append(rate)
            ratios[name].append(rate / base_rate[durable])
    rows = [{"contender": name, "durable": durable,
             "ops_per_s": statistics.median(results[name]),
             "ratio_to_raw": statistics.median(ratios[name])} for name, durable, _ in cont]
    return {"rows": rows, "notes": notes, "repeat": repeat, "ops_durable": ops_durable,
            "ops_fast": ops_fast}


def main(args: argparse.Namespace) -> int:
    quick = getattr(args, "quick", False)
    repeat = args.repeat or (1 if quick else 3)
    ops_d = args.ops or (200 if quick else 2000)
    ops_f = (args.ops or (2000 if quick else 50000)) * (1 if args.ops else 1)
    res = run(ops_d, ops_f, repeat, getattr(args, "dir", None))
    if args.json:
        print(json.dumps(res, sort_keys=True))
        return 0
    print(f"puts of 16-byte keys, 100-byte values; median of {repeat} run(s); ratio = ops/s "
          "divided by the raw loop of the same durability in the same run")
    print(f"{'contender':<34} {'durable':>7} {'ops/s':>12} {'x raw':>7}")
    for r in res["rows"]:
        print(f"{r['contender']:<34} {'yes' if r['durable'] else 'no':>7} "
              f"{r['ops_per_s']:>12,.0f} {r['ratio_to_raw']:>7.2f}")
    for n in res["notes"]:
        print(f"note: {n}")
    return 0
