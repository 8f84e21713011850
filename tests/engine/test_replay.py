"""Recovery's inner loop: the C version (walstate._speedups.Replay, csrc/speedups/replay.c)
and its Python twin give the same table, stop at the same records, and refuse
malformed payloads."""

from __future__ import annotations

import os
import random

import pytest

import walstate
from walstate import codec, recovery
from walstate._native import ffi
from walstate._native import speedups as _speedups
from walstate.errors import CorruptionError
from walstate.layout import Layout, read_marker
from walstate.wal import WalReader


def crashed_log(path: str, rng: random.Random) -> dict[bytes, bytes]:
    model: dict[bytes, bytes] = {}
    db = walstate.open(path, sync="none", segment_size=64 * 1024, max_wal_size=1 << 30)
    for _ in range(3000):
        k = b"k%03d" % rng.randrange(400)
        r = rng.random()
        if r < 0.7:
            v = rng.randbytes(rng.randrange(0, 300))
            db.put(k, v)
            model[k] = v
        elif r < 0.85:
            db.delete(k)
            model.pop(k, None)
        else:
            with db.batch() as b:
                for _ in range(rng.randrange(1, 5)):
                    kk = b"b%03d" % rng.randrange(100)
                    b.put(kk, b"x")
                    model[kk] = b"x"
                b.delete(k)
                model.pop(k, None)
    db.sync()
    db._abandon()
    return model


@pytest.mark.parametrize("seed", [1, 2])
def test_replay_matches_every_record_decoded_in_order(tmp_path, seed):
    """The C replay's table equals the records read one by one and decoded with
    walstate.codec (what `walstate dump` shows), applied in LSN order."""
    path = str(tmp_path / "db")
    model = crashed_log(path, random.Random(seed))
    sid = read_marker(Layout(path))["system_id"]
    r = recovery.replay(os.path.join(path, "wal"), system_id=sid, snapshot_lsn=0,
                        mode="strict", read_only=True)
    decoded: dict[bytes, bytes | None] = {}
    records = 0
    with WalReader(os.path.join(path, "wal"), sid) as reader:
        for rec in reader:
            if not rec.type & codec.IGNORABLE:
                records += 1
                decoded.update(codec.decode(rec.type, bytes(rec.payload)))
    assert r.table == decoded
    assert {k: v for k, v in r.table.items() if v is not None} == model
    assert r.report["records_replayed"] == records


def arrays(payloads: list[tuple[int, bytes]]):
    data = b"".join(p for _, p in payloads)
    offs, lens, pos = [], [], 0
    for _, p in payloads:
        offs.append(pos)
        lens.append(len(p))
        pos += len(p)
    n = len(payloads)
    return (data, ffi.new("uint64_t[]", offs), ffi.new("uint64_t[]", lens),
            ffi.new("uint8_t[]", [t for t, _ in payloads]), n)


def test_stops_at_the_first_other_record():
    new, apply, as_dict = _speedups.Replay, recovery.apply_records, lambda t: t.table()
    data, offs, lens, types, n = arrays([
        (codec.PUT, b"\x01\x00ka"), (codec.DELETE, b"gone"), (codec.BATCH, b"\0\0\0\0"),
        (codec.PUT, b"\x01\x00kb")])
    table = new()
    i = apply(table, data, offs, lens, types, 0, n)
    assert i == 2 and as_dict(table) == {b"k": b"a", b"gone": None}
    assert apply(table, data, offs, lens, types, 3, n) == 4
    assert as_dict(table)[b"k"] == b"b"


@pytest.mark.parametrize("payload", [b"\x05\x00ab", b"\x00\x00v", b"\x01"])
def test_malformed_put_is_corruption(payload):
    new, apply = _speedups.Replay, recovery.apply_records
    data, offs, lens, types, n = arrays([(codec.PUT, payload)])
    with pytest.raises(CorruptionError):
        apply(new(), data, offs, lens, types, 0, n)


def test_the_c_table_matches_a_dict_under_random_updates():
    """Replay against a dict: keys of every length, values that shrink and grow
    (moved in the arena), deletes and re-puts, through apply() and r[k] = v,
    across several growths of the table."""
    rng = random.Random(3)
    r = _speedups.Replay()
    model: dict[bytes, bytes | None] = {}
    keys = [rng.randbytes(rng.choice([1, 2, 8, 9, 16, 40])) for _ in range(3000)]
    for rnd in range(20):
        payloads = []
        for _ in range(700):
            k = rng.choice(keys)
            if rng.random() < 0.2:
                payloads.append((codec.DELETE, k))
                model[k] = None
            else:
                v = rng.randbytes(rng.choice([0, 1, 50, 300, 2000]))
                payloads.append((codec.PUT, len(k).to_bytes(2, "little") + k + v))
                model[k] = v
        data, offs, lens, types, n = arrays(payloads)
        assert recovery.apply_records(r, data, offs, lens, types, 0, n) == n
        k = rng.choice(keys)
        r[k] = model[k] = rng.choice([None, b"", b"set" * rnd])
        assert len(r) == len(model)
    assert r.table() == model
    with pytest.raises(TypeError):
        r["str"] = b"x"
    with pytest.raises(TypeError):
        del r[keys[0]]
