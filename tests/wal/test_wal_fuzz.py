"""Hypothesis against the reader (and the writer's open): arbitrary bytes as
segments and random damage to a valid log never crash the process and never
yield a record that was not written.

The default example counts keep this file well under a minute; the ``slow``
variants (``pytest --run-slow``) run many more.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from functools import cache

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from walstate.errors import WalStateError
from walstate.wal import Wal, WalReader, segment_name

SYSTEM_ID = 0xF022_0000_0000_0042
SEG = 4096
FAST = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@cache
def pristine() -> tuple[dict[str, bytes], dict[int, tuple[int, bytes]]]:
    """A valid log of several segments: {file name: bytes}, {lsn: (type, payload)}.

    Some records are synced (so later ones carry a synced_lsn), one is bigger
    than a segment, LSNs jump once (min_next_lsn)."""
    d = tempfile.mkdtemp(prefix="walstate-fuzz-")
    rng = random.Random(7)
    written: dict[int, tuple[int, bytes]] = {}
    try:
        for min_next in (1, 200):
            w = Wal(d, system_id=SYSTEM_ID, segment_size=SEG, min_next_lsn=min_next)
            for i in range(30):
                size = 5000 if i == 11 else rng.choice([0, 1, 20, 100, 700])
                payload = rng.randbytes(size)
                rtype = rng.choice([1, 2, 3, 0x81])
                written[w.append(rtype, payload)] = (rtype, payload)
                if i % 4 == 0:
                    w.sync()
            w.close()
        files = {}
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                files[name] = f.read()
    finally:
        shutil.rmtree(d)
    assert len(files) >= 6
    return files, written


def write_dir(d: str, files: dict[str, bytes]) -> None:
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def check_reader(d: str, written: dict[int, tuple[int, bytes]], system_id: int,
                 from_lsn: int) -> list[int]:
    """Reads ``d``; every record yielded must be one that was written, in order."""
    with WalReader(d, system_id=system_id, from_lsn=from_lsn) as r:
        recs = list(r)
        end = r.end
    lsns = [x.lsn for x in recs]
    assert lsns == sorted(set(lsns))
    for x in recs:
        assert x.lsn >= from_lsn
        assert written.get(x.lsn) == (x.type, x.payload), f"record {x.lsn} was never written"
    assert end.status in ("clean", "torn", "error")
    if currently_in_test_context():
        event(f"end {end.status} rc={end.rc} records={'some' if recs else 'none'}")
    if end.status == "error":
        assert end.rc < 0
    else:
        assert end.rc == 0
    if recs:
        assert end.last_lsn == recs[-1].lsn
    return lsns


def check_open(d: str) -> None:
    """The writer's open either refuses cleanly or gives a log that appends."""
    try:
        w = Wal(d, system_id=SYSTEM_ID, segment_size=SEG)
    except (WalStateError, OSError, ValueError):
        return
    w.append(2, b"fuzz")
    w.close()


# ---- arbitrary bytes ------------------------------------------------------------

names = st.sampled_from([segment_name(n) for n in (1, 2, 31, 200, 1 << 40)])


def arbitrary_bytes(files: dict[str, bytes], system_id: int, from_lsn: int) -> None:
    with tempfile.TemporaryDirectory(prefix="walstate-fuzz-") as d:
        write_dir(d, files)
        # nothing was ever written here: nothing may be yielded
        assert check_reader(d, {}, system_id, from_lsn) == []
        check_open(d)


header = st.deferred(lambda: st.sampled_from([b[:64] for _, b in sorted(pristine()[0].items())]))
segment_bytes = st.one_of(
    st.binary(max_size=6000),
    st.tuples(header, st.binary(max_size=6000)).map(lambda t: t[0] + t[1]),
)
file_sets = st.dictionaries(names, segment_bytes, min_size=1, max_size=3)


@FAST
@given(files=file_sets, system_id=st.sampled_from([0, SYSTEM_ID, 1]),
       from_lsn=st.integers(0, 300))
