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
        # the read-only engine keeps its own view (through the shared snapshot)
        assert ro.get(b"a") == b"1" and ro.get(b"b") is None and list(it) == []
        rw.checkpoint()
        with pytest.raises(walstate.StaleReadError):  # b folded in: never a mixed state
            ro.get(b"a")
    ro.close()
    with walstate.open(path, read_only=True) as again:
        assert dict(again.items()) == {b"a": b"1", b"b": b"2"}


class _FakeEnv:
    """What _check_size reads of an LMDB environment."""

    def __init__(self, last_pgno: int) -> None:
        self.last_pgno = last_pgno
        self.closed = False

    def stat(self) -> dict:
        return {"psize": 4096}

    def info(self) -> dict:
        return {"last_pgno": self.last_pgno}

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("pages, ok", [(306, True), (305, True), (268, True), (267, False),
                                       (153, False), (2, False)])
def test_snapshot_size_check_allows_unwritten_loose_pages_only(tmp_path, pages, ok):
    """A crash left a data.mdb one page short of last_pgno + 1 (a page LMDB allocated
    and freed in one transaction is never written): it must open. A real cut must not
    (reading past the end of the mapping would be SIGBUS)."""
    from walstate.errors import CorruptionError
    from walstate.snapshot import _check_size

    f = tmp_path / "data.mdb"
    f.write_bytes(b"\0" * (pages * 4096))
    env = _FakeEnv(last_pgno=305)  # 306 pages; slack min(256, 306 // 8) = 38
    if ok:
        _check_size(env, str(f))  # type: ignore[arg-type]
        assert not env.closed
    else:
        with pytest.raises(CorruptionError):
            _check_size(env, str(f))  # type: ignore[arg-type]
        assert env.closed


def test_snapshot_size_check_accepts_a_torn_last_page(tmp_path):
    """A power loss can tear the file's last write at a sector: harmless (the mapping
    reads zeros to the end of that page), so the snapshot opens."""
    from walstate.snapshot import _check_size

    f = tmp_path / "data.mdb"
    f.write_bytes(b"\0" * (306 * 4096 - 1536))
    env = _FakeEnv(305)
    _check_size(env, str(f))  # type: ignore[arg-type]
    assert not env.closed
