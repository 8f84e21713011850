"""A reader opening while the writer switches segments (wal_reader_open in
csrc/wal_reader.c): wal/LAST is read before the segments are listed, so a
segment created in between is never taken for a lost newest segment.

The moment is made exact with a call point ("reader_open", csrc/wal_hooks.c)
inside wal_reader_open: the callback switches the writer to a new segment
there. With the old order (list, then LAST) the reader reported
LogEnd(status='error', rc=WAL_ECORRUPT, segment=0, path=<the new segment>), as
tests/test_wal.py::test_reader_survives_a_concurrent_writer once did by chance.
"""

from __future__ import annotations

import os

import pytest
from conftest import SYSTEM_ID, payload_for

from walstate import codec
from walstate._native import ffi, lib
from walstate.wal import Wal, WalReader, list_segments


@pytest.fixture
def callpoint():
    """Sets lib.wal_test_callpoint(name, fn) (fn a Python callable), cleared after."""
    keep = []

    def arm(name: str, fn) -> None:
        cb = ffi.callback("void(void)", fn)
        keep.append(cb)  # the C side holds the pointer: keep the callback alive
        lib.wal_test_callpoint(name.encode(), cb)

    yield arm
    lib.wal_test_callpoint(b"", ffi.NULL)


@pytest.mark.parametrize("end_hint", [False, True])
def test_a_segment_switch_while_a_reader_opens_is_not_a_lost_segment(wal_dir, callpoint,
                                                                       end_hint) -> None:
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=4096)
    lsn = 0
    for i in range(5):
        lsn = w.append(codec.DELETE, payload_for(i, 300))
    w.sync(lsn)
    before = list_segments(wal_dir)
    errors: list[BaseException] = []
    calls = []

    def switch_segment() -> None:  # runs inside wal_reader_open
        try:
            calls.append(1)
            n = len(list_segments(wal_dir))
            i = 5
            while len(list_segments(wal_dir)) == n:
                w.append(codec.DELETE, payload_for(i, 300))
                w.flush()
                i += 1
        except BaseException as exc:  # a cffi callback cannot raise into C
            errors.append(exc)

    callpoint("reader_open", switch_segment)
    try:
        with WalReader(str(wal_dir), SYSTEM_ID, 1, end_hint=end_hint) as r:
            lsns = [rec.lsn for rec in r]
            end = r.end
    finally:
        w.close()
    assert not errors and calls == [1]
    assert len(list_segments(wal_dir)) > len(before), os.listdir(wal_dir)
    assert end.status in ("clean", "torn"), end
    assert lsns == list(range(1, len(lsns) + 1)) and len(lsns) >= 5
    # and the log read afterwards, quietly, is whole and clean
    with WalReader(str(wal_dir), SYSTEM_ID, 1) as r:
        assert [rec.lsn for rec in r][: len(lsns)] == lsns
        assert r.end.status == "clean", r.end


def test_lost_newest_segment_is_still_an_error(wal_dir) -> None:
    """The check that the reorder must keep: LAST names a segment that is gone."""
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=4096)
    i = 0
    while len(list_segments(wal_dir)) < 3:
        w.append(codec.DELETE, payload_for(i, 300))
        i += 1
    w.close()
    newest = list_segments(wal_dir)[-1][1]
    os.unlink(os.path.join(wal_dir, newest))
    with WalReader(str(wal_dir), SYSTEM_ID, 1) as r:
        list(r)
        end = r.end
    assert end.status == "error" and end.rc == lib.WAL_ECORRUPT, end
    assert end.path.endswith(newest)
