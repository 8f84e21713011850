"""close() racing other threads' calls (issue 12, item 3): every call returns
normally or raises ClosedError; once close() has begun new writes raise and
write nothing; after reopen the shutdown was clean, every write that returned
is there and every write that raised is absent; close() takes what the writes
already in flight need, not as long as other threads keep writing."""

from __future__ import annotations

import random
import threading
import time

import pytest

import walstate


class Worker(threading.Thread):
    """Writes in a loop until it has seen ClosedError a few times; records what
    each call did."""

    def __init__(self, db, wid: int, ops: tuple[str, ...], seed: int) -> None:
        super().__init__(daemon=True)
        self.db, self.wid, self.ops = db, wid, ops
        self.rng = random.Random(seed)
        self.ok: dict[bytes, bytes] = {}          # key -> value, for writes that returned
        self.deleted: set[bytes] = set()          # deletes that returned
        self.raised: set[bytes] = set()           # keys of writes that raised
        self.undeleted: dict[bytes, bytes] = {}   # deletes that raised: the value stays
        self.bad: list[str] = []
        self.calls = 0
        self.after_close: list[str] = []          # outcomes of calls begun after close()
        self.closed_at: float | None = None       # set by the test when close() returned

    def run(self) -> None:
        n, closed_seen = 0, 0
        while closed_seen < 3 and n < 10_000_000:
            op = self.rng.choice(self.ops)
            n += 1
            key = b"w%d-%08d" % (self.wid, n)
            began_after = self.closed_at is not None
            try:
                if op == "put":
                    self.db.put(key, b"v%d" % n)
                    self.ok[key] = b"v%d" % n
                elif op == "put_buf":   # the general (Python) path
                    self.db.put(bytearray(key), memoryview(b"k%d" % n))
                    self.ok[key] = b"k%d" % n
                elif op == "delete":
                    if not self.ok:
                        continue
                    victim = next(iter(self.ok))
                    value = self.ok.pop(victim)
                    try:
                        self.db.delete(victim)
                    except BaseException:
                        self.undeleted[victim] = value
                        raise
                    self.deleted.add(victim)
                elif op == "batch":
                    with self.db.batch() as b:
                        b.put(key, b"b1")
                        b.put(key + b"-2", b"b2")
                    self.ok[key] = b"b1"
                    self.ok[key + b"-2"] = b"b2"
                elif op == "checkpoint":
                    self.db.checkpoint()
                elif op == "sync":
                    self.db.sync()
                elif op == "get":
                    self.db.get(key)
                    list(self.db.items(b"w", b"w0"))
                self.calls += 1
                if began_after:
                    self.after_close.append(f"{op} returned")
            except walstate.ClosedError:
                closed_seen += 1
                if op in ("put", "put_buf", "batch"):
                    self.raised.add(key)
                    if op == "batch":
                        self.raised.add(key + b"-2")
            except BaseException as exc:  # anything else is a bug
                self.bad.append(f"{op}: {type(exc).__name__}: {exc}")
                return


def race(path: str, ops_per_worker: list[tuple[str, ...]], *, sync: str, run_for: float,
         seed: int, **options) -> tuple[float, list[Worker], int]:
    db = walstate.open(path, sync=sync, segment_size=1 << 20, **options)
    workers = [Worker(db, i, ops, seed * 100 + i) for i, ops in enumerate(ops_per_worker)]
    for w in workers:
        w.start()
    time.sleep(run_for)
    t0 = time.monotonic()
    db.close()
    took = time.monotonic() - t0
    for w in workers:
        w.closed_at = took
    for w in workers:
        w.join(30)
        assert not w.is_alive(), "a worker hung after close()"
    calls = sum(w.calls for w in workers)
    return took, workers, calls


