"""The bytes of a real segment against the layout in csrc/wal_format.h.

Offsets and checksums are recomputed here independently (struct + the crc32c
package), so a change of the format that is not a change of this test fails.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import crc32c as oracle
from conftest import read_wal

from walstate import codec
from walstate._native import lib
from walstate.wal import Wal, list_segments, segment_name

REPO = Path(__file__).resolve().parents[2]
SYSTEM_ID = 0x1122_3344_5566_7788
SEG = 65536

# magic version header_size system_id first_lsn nonce segment_size prev_lsn reserved crc
HDR = struct.Struct("<8sIIQQQQQ4sI")
# crc length lsn synced_lsn type reserved
REC = struct.Struct("<IIQQB3s")


def parse_header(b: bytes) -> dict:
    magic, version, hsize, sid, first, nonce, segsize, prev, reserved, crc = HDR.unpack_from(b)
    return dict(magic=magic, version=version, hsize=hsize, system_id=sid, first_lsn=first,
                nonce=nonce, segment_size=segsize, prev_lsn=prev, reserved=reserved, crc=crc)


def parse_records(b: bytes, salt: int) -> list[dict]:
    """Walks the records from byte 64, checking each CRC with the oracle."""
    out, off = [], 64
    while off + 28 <= len(b) and b[off:off + 28] != bytes(28):
        crc, length, lsn, synced, rtype, reserved = REC.unpack_from(b, off)
        payload = b[off + 28:off + 28 + length]
        assert len(payload) == length
        assert crc == oracle.crc32c(b[off + 4:off + 28] + payload, salt), f"record at {off}"
        out.append(dict(offset=off, length=length, lsn=lsn, synced_lsn=synced, type=rtype,
                        reserved=reserved, payload=payload))
        off += 28 + length
    assert b[off:] == bytes(len(b) - off), "after the last record the segment is zero fill"
    return out


def test_constants_match_wal_format_h() -> None:
    text = (REPO / "csrc" / "wal_format.h").read_text()
    defines = dict(re.findall(r"#define (WAL_\w+) ([0-9a-fx]+)u?\b", text))
    assert int(defines["WAL_SEG_HDR_SIZE"], 0) == lib.WAL_SEG_HDR_SIZE == HDR.size == 64
    assert int(defines["WAL_REC_HDR_SIZE"], 0) == lib.WAL_REC_HDR_SIZE == REC.size == 28
    assert int(defines["WAL_SEG_HDR_CRC_OFF"], 0) == 60
    assert int(defines["WAL_FORMAT_VERSION"], 0) == lib.WAL_FORMAT_VERSION == 1
    assert (lib.WAL_TYPE_PUT, lib.WAL_TYPE_DELETE, lib.WAL_TYPE_BATCH) == (1, 2, 3)
    assert lib.WAL_TYPE_IGNORABLE == 0x80
    assert lib.WAL_REC_MAX_PAYLOAD == 1 << 30
    assert '"WALSTSEG"' in text and '".seg"' in text


def test_segment_name_is_16_hex_digits_of_first_lsn() -> None:
    assert segment_name(1) == "0000000000000001.seg"
    assert segment_name(0xABCDEF0123) == "000000abcdef0123.seg"


def test_segment_header_and_records_byte_by_byte(wal_dir) -> None:
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=SEG)
    lsn1 = w.put(b"key", b"value")
    w.sync()
    lsn2 = w.append(codec.DELETE, b"key")
    lsn3 = w.append(codec.IGNORABLE | 5, b"")
    w.close()
    assert (lsn1, lsn2, lsn3) == (1, 2, 3)

    path = wal_dir / segment_name(1)
    b = path.read_bytes()
    assert len(b) == SEG, "a segment is preallocated to segment_size"
    h = parse_header(b)
    assert h["magic"] == b"WALSTSEG"
    assert h["version"] == 1
    assert h["hsize"] == 64
    assert h["system_id"] == SYSTEM_ID
    assert h["first_lsn"] == 1
    assert h["segment_size"] == SEG
    assert h["prev_lsn"] == 0
    assert h["reserved"] == bytes(4)
    assert h["crc"] == oracle.crc32c(b[:60])

    recs = parse_records(b, salt=h["crc"])
    assert [r["lsn"] for r in recs] == [1, 2, 3]
    put, delete, noop = recs
    assert put["offset"] == 64
    assert put["type"] == codec.PUT
    assert put["payload"] == struct.pack("<H", 3) + b"key" + b"value"
    assert put["length"] == 10
    assert put["synced_lsn"] == 0
    assert put["reserved"] == bytes(3)
    # packed: each record starts right after the previous one, no alignment
    assert delete["offset"] == 64 + 28 + 10
    assert delete["type"] == codec.DELETE and delete["payload"] == b"key"
    assert delete["synced_lsn"] == 1, "the record knows LSN 1 durable (synced before it)"
    assert noop["offset"] == delete["offset"] + 28 + 3
    assert noop["type"] == 0x85 and noop["length"] == 0

    # the reader agrees on offsets and contents
    got, end, objs = read_wal(wal_dir)
    assert [(r.offset, r.synced_lsn, r.segment) for r in objs] == [
        (64, 0, 1), (delete["offset"], 1, 1), (noop["offset"], 1, 1)]
    assert end.status == "clean" and end.last_lsn == 3


def test_next_segment_header_continues_the_previous(wal_dir) -> None:
    w = Wal(str(wal_dir), system_id=SYSTEM_ID, segment_size=4096)
    for i in range(20):
        w.append(codec.DELETE, bytes([i + 1]) * 500)
    w.close()
    segs = list_segments(wal_dir)
    assert len(segs) >= 3
    headers = [parse_header(Path(p).read_bytes()) for _, p in segs]
    nonces = set()
    for (first, p), h in zip(segs, headers, strict=True):
        b = Path(p).read_bytes()
        assert h["first_lsn"] == first and Path(p).name == segment_name(first)
        assert h["crc"] == oracle.crc32c(b[:60])
        recs = parse_records(b, salt=h["crc"])
        assert recs[0]["lsn"] == first
        nonces.add(h["nonce"])
    for prev, h in zip(headers, headers[1:], strict=False):
        last = prev["first_lsn"] + len(parse_records(
            (wal_dir / segment_name(prev["first_lsn"])).read_bytes(), prev["crc"])) - 1
        assert h["prev_lsn"] == last
        assert h["first_lsn"] == last + 1
    assert len(nonces) == len(segs), "every segment gets its own random nonce (salt)"


def test_record_crc_is_bound_to_its_segment(tmp_path) -> None:
    """A record copied byte for byte into another log's segment (same system_id,
    same LSN, same offset) fails validation: its CRC is seeded with the header's."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d in (a, b):
        w = Wal(str(d), system_id=SYSTEM_ID, segment_size=SEG)
        w.append(codec.DELETE, b"payload-" + d.name.encode())
        w.close()
    sa = (a / segment_name(1)).read_bytes()
    sb = bytearray((b / segment_name(1)).read_bytes())
    n = 28 + len(b"payload-a")
    sb[64:64 + n] = sa[64:64 + n]
    (b / segment_name(1)).write_bytes(sb)
    got, end, _ = read_wal(b)
    assert got == []
    assert end.status == "torn" and end.offset == 64
