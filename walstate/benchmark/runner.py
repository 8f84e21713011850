"""``walstate bench``: walstate beside the stores a Python user would pick
instead (sqlite3, py-lmdb, RocksDB, LevelDB) and raw Python loops, on this
machine's disk, one workload of the targets table (docs/PERFORMANCE.md) after another.

The grid: every workload has a baseline row and contender rows. In each
repetition every row of a workload is measured, one after the other (the
order rotates between repetitions), and every figure is divided by the
baseline measured in that same repetition; the report gives the median of
the values and the median of those ratios, because this machine is shared
and noisy. Targets are checked on the same in-run ratios.

Workload: 16-byte keys, 100-byte random values, a key space prefilled (not
timed) so that puts are updates. See docs/PERFORMANCE.md for the latest
table and what each contender's durability means (walstate.benchmark.peers.DURABILITY).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import crc32c as _crc

from ..layout import Layout, not_files
from . import peers
from .peers import RAW_HEADER, Items, Store, frame

THREADS = 4
BATCH = 1000
MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """How much each workload does (per contender and repetition)."""

    keys: int = 100_000            # key space, prefilled
    durable_ops: int = 2000        # durable puts, single writer
    thread_ops: int = 2000         # durable puts over all THREADS writers
    batches: int = 20              # durable batches of BATCH puts
    fast_ops: int = 100_000        # non-durable puts
    gets: int = 100_000            # random gets
    recovery_records: int = 1_000_000
    reopen_keys: int = 100_000     # keys in the checkpointed directory reopened
    ckpt_keys: int = 1_000_000     # dirty keys a checkpoint folds
    quiet_none: int = 50_000       # puts timed without a checkpoint (sync=none)
    quiet_always: int = 400        # the same under sync=always
    max_wal_mib: int = 64          # memory workload: max_wal_size
    wal_multiple: int = 20         # memory workload: writes this many max_wal_size
    repeat: int = 3


FULL = Sizes()
QUICK = Sizes(keys=10_000, durable_ops=150, thread_ops=200, batches=10, fast_ops=20_000,
              gets=20_000, recovery_records=100_000, reopen_keys=10_000, ckpt_keys=100_000,
              quiet_none=10_000, quiet_always=100, max_wal_mib=16, repeat=2)

Step = Callable[[str], dict[str, float]]


def _timed_gets(get: Callable[[bytes], Any], order: list[bytes]) -> float:
    """Seconds that get(k) takes for every k of order, in a plain loop."""
    t0 = time.perf_counter()
    for k in order:
        get(k)
    return time.perf_counter() - t0


@dataclass
class Workload:
    key: str
    title: str
    unit: str
    higher_better: bool
    baseline: str
    steps: list[Step]
    repeat: int | None = None      # None: Sizes.repeat
    detail: str = ""


@dataclass(frozen=True)
class Target:
    """``row`` (divided by ``versus`` in the same repetition, or absolute when
    ``versus`` is None) ``op`` ``bound``."""

    workload: str
    row: str
    versus: str | None
    op: str
    bound: float
    text: str


TARGETS = [
    Target("durable-1", "walstate sync=always", "raw write+fdatasync", ">=", 0.95,
           "durable single writer >= 0.95 x raw write+fdatasync loop"),
    Target("durable-1", "walstate sync=always", "leveldb sync", ">=", 1.0,
           "durable single writer >= LevelDB (sync)"),
    Target("durable-1", "walstate sync=always", "rocksdb sync", ">=", 1.0,
           "durable single writer >= RocksDB (sync)"),
    Target("durable-4t", "walstate sync=always", "raw write+fdatasync, own file per thread",
           ">=", 1.3, "4 durable writers >= 1.3 x raw loop (write+fdatasync per thread)"),
    Target("durable-4t", "walstate sync=always", "leveldb sync", ">=", 1.3,
           "4 durable writers >= 1.3 x LevelDB (sync)"),
    Target("batch-1000", "walstate sync=always", "leveldb sync", ">=", 1.2,
           "durable batches of 1000 >= 1.2 x LevelDB write_batch(sync=True)"),
    Target("batch-1000", "walstate sync=always", "raw write+fdatasync per batch", ">=", 0.9,
           "durable batches of 1000 >= 0.9 x raw one-write-one-fdatasync per batch"),
    Target("fast", "walstate sync=none", "leveldb nosync", ">=", 2.0,
           "non-durable puts >= 2 x LevelDB sync=False"),
    Target("fast", "walstate sync=none", "raw write", ">=", 1.5,
           "non-durable puts >= 1.5 x raw framed os.write loop"),
    Target("get-snapshot", "walstate", "lmdb, read txn per get", ">=", 1.0,
           "gets of checkpointed keys >= 1.0 x py-lmdb"),
    Target("get-memtable", "walstate", "dict.get", "<=", 2.0,
           "gets of keys written since the checkpoint <= 2 x the time of a dict lookup"),
    Target("recovery", "walstate open + first get", "python replay of the raw log", "<=", 0.3,
           "recovery <= 0.3 x a Python replay of the same raw log"),
    Target("recovery", "walstate open + first get", "rocksdb reopen + first get", "<=", 0.3,
           "recovery <= 0.3 x RocksDB reopening with the records in its WAL"),
    Target("reopen", "walstate open + first get", "lmdb open + first get", "<=", 3.0,
           "reopen after a checkpoint <= 3 x py-lmdb's open"),
    Target("checkpoint", "walstate checkpoint", None, ">=", 500_000,
           "a checkpoint folds >= 500k keys/s into LMDB"),
    Target("ckpt-latency-none", "during a checkpoint", "no checkpoint", "<=", 3.0,
           "p99 put latency during a checkpoint <= 3 x without (sync=none)"),
    Target("ckpt-latency-always", "during a checkpoint", "no checkpoint", "<=", 3.0,
           "p99 put latency during a checkpoint <= 3 x without (sync=always)"),
    Target("memory", "walstate RSS growth", "max_wal_size", "<=", 3.0,
           "RSS <= start + 3 x max_wal_size while writing 20 x max_wal_size"),
    Target("archive", "walstate sync=always, archive to a directory",
           "walstate sync=always, no archive", ">=", 0.95,
           "4 durable writers with WAL archiving >= 0.95 x without"),
]


# ---- the workload data ------------------------------------------------------------
class Data:
    """Keys, values and operation lists, deterministic from ``seed``."""

    def __init__(self, sizes: Sizes, seed: int = 1) -> None:
        self.rnd = rnd = random.Random(seed)
        self.keys = [rnd.randbytes(16) for _ in range(sizes.keys)]
        self.prefill: Items = [(k, rnd.randbytes(100)) for k in self.keys]

    def updates(self, n: int) -> Items:
        """``n`` puts of fresh random values to random keys of the key space."""
        keys, rnd = self.keys, self.rnd
        return [(keys[rnd.randrange(len(keys))], rnd.randbytes(100)) for _ in range(n)]

    def lookups(self, n: int) -> list[bytes]:
        keys, rnd = self.keys, self.rnd
        return [keys[rnd.randrange(len(keys))] for _ in range(n)]


def update_stream(seed: int, keys: int, n: int) -> Iterator[tuple[bytes, bytes]]:
    """The updates a recovery run writes: the same in every process."""
    rnd = random.Random(seed)
    space = [rnd.randbytes(16) for _ in range(keys)]
    for _ in range(n):
        yield space[rnd.randrange(keys)], rnd.randbytes(100)


def _finish(store: Store) -> None:
    if isinstance(store, peers.WalstateStore):
        store.abandon()
    else:
        store.close()


@contextlib.contextmanager
def _store(factory: peers.StoreFactory, d: str, prefill: Items | None) -> Iterator[Store]:
    s = factory(d)
    try:
        if prefill:
            s.prefill(prefill)
        yield s
    finally:
        _finish(s)


def _timed_puts(put: Callable[[bytes, bytes], Any], ops: Items,
                lat: list[float] | None) -> float:
    pc = time.perf_counter
    t0 = pc()
    if lat is None:
        for k, v in ops:
            put(k, v)
    else:
        for k, v in ops:
            t = pc()
            put(k, v)
            lat.append(pc() - t)
    return pc() - t0


def _run_threads(work: list[Callable[[], None]]) -> float:
    """Starts one thread per callable together; seconds until all are done."""
    gate = threading.Barrier(len(work) + 1)
    errors: list[BaseException] = []

    def body(fn: Callable[[], None]) -> None:
        gate.wait()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)

    ts = [threading.Thread(target=body, args=(fn,)) for fn in work]
    for t in ts:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return secs


def _raw_fd(d: str, name: str = "raw.log") -> int:
    return os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


# ---- the workloads -----------------------------------------------------------------
class Bench:
    def __init__(self, sizes: Sizes, base: str | None, only: set[str] | None) -> None:
        self.sz = sizes
        self.base = base
        self.only = only
        self.data = Data(sizes)
        self.notes: list[str] = []
        self.latencies: dict[str, list[float]] = {}   # durable single-writer put latencies
        self.extra: dict[str, Any] = {}
        self._prepared: dict[str, str] = {}
        self._keep = tempfile.mkdtemp(prefix="walstate-bench-prep-", dir=base)

    def close(self) -> None:
        shutil.rmtree(self._keep, ignore_errors=True)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- durable single writer --
    def durable_single(self) -> Workload:
        n, data = self.sz.durable_ops, self.data

        def raw(d: str) -> dict[str, float]:
            ops = data.updates(n)
            lat: list[float] = []
            fd = _raw_fd(d)
            pack, crc, write, fds, pc = RAW_HEADER.pack, _crc.crc32c, os.write, os.fdatasync, \
                time.perf_counter
            t0 = pc()
            for i, (k, v) in enumerate(ops):
                t = pc()
                body = k + v
                write(fd, pack(crc(body), len(body), i) + body)
                fds(fd)
                lat.append(pc() - t)
            secs = pc() - t0
            os.close(fd)
            self.latencies["raw write+fdatasync"] = lat
            return {"raw write+fdatasync": n / secs}

        def raw_prealloc(d: str) -> dict[str, float]:
            # the same loop into a file whose blocks exist already (zero-filled, as a
            # preallocated WAL segment): fdatasync then has no file size to persist
            ops = data.updates(n)
            rec = RAW_HEADER.size + 116
            fd = os.open(os.path.join(d, "pre.log"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, bytes(n * rec + 4096))
            os.fsync(fd)
            pack, crc, pwrite, fds = RAW_HEADER.pack, _crc.crc32c, os.pwrite, os.fdatasync
            t0 = time.perf_counter()
            off = 0
            for i, (k, v) in enumerate(ops):
                body = k + v
                off += pwrite(fd, pack(crc(body), len(body), i) + body, off)
                fds(fd)
            secs = time.perf_counter() - t0
            os.close(fd)
            return {"raw write+fdatasync, preallocated file": n / secs}

        steps: list[Step] = [raw, raw_prealloc]
        facts, notes = peers.factories("durable")
        for note in notes:
            self.note(note)
        for name, fac in facts.items():
            steps.append(self._put_step(name, fac, n, record=True))
        return Workload("durable-1", "durable single writer: each put returns after fdatasync",
                        "puts/s", True, "raw write+fdatasync", steps,
                        detail=f"{n} puts per contender, {self.sz.keys} keys prefilled")

    def _put_step(self, name: str, fac: peers.StoreFactory, n: int, record: bool) -> Step:
        data = self.data

        def step(d: str) -> dict[str, float]:
            ops = data.updates(n)
            lat: list[float] | None = [] if record else None
            with _store(fac, d, data.prefill) as s:
                secs = _timed_puts(s.put, ops, lat)
            if lat is not None:
                self.latencies[name] = lat
            return {name: n / secs}
        return step

    # -- durable, 4 writer threads --
    def durable_threads(self) -> Workload:
        per = max(1, self.sz.thread_ops // THREADS)
        n, data = per * THREADS, self.data

        def raw(d: str, shared: bool) -> dict[str, float]:
            fds = [_raw_fd(d, "raw.log" if shared else f"raw{i}.log") for i in range(THREADS)]
            parts = [data.updates(per) for _ in range(THREADS)]

            def writer(fd: int, ops: Items) -> Callable[[], None]:
                def run() -> None:
                    for i, (k, v) in enumerate(ops):
                        os.write(fd, frame(i, k, v))
                        os.fdatasync(fd)
                return run
            secs = _run_threads([writer(fd, ops) for fd, ops in zip(fds, parts, strict=True)])
            for fd in fds:
                os.close(fd)
            name = ("raw write+fdatasync, one shared file" if shared
                    else "raw write+fdatasync, own file per thread")
            return {name: n / secs}

        steps: list[Step] = [lambda d: raw(d, False), lambda d: raw(d, True)]
        facts, _ = peers.factories("durable")

        def store_step(name: str, fac: peers.StoreFactory) -> Step:
            def step(d: str) -> dict[str, float]:
                parts = [data.updates(per) for _ in range(THREADS)]
                with _store(fac, d, data.prefill) as s:
                    puts = [s.thread_put() for _ in range(THREADS)]

                    def writer(put: Callable[[bytes, bytes], Any], ops: Items
                               ) -> Callable[[], None]:
                        return lambda: _timed_puts(put, ops, None) and None
                    secs = _run_threads([writer(p, o) for p, o in zip(puts, parts, strict=True)])
                return {name: n / secs}
            return step

        for name, fac in facts.items():
            steps.append(store_step(name, fac))
        return Workload("durable-4t", f"durable, {THREADS} writer threads (each put returns "
                        "after fdatasync)", "puts/s", True,
                        "raw write+fdatasync, own file per thread", steps,
                        detail=f"{n} puts in all per contender")

    # -- durable batches of 1000 --
    def batches(self) -> Workload:
        nb, data = self.sz.batches, self.data

        def raw(d: str) -> dict[str, float]:
            groups = [data.updates(BATCH) for _ in range(nb)]
            fd = _raw_fd(d)
            t0 = time.perf_counter()
            seq = 0
            for g in groups:
                buf = b"".join([frame(seq + i, k, v) for i, (k, v) in enumerate(g)])
                seq += len(g)
                os.write(fd, buf)
                os.fdatasync(fd)
            secs = time.perf_counter() - t0
            os.close(fd)
            return {"raw write+fdatasync per batch": nb * BATCH / secs}

        steps: list[Step] = [raw]
        facts, _ = peers.factories("durable")

        def store_step(name: str, fac: peers.StoreFactory) -> Step:
            def step(d: str) -> dict[str, float]:
                groups = [data.updates(BATCH) for _ in range(nb)]
                with _store(fac, d, data.prefill) as s:
                    batch = s.batch
                    t0 = time.perf_counter()
                    for g in groups:
                        batch(g)
                    secs = time.perf_counter() - t0
                return {name: nb * BATCH / secs}
            return step

        for name, fac in facts.items():
            steps.append(store_step(name, fac))
        return Workload("batch-1000", f"durable batches of {BATCH} puts (one atomic write, "
                        "then fdatasync)", "puts/s", True, "raw write+fdatasync per batch",
                        steps, detail=f"{nb} batches per contender; walstate: with db.batch(); "
                        "LevelDB write_batch(sync=True); RocksDB WriteBatch, sync; sqlite3 one "
                        "transaction; lmdb one txn")

    # -- non-durable puts --
    def fast(self) -> Workload:
        n, data = self.sz.fast_ops, self.data

        def raw(d: str) -> dict[str, float]:
            ops = data.updates(n)
            fd = _raw_fd(d)
            pack, crc, write = RAW_HEADER.pack, _crc.crc32c, os.write
            t0 = time.perf_counter()
            for i, (k, v) in enumerate(ops):
                body = k + v
                write(fd, pack(crc(body), len(body), i) + body)
            secs = time.perf_counter() - t0
            os.close(fd)
            return {"raw write": n / secs}

        steps: list[Step] = [raw]
        facts, _ = peers.factories("fast")
        for name, fac in facts.items():
            steps.append(self._put_step(name, fac, n, record=False))
        return Workload("fast", "non-durable puts", "puts/s", True, "raw write", steps,
                        detail=f"{n} puts per contender, {self.sz.keys} keys prefilled")

    # -- random gets --
    def get_snapshot(self) -> Workload:
        data, n = self.data, self.sz.gets

        def ws(d: str) -> dict[str, float]:
            order = data.lookups(n)
            with _store(lambda d: peers.WalstateStore(d, "none"), d, data.prefill) as s:
                s.checkpoint()  # type: ignore[attr-defined]
                assert s.get(order[0]) is not None
                secs = _timed_gets(s.get, order)
            return {"walstate": n / secs}

        def lm(d: str) -> dict[str, float]:
            order = data.lookups(n)
            with _store(lambda d: peers.LmdbStore(d, False), d, data.prefill) as s:
                per = _timed_gets(s.get, order)
                with s.env.begin() as txn:  # type: ignore[attr-defined]
                    one = _timed_gets(txn.get, order)
            return {"lmdb, read txn per get": n / per, "lmdb, one read txn": n / one}

        def peer(name: str, fac: peers.StoreFactory) -> Step:
            def step(d: str) -> dict[str, float]:
                order = data.lookups(n)
                with _store(fac, d, data.prefill) as s:
                    if isinstance(s, peers.RocksStore):
                        s.db.flush()
                    secs = _timed_gets(s.get, order)
                return {name: n / secs}
            return step

        steps: list[Step] = [ws, lm, peer("sqlite3", lambda d: peers.SqliteStore(d, "NORMAL"))]
        if peers.available("rocksdict"):
            steps.append(peer("rocksdb", lambda d: peers.RocksStore(d, False)))
        if peers.available("plyvel"):
            steps.append(peer("leveldb", lambda d: peers.LevelStore(d, False)))
        return Workload("get-snapshot", "random gets of checkpointed keys", "gets/s", True,
                        "lmdb, read txn per get", steps,
                        detail=f"{n} gets over {self.sz.keys} keys; walstate: all keys in the "
                        "LMDB snapshot, memtable empty; walstate reads through one read txn "
                        "per get, as the lmdb baseline does")

    def get_memtable(self) -> Workload:
        data, n = self.data, self.sz.gets

        def dct(d: str) -> dict[str, float]:
            order = data.lookups(n)
            table = dict(data.prefill)
            return {"dict.get": _timed_gets(table.get, order) / n * 1e9}

        def ws(d: str) -> dict[str, float]:
            order = data.lookups(n)
            with _store(lambda d: peers.WalstateStore(d, "none"), d, data.prefill) as s:
                secs = _timed_gets(s.get, order)
            return {"walstate": secs / n * 1e9}

        return Workload("get-memtable", "random gets of keys written since the last "
                        "checkpoint", "ns/get", False, "dict.get", [dct, ws],
                        detail=f"{n} gets over {self.sz.keys} keys, loop overhead included "
                        "in both")

    # -- recovery --
    def _prepare_recovery(self) -> None:
        n, keys = self.sz.recovery_records, self.sz.keys
        root = self._keep
        # the raw framed log of the same updates
        raw = os.path.join(root, "raw.log")
        with open(raw, "wb") as f:
            buf = []
            for i, (k, v) in enumerate(update_stream(7, keys, n)):
                buf.append(frame(i, k, v))
                if len(buf) == 10000:
                    f.write(b"".join(buf))
                    buf = []
            f.write(b"".join(buf))
        self._prepared["raw"] = raw
        for kind in ["walstate"] + (["rocksdb"] if peers.available("rocksdict") else []):
            path = os.path.join(root, f"rec-{kind}")
            out = _child(["recovery-writer", kind, path, str(keys), str(n)])
            self.extra[f"recovery_prepare_{kind}"] = out
            self._prepared[kind] = path
        self._last = list(update_stream(7, keys, n))[-1]

    def recovery(self) -> Workload:
        n = self.sz.recovery_records
        state: dict[str, bool] = {}

        def prep() -> None:
            if not state:
                self._prepare_recovery()
                state["done"] = True

        def replay(d: str) -> dict[str, float]:
            prep()
            key, value = self._last
            t0 = time.perf_counter()
            got = python_replay(self._prepared["raw"], key)
            secs = time.perf_counter() - t0
            assert got == value, "python replay lost the last record"
            return {"python replay of the raw log": secs}

        def ws(d: str) -> dict[str, float]:
            import walstate

            prep()
            key, value = self._last
            path = os.path.join(d, "ws")
            shutil.copytree(self._prepared["walstate"], path, ignore=not_files)
            t0 = time.perf_counter()
            db = walstate.open(path)
            got = db.get(key)
            secs = time.perf_counter() - t0
            rec = db.info()["recovery"]
            db.close()
            assert got == value, "walstate recovery lost the last record"
            t0 = time.perf_counter()
            with walstate.open(self._prepared["walstate"], read_only=True) as db:
                db.get(key)
                ro = time.perf_counter() - t0
            self.extra["walstate_recovery_report"] = rec
            return {"walstate open + first get": secs,
                    "walstate read-only open + first get (replay only)": ro}

        def rocks(d: str) -> dict[str, float]:
            from rocksdict import Rdict

            prep()
            key, value = self._last
            path = os.path.join(d, "rocks")
            shutil.copytree(self._prepared["rocksdb"], path)
            t0 = time.perf_counter()
            db = Rdict(path, peers.rocksdb_options(big_memtable=True))
            got = db.get(key)
            secs = time.perf_counter() - t0
            db.close()
            assert got == value, "rocksdb reopen lost the last record"
            return {"rocksdb reopen + first get": secs}

        steps: list[Step] = [replay, ws]
        if peers.available("rocksdict"):
            steps.append(rocks)
        return Workload("recovery", f"recovery: {n:,} un-checkpointed records, open + first get",
                        "s", False, "python replay of the raw log", steps,
                        detail=f"updates over {self.sz.keys} keys; walstate: read-write open "
                        "(replay + the recovery checkpoint it runs); rocksdb: written with the "
                        "WAL on, write_buffer_size 1 GiB (no memtable flush), the writer "
                        "process exits with os._exit() after flush_wal() (no close, no flush); "
                        "each repetition opens a fresh copy")

    # -- reopen after a checkpoint --
    def reopen(self) -> Workload:
        import lmdb

        import walstate

        state: dict[str, str] = {}
        k0 = self.data.keys[0]
        items = self.data.prefill[:self.sz.reopen_keys]

        def prep() -> None:
            if state:
                return
            d = tempfile.mkdtemp(prefix="reopen-", dir=self._keep)
            state["ws"] = os.path.join(d, "ws")
            with walstate.open(state["ws"], sync="none") as db:
                for i in range(0, len(items), 5000):
                    with db.batch() as b:
                        for k, v in items[i:i + 5000]:
                            b.put(k, v)
                db.checkpoint()
            s = peers.LmdbStore(d, True)
            s.prefill(items)
            s.close()
            state["lmdb"] = s.path

        def median_of(fn: Callable[[], None], times: int = 5) -> float:
            out = []
            for _ in range(times):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return statistics.median(out) * 1e3

        def ws(d: str) -> dict[str, float]:
            prep()
            dbs = []

            def once() -> None:
                db = walstate.open(state["ws"])
                db.get(k0)
                dbs.append(db)
            ms = []
            for _ in range(5):
                ms.append(median_of(once, 1))
                dbs.pop().close()  # not timed
            return {"walstate open + first get": statistics.median(ms)}

        def lm(d: str) -> dict[str, float]:
            prep()
            envs = []

            def once() -> None:
                env = lmdb.open(state["lmdb"], map_size=4 << 30)
                with env.begin() as txn:
                    txn.get(k0)
                envs.append(env)
            ms = []
            for _ in range(5):
                ms.append(median_of(once, 1))
                envs.pop().close()
            return {"lmdb open + first get": statistics.median(ms)}

        return Workload("reopen", "reopen after a checkpoint (clean close), open + first get",
                        "ms", False, "lmdb open + first get", [lm, ws],
                        detail=f"{len(items)} keys; median of 5 opens per repetition")

    # -- checkpoint fold rate and put latency during a checkpoint --
    def _dirty(self) -> Items:
        rnd = random.Random(11)
        pool = [rnd.randbytes(100) for _ in range(1024)]
        return [(rnd.randbytes(16), pool[i & 1023]) for i in range(self.sz.ckpt_keys)]

    def checkpoint(self) -> Workload:
        n = self.sz.ckpt_keys
        big = {"max_wal_size": 1 << 40, "checkpoint_timeout": 1e6}

        def ws(d: str) -> dict[str, float]:
            items = self._dirty()
            with _store(lambda d: peers.WalstateStore(d, "none", **big), d, items) as s:
                t0 = time.perf_counter()
                info = s.checkpoint()  # type: ignore[attr-defined]
                secs = time.perf_counter() - t0
            del items
            gc.collect()
            return {"walstate checkpoint": info.keys_written / secs}

        def lm(d: str) -> dict[str, float]:
            items = self._dirty()
            with _store(lambda d: peers.LmdbStore(d, True), d, None) as s:
                t0 = time.perf_counter()
                s.batch(sorted(items))
                secs = time.perf_counter() - t0
            del items
            gc.collect()
            return {"lmdb: sort + one txn of the same keys": n / secs}

        return Workload("checkpoint", f"checkpoint: fold {n:,} dirty keys into LMDB", "keys/s",
                        True, "lmdb: sort + one txn of the same keys", [lm, ws],
                        detail="walstate: db.checkpoint() after the keys were written with "
                        "sync=none, no other writer")

    def ckpt_latency(self, sync: str) -> Workload:
        n = self.sz.ckpt_keys
        quiet = self.sz.quiet_always if sync == "always" else self.sz.quiet_none
        big = {"max_wal_size": 1 << 40, "checkpoint_timeout": 1e6}
        data = self.data

        def step(d: str) -> dict[str, float]:
            items = self._dirty()
            with _store(lambda d: peers.WalstateStore(d, sync, **big), d, items) as s:
                del items
                lat_q: list[float] = []
                _timed_puts(s.put, data.updates(quiet), lat_q)
                ops = data.updates(quiet)
                lat_b: list[float] = []
                pc, put = time.perf_counter, s.put
                t = threading.Thread(target=s.checkpoint)  # type: ignore[attr-defined]
                t0 = pc()
                t.start()
                i = 0
                while t.is_alive():
                    k, v = ops[i % quiet]
                    a = pc()
                    put(k, v)
                    lat_b.append(pc() - a)
                    i += 1
                t.join()
                ck = pc() - t0
            gc.collect()
            p = percentiles
            self.extra[f"ckpt_latency_{sync}"] = {
                "no checkpoint": p(lat_q), "during a checkpoint": p(lat_b),
                "puts during": len(lat_b), "checkpoint seconds": ck}
            return {"no checkpoint": p(lat_q)["p99"], "during a checkpoint": p(lat_b)["p99"]}

        return Workload(f"ckpt-latency-{sync}", f"p99 put latency, sync={sync}, while a "
                        f"checkpoint of {n:,} dirty keys runs", "us p99", False,
                        "no checkpoint", [step],
                        detail=f"{quiet} puts timed alone, then puts timed until the "
                        "checkpoint (another thread) finishes")

    # -- memory --
    def memory(self) -> Workload:
        m = self.sz.max_wal_mib

        def ws(d: str) -> dict[str, float]:
            out = _child(["memory", "walstate", os.path.join(d, "ws"), str(self.sz.keys),
                          str(m), str(self.sz.wal_multiple)])
            self.extra["memory_walstate"] = out
            return {"walstate RSS growth": (out["peak"] - out["start"]) / MiB,
                    "walstate WAL on disk, peak": out["wal_peak"] / MiB,
                    "max_wal_size": float(m)}

        def dct(d: str) -> dict[str, float]:
            out = _child(["memory", "dict", d, str(self.sz.keys), str(m),
                          str(self.sz.wal_multiple)])
            self.extra["memory_dict"] = out
            return {"python dict RSS growth (same updates)": (out["peak"] - out["start"]) / MiB}

        return Workload("memory", f"memory: RSS growth while writing {self.sz.wal_multiple} x "
                        f"max_wal_size ({m} MiB) of updates, sync=none", "MiB", False,
                        "max_wal_size", [ws, dct], repeat=1,
                        detail=f"updates over {self.sz.keys} keys, segment_size = max_wal_size/4; "
                        "RSS from /proc/self/statm in a fresh process, sampled every 10k puts")

    # -- durable, 4 writer threads, WAL archiving on vs off --
    def archive(self) -> Workload:
        import walstate

        per = max(1, self.sz.thread_ops // THREADS)
        n, data = per * THREADS, self.data
        off, on = "walstate sync=always, no archive", "walstate sync=always, archive to a directory"

        def run(d: str, archive: bool) -> dict[str, float]:
            parts = [data.updates(per) for _ in range(THREADS)]
            opts: dict[str, Any] = ({"archive": os.path.join(d, "archive"),
                                     "archive_interval": 1.0} if archive else {})
            db = walstate.open(os.path.join(d, "db"), **opts)
            lags: list[float] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    lags.append(db.info()["archive"]["lag_seconds"])
                    stop.wait(0.01)
            sampler = threading.Thread(target=sample) if archive else None
            try:
                if sampler is not None:
                    sampler.start()
                secs = _run_threads([
                    (lambda ops=ops: _timed_puts(db.put, ops, None) and None)  # type: ignore[misc]
                    for ops in parts])
            finally:
                stop.set()
                if sampler is not None:
                    sampler.join()
                db.close()
            if lags:
                lags.sort()
                self.note(f"archive: lag while {THREADS} durable writers ran: p50 "
                          f"{lags[len(lags) // 2]:.3f} s, p99 "
                          f"{lags[min(int(0.99 * len(lags)), len(lags) - 1)]:.3f} s "
                          "(archive_interval 1 s, a local directory archive)")
            return {on if archive else off: n / secs}

        return Workload("archive", f"durable, {THREADS} writer threads, WAL archiving on vs off",
                        "puts/s", True, off, [lambda d: run(d, False), lambda d: run(d, True)],
                        detail=f"{n} puts in all per contender; the archive is a directory on "
                        "the same disk")

    def workloads(self) -> list[Callable[[], Workload]]:
        return [self.durable_single, self.durable_threads, self.batches, self.fast,
                self.get_snapshot, self.get_memtable, self.recovery, self.reopen,
                self.checkpoint, lambda: self.ckpt_latency("none"),
                lambda: self.ckpt_latency("always"), self.memory, self.archive]


WORKLOAD_KEYS = ["durable-1", "durable-4t", "batch-1000", "fast", "get-snapshot",
                 "get-memtable", "recovery", "reopen", "checkpoint", "ckpt-latency-none",
                 "ckpt-latency-always", "memory", "archive"]


def percentiles(xs: list[float]) -> dict[str, float]:
    """p50/p99/max of latencies in seconds, in microseconds."""
    s = sorted(xs)
    if not s:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}

    def q(f: float) -> float:
        return s[min(len(s) - 1, int(f * len(s)))] * 1e6
    return {"p50": q(0.5), "p99": q(0.99), "max": s[-1] * 1e6, "n": len(s)}


def python_replay(path: str, key: bytes) -> bytes | None:
    """The baseline recovery: read the raw framed log, check every CRC, build a
    dict, look ``key`` up."""
    unpack, crc = RAW_HEADER.unpack_from, _crc.crc32c
    hs = RAW_HEADER.size
    table: dict[bytes, bytes] = {}
    with open(path, "rb") as f:
        data = f.read()
    mv = memoryview(data)
    pos, end = 0, len(data)
    while pos + hs <= end:
        c, n, _seq = unpack(data, pos)
        body = mv[pos + hs:pos + hs + n]
        if len(body) < n or crc(body) != c:
            break
        table[bytes(body[:16])] = bytes(body[16:])
        pos += hs + n
    return table.get(key)


# ---- child processes ----------------------------------------------------------------
def _child(argv: list[str]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "walstate.benchmark", *argv],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"bench child {argv[0]} failed: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dir_bytes(path: str) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except FileNotFoundError:
        return 0


def child_memory(kind: str, path: str, keys: int, max_wal_mib: int, multiple: int) -> dict:
    """Writes ``multiple`` x max_wal_size of updates; RSS start/peak/end."""
    rnd = random.Random(3)
    space = [rnd.randbytes(16) for _ in range(keys)]
    pool = [rnd.randbytes(100) for _ in range(1024)]
    n = multiple * max_wal_mib * MiB // (28 + 2 + 16 + 100)  # walstate's record size
    wal_dir = Layout(path).wal
    if kind == "walstate":
        import walstate

        db = walstate.open(path, sync="none", max_wal_size=max_wal_mib * MiB,
                           segment_size=max(4096, max_wal_mib * MiB // 4))
        put = db.put
    else:
        table: dict[bytes, bytes] = {}
        put = table.__setitem__
    gc.collect()
    start = peak = _statm_rss()
    wal_peak = 0
    t0 = time.perf_counter()
    step = 7919  # a prime: walks the key space in a scattered order
    j = 0
    for i in range(n):
        j = (j + step) % keys
        put(space[j], pool[i & 1023])
        if i % 10000 == 0:
            peak = max(peak, _statm_rss())
            if kind == "walstate" and i % 100000 == 0:
                wal_peak = max(wal_peak, _dir_bytes(wal_dir))
    secs = time.perf_counter() - t0
    end = _statm_rss()
    peak = max(peak, end)
    out = {"start": start, "peak": peak, "end": end, "puts": n, "seconds": secs,
           "wal_peak": max(wal_peak, _dir_bytes(wal_dir))}
    if kind == "walstate":
        out["checkpoints"] = db.stats()["checkpoints"]
        db.close()
    return out


def child_recovery_writer(kind: str, path: str, keys: int, n: int) -> dict:
    """Writes ``n`` updates that stay un-checkpointed, then exits without closing."""
    stream = update_stream(7, keys, n)
    if kind == "walstate":
        import walstate

        db = walstate.open(path, sync="none", max_wal_size=1 << 40, checkpoint_timeout=1e6)
        put = db.put
        for k, v in stream:
            put(k, v)
        db.sync()  # the records on disk; no checkpoint, no close
        out = {"wal_bytes": db.info()["wal_bytes"]}
    else:
        from rocksdict import Rdict, WriteOptions

        db = Rdict(path, peers.rocksdb_options(big_memtable=True))
        wo = WriteOptions()
        wo.sync = False
        wo.disable_wal = False
        db.set_write_options(wo)
        put = db.put
        for k, v in stream:
            put(k, v)
        db.flush_wal(True)  # the WAL on disk; the memtable is never flushed
        files = os.listdir(path)
        out = {"sst_files": sum(f.endswith(".sst") for f in files),
               "wal_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in files
                                if f.endswith(".log"))}
    print(json.dumps(out), flush=True)
    os._exit(0)  # a crash as far as the store knows: no close, no flush


# ---- the grid -----------------------------------------------------------------------
@dataclass
class Row:
    name: str
    values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None


def run_workload(w: Workload, repeat: int, base: str | None,
                 progress: Callable[[str], None]) -> tuple[dict[str, Row], list[dict]]:
    rows: dict[str, Row] = {}
    reps: list[dict[str, float]] = []
    reps_n = w.repeat or repeat
    for r in range(reps_n):
        got: dict[str, float] = {}
        k = r % len(w.steps)
        for step in w.steps[k:] + w.steps[:k]:  # rotate: no contender always goes first
            d = tempfile.mkdtemp(prefix="walstate-bench-", dir=base)
            try:
                got.update(step(d))
            finally:
                shutil.rmtree(d, ignore_errors=True)
            gc.collect()
        reps.append(got)
        progress(f"  {w.key} repetition {r + 1}/{reps_n} done")
        b = got.get(w.baseline)
        for name, v in got.items():
            row = rows.setdefault(name, Row(name))
            row.values.append(v)
            if b:
                row.ratios.append(v / b)
    # baseline first, then in the order measured
    order = [w.baseline] + [n for n in rows if n != w.baseline]
    return {n: rows[n] for n in order if n in rows}, reps


def check_targets(workload_key: str, reps: list[dict[str, float]]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        if t.workload != workload_key:
            continue
        vals = []
        for got in reps:
            if t.row not in got or (t.versus is not None and t.versus not in got):
                continue
            vals.append(got[t.row] / got[t.versus] if t.versus else got[t.row])
        if not vals:
            out.append({**asdict(t), "value": None, "met": None})
            continue
        v = statistics.median(vals)
        met = v >= t.bound if t.op == ">=" else v <= t.bound
        out.append({**asdict(t), "value": v, "met": met})
    return out


def run(sizes: Sizes, base: str | None = None, only: set[str] | None = None,
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from . import report

    bench = Bench(sizes, base, only)
    results = []
    t_all = time.perf_counter()
    try:
        for make in bench.workloads():
            w = make()
            if only and w.key not in only:
                continue
            progress(f"{w.key}: {w.title}")
            t0 = time.perf_counter()
            rows, reps = run_workload(w, sizes.repeat, base, progress)
            results.append({
                "key": w.key, "title": w.title, "unit": w.unit, "higher_better": w.higher_better,
                "baseline": w.baseline, "detail": w.detail, "seconds": time.perf_counter() - t0,
                "rows": [{"contender": r.name, "value": r.value, "ratio": r.ratio,
                          "values": r.values, "durability": peers.durability(r.name)}
                         for r in rows.values()],
                "repetitions": reps,
                "targets": check_targets(w.key, reps),
            })
    finally:
        bench.close()
    for t in (t for r in results for t in r["targets"]):
        if t["value"] is None:
            bench.note(f"target not checked (a contender is missing): {t['text']}")
    return {"machine": report.machine(base), "versions": peers.versions(),
            "sizes": asdict(sizes), "workloads": results, "notes": bench.notes,
            "extra": bench.extra, "seconds": time.perf_counter() - t_all,
            "latencies_us": {k: [x * 1e6 for x in v] for k, v in bench.latencies.items()}}


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    sz = QUICK if getattr(args, "quick", False) else FULL
    if getattr(args, "ops", None):
        n = args.ops
        sz = replace(sz, durable_ops=n, thread_ops=n, batches=max(2, n // 50),
                     fast_ops=n * 50, gets=n * 50, quiet_always=max(20, n // 2),
                     quiet_none=n * 50)
    if getattr(args, "records", None):
        n = args.records
        sz = replace(sz, recovery_records=n, ckpt_keys=n, keys=min(sz.keys, n),
                     reopen_keys=min(sz.reopen_keys, n))
    if getattr(args, "max_wal_mib", None):
        sz = replace(sz, max_wal_mib=args.max_wal_mib)
    if getattr(args, "repeat", None):
        sz = replace(sz, repeat=args.repeat)
    return sz


def main(args: argparse.Namespace) -> int:
    from . import report

    sizes = sizes_from_args(args)
    only = None
    if getattr(args, "only", None):
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = only - set(WORKLOAD_KEYS)
        if unknown:
            print(f"walstate bench: unknown workload(s) {', '.join(sorted(unknown))}; "
                  f"choose from {', '.join(WORKLOAD_KEYS)}", file=sys.stderr)
            return 2
    res = run(sizes, getattr(args, "dir", None), only,
              progress=lambda s: print(s, file=sys.stderr, flush=True))
    plot = getattr(args, "plot", None)
    if plot:
        msg = report.plot(res, plot)
        res["notes"].append(msg)
    if args.json:
        print(json.dumps(res, sort_keys=True))
    elif getattr(args, "markdown", False):
        print(report.markdown(res))
    else:
        print(report.text(res))
    return 0


def _child_main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "memory":
        kind, path, keys, mib, mult = argv[1:6]
        print(json.dumps(child_memory(kind, path, int(keys), int(mib), int(mult))))
        return 0
    if cmd == "recovery-writer":
        kind, path, keys, n = argv[1:5]
        child_recovery_writer(kind, path, int(keys), int(n))
    print(f"unknown bench child command {cmd!r}", file=sys.stderr)
    return 2

