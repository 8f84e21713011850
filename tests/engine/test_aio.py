"""walstate.aio: the asyncio face, used as asyncio code uses it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import walstate
import walstate.aio


def run(coro):
    return asyncio.run(coro)


def test_open_awaited_and_as_async_context_manager(tmp_path: Path) -> None:
    async def main() -> None:
        db = await walstate.aio.open(tmp_path / "db", sync="always")
        assert isinstance(db, walstate.aio.AsyncEngine)
        lsn = await db.put(b"k", b"v1")
        assert await db.get(b"k") == b"v1"
        assert db.info()["last_lsn"] >= lsn and db.stats()["puts"] == 1
        await db.close()
        await db.close()  # idempotent
        with pytest.raises(walstate.ClosedError):
            await db.get(b"k")
        with pytest.raises(walstate.ClosedError):
            await db.put(b"k", b"v")
        async with walstate.aio.open(path=tmp_path / "db") as db2:
            assert await db2.get(key=b"k") == b"v1"
            assert await db2.get(b"missing", default=7) == 7
            assert await db2.put(key=b"k2", value=b"v2") > lsn
            assert await db2.contains(b"k2") and not await db2.contains(b"k3")
            assert await db2.delete(key=b"k2") > 0
            assert await db2.get(b"k2") is None
        assert db2.engine._closed

    run(main())


def test_bad_arguments_raise_clearly_and_write_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(walstate.ConfigError, match="sync"):
            await walstate.aio.open(tmp_path / "bad", sync="sometimes")
        with pytest.raises(ValueError, match="max_workers"):
            walstate.aio.open(tmp_path / "bad2", max_workers=0)
        async with walstate.aio.open(tmp_path / "db") as db:
            last = db.info()["last_lsn"]
            with pytest.raises(TypeError):
                await db.put("not bytes", b"v")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="511"):
                await db.put(b"k" * 600, b"v")
            with pytest.raises(ValueError, match="511"):
                async with db.batch() as b:
                    b.put(b"ok", b"1")
                    b.put(b"k" * 600, b"v")
            assert db.info()["last_lsn"] == last and await db.get(b"ok") is None

    run(main())


def test_locked_directory_raises_locked_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with walstate.aio.open(tmp_path / "db"):
            code = f"import walstate; walstate.open({str(tmp_path / 'db')!r})"
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            assert "LockedError" in p.stderr

    run(main())


def test_blocking_work_runs_off_the_event_loop(tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []
    real_open = walstate.engine.open

    def spy_open(*a, **kw):
        seen.append(("open", threading.current_thread().name))
        return real_open(*a, **kw)

    monkeypatch.setattr(walstate.engine, "open", spy_open)

    def wrap(name, fn):
        def w(*a, **kw):
            seen.append((name, threading.current_thread().name))
            return fn(*a, **kw)
        return w

    walstate.open(tmp_path / "db").close()   # reopened cleanly: the first write starts
    # the engine's session (an fsync), which must not happen on the loop either

    async def main() -> None:
        loop_thread = threading.current_thread().name
        db = await walstate.aio.open(tmp_path / "db", sync="always")
        e = db.engine
        for name in ("put", "get", "delete", "sync", "checkpoint", "close", "items",
                     "_commit_batch", "__contains__", "batch", "_start_session"):
            if name in ("put", "get"):
                setattr(e, name, wrap(name, getattr(e, name)))
            else:
                monkeypatch.setattr(e, name, wrap(name, getattr(e, name)))
        await db.put(b"a", b"1")
        await db.get(b"a")
        await db.contains(b"a")
        async with db.batch() as b:
            b.put(b"b", b"2")
        assert [kv async for kv in db.items()] == [(b"a", b"1"), (b"b", b"2")]
        await db.delete(b"a")
        await db.sync()
        await db.checkpoint()
        await db.close()
        names = {n for n, _ in seen}
        assert names >= {"open", "put", "get", "__contains__", "_commit_batch", "items",
                         "delete", "sync", "checkpoint", "close", "batch", "_start_session"}
        assert all(t != loop_thread and t.startswith("walstate-aio") for _, t in seen), seen

    run(main())


def test_concurrent_durable_puts_share_fsyncs(tmp_path: Path) -> None:
    async def main() -> None:
        async with walstate.aio.open(tmp_path / "db", sync="always") as db:
            n = 400
            lsns = await asyncio.gather(*(db.put(b"k%04d" % i, b"v%d" % i) for i in range(n)))
            assert len(set(lsns)) == n
            st = db.stats()
            assert st["puts"] == n
            assert st["fsyncs"] < n / 2, st  # group commit: awaits wait together
            assert [k async for k, _ in db.items()] == [b"k%04d" % i for i in range(n)]

    run(main())


def test_batches_are_atomic_and_an_exception_discards(tmp_path: Path) -> None:
    async def main() -> None:
        async with walstate.aio.open(tmp_path / "db") as db:
            async with db.batch() as b:
                b.put(b"a", b"1")
                b.put(key=b"b", value=b"2")
                b.delete(key=b"gone")
            assert b.lsn is not None and b.lsn == db.info()["last_lsn"]
            with pytest.raises(RuntimeError):
                async with db.batch() as b2:
                    b2.put(b"c", b"3")
                    await asyncio.sleep(0)
                    raise RuntimeError("boom")
            assert b2.lsn is None and await db.get(b"c") is None
            async with db.batch() as b3:
                pass
            assert b3.lsn is None
            assert db.stats()["batches"] == 1

    run(main())


def test_cancellation(tmp_path: Path) -> None:
    """A write cancelled while it runs completes before CancelledError reaches the
    caller; one cancelled before it started, or a batch cancelled inside its block,
    writes nothing."""

    async def main() -> None:
        async with walstate.aio.open(tmp_path / "db", sync="always") as db:
            for i in range(20):
                t = asyncio.create_task(db.put(b"run%d" % i, b"x"))
                await asyncio.sleep(0)          # started: handed to the pool
                t.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await t
                assert db.engine.get(b"run%d" % i) == b"x"   # the write happened
                assert db.engine.info()["durable_lsn"] >= db.engine.info()["last_lsn"]

            t = asyncio.create_task(db.put(b"never", b"x"))
            t.cancel()                          # before it ran
            with pytest.raises(asyncio.CancelledError):
                await t
            assert db.engine.get(b"never") is None

            gate = asyncio.Event()

            async def in_block() -> None:
                async with db.batch() as b:
                    b.put(b"half1", b"1")
                    await gate.wait()           # cancelled here
                    b.put(b"half2", b"2")

            t = asyncio.create_task(in_block())
            await asyncio.sleep(0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            assert db.engine.get(b"half1") is None and db.engine.get(b"half2") is None

            async def commit() -> None:
                async with db.batch() as b:
                    for j in range(100):
                        b.put(b"whole%03d" % j, b"v")

            t = asyncio.create_task(commit())
            for _ in range(3):
                await asyncio.sleep(0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            got = [k for k, _ in db.engine.items(b"whole", b"whole~")]
            assert len(got) in (0, 100)         # all of the batch or none

    run(main())


def test_async_items_with_ranges_and_early_exit(tmp_path: Path) -> None:
    async def main() -> None:
        async with walstate.aio.open(tmp_path / "db", sync="none") as db:
            async with db.batch() as b:
                for i in range(1000):
                    b.put(b"%05d" % i, b"v%d" % i)
            await db.checkpoint()                       # half in LMDB, half in memory
            async with db.batch() as b:
                for i in range(0, 1000, 2):
                    b.put(b"%05d" % i, b"w%d" % i)
                b.delete(b"00003")
            want = list(db.engine.items(b"00100", b"00700"))
            got = [kv async for kv in db.items(b"00100", b"00700")]
            assert got == want and len(got) == 600
            assert [kv async for kv in db.items(start=b"00998")] == \
                [(b"00998", b"w998"), (b"00999", b"v999")]
            assert [kv async for kv in db.items(stop=b"00002")] == \
                [(b"00000", b"w0"), (b"00001", b"v1")]
            it = db.items()
            async for k, _ in it:
                if k == b"00010":
                    break
            await it.aclose()
            n = 0
            async for _ in db.items():
                n += 1
            assert n == 999

    run(main())


CHILD = textwrap.dedent("""
    import asyncio, sys, walstate.aio

    async def main(path):
        async with walstate.aio.open(path, sync="always") as db:
            async def writer(w):
                last = await db.get(b"w%02d:last" % w)
                i = 0 if last is None else int(last) + 1   # go on after a crash
                while True:
                    async with db.batch() as b:
                        b.put(b"w%02d:%06d" % (w, i), b"x" * 100)
                        b.put(b"w%02d:last" % w, b"%d" % i)
                    print(w, i, flush=True)
                    i += 1
            await asyncio.gather(*(writer(w) for w in range(8)))

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_keeps_every_acknowledged_async_write(tmp_path: Path, seed: int) -> None:
    """8 asyncio tasks commit batches under sync="always", printing each one
    acknowledged; SIGKILL after a random number, reopen: every acknowledged batch
    is there, whole; twice in a row (the second run goes on from the first)."""
    rng = random.Random(seed)
    path = tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    acked: dict[int, int] = {}
    for _round in range(2):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True, env=env)
        stop_after = rng.randint(50, 400)
        n = 0
        assert p.stdout is not None
        for line in p.stdout:
            w, i = map(int, line.split())
            acked[w] = max(acked.get(w, -1), i)
            n += 1
            if n >= stop_after:
                p.send_signal(signal.SIGKILL)
                break
        p.wait()
        with walstate.open(path) as db:
            for w, i in acked.items():
                last = int(db.get(b"w%02d:last" % w))
                assert last >= i, f"writer {w}: acknowledged batch {i} lost"
                # batches are whole: every key up to `last` is there
                assert sum(1 for _ in db.items(b"w%02d:0" % w, b"w%02d:9" % w)) == last + 1
                acked[w] = last
