"""Where a walstate put and get spend their time, layer by layer, in ns per
operation (best of several runs, this process only; not a test).

Each line adds one layer to the one above it, so the differences are the cost
of that layer: the loop itself, the cffi call into wal_put, the Wal wrapper,
Engine.put (in C: walstate._speedups.Hot -- the append without a cffi crossing,
the memtable, the counters); then the get path: dict,
Engine.get from the memtable, py-lmdb's txn-per-get, Engine.get from the
snapshot. Run: python bench/profile_paths.py [N]
For a sampling profile of the same loops: pyinstrument bench/profile_paths.py
For instructions per append in C: bench/callgrind_append.py
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

import lmdb

import walstate
from walstate._native import ffi, lib

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
rnd = random.Random(5)
KEYS = [rnd.randbytes(16) for _ in range(100_000)]
OPS = [(KEYS[rnd.randrange(len(KEYS))], rnd.randbytes(100)) for _ in range(N)]
ORDER = [KEYS[rnd.randrange(len(KEYS))] for _ in range(N)]


def best(fn, runs: int = 5) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out) / N * 1e9


def main() -> None:
    d = tempfile.mkdtemp(prefix="walstate-prof-")
    try:
        db = walstate.open(os.path.join(d, "ws"), sync="none", max_wal_size=1 << 40)
        wal = db._wal  # noqa: SLF001 - profiling the layers below the engine
        h, out = wal._h, ffi.new("uint64_t *")  # noqa: SLF001
        wal_put = lib.wal_put
        rows = []

        def loop():
            for _k, _v in OPS:
                pass
        rows.append(("loop over (k, v) pairs", best(loop)))

        def cffi():
            for k, v in OPS:
                wal_put(h, k, 16, v, 100, out)
        rows.append(("+ lib.wal_put via cffi (the C append)", best(cffi)))

        put_s = wal.put_serialized

        def wrapper():
            for k, v in OPS:
                put_s(k, v)
        rows.append(("+ Wal.put_serialized (wrapper)", best(wrapper)))

        put = db.put

        def engine():
            for k, v in OPS:
                put(k, v)
        rows.append(("+ Engine.put, sync=none", best(engine)))
        table = {}
        dput = table.__setitem__

        def dct():
            for k, v in OPS:
                dput(k, v)
        rows.append(("(for scale: dict[k] = v)", best(dct)))

        tget = dict.fromkeys(KEYS, b"x").get

        def dget():
            for k in ORDER:
                tget(k)
        rows.append(("get: dict.get", best(dget)))
        with db.batch() as b:
            for k in KEYS:
                b.put(k, b"v" * 100)
        get = db.get

        def mget():
            for k in ORDER:
                get(k)
        rows.append(("get: Engine.get, key in the memtable", best(mget)))
        db.checkpoint()
        env = lmdb.open(os.path.join(d, "l"), map_size=1 << 30)
        with env.begin(write=True) as txn:
            for k in KEYS:
                txn.put(k, b"v" * 100)
        begin = env.begin

        def lget():
            for k in ORDER:
                with begin() as t:
                    t.get(k)
        rows.append(("get: py-lmdb, read txn per get", best(lget)))
        with begin() as t:
            tg = t.get

            def lget1():
                for k in ORDER:
                    tg(k)
            rows.append(("get: py-lmdb, one read txn", best(lget1)))

        def sget():
            for k in ORDER:
                get(k)
        rows.append(("get: Engine.get, key in the snapshot", best(sget)))
        env.close()
        db.close()
        for name, ns in rows:
            print(f"{name:<44} {ns:8.0f} ns/op")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