def check(path: str, workers: list[Worker]) -> int:
    for w in workers:
        assert not w.bad, w.bad
        assert not [a for a in w.after_close if "returned" in a], w.after_close
    with walstate.open(path) as db:
        rec = db.info()["recovery"]
        got = dict(db.items())
    assert rec["clean_shutdown"] is True, rec
    n = 0
    for w in workers:
        for k, v in w.ok.items():
            assert got.get(k) == v, f"a write that returned is missing: {k!r}"
        for k in w.deleted:
            assert k not in got, f"a delete that returned did not happen: {k!r}"
        for k, v in w.undeleted.items():
            assert got.get(k) == v, f"a delete that raised happened: {k!r}"
        for k in w.raised:
            assert k not in got, f"a write that raised ClosedError is durable: {k!r}"
        n += len(w.ok) + len(w.raised)
    return n


WRITERS = ("put", "put_buf", "delete", "batch")


@pytest.mark.parametrize("sync", ["always", "none"])
def test_close_racing_writers_readers_and_checkpoints(tmp_path, sync):
    path = str(tmp_path / "db")
    took, workers, calls = race(
        path, [WRITERS, WRITERS, ("put", "batch", "sync"), ("checkpoint", "put", "get")],
        sync=sync, run_for=0.3, seed=1)
    n = check(path, workers)
    print(f"sync={sync}: close took {took * 1000:.1f} ms after {calls} calls; {n} writes "
          "checked")
    assert took < 10.0, f"close() took {took:.1f} s"


def test_close_while_threads_put_flat_out_under_sync_none(tmp_path):
    """(Found: writes went on during the shutdown checkpoint; close took seconds and
    the next open replayed the writes appended after SHUTDOWN.)"""
    path = str(tmp_path / "db")
    took, workers, calls = race(path, [("put",)] * 3, sync="none", run_for=1.0, seed=2,
                                max_wal_size=1 << 30)
    n = check(path, workers)
    print(f"close took {took * 1000:.1f} ms after {calls} puts; {n} checked")
    assert took < 10.0, f"close() took {took:.1f} s"


def test_close_while_a_thread_checkpoints_in_a_loop(tmp_path):
    """(Found: close() waited 66-176 s for the checkpoint lock.)"""
    path = str(tmp_path / "db")
    took, workers, calls = race(path, [("checkpoint",), ("checkpoint",), ("put", "batch")],
                                sync="none", run_for=0.5, seed=3)
    check(path, workers)
    print(f"close took {took * 1000:.1f} ms after {calls} calls")
    assert took < 10.0, f"close() took {took:.1f} s"


def test_every_call_after_close_raises_closed_error(tmp_path):
    db = walstate.open(str(tmp_path / "db"))
    db.put(b"k", b"v")
    b = db.batch()
    b.put(b"in-batch", b"1")
    db.close()
    calls = {
        "put": lambda: db.put(b"k", b"v"), "put_buf": lambda: db.put(bytearray(b"k"), b"v"),
        "get": lambda: db.get(b"k"), "get_default": lambda: db.get(b"zz", b"d"),
        "contains": lambda: b"k" in db, "delete": lambda: db.delete(b"k"),
        "batch": db.batch, "batch_commit": lambda: b.__exit__(None, None, None),
        "items": lambda: list(db.items()), "checkpoint": db.checkpoint, "sync": db.sync,
        "info": db.info, "stats": db.stats,
    }
    for name, call in calls.items():
        with pytest.raises(walstate.ClosedError):
            call()
        assert name
    db.close()  # idempotent
    with walstate.open(str(tmp_path / "db")) as db2:
        assert dict(db2.items()) == {b"k": b"v"}


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["always", "interval", "none"])
def test_close_races_many_rounds(tmp_path, sync):
    times = []
    for r in range(40):
        path = str(tmp_path / f"db{r}")
        took, workers, _calls = race(
            path, [WRITERS, WRITERS, ("put", "batch", "sync"), ("checkpoint", "put", "get")],
            sync=sync, run_for=random.uniform(0.01, 0.3), seed=100 + r, sync_interval=0.01)
        check(path, workers)
        times.append(took)
    print(f"sync={sync}: 40 rounds, close took max {max(times) * 1000:.1f} ms, median "
          f"{sorted(times)[20] * 1000:.1f} ms")
