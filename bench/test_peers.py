"""walstate beside every peer of ``walstate bench`` (benchpeers.py), as a
pytest-benchmark grid: durability x operation, each group with a raw loop as
its baseline. Missing peers (rocksdict, plyvel) are simply not parametrized.

Groups:
  peers-put-durable   single puts, each durable  vs  os.write + os.fdatasync per record
  peers-put-none      single puts, not durable   vs  os.write per framed record
  peers-batch1000     1000 puts in one atomic durable write  vs  one os.write + fdatasync
Run: pytest bench/test_peers.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
from conftest import record

from walstate.benchmark import Data, Sizes, peers

DATA = Data(Sizes(keys=20000))
N = {"durable": 200, "fast": 20000}
GROUP = {"durable": "peers-put-durable", "fast": "peers-put-none"}


def _cases(kind: str) -> list[str]:
    return ["baseline", *peers.factories(kind)[0]]


def _close(s: peers.Store) -> None:
    if isinstance(s, peers.WalstateStore):
        s.abandon()  # the shutdown checkpoint is not what is measured
    else:
        s.close()


def _raw(bench_dir: str, ops: list[tuple[bytes, bytes]], durable: bool):
    fd = os.open(os.path.join(bench_dir, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def run():
        for i, (k, v) in enumerate(ops):
            os.write(fd, peers.frame(i, k, v))
            if durable:
                os.fdatasync(fd)
    return fd, run


@pytest.mark.parametrize(("kind", "who"), [(k, w) for k in ("durable", "fast")
                                           for w in _cases(k)])
def test_put(benchmark, bench_dir, kind, who):
    ops = DATA.updates(N[kind])
    if who == "baseline":
        fd, run = _raw(bench_dir, ops, kind == "durable")
        benchmark.pedantic(run, rounds=3)
        os.close(fd)
    else:
        s = peers.factories(kind)[0][who](bench_dir)
        s.prefill(DATA.prefill)
        put = s.put

        def run():
            for k, v in ops:
                put(k, v)
        benchmark.pedantic(run, rounds=3)
        _close(s)
    record(GROUP[kind], who, len(ops), benchmark)


@pytest.mark.parametrize("who", _cases("durable"))
def test_batch1000(benchmark, bench_dir, who):
    ops = DATA.updates(1000)
    if who == "baseline":
        fd = os.open(os.path.join(bench_dir, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

        def run():
            os.write(fd, b"".join([peers.frame(i, k, v) for i, (k, v) in enumerate(ops)]))
            os.fdatasync(fd)
        benchmark.pedantic(run, rounds=10)
        os.close(fd)
    else:
        s = peers.factories("durable")[0][who](bench_dir)
        s.prefill(DATA.prefill)
        benchmark.pedantic(lambda: s.batch(ops), rounds=10)
        _close(s)
    record("peers-batch1000", who, len(ops), benchmark)
