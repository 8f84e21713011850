"""`walstate bench` runs and reports (no figure is checked: benchmarks are not
tests; the comparison itself is bench/ and docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from walstate import benchmark
from walstate.benchmark.peers import frame

SMALL = ["--ops", "20", "--records", "5000", "--max-wal-mib", "2"]


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["walstate", "bench", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_bench_quick_prints_a_table_with_every_workload(tmp_path: Path) -> None:
    p = bench("--quick", *SMALL, "--dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for row in ("walstate sync=always", "walstate sync=none", "sqlite3 WAL FULL",
                "sqlite3 WAL NORMAL", "lmdb sync", "lmdb nosync", "raw write+fdatasync",
                "(baseline)", "ratio", "target:", "targets met:"):
        assert row in out, row
    assert out.count("\n== ") == len(benchmark.WORKLOAD_KEYS)
    assert os.listdir(tmp_path) == []  # cleans up after itself


def test_bench_json_parses() -> None:
    p = bench("--quick", *SMALL, "--json", "--only", "durable-1,get-memtable")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert [w["key"] for w in res["workloads"]] == ["durable-1", "get-memtable"]
    rows = {r["contender"]: r for r in res["workloads"][0]["rows"]}
    assert {"raw write+fdatasync", "walstate sync=always", "sqlite3 WAL FULL",
            "lmdb sync"} <= set(rows)
    assert rows["raw write+fdatasync"]["ratio"] == 1.0
    assert all(r["value"] > 0 for r in rows.values())
    assert res["machine"]["nproc"] >= 1 and res["machine"]["filesystem"]


def test_bench_missing_peer_is_skipped_with_a_note(tmp_path: Path) -> None:
    for mod in ("rocksdict", "plyvel"):
        (tmp_path / f"{mod}.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    p = bench("--quick", *SMALL, "--only", "durable-1", env=env)
    assert p.returncode == 0, p.stderr
    assert "rocksdict not installed" in p.stdout and "plyvel not installed" in p.stdout
    assert "rocksdb sync" not in p.stdout.split("note:")[0]
    assert "not checked" in p.stdout  # the targets against the missing peers


def test_bench_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    p = bench("--quick", *SMALL, "--only", "get-memtable,durable-1", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unknown_workload_is_bad_usage() -> None:
    p = bench("--only", "nonsense")
    assert p.returncode == 2 and "nonsense" in p.stderr


def test_python_replay_baseline_stops_at_a_torn_record(tmp_path: Path) -> None:
    log = tmp_path / "raw.log"
    recs = [frame(i, b"k%015d" % (i % 3), b"v%099d" % i) for i in range(10)]
    log.write_bytes(b"".join(recs) + recs[0][:20])
    assert benchmark.python_replay(str(log), b"k%015d" % 0) == b"v%099d" % 9


def test_targets_cover_the_issue_table() -> None:
    keys = {t.workload for t in benchmark.TARGETS}
    assert keys <= set(benchmark.WORKLOAD_KEYS)
    assert {"durable-1", "durable-4t", "batch-1000", "fast", "get-snapshot", "get-memtable",
            "recovery", "reopen", "checkpoint", "memory"} <= keys


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
