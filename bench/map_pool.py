"""TaskStore.map against the pools people use instead, on this machine.

    python bench/map_pool.py [--items 100000] [--processes 4] [--sqlite-items 2000]
                             [--repeat 3] [--dir DIR]

Three contenders run the same trivial function (``double``) over range(N),
each in a fresh interpreter (no warm forkserver or page cache carried over),
alternating, ``--repeat`` times; the median items/s of each is printed with
the ratios the issue asked for:

- ``walstate map``: ``TaskStore.map(double, range(N), processes=P)`` on a new
  directory under ``sync="always"``: every start and every result durable
  before it is acknowledged (transitions batched, fsyncs shared);
- ``multiprocessing.Pool.map``: the same function, the same number of
  processes and start method (forkserver), pool start-up included -- fast,
  and nothing survives a crash;
- ``sqlite3 loop``: one durable transaction per item (journal_mode=WAL,
  synchronous=FULL: an fsync per commit) recording the result, in one
  process -- the durable loop one writes by hand. It runs ``--sqlite-items``
  items (it is fsync-bound: items/s do not depend on N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def double(x: int) -> int:
    return 2 * x


def run_walstate(n: int, processes: int, where: str) -> float:
    import walstate
    from walstate.tasks import TaskStore

    path = tempfile.mkdtemp(prefix="map-", dir=where)
    try:
        with walstate.open(os.path.join(path, "db"), sync="always") as db:
            tasks = TaskStore(db)
            t0 = time.perf_counter()
            out = tasks.map(double, range(n), processes=processes)
            dt = time.perf_counter() - t0
        assert out[-1] == 2 * (n - 1)
        return dt
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_pool(n: int, processes: int, where: str) -> float:
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    t0 = time.perf_counter()
    with ctx.Pool(processes) as pool:
        out = pool.map(double, range(n))
    dt = time.perf_counter() - t0
    assert out[-1] == 2 * (n - 1)
    return dt


def run_sqlite(n: int, processes: int, where: str) -> float:
    import sqlite3

    path = tempfile.mkdtemp(prefix="sqlite-", dir=where)
    try:
        con = sqlite3.connect(os.path.join(path, "tasks.db"), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, status TEXT, result BLOB)")
        t0 = time.perf_counter()
        for x in range(n):
            result = double(x)
            con.execute("BEGIN")
            con.execute("INSERT OR REPLACE INTO tasks VALUES (?, 'SUCCESS', ?)",
                        (str(x), str(result).encode()))
            con.execute("COMMIT")
        dt = time.perf_counter() - t0
        con.close()
        return dt
    finally:
        shutil.rmtree(path, ignore_errors=True)


RUNNERS = {"walstate": run_walstate, "pool": run_pool, "sqlite": run_sqlite}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--sqlite-items", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    p.add_argument("--one", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    where = args.dir or tempfile.gettempdir()
    if args.one:  # a child: one measurement, seconds on stdout
        n = args.sqlite_items if args.one == "sqlite" else args.items
        print(RUNNERS[args.one](n, args.processes, where))
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(here)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    rates: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for _ in range(args.repeat):
        for name in RUNNERS:  # alternating, so that load drifts hit each alike
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", name, "--items",
                 str(args.items), "--processes", str(args.processes), "--sqlite-items",
                 str(args.sqlite_items), "--dir", where],
                capture_output=True, text=True, env=env, check=True)
            n = args.sqlite_items if name == "sqlite" else args.items
            rates[name].append(n / float(out.stdout.strip().splitlines()[-1]))
    med = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "items": args.items, "processes": args.processes, "sqlite_items": args.sqlite_items,
        "cpus": os.cpu_count(), "items_per_s": med, "runs": rates,
        "walstate_vs_pool": med["walstate"] / med["pool"],
        "walstate_vs_sqlite": med["walstate"] / med["sqlite"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.items} trivial items, {args.processes} processes, {os.cpu_count()} CPUs, "
          f"median of {args.repeat}")
    labels = {"walstate": "walstate TaskStore.map (durable)",
              "pool": "multiprocessing.Pool.map (not durable)",
              "sqlite": f"sqlite3 loop, 1 txn/item ({args.sqlite_items} items, durable)"}
    for name, label in labels.items():
        print(f"  {label:<48} {med[name]:>12,.0f} items/s")
    print(f"  walstate / Pool.map    = {result['walstate_vs_pool']:.2f}  (target >= 0.5)")
    print(f"  walstate / sqlite loop = {result['walstate_vs_sqlite']:.1f}  (target >= 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
