"""Gets of checkpointed keys read through one LMDB read transaction kept
between gets (walstate/snapshot.py): they must see every checkpoint as soon
as it commits, keep working while the map grows, from many threads at once,
and never pin old pages for long."""

from __future__ import annotations

import threading
import time

import walstate

MiB = 1 << 20


def test_gets_see_each_checkpoint_while_threads_read_and_the_map_grows(tmp_path):
    path = str(tmp_path / "db")
    keys = [b"key-%05d" % i for i in range(400)]
    # a 1 MiB map: the checkpoints below must grow it, with readers active
    db = walstate.open(path, map_size=1 * MiB, sync="none", max_wal_size=1 << 30)
    stop = threading.Event()
    errors: list[str] = []
    version = [0]  # every key holds b"v<version>-" + padding after round <version>
    gets = [0]

    def reader(t: int) -> None:
        i = t
        while not stop.is_set():
            k = keys[i % len(keys)]
            i += 7
            if i % 64 == 0:
                time.sleep(0.0002)  # CPU-bound readers would starve the checkpointer of the GIL
            before = version[0]
            got = db.get(k)
            after = version[0]
            gets[0] += 1
            n = int(got.split(b"-")[0][1:]) if got else -1
            # a value from a round that finished before the get started, or a later one
            if got is None or not before <= n <= after + 1:
                errors.append(f"{k!r}: got version {n}, expected {before}..{after + 1}")
                return

    for k in keys:
        db.put(k, b"v0-" + b"x" * 2000)
    db.checkpoint()
    threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        for rnd in range(1, 8):
            with db.batch() as b:
                for k in keys:
                    b.put(k, b"v%d-" % rnd + b"x" * (2000 + 300 * rnd))
            db.checkpoint()  # the values now live only in the snapshot
            version[0] = rnd
            # right after the checkpoint, every get sees this round
            assert all(db.get(k).startswith(b"v%d-" % rnd) for k in keys[::37])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert gets[0] > 1000  # the readers did read during the checkpoints
    assert db.info()["map_size"] > 1 * MiB  # the map did grow under the readers
    assert db.info()["memtable_keys"] == 0
    db.close()
    with walstate.open(path, read_only=True) as ro:
        assert ro.get(keys[5]).startswith(b"v7-")


def test_a_kept_read_transaction_does_not_pin_old_pages(tmp_path):
    """Rewriting the same keys over and over through checkpoints, with gets in
    between, must let LMDB reuse the freed pages: the file stays bounded."""
    path = str(tmp_path / "db")
    keys = [b"k%04d" % i for i in range(200)]
    with walstate.open(path, sync="none", max_wal_size=1 << 30) as db:
        sizes = []
        for rnd in range(30):
            with db.batch() as b:
                for k in keys:
                    b.put(k, bytes([rnd]) * 1000)
            db.checkpoint()
            assert db.get(keys[rnd]) == bytes([rnd]) * 1000  # keeps a read txn
            sizes.append(db.info()["snapshot_bytes"])
        # ~200 KiB of live data; without page reuse 30 rounds would need ~6 MiB
        assert sizes[-1] < 3 * max(sizes[:3]), sizes
