"""pytest-benchmark helpers: every benchmark belongs to a group holding one
``baseline``; the terminal summary prints ops/s and the ratio of each
contender to the baseline measured in the same run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture
def bench_dir() -> Iterator[str]:
    base = os.environ.get("WALSTATE_BENCH_DIR")  # a directory on the disk to measure
    d = tempfile.mkdtemp(prefix="walstate-bench-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def record(group: str, name: str, ops: int, benchmark: pytest.FixtureRequest) -> None:
    """Remembers ops/s of this benchmark (ops per round / median round time)."""
    if benchmark.stats is None:  # type: ignore[attr-defined]  # --benchmark-disable
        return
    stats = benchmark.stats.stats  # type: ignore[attr-defined]
    RESULTS.setdefault(group, {})[name] = ops / stats.median
    benchmark.extra_info["ops_per_round"] = ops  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("walstate: ops/s and ratio to the baseline of the same group")
    for group, rows in sorted(RESULTS.items()):
        base = rows.get("baseline")
        for name, rate in sorted(rows.items(), key=lambda kv: kv[0] != "baseline"):
            ratio = f"{rate / base:6.2f}x" if base else "     -"
            tr.write_line(f"{group:<28} {name:<34} {rate:>14,.0f} ops/s {ratio}")
