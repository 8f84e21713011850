"""LangGraph's own conformance suite (langgraph-checkpoint-conformance) run against
both savers: every capability, base and extended, must be detected and pass."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("langgraph.checkpoint.conformance")

from langgraph.checkpoint.conformance import checkpointer_test, validate  # noqa: E402
from langgraph.checkpoint.conformance.capabilities import Capability  # noqa: E402

import walstate  # noqa: E402
import walstate.aio  # noqa: E402
from walstate.langgraph import AsyncWalstateSaver, WalstateSaver  # noqa: E402

ALL = {c.value for c in Capability}


def _check(report) -> None:
    failures = {name: r.failures for name, r in report.results.items() if r.failures}
    assert failures == {}
    assert {n for n, r in report.results.items() if r.detected} == ALL
    assert all(r.passed is True for r in report.results.values())
    assert sum(r.tests_passed for r in report.results.values()) >= 70
    assert report.conformance_level() == "FULL"


def test_async_saver_is_fully_conformant(tmp_path: Path) -> None:
    n = iter(range(100))

    @checkpointer_test(name="AsyncWalstateSaver")
    async def factory():
        async with AsyncWalstateSaver.from_path(str(tmp_path / f"db{next(n)}")) as saver:
            yield saver

    _check(asyncio.run(validate(factory)))


def test_sync_saver_is_fully_conformant(tmp_path: Path) -> None:
    # the suite calls the a-methods; the sync saver runs its own methods in threads
    n = iter(range(100))

    @checkpointer_test(name="WalstateSaver")
    async def factory():
        with WalstateSaver.from_path(str(tmp_path / f"db{next(n)}"), sync="always") as saver:
            yield saver

    _check(asyncio.run(validate(factory)))


def test_conformant_on_a_shared_engine_after_checkpoints_and_reopen(tmp_path: Path) -> None:
    """The same suite on one engine opened by the caller, with the data moved into
    the LMDB snapshot between capabilities (range reads across memtable and
    snapshot), and on an AsyncEngine given to the async saver."""
    db = walstate.open(tmp_path / "shared")

    @checkpointer_test(name="WalstateSaver(shared engine)")
    async def factory():
        db.checkpoint()
        yield WalstateSaver(db)

    try:
        _check(asyncio.run(validate(factory)))
    finally:
        db.close()

    async def run_async() -> None:
        async with walstate.aio.open(tmp_path / "shared") as adb:
            @checkpointer_test(name="AsyncWalstateSaver(AsyncEngine)")
            async def afactory():
                await adb.checkpoint()
                yield AsyncWalstateSaver(adb)

            _check(await validate(afactory))

    asyncio.run(run_async())
