"""Engine.observe: the hook through which tools (walstate.ops.metrics) time
writes and checkpoints without patching the engine."""

from __future__ import annotations

import pytest

import walstate


def test_observer_sees_each_write_and_checkpoint_then_stops(tmp_path) -> None:
    events: list[tuple[str, float]] = []
    with walstate.open(tmp_path / "db", sync="always") as db:
        db.observe(lambda event, seconds: events.append((event, seconds)))
        db.put(b"a", b"1")
        db.put(b"b", b"2")
        db.delete(b"a")
        with db.batch() as b:
            b.put(b"c", b"3")
        with pytest.raises(ValueError):
            db.put(b"", b"x")  # a write that raised is observed too
        db.checkpoint()
        assert [e for e, _ in events] == ["put", "put", "delete", "batch", "put", "checkpoint"]
        assert all(s >= 0 for _, s in events)
        db.observe(None)
        db.put(b"d", b"4")
        db.checkpoint()
        assert len(events) == 6
        assert type(db.put) is type(len)  # the C fast path again
        assert db.get(b"b") == b"2" and db.get(b"c") == b"3" and db.get(b"a") is None


def test_observe_on_a_closed_engine_raises(tmp_path) -> None:
    db = walstate.open(tmp_path / "db")
    db.close()
    with pytest.raises(walstate.ClosedError):
        db.observe(lambda e, s: None)
