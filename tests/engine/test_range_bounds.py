"""Range bounds are not keys: items(start=, stop=) takes any bytes (b"" and
bounds longer than the 511-byte key limit included), by position and by
keyword, over checkpointed and not yet checkpointed keys alike."""

from __future__ import annotations

import random

import pytest

import walstate

MAX_KEY = 511


def _model_range(model, start, stop):
    return sorted((k, v) for k, v in model.items()
                  if (start is None or k >= start) and (stop is None or k < stop))


@pytest.fixture(params=["memtable", "snapshot", "both"])
def db_model(request, tmp_path):
    rng = random.Random(5)
    keys = [b"", b"a", b"a" * MAX_KEY, b"a" * (MAX_KEY - 1) + b"b", b"\x00", b"\xff" * MAX_KEY,
            b"m", b"mm"]
    keys += [rng.randbytes(rng.randint(1, 20)) for _ in range(200)]
    model = {k: b"v" + k[:10] for k in keys if k}
    db = walstate.open(tmp_path / "db")
    items = list(model.items())
    first = items if request.param == "snapshot" else items[: len(items) // 2]
    if request.param != "memtable":
        for k, v in first:
            db.put(k, v)
        db.checkpoint()
        items = items[len(first):]
    for k, v in items:
        db.put(k, v)
    yield db, model
    db.close()


BOUNDS = [None, b"", b"\x00", b"a", b"a" * MAX_KEY, b"a" * (MAX_KEY + 1), b"a" * 2000,
          b"m", b"\xff" * (MAX_KEY + 5), b"\xff" * MAX_KEY]


@pytest.mark.parametrize("start", BOUNDS, ids=lambda b: "None" if b is None else f"{len(b)}B")
def test_any_bytes_bound(db_model, start):
    db, model = db_model
    for stop in BOUNDS:
        want = _model_range(model, start, stop)
        assert list(db.items(start, stop)) == want, (start, stop)
        assert list(db.items(start=start, stop=stop)) == want, (start, stop)


def test_empty_bounds(db_model):
    db, model = db_model
    assert list(db.items(start=b"")) == sorted(model.items())
    assert list(db.items(stop=b"")) == []
    assert list(db.items(b"", b"")) == []
    assert list(db.items(memoryview(b"m"), bytearray(b"n"))) == _model_range(model, b"m", b"n")


@pytest.mark.parametrize("bad", ["a", 5, object()])
def test_a_bound_that_is_not_bytes_is_a_type_error_naming_it(tmp_path, bad):
    with walstate.open(tmp_path / "db") as db:
        db.put(b"k", b"v")
        with pytest.raises(TypeError, match="start"):
            db.items(start=bad)
        with pytest.raises(TypeError, match="stop"):
            db.items(None, bad)
