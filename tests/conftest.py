"""Shared test helpers: damage a file, build a WAL with N records, mount a small tmpfs,
and the ``--run-slow`` switch for tests marked ``slow``.

The helpers are plain functions (importable as ``from conftest import corrupt`` by
hypothesis tests, which cannot take function-scoped fixtures) and fixtures.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEM_ID = 0x5EED_0000_0000_0001
SMALL_SEGMENT = 65536


# ---- pytest options ---------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (long fuzzing, crash campaigns)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---- damage -----------------------------------------------------------------

HOWS = ("flip", "zero", "garbage", "truncate")


def corrupt(path: str | os.PathLike[str], offset: int, how: str, n: int = 1, *,
            bit: int = 0, seed: int = 0) -> bytes:
    """Damages file ``path`` at byte ``offset``; returns the bytes written (b"" for
    truncate).

    how: "flip" flips bit ``bit`` of the byte at offset; "zero" writes ``n`` zero
    bytes; "garbage" writes ``n`` pseudo-random bytes, all non-zero (so that they
    can never read as zero fill), seeded by ``seed``; "truncate" cuts the file to
    ``offset`` bytes.
    """
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}, not {how!r}")
    size = os.path.getsize(path)
    if how == "truncate":
        if offset > size:
            raise ValueError(f"truncate at {offset} beyond the end ({size})")
        os.truncate(path, offset)
        return b""
    with open(path, "r+b") as f:
        if how == "flip":
            if offset >= size:
                raise ValueError(f"flip at {offset} beyond the end ({size})")
            f.seek(offset)
            old = f.read(1)[0]
            data = bytes([old ^ (1 << bit)])
        elif how == "zero":
            data = bytes(n)
        else:
            rng = random.Random(seed)
            data = bytes(rng.randrange(1, 256) for _ in range(n))
        f.seek(offset)
        f.write(data)
    return data


# ---- building and reading logs ----------------------------------------------

def payload_for(i: int, size: int = 40) -> bytes:
    """A deterministic payload for record ``i`` (distinct for distinct i)."""
    head = f"rec{i:08d}|".encode()
    body = bytes((i * 31 + j * 7) & 0xFF for j in range(max(size - len(head), 0)))
    return (head + body)[:size] if size >= len(head) else head[:size]


def build_wal(wal_dir: str | os.PathLike[str], n: int, *, size: int = 40,
              segment_size: int = SMALL_SEGMENT, system_id: int = SYSTEM_ID,
              sync: str = "each", rtype: int | None = None) -> list[tuple[int, int, bytes]]:
    """Creates (or extends) the log in ``wal_dir`` with ``n`` records and closes it.

    Records are ``payload_for(i, size)`` of type ``rtype`` (default codec.DELETE,
    whose payload is opaque to the log). sync: "each" (sync after every append:
    later records then know earlier ones durable), "end" (one sync) or "close"
    (no sync; close flushes). Returns the (lsn, type, payload) written.
    """
    from walstate import codec
    from walstate.wal import Wal

    os.makedirs(wal_dir, exist_ok=True)
    rtype = codec.DELETE if rtype is None else rtype
    out = []
    w = Wal(os.fspath(wal_dir), system_id=system_id, segment_size=segment_size,
            buffer_size=1 << 16)
    try:
        for i in range(n):
            p = payload_for(i, size)
            lsn = w.append(rtype, p)
            out.append((lsn, rtype, p))
            if sync == "each":
                w.sync()
        if sync == "end":
            w.sync()
    finally:
        w.close()
    return out


def read_wal(wal_dir: str | os.PathLike[str], system_id: int = 0, from_lsn: int = 0):
    """(records as (lsn, type, payload), the reader's LogEnd, the Record objects)."""
    from walstate.wal import WalReader

    with WalReader(os.fspath(wal_dir), system_id=system_id, from_lsn=from_lsn) as r:
        recs = list(r)
        end = r.end
    return [(x.lsn, x.type, x.payload) for x in recs], end, recs


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    d = tmp_path / "wal"
    d.mkdir()
    return d


@pytest.fixture
def hooks() -> Iterator[object]:
    """walstate._hooks, with every fault and kill point cleared afterwards."""
    from walstate import _hooks

    _hooks.clear()
    yield _hooks
    _hooks.clear()
    _hooks.sync_trace("")


# ---- a size-limited tmpfs ---------------------------------------------------

@pytest.fixture
def tmpfs() -> Iterator[object]:
    """A factory ``tmpfs(size="2m") -> Path`` mounting a fresh size-limited tmpfs;
    everything it mounted is unmounted afterwards. Skips (naming the reason) when
    mounting is not possible here (not root, no CAP_SYS_ADMIN)."""
    mounted: list[str] = []

    def mount(size: str = "2m") -> Path:
        d = tempfile.mkdtemp(prefix="walstate-tmpfs-")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
                             capture_output=True, text=True)
        if res.returncode != 0:
            os.rmdir(d)
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): "
                        f"{res.stderr.strip() or res.returncode}")
        mounted.append(d)
        return Path(d)

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", d], check=False)
        shutil.rmtree(d, ignore_errors=True)
