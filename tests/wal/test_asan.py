"""The C WAL's suite once more under AddressSanitizer + UBSan (.ci/asan.sh builds a
second, sanitized copy of the extension in a temp dir and runs the WAL, fuzz and
CRC tests against it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "asan.sh"


def test_wal_suite_under_asan_and_ubsan() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the sanitized extension")
    p = subprocess.run(["bash", str(SCRIPT)],
                       capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert " passed" in out and "ERROR: AddressSanitizer" not in out
