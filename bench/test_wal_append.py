"""Appending 100-byte records to the C WAL from Python, beside raw loops.

Groups (each with its baseline):
  none       Wal.put, sync never  vs  os.write of the same framed records
  always-Nt  Wal.put + sync from N threads  vs  os.write + os.fdatasync per record,
             each thread on its own file
  batch1000  1000 Wal.put + one sync  vs  one os.write of 1000 framed records + fdatasync
Run: pytest bench/test_wal_append.py --benchmark-only
"""

from __future__ import annotations

import os
import struct
import threading

import crc32c
import pytest
from conftest import record

from walstate.wal import Wal

KEY = b"k" * 16
VAL = os.urandom(100)
HDR = struct.Struct("<IIQ")
FRAMED = HDR.pack(crc32c.crc32c(KEY + VAL), len(KEY) + len(VAL), 1) + KEY + VAL
N_FAST = 20000
N_SYNC = 300


def _wal(d: str) -> Wal:
    return Wal(os.path.join(d, "wal"), system_id=1, segment_size=64 << 20)


def _mkwal(d: str) -> Wal:
    os.makedirs(os.path.join(d, "wal"), exist_ok=True)
    return _wal(d)


def test_none_walstate(benchmark, bench_dir):
    w = _mkwal(bench_dir)

    def run():
        for _ in range(N_FAST):
            w.put(KEY, VAL)
    benchmark.pedantic(run, rounds=5)
    w.close()
    record("none", "walstate", N_FAST, benchmark)


def test_none_baseline(benchmark, bench_dir):
    fd = os.open(os.path.join(bench_dir, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def run():
        for _ in range(N_FAST):
            os.write(fd, FRAMED)
    benchmark.pedantic(run, rounds=5)
    os.close(fd)
    record("none", "baseline", N_FAST, benchmark)


@pytest.mark.parametrize("threads", [1, 4, 8])
def test_always_walstate(benchmark, bench_dir, threads):
    w = _mkwal(bench_dir)

    def worker():
        for _ in range(N_SYNC // threads * threads // threads):
            w.sync(w.put(KEY, VAL))

    def run():
        ts = [threading.Thread(target=worker) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    benchmark.pedantic(run, rounds=3)
    w.close()
    record(f"always-{threads}t", "walstate", N_SYNC // threads * threads, benchmark)


@pytest.mark.parametrize("threads", [1, 4, 8])
def test_always_baseline(benchmark, bench_dir, threads):
    fds = [os.open(os.path.join(bench_dir, f"raw{i}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
           for i in range(threads)]

    def worker(fd):
        for _ in range(N_SYNC // threads):
            os.write(fd, FRAMED)
            os.fdatasync(fd)

    def run():
        ts = [threading.Thread(target=worker, args=(fd,)) for fd in fds]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    benchmark.pedantic(run, rounds=3)
    for fd in fds:
        os.close(fd)
    record(f"always-{threads}t", "baseline", N_SYNC // threads * threads, benchmark)


def test_batch1000_walstate(benchmark, bench_dir):
    w = _mkwal(bench_dir)

    def run():
        for _ in range(1000):
            w.put(KEY, VAL)
        w.sync()
    benchmark.pedantic(run, rounds=20)
    w.close()
    record("batch1000", "walstate", 1000, benchmark)


def test_batch1000_baseline(benchmark, bench_dir):
    fd = os.open(os.path.join(bench_dir, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def run():
        os.write(fd, b"".join(FRAMED for _ in range(1000)))
        os.fdatasync(fd)
    benchmark.pedantic(run, rounds=20)
    os.close(fd)
    record("batch1000", "baseline", 1000, benchmark)
