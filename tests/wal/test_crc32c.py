"""CRC32C of the C layer against the crc32c package (the oracle): lengths,
alignments, continuation, and the software fallback forced in a subprocess."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import textwrap

import crc32c as oracle
import pytest

from walstate._native import ffi, lib
from walstate.wal import crc32c

LENGTHS = [*range(0, 130), 255, 256, 257, 1000, 1023, 1024, 1025, 4095, 4096, 4097,
           65535, 65536, 65537, 1 << 20, (1 << 20) + 3]


def c_crc(data: bytes, crc: int = 0, align: int = 0) -> int:
    """wal_crc32c over ``data`` placed ``align`` bytes past an 8-aligned address."""
    buf = ffi.new("uint8_t[]", len(data) + 16)
    base = int(ffi.cast("uintptr_t", buf))
    start = (-base) % 8 + align
    p = buf + start
    assert int(ffi.cast("uintptr_t", p)) % 8 == align
    ffi.memmove(p, data, len(data))
    return lib.wal_crc32c(crc, p, len(data))


def test_known_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


def test_random_data_every_length_and_alignment() -> None:
    rng = random.Random(1)
    for n in LENGTHS:
        data = rng.randbytes(n)
        want = oracle.crc32c(data)
        for align in range(8) if n < 70000 else (0, 3):
            assert c_crc(data, align=align) == want, (n, align)
        assert crc32c(data) == want


def test_continuation_at_every_split() -> None:
    rng = random.Random(2)
    data = rng.randbytes(300)
    want = oracle.crc32c(data)
    for k in range(len(data) + 1):
        assert crc32c(data[k:], crc32c(data[:k])) == want, k
        # continuing from an arbitrary seed, as a record CRC is seeded with the salt
        seed = rng.getrandbits(32)
        assert crc32c(data[:k], seed) == oracle.crc32c(data[:k], seed)


def test_continuation_in_many_pieces() -> None:
    rng = random.Random(3)
    data = rng.randbytes(20000)
    crc, pos = 0, 0
    while pos < len(data):
        step = rng.randrange(1, 300)
        crc = c_crc(data[pos:pos + step], crc, align=rng.randrange(8))
        pos += step
    assert crc == oracle.crc32c(data)


def _expect_hw() -> bool | None:
    """Whether this CPU has CRC32C instructions (None: cannot tell)."""
    if platform.machine() == "x86_64":
        try:
            with open("/proc/cpuinfo") as f:
                return " sse4_2" in f.read()
        except OSError:
            return None
    return None


def test_hardware_path_is_used_where_available() -> None:
    want = _expect_hw()
    if want is None:
        pytest.skip(f"cannot tell whether {platform.machine()} has CRC32C instructions")
    assert bool(lib.wal_crc32c_hw()) == want


def test_hw_flag_is_zero_or_one() -> None:
    assert lib.wal_crc32c_hw() in (0, 1)


CHILD = textwrap.dedent("""
    import json, random, sys
    from walstate._native import ffi, lib
    rng = random.Random(4)
    out = {"hw": lib.wal_crc32c_hw(), "crcs": []}
    for n in json.loads(sys.argv[1]):
        data = rng.randbytes(n)
        buf = ffi.new("uint8_t[]", n + 16)
        for align in range(8):
            p = buf + align
            ffi.memmove(p, data, n)
            out["crcs"].append(lib.wal_crc32c(0, p, n))
        half = n // 2
        out["crcs"].append(lib.wal_crc32c(lib.wal_crc32c(0, data[:half], half),
                                          data[half:], n - half))
    print(json.dumps(out))
""")


def test_software_fallback_matches_oracle(tmp_path) -> None:
    lengths = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4097, 65537]
    env = dict(os.environ, WALSTATE_CRC32C_SW="1")
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(lengths)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["hw"] == 0, "WALSTATE_CRC32C_SW=1 must force the software path"
    rng = random.Random(4)
    want = []
    for n in lengths:
        data = rng.randbytes(n)
        want += [oracle.crc32c(data)] * 9
    assert out["crcs"] == want
