"""WalstateSaver / AsyncWalstateSaver as LangGraph users meet them: graphs in 16
threads and 16 asyncio tasks on one saver, keep_last, reopening, bad input."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

pytest.importorskip("langgraph.graph")

import lg_graphs  # noqa: E402
from langgraph.checkpoint.base import BaseCheckpointSaver  # noqa: E402

import walstate  # noqa: E402
import walstate.aio  # noqa: E402
from walstate.langgraph import AsyncWalstateSaver, WalstateSaver  # noqa: E402

N = 16


def _conf(tid: str, ns: str | None = "") -> dict:
    c = {"thread_id": tid}
    if ns is not None:
        c["checkpoint_ns"] = ns
    return {"configurable": c}


def test_savers_are_langgraph_checkpoint_savers(tmp_path: Path) -> None:
    with WalstateSaver.from_path(str(tmp_path / "a")) as s:
        assert isinstance(s, BaseCheckpointSaver)
        assert s.engine.config.sync == "always"


def test_16_threads_run_graphs_on_one_saver(tmp_path: Path) -> None:
    want = lg_graphs.expected()
    errors: list[BaseException] = []
    results: dict[int, dict] = {}
    with WalstateSaver.from_path(str(tmp_path / "db")) as saver:
        graph = lg_graphs.build(saver)
        start = threading.Barrier(N)

        def run(i: int) -> None:
            try:
                start.wait()
                results[i] = dict(graph.invoke(dict(lg_graphs.INPUT), _conf(f"t{i}")))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert results == {i: want for i in range(N)}
        for i in range(N):
            steps = [t.metadata["step"] for t in saver.list(_conf(f"t{i}"))]
            assert steps == list(range(lg_graphs.STEPS, -2, -1))
        fsyncs = saver.engine.stats()["fsyncs"]
    # reopened: the same states
    with WalstateSaver.from_path(str(tmp_path / "db")) as saver:
        graph = lg_graphs.build(saver)
        for i in range(N):
            snap = graph.get_state(_conf(f"t{i}"))
            assert dict(snap.values) == want and snap.next == ()
    assert fsyncs > 0


def test_16_asyncio_tasks_run_graphs_on_one_async_saver(tmp_path: Path) -> None:
    want = lg_graphs.expected()

    async def main() -> None:
        async with AsyncWalstateSaver.from_path(str(tmp_path / "db"), sync="always") as saver:
            graph = lg_graphs.build(saver)
            outs = await asyncio.gather(*(
                graph.ainvoke(dict(lg_graphs.INPUT), _conf(f"t{i}")) for i in range(N)))
            assert [dict(o) for o in outs] == [want] * N
            for i in range(N):
                snap = await graph.aget_state(_conf(f"t{i}"))
                assert dict(snap.values) == want
                assert len([t async for t in saver.alist(_conf(f"t{i}"))]) == lg_graphs.STEPS + 2
            st = saver.engine.stats()
            # every put and put_writes is one batch: 16 graphs wrote at once, so
            # some of those durable writes shared an fsync
            assert st["batches"] >= N * (lg_graphs.STEPS + 2)
            assert st["fsyncs"] < st["batches"]

    asyncio.run(main())


def test_keep_last_bounds_the_checkpoints_of_each_thread(tmp_path: Path) -> None:
    want = lg_graphs.expected()
    with WalstateSaver.from_path(str(tmp_path / "db"), keep_last=3) as saver:
        graph = lg_graphs.build(saver)
        for i in range(3):
            assert dict(graph.invoke(dict(lg_graphs.INPUT), _conf(f"t{i}"))) == want
        for i in range(3):
            got = list(saver.list(_conf(f"t{i}")))
            assert [t.metadata["step"] for t in got] == [20, 19, 18]
        # every key left belongs to a kept checkpoint: 3 threads x 3 checkpoints,
        # their writes, no run index leftovers from the deleted ones
        keys = [k for k, _ in saver.engine.items(b"lg/", b"lg0")]
        ck = [k for k in keys if k.startswith(b"lg/c\x00") and k.endswith(b"\xffc")]
        assert len(ck) == 9
        assert len(keys) < 9 * 6
    with walstate.open(tmp_path / "x") as db, pytest.raises(ValueError, match="keep_last"):
        WalstateSaver(db, keep_last=0)


def test_resume_after_reopen_continues_the_thread(tmp_path: Path) -> None:
    """A graph stopped by an interrupt_before resumes in a new process-like
    reopen with the same thread_id."""
    with WalstateSaver.from_path(str(tmp_path / "db")) as saver:
        g = lg_graphs.build(saver)
        g2 = g.builder.compile(checkpointer=saver, interrupt_before=["n10"])
        out = g2.invoke(dict(lg_graphs.INPUT), _conf("t"))
        assert out["log"] == list(range(1, 10))
    with WalstateSaver.from_path(str(tmp_path / "db")) as saver:
        g = lg_graphs.build(saver)
        assert dict(g.invoke(None, _conf("t"))) == lg_graphs.expected()


def test_bad_input_is_refused_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    from langgraph.checkpoint.conformance.test_utils import generate_checkpoint

    with WalstateSaver.from_path(str(tmp_path / "db")) as saver:
        before = saver.engine.info()["last_lsn"]
        cp = generate_checkpoint()
        with pytest.raises(ValueError, match="thread_id"):
            saver.put(_conf("a\x00b"), cp, {}, {})
        with pytest.raises(ValueError, match="511"):
            saver.put(_conf("t" * 600), cp, {}, {})
        with pytest.raises(TypeError, match="thread_id"):
            saver.put(_conf(None), cp, {}, {})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="strategy"):
            saver.prune(["t"], strategy="keep_some")
        with pytest.raises(TypeError, match="run_ids"):
            saver.delete_for_runs("run-1")
        with pytest.raises(TypeError, match="engine"):
            WalstateSaver("not an engine")  # type: ignore[arg-type]
        assert saver.engine.info()["last_lsn"] == before


def test_positional_and_keyword_arguments(tmp_path: Path) -> None:
    from langgraph.checkpoint.conformance.test_utils import generate_checkpoint

    with WalstateSaver.from_path(str(tmp_path / "db")) as saver:
        cp = generate_checkpoint(channel_values={"x": 1}, channel_versions={"x": 1})
        c1 = saver.put(_conf("t"), cp, {"source": "input", "step": -1}, {"x": 1})
        c2 = saver.put(config=_conf("t"), checkpoint=generate_checkpoint(),
                       metadata={"source": "loop", "step": 0}, new_versions={})
        saver.put_writes(c1, [("ch", 1)], "task-1")
        saver.put_writes(config=c1, writes=[("ch", 2)], task_id="task-2", task_path="p")
        t = saver.get_tuple(config=c1)
        assert [w[2] for w in t.pending_writes] == [1, 2]
        assert saver.get_tuple(_conf("t")).config == c2
        assert len(list(saver.list(config=_conf("t"), limit=1))) == 1
        assert [x.config for x in saver.list(_conf("t"), before=c2)] == [c1]
        assert [x.config for x in saver.list(None, filter={"step": -1})] == [c1]
        saver.copy_thread(source_thread_id="t", target_thread_id="u")
        saver.prune(thread_ids=["u"], strategy="keep_latest")
        assert [x.config["configurable"]["checkpoint_id"] for x in saver.list(_conf("u"))] \
            == [c2["configurable"]["checkpoint_id"]]
        saver.delete_thread(thread_id="u")
        assert saver.get_tuple(_conf("u")) is None
        saver.delete_for_runs(run_ids=[])


def test_async_saver_on_a_sync_engine_and_an_async_engine(tmp_path: Path) -> None:
    want = lg_graphs.expected()

    async def main() -> None:
        db = walstate.open(tmp_path / "a")
        try:
            out = await lg_graphs.build(AsyncWalstateSaver(db)).ainvoke(
                dict(lg_graphs.INPUT), _conf("t"))
            assert dict(out) == want
        finally:
            db.close()
        async with walstate.aio.open(tmp_path / "a") as adb:
            saver = AsyncWalstateSaver(adb, keep_last=2)
            g = lg_graphs.build(saver)
            assert dict((await g.aget_state(_conf("t"))).values) == want
            await g.ainvoke(dict(lg_graphs.INPUT), _conf("t2"))
            assert len([x async for x in saver.alist(_conf("t2"))]) == 2
            # the sync methods work on the async saver too
            assert saver.get_tuple(_conf("t")).metadata["step"] == 20

    asyncio.run(main())


def test_list_across_namespaces_and_threads_newest_first(tmp_path: Path) -> None:
    from langgraph.checkpoint.conformance.test_utils import generate_checkpoint

    with WalstateSaver.from_path(str(tmp_path / "db")) as saver:
        made = []
        for i in range(6):
            tid, ns = f"t{i % 2}", ["", "child:1", "child:2"][i % 3]
            made.append(saver.put(_conf(tid, ns), generate_checkpoint(), {"step": i}, {}))
        ids = [c["configurable"]["checkpoint_id"] for c in made]
        got = [t.config["configurable"]["checkpoint_id"] for t in saver.list(None)]
        assert got == sorted(ids, reverse=True)
        t0 = [t.config["configurable"]["checkpoint_id"] for t in saver.list(_conf("t0", None))]
        assert t0 == [ids[4], ids[2], ids[0]]
        assert [t.metadata["step"] for t in saver.list(_conf("t0", None), before=made[4])] \
            == [2, 0]
        one = {"configurable": {"thread_id": "t0", "checkpoint_id": ids[2]}}
        assert [t.metadata["step"] for t in saver.list(one)] == [2]
        assert [t.metadata["step"] for t in saver.list(None, filter={"step": 3})] == [3]
        assert [t.metadata["step"] for t in saver.list(None, limit=2)] == [5, 4]
