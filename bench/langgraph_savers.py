"""LangGraph checkpoint savers side by side, in one run, on the same disk:
walstate's WalstateSaver / AsyncWalstateSaver against LangGraph's SqliteSaver /
AsyncSqliteSaver and (when it imports) langgraph-checkpoint-lmdb's LMDBSaver /
AsyncLMDBSaver, each at a stated durability where every acknowledged write
survives power loss:

- walstate: ``sync="always"`` (a put returns after fdatasync of its WAL record;
  concurrent puts share fsyncs);
- sqlite: ``journal_mode=WAL``, ``synchronous=FULL`` (every commit fsyncs the
  WAL file);
- lmdb: py-lmdb's defaults (``sync=True``, ``metasync=True``: every write
  transaction is synced).

One "checkpoint" is what a LangGraph super-step stores: ``put`` of a checkpoint
(a ~2 KB message history) and ``put_writes`` of the node's writes. Printed:
checkpoints per second (1 thread; N threads each on its own thread_id; N
asyncio tasks) and ``get_tuple`` latency (newest checkpoint of a thread, median
and p99). The disk's fsync latency drifts (a shared machine), so the peers run
in turn within each round and the ratios printed are the median over rounds of
walstate's figure against the peer's figure of the same round::

    python bench/langgraph_savers.py [--steps 60] [--threads 16] [--rounds 7] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.conformance.test_utils import generate_checkpoint

from walstate.langgraph import AsyncWalstateSaver, WalstateSaver

# ---- the savers, each opened in its own fresh directory ----------------------------------

@contextlib.contextmanager
def walstate_sync(d: str) -> Iterator[BaseCheckpointSaver]:
    with WalstateSaver.from_path(os.path.join(d, "ws"), sync="always") as s:
        yield s


@contextlib.asynccontextmanager
async def walstate_async(d: str):
    async with AsyncWalstateSaver.from_path(os.path.join(d, "ws"), sync="always") as s:
        yield s


@contextlib.contextmanager
def sqlite_sync(d: str) -> Iterator[BaseCheckpointSaver]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(os.path.join(d, "cp.sqlite"), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    try:
        s = SqliteSaver(conn)
        s.setup()
        yield s
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def sqlite_async(d: str):
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with aiosqlite.connect(os.path.join(d, "cp.sqlite")) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        s = AsyncSqliteSaver(conn)
        await s.setup()
        yield s


def _lmdb_env(d: str) -> Any:
    import lmdb

    return lmdb.open(os.path.join(d, "cp.lmdb"), map_size=4 << 30, max_dbs=4)  # sync=True


@contextlib.contextmanager
def lmdb_sync(d: str) -> Iterator[BaseCheckpointSaver]:
    from langgraph_checkpoint_lmdb import LMDBSaver

    env = _lmdb_env(d)
    try:
        yield LMDBSaver(env)
    finally:
        env.close()


@contextlib.asynccontextmanager
async def lmdb_async(d: str):
    from langgraph_checkpoint_lmdb import AsyncLMDBSaver

    env = _lmdb_env(d)
    try:
        yield AsyncLMDBSaver(env)
    finally:
        env.close()


def lmdb_available() -> bool:
    try:
        import langgraph_checkpoint_lmdb  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure: the peer is left out
        return False
    return True


# ---- one super-step's checkpoint -----------------------------------------------------------

HISTORY = [{"role": "user" if i % 2 else "assistant", "content": "x" * 200} for i in range(8)]


def step_args(thread_id: str, step: int, parent: str | None) -> tuple:
    cp = generate_checkpoint(channel_values={"messages": HISTORY, "step": step},
                             channel_versions={"messages": step + 1, "step": step + 1})
    conf: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ""}
    if parent:
        conf["checkpoint_id"] = parent
    md = {"source": "loop", "step": step, "parents": {}}
    return {"configurable": conf}, cp, md, {"messages": step + 1, "step": step + 1}


WRITES = [("messages", {"role": "assistant", "content": "y" * 200}), ("step", 1)]


def run_thread(saver: BaseCheckpointSaver, thread_id: str, steps: int) -> None:
    parent = None
    for i in range(steps):
        cfg = saver.put(*step_args(thread_id, i, parent))
        saver.put_writes(cfg, WRITES, str(uuid.uuid4()))
        parent = cfg["configurable"]["checkpoint_id"]


async def arun_thread(saver: BaseCheckpointSaver, thread_id: str, steps: int) -> None:
    parent = None
    for i in range(steps):
        cfg = await saver.aput(*step_args(thread_id, i, parent))
        await saver.aput_writes(cfg, WRITES, str(uuid.uuid4()))
        parent = cfg["configurable"]["checkpoint_id"]


# ---- measurements ----------------------------------------------------------------------------

def cps_threads(saver: BaseCheckpointSaver, threads: int, steps: int, tag: str) -> float:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            run_thread(saver, f"{tag}-{i}", steps)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return threads * steps / dt


def get_latency(saver: BaseCheckpointSaver, thread_ids: list[str], n: int) -> tuple[float, float]:
    rng = random.Random(1)
    lat = []
    for _ in range(n):
        tid = rng.choice(thread_ids)
        t0 = time.perf_counter()
        tup = saver.get_tuple({"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
        lat.append(time.perf_counter() - t0)
        assert tup is not None and tup.pending_writes
    lat.sort()
    return statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6


async def acps_tasks(saver: BaseCheckpointSaver, tasks: int, steps: int, tag: str) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(arun_thread(saver, f"{tag}-{i}", steps) for i in range(tasks)))
    return tasks * steps / (time.perf_counter() - t0)


async def aget_latency(saver: BaseCheckpointSaver, thread_ids: list[str],
                       n: int) -> tuple[float, float]:
    rng = random.Random(1)
    lat = []
    for _ in range(n):
        tid = rng.choice(thread_ids)
        t0 = time.perf_counter()
        tup = await saver.aget_tuple({"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
        lat.append(time.perf_counter() - t0)
        assert tup is not None
    lat.sort()
    return statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def measure_sync(openers: dict[str, Callable], base: str, steps: int, threads: int,
                 gets: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Every peer open at once, each in its own directory; the runs alternate
    between peers, ``rounds`` times, and the median of each is kept (the disk's
    fsync latency drifts: alternating exposes every peer to the same drift)."""
    dirs = {n: tempfile.mkdtemp(prefix=f"lg-{n}-", dir=base) for n in openers}
    runs: dict[str, dict[str, list[float]]] = {n: {} for n in openers}
    try:
        with contextlib.ExitStack() as stack:
            savers = {n: stack.enter_context(o(dirs[n])) for n, o in openers.items()}
            for r in range(rounds):
                for n, saver in savers.items():
                    m = runs[n]
                    m.setdefault("1 thread", []).append(cps_threads(saver, 1, steps, f"one{r}"))
                    m.setdefault(f"{threads} threads", []).append(
                        cps_threads(saver, threads, max(steps // 4, 10), f"many{r}"))
                    med, p99 = get_latency(saver, [f"many{r}-{i}" for i in range(threads)], gets)
                    m.setdefault("get_tuple median", []).append(med)
                    m.setdefault("get_tuple p99", []).append(p99)
        return runs
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def measure_async(openers: dict[str, Callable], base: str, steps: int, tasks: int,
                  gets: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    dirs = {n: tempfile.mkdtemp(prefix=f"lg-{n}-", dir=base) for n in openers}
    runs: dict[str, dict[str, list[float]]] = {n: {} for n in openers}

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            savers = {n: await stack.enter_async_context(o(dirs[n])) for n, o in openers.items()}
            for r in range(rounds):
                for n, saver in savers.items():
                    m = runs[n]
                    m.setdefault("1 task", []).append(await acps_tasks(saver, 1, steps, f"one{r}"))
                    m.setdefault(f"{tasks} tasks", []).append(
                        await acps_tasks(saver, tasks, max(steps // 4, 10), f"many{r}"))
                    med, p99 = await aget_latency(saver, [f"many{r}-{i}" for i in range(tasks)],
                                                  gets)
                    m.setdefault("aget_tuple median", []).append(med)
                    m.setdefault("aget_tuple p99", []).append(p99)

    try:
        asyncio.run(main())
        return runs
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def walstate_get_after_checkpoint(base: str, steps: int, threads: int,
                                  gets: int) -> tuple[float, float, float, int]:
    """get_tuple on walstate with the same data, before and after ``db.checkpoint()``
    folded the in-memory table into LMDB: today a range read scans the engine's
    in-memory table, so its cost grows with the writes since the last checkpoint."""
    d = tempfile.mkdtemp(prefix="lg-ws-ck-", dir=base)
    try:
        with walstate_sync(d) as saver:
            cps_threads(saver, threads, steps, "t")
            keys = saver.engine.info()["memtable_keys"]
            before, _ = get_latency(saver, [f"t-{i}" for i in range(threads)], gets)
            saver.engine.checkpoint()
            after, p99 = get_latency(saver, [f"t-{i}" for i in range(threads)], gets)
        return before, after, p99, keys
    finally:
        shutil.rmtree(d, ignore_errors=True)


def report(title: str, runs: dict[str, dict[str, list[float]]]) -> None:
    """Medians over the rounds, and the median over the rounds of walstate's
    ratio to each peer in the same round (> 1: walstate better)."""
    print(f"\n{title}")
    names = list(runs)
    base = runs["walstate"]
    print(f"  {'median of rounds':28s}" + "".join(f"{n:>12s}" for n in names)
          + "".join(f"{'walstate/' + n:>18s}" for n in names[1:]))
    for metric in base:
        latency = "get_tuple" in metric
        unit = "us" if latency else "ckpt/s"
        row = f"  {metric + ' (' + unit + ')':28s}"
        row += "".join(f"{statistics.median(runs[n][metric]):12.1f}" for n in names)
        for n in names[1:]:
            pairs = zip(base[metric], runs[n][metric], strict=True)
            r = statistics.median((t / m) if latency else (m / t) for m, t in pairs)
            row += f"{r:17.2f}x"
        print(row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60,
                    help="checkpoints of a 1-thread round (a 16-thread round: steps/4 each)")
    ap.add_argument("--threads", type=int, default=16, help="threads / asyncio tasks")
    ap.add_argument("--gets", type=int, default=300, help="get_tuple calls timed per round")
    ap.add_argument("--rounds", type=int, default=7,
                    help="rounds; each runs every peer in turn (medians over rounds)")
    ap.add_argument("--dir", default=os.environ.get("WALSTATE_BENCH_DIR"),
                    help="a directory on the disk to measure (default: the temp dir)")
    a = ap.parse_args(argv)
    sync_peers: dict[str, Callable] = {"walstate": walstate_sync, "sqlite": sqlite_sync}
    async_peers: dict[str, Callable] = {"walstate": walstate_async, "sqlite": sqlite_async}
    if lmdb_available():
        sync_peers["lmdb"] = lmdb_sync
        async_peers["lmdb"] = lmdb_async
    else:
        print("(langgraph-checkpoint-lmdb does not import: left out)")
    print(f"steps={a.steps} threads={a.threads} rounds={a.rounds} "
          f"dir={a.dir or tempfile.gettempdir()}; ratios: walstate's advantage "
          "(>1 = walstate better)")
    res = measure_sync(sync_peers, a.dir, a.steps, a.threads, a.gets, a.rounds)
    report("synchronous savers (put + put_writes per checkpoint)", res)
    ares = measure_async(async_peers, a.dir, a.steps, a.threads, a.gets, a.rounds)
    report("asyncio savers (aput + aput_writes per checkpoint)", ares)
    before, after, p99, keys = walstate_get_after_checkpoint(a.dir, a.steps, a.threads,
                                                             a.gets)
    print(f"\nwalstate get_tuple: median {before:.1f} us with {keys} keys in the in-memory "
          f"table, {after:.1f} us (p99 {p99:.1f}) once checkpointed into LMDB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
