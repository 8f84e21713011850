"""The checkpoint that ends recovery: inline for small replays, in the background
for large ones (open returns once the replay is done)."""

from __future__ import annotations

import time

import pytest

import walstate
from walstate import engine


def crashed(path: str, n: int) -> dict[bytes, bytes]:
    db = walstate.open(path, sync="none")
    model = {b"k%05d" % i: b"v%d" % i for i in range(n)}
    with db.batch() as b:
        for k, v in model.items():
            b.put(k, v)
    db.delete(b"k00000")
    del model[b"k00000"]
    db.sync()
    db._abandon()
    return model


def test_small_recovery_checkpoints_before_open_returns(tmp_path):
    path = str(tmp_path / "db")
    model = crashed(path, 50)
    with walstate.open(path) as db:
        ck = db.info()["last_checkpoint"]
        assert ck is not None and ck.reason == "recovery" and ck.keys_written == 50
        assert dict(db.items()) == model


def test_large_recovery_checkpoints_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "RECOVERY_CHECKPOINT_INLINE_KEYS", 10)
    path = str(tmp_path / "db")
    model = crashed(path, 500)
    with walstate.open(path) as db:
        assert dict(db.items()) == model  # served from memory at once
        db.put(b"new", b"1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ck = db.info()["last_checkpoint"]
            if ck is not None and ck.reason == "recovery":
                break
            time.sleep(0.02)
        else:
            pytest.fail("the background recovery checkpoint never ran")
        assert ck.keys_written >= 500  # the replayed keys (and the put, if it came first)
        assert db.get(b"k00001") == b"v1" and db.get(b"k00000") is None
    with walstate.open(path, recovery="strict") as db:
        assert dict(db.items()) == {**model, b"new": b"1"}


def test_a_writer_opens_beside_read_only_engines_of_its_process(tmp_path):
    path = str(tmp_path / "db")
    with walstate.open(path) as db:
        db.put(b"a", b"1")
    ro = walstate.open(path, read_only=True)
    it = ro.items()
    assert next(it) == (b"a", b"1")
    with walstate.open(path) as rw:  # LMDB allows one environment per process: shared
        rw.put(b"b", b"2")
        rw.checkpoint()
        assert ro.get(b"a") == b"1" and list(it) == []
        assert ro.get(b"b") == b"2"  # through the shared snapshot, after the checkpoint
    assert ro.get(b"a") == b"1"
    ro.close()
    with walstate.open(path, read_only=True) as again:
        assert dict(again.items()) == {b"a": b"1", b"b": b"2"}
