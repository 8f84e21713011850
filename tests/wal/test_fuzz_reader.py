"""libFuzzer over the C WAL reader and the tail cut, with ASan + UBSan
(fuzz/wal_reader_fuzz.c, built by fuzz/build.sh with clang).

The default run replays the checked-in seed corpus and fuzzes for 20 s;
``--run-slow`` fuzzes for 10 minutes. A crash leaves its input in the
test's temporary directory (crash-*) and fails the test with the sanitizer
report. test_wal_fuzz.py fuzzes the same reader from Python with hypothesis
(no sanitizers); this target is the instrumented, coverage-guided one.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from walstate.wal import WalReader, segment_name

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "fuzz" / "corpus"


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory) -> Path:
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (apt-get install clang): libFuzzer needs it")
    out = tmp_path_factory.mktemp("fuzz") / "wal_reader_fuzz"
    p = subprocess.run(["bash", str(REPO / "fuzz" / "build.sh"), str(out)],
                       capture_output=True, text=True)
    if p.returncode != 0 and "fuzzer" in p.stderr and "cannot find" in p.stderr:
        pytest.skip(f"clang has no libFuzzer runtime here: {p.stderr.strip()[:300]}")
    assert p.returncode == 0, p.stderr
    assert "warning:" not in p.stderr, p.stderr
    return out


def run_fuzzer(fuzzer: Path, work: Path, seconds: int) -> str:
    new = work / "corpus"
    new.mkdir(exist_ok=True)
    env = dict(os.environ, WAL_FUZZ_DIR=str(work),
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    p = subprocess.run([str(fuzzer), f"-max_total_time={seconds}", "-max_len=20000",
                        "-print_final_stats=1", f"-artifact_prefix={work}/", str(new),
                        str(CORPUS)], capture_output=True, text=True, env=env,
                       timeout=seconds + 300, cwd=work)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-6000:]
    assert "Done" in out, out[-3000:]
    return out


def _runs(out: str) -> int:
    for line in out.splitlines():
        if line.startswith("stat::number_of_executed_units:"):
            return int(line.split(":")[-1])
    return 0


def test_seed_corpus_is_valid_wal(tmp_path):
    """The seeds are real logs (so the fuzzer starts deep in the reader)."""
    seeds = sorted(CORPUS.iterdir())
    assert len(seeds) >= 5
    for seed in seeds:
        data = seed.read_bytes()
        assert len(data) <= 8192 and data[:8] == b"WALSTSEG", seed.name
        data, magic, end_file = data.partition(b"WALSTEND")  # the wal/END part, if any
        assert bool(magic) == (seed.name == "end_hint") == bool(end_file), seed.name
        d = tmp_path / seed.name
        d.mkdir()
        parts = [p for p in data.split(b"WALSTSEG") if p]
        for part in parts:
            seg = b"WALSTSEG" + part
            first = struct.unpack_from("<Q", seg, 24)[0] if len(seg) >= 32 else 0
            # the seeds leave out the zero fill; a segment on disk has the size its
            # header records (a shorter one is damage: cut short by a copy)
            size = struct.unpack_from("<Q", seg, 40)[0] if len(seg) >= 48 else 0
            (d / segment_name(first)).write_bytes(seg + bytes(max(0, size - len(seg))))
        with WalReader(str(d)) as r:
            recs = list(r)
            end = r.end
        if seed.name == "torn_tail":
            assert end.status == "torn" and recs
        elif seed.name == "header_only":
            assert end.status == "clean" and not recs
        else:
            assert end.status == "clean" and len(recs) >= 3, (seed.name, end)


def test_fuzz_the_reader_briefly(fuzzer, tmp_path):
    out = run_fuzzer(fuzzer, tmp_path, 20)
    assert _runs(out) > 10_000


@pytest.mark.slow
def test_fuzz_the_reader_ten_minutes(fuzzer, tmp_path):
    out = run_fuzzer(fuzzer, tmp_path, 600)
    print("\n".join(line for line in out.splitlines() if line.startswith("stat::")))
    assert _runs(out) > 1_000_000
