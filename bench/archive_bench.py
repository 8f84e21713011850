"""Figures of the WAL archive (prints them; asserts nothing).

    python bench/archive_bench.py [--s3] [--seconds 10] [--restore-mib 256]

1. archive lag at about 5k durable puts/s: ``info()["archive"]["lag_seconds"]``
   sampled every 5 ms (the age of the oldest durable write not yet archived),
   p50/p99/max, and the bytes and requests the archive took;
2. durable puts from 4 threads with archiving on vs off (ratio; target >= 0.95);
3. restore speed reading the WAL from a local (directory) store (target >= 100 MB/s).

``--s3`` archives to a SeaweedFS ``weed mini`` started for the run
(tests/archive/s3server.py) instead of a local directory for 1 and 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "archive"))

import walstate  # noqa: E402
from walstate.ops.archivetool import restore_archive  # noqa: E402


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else 0.0


def lag_at_rate(root: str, archive: str, rate: float, seconds: float) -> dict:
    d = os.path.join(root, "lag")
    db = walstate.open(d, archive=archive, archive_interval=1.0, max_wal_size=64 << 20)
    stop = threading.Event()
    n = [0]
    threads = 8
    per = rate / threads

    def writer(t: int) -> None:
        i = 0
        start = time.monotonic()
        while not stop.is_set():
            db.put(b"t%d-%08d" % (t, i % 50000), b"v" * 100)
            i += 1
            ahead = i / per - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        n[0] += i

    ws = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in ws:
        w.start()
    time.sleep(1.0)  # warm up
    samples = []
    t_end = time.monotonic() + seconds
    a0 = db.info()["archive"]
    while time.monotonic() < t_end:
        samples.append(db.info()["archive"]["lag_seconds"])
        time.sleep(0.005)
    a1 = db.info()["archive"]
    stop.set()
    for w in ws:
        w.join()
    db.close()
    took = seconds + 1.0
    return {"puts_per_s": n[0] / took, "lag_p50": _quantile(samples, 0.5),
            "lag_p99": _quantile(samples, 0.99), "lag_max": max(samples),
            "uploads_per_s": (a1["uploads"] - a0["uploads"]) / seconds,
            "uploaded_MB_per_s": (a1["bytes_uploaded"] - a0["bytes_uploaded"]) / seconds / 1e6,
            "failing": a1["failing"]}


def four_threads(root: str, archive: str | None, seconds: float) -> float:
    d = tempfile.mkdtemp(dir=root)
    opts = {"archive": archive, "archive_interval": 1.0} if archive else {}
    db = walstate.open(d, max_wal_size=64 << 20, **opts)
    stop = threading.Event()
    counts = [0] * 4

    def writer(t: int) -> None:
        i = 0
        while not stop.is_set():
            db.put(b"t%d-%08d" % (t, i % 50000), b"v" * 100)
            i += 1
        counts[t] = i

    ws = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    t0 = time.monotonic()
    for w in ws:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in ws:
        w.join()
    rate = sum(counts) / (time.monotonic() - t0)
    db.close()
    shutil.rmtree(d)
    return rate


def restore_speed(root: str, mib: int) -> dict:
    arch = os.path.join(root, "speed-arch")
    d = os.path.join(root, "speed")
    value = os.urandom(4000)
    with walstate.open(d, archive=arch, sync="none", max_wal_size=1 << 34,
                       checkpoint_timeout=3600) as db:
        n = mib * (1 << 20) // 4100
        for i in range(n):
            db.put(b"k%09d" % i, value)
        db.sync()
        assert db._checkpointer.archiver.wait_archived(timeout=600)
    dest = os.path.join(root, "speed-restored")
    t0 = time.monotonic()
    res = restore_archive(arch, dest)
    secs = time.monotonic() - t0
    return {"wal_MB": res.wal_bytes / 1e6, "seconds": secs, "MB_per_s": res.wal_bytes / 1e6 / secs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--restore-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="walstate-archive-bench-")
    server = None
    try:
        if args.s3:
            from s3server import WeedServer

            server = WeedServer(os.path.join(root, "weed"))
            server.start()
            os.environ.update(server.env())
            server.create_bucket("bench")
            archive = "s3://bench/a"
        else:
            archive = os.path.join(root, "arch")
        lag = lag_at_rate(root, archive + "-lag", args.rate, args.seconds)
        kind = "S3" if args.s3 else "dir"
        print(f"archive lag at {lag['puts_per_s']:.0f} durable puts/s ({kind}):"
              f" p50 {lag['lag_p50']:.3f} s, p99 {lag['lag_p99']:.3f} s, max "
              f"{lag['lag_max']:.3f} s; {lag['uploads_per_s']:.1f} uploads/s, "
              f"{lag['uploaded_MB_per_s']:.2f} MB/s uploaded; failing={lag['failing']}")
        ratios = []
        for r in range(args.repeat):
            off = four_threads(root, None, args.seconds / 2)
            on = four_threads(root, f"{archive}-t{r}", args.seconds / 2)
            ratios.append(on / off)
            print(f"4 threads durable puts: off {off:.0f}/s, on {on:.0f}/s, ratio {on / off:.3f}")
        print(f"4 threads ratio on/off: median {statistics.median(ratios):.3f} "
              "(target >= 0.95)")
        sp = restore_speed(root, args.restore_mib)
        print(f"restore from a local directory archive: {sp['wal_MB']:.0f} MB of WAL in "
              f"{sp['seconds']:.2f} s = {sp['MB_per_s']:.0f} MB/s (target >= 100 MB/s)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