def test_arbitrary_bytes_never_yield_a_record(files, system_id, from_lsn) -> None:
    arbitrary_bytes(files, system_id, from_lsn)


@pytest.mark.slow
@SLOW
@given(files=file_sets, system_id=st.sampled_from([0, SYSTEM_ID, 1]),
       from_lsn=st.integers(0, 300))
def test_arbitrary_bytes_never_yield_a_record_slow(files, system_id, from_lsn) -> None:
    arbitrary_bytes(files, system_id, from_lsn)


# ---- mutations of a valid log ------------------------------------------------------

seg_index = st.one_of(st.just(-1), st.integers(0, 63))  # -1: the last segment
position = st.integers(0, 1 << 14)
mutation = st.one_of(
    st.tuples(st.just("flip"), seg_index, position, st.integers(0, 7)),
    st.tuples(st.just("zero"), seg_index, position, st.integers(1, 600)),
    st.tuples(st.just("garbage"), seg_index, position, st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("truncate"), seg_index, position),
    st.tuples(st.just("splice"), seg_index, position, st.integers(1, 2000), seg_index,
              position),
    st.tuples(st.just("delete"), seg_index),
    st.tuples(st.just("copy_file"), seg_index, seg_index),
)


def apply(files: dict[str, bytes], muts) -> dict[str, bytes]:
    out = {k: bytearray(v) for k, v in files.items()}
    for m in muts:
        keys = sorted(out)
        if not keys:
            break
        key = keys[m[1] % len(keys)]
        b = out[key]
        kind = m[0]
        if kind == "delete":
            del out[key]
            continue
        if kind == "copy_file":
            out[key] = bytearray(out[keys[m[2] % len(keys)]])
            continue
        pos = m[2] % (len(b) + 1)
        if kind == "flip" and pos < len(b):
            b[pos] ^= 1 << m[3]
        elif kind == "zero":
            b[pos:pos + m[3]] = bytes(len(b[pos:pos + m[3]]))
        elif kind == "garbage":
            b[pos:pos + len(m[3])] = m[3]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "splice":
            src = out[keys[m[4] % len(keys)]]
            spos = m[5] % (len(src) + 1)
            chunk = bytes(src[spos:spos + m[3]])
            b[pos:pos + len(chunk)] = chunk
    return {k: bytes(v) for k, v in out.items()}


def mutated_log(muts, system_id: int, from_lsn: int) -> None:
    files, written = pristine()
    with tempfile.TemporaryDirectory(prefix="walstate-fuzz-") as d:
        write_dir(d, apply(files, muts))
        lsns = check_reader(d, written, system_id, from_lsn)
        # what is yielded is a run of the written LSNs with none skipped
        order = sorted(written)
        if lsns:
            i = order.index(lsns[0])
            assert lsns == order[i:i + len(lsns)]
        check_open(d)


@FAST
@given(muts=st.lists(mutation, min_size=1, max_size=4),
       system_id=st.sampled_from([0, SYSTEM_ID]), from_lsn=st.integers(0, 240))
def test_mutated_log_yields_only_written_records(muts, system_id, from_lsn) -> None:
    mutated_log(muts, system_id, from_lsn)


@pytest.mark.slow
@SLOW
@given(muts=st.lists(mutation, min_size=1, max_size=8),
       system_id=st.sampled_from([0, SYSTEM_ID]), from_lsn=st.integers(0, 240))
def test_mutated_log_yields_only_written_records_slow(muts, system_id, from_lsn) -> None:
    mutated_log(muts, system_id, from_lsn)


def test_pristine_log_reads_back_whole() -> None:
    """The fuzzed log itself is valid, so the properties above are not vacuous."""
    files, written = pristine()
    with tempfile.TemporaryDirectory(prefix="walstate-fuzz-") as d:
        write_dir(d, files)
        assert check_reader(d, written, SYSTEM_ID, 0) == sorted(written)
        with WalReader(d, system_id=SYSTEM_ID) as r:
            list(r)
            assert r.end.status == "clean"
    assert 200 in written and 31 not in written, "the log has an LSN jump"
