"""docs/FORMAT.md's worked example, fed to the real reader: the document and
the code describe the same bytes."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import crc32c

from walstate import codec
from walstate._native import lib
from walstate.wal import WalReader, segment_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def example_blocks() -> list[bytes]:
    text = DOC.read_text()
    example = text.split("## Worked example", 1)[1]
    blocks = re.findall(r"```\n(.*?)```", example, re.S)
    return [bytes.fromhex("".join(b.split())) for b in blocks]


def test_doc_constants_match_the_header() -> None:
    text = DOC.read_text()
    assert f"version {lib.WAL_FORMAT_VERSION}" in text.splitlines()[0]
    assert f"{lib.WAL_REC_HDR_SIZE}-byte header" in text
    assert f"Segment header ({lib.WAL_SEG_HDR_SIZE} bytes)" in text


def test_worked_example_crcs_are_right() -> None:
    header, record = example_blocks()
    assert len(header) == lib.WAL_SEG_HDR_SIZE
    salt = crc32c.crc32c(header[:60])
    assert struct.unpack_from("<I", header, 60)[0] == salt == 0xCB7A4C57
    assert struct.unpack_from("<I", record, 0)[0] == crc32c.crc32c(record[4:], value=salt)


def test_worked_example_reads_back(tmp_path: Path) -> None:
    header, record = example_blocks()
    seg = tmp_path / segment_name(1)
    seg.write_bytes(header + record + bytes(65536 - len(header) - len(record)))
    with WalReader(str(tmp_path), 0x1122334455667788, 1) as r:
        recs = list(r)
        end = r.end
    assert end.status == "clean"
    assert [(x.lsn, x.type) for x in recs] == [(1, codec.PUT)]
    assert list(codec.decode(recs[0].type, recs[0].payload)) == [(b"key", b"value")]


def test_worked_example_is_rejected_under_another_system_id(tmp_path: Path) -> None:
    header, record = example_blocks()
    (tmp_path / segment_name(1)).write_bytes(header + record)
    with WalReader(str(tmp_path), 0x99, 1) as r:
        assert list(r) == []
        assert r.end.status == "error" and r.end.rc == lib.WAL_EMISMATCH
