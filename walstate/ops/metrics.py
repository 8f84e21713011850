"""Prometheus metrics for an open engine (optional extra: ``walstate[metrics]``).

::

    from walstate.ops import metrics
    server = metrics.serve(db, 9464)          # http://127.0.0.1:9464/metrics
    ...
    server.close()

Counters and gauges are read from ``db.stats()`` / ``db.info()`` at scrape
time (a custom collector: nothing is added to the write path). The fsync
latency histogram comes from the C log's own log2 histogram. Put latency and
checkpoint duration need one observation per event: ``instrument(db)`` (done
by ``serve``) sets the engine's observer (``Engine.observe``: about a
microsecond per write); ``close()`` removes it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Histogram, start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("walstate.ops.metrics needs prometheus-client: pip install "
                      "'walstate[metrics]'") from exc

from ..errors import ClosedError

FSYNC_BUCKETS = 32  # wal.h WAL_FSYNC_BUCKETS: bucket b holds [2^b, 2^(b+1)) microseconds
PUT_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
               0.25, 0.5, 1.0, 2.5)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_COUNTERS = (
    ("puts", "walstate_puts", "PUT records committed"),
    ("deletes", "walstate_deletes", "DELETE records committed"),
    ("batches", "walstate_batches", "batches committed"),
    ("wal_records", "walstate_wal_records", "WAL records appended"),
    ("wal_bytes_written", "walstate_wal_written_bytes", "WAL bytes appended (headers included)"),
    ("fsyncs", "walstate_fsyncs", "WAL fdatasyncs"),
    ("checkpoints", "walstate_checkpoints", "checkpoints completed"),
    ("checkpoint_seconds_total", "walstate_checkpoint_seconds", "time spent in checkpoints"),
)


class EngineCollector(Collector):
    """Reads an engine's stats()/info() at every scrape."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def collect(self) -> Iterator[Any]:
        try:
            stats = self.db.stats()
            info = self.db.info()
        except ClosedError:
            return
        for key, name, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        arch = info.get("archive") or {}
        gauges = (
            ("walstate_last_lsn", "LSN of the last committed write", info["last_lsn"]),
            ("walstate_durable_lsn", "LSN up to which the WAL is fdatasynced",
             info["durable_lsn"]),
            ("walstate_durable_lag_records", "committed records not yet durable (LSN distance)",
             max(info["last_lsn"] - info["durable_lsn"], 0)),
            ("walstate_checkpoint_lsn", "LSN of the last checkpoint", info["checkpoint_lsn"]),
            ("walstate_wal_bytes", "WAL bytes on disk", info["wal_bytes"]),
            ("walstate_wal_segments", "WAL segment files on disk", info["wal_segments"]),
            ("walstate_wal_since_checkpoint_bytes", "WAL bytes written since the last "
             "checkpoint started", info.get("wal_bytes_since_checkpoint", 0)),
            ("walstate_estimated_replay_seconds", "estimated crash-recovery replay time",
             info.get("estimated_replay_seconds", 0.0)),
            ("walstate_snapshot_bytes", "LMDB snapshot file bytes", info["snapshot_bytes"]),
            ("walstate_snapshot_keys", "keys in the LMDB snapshot", info.get("snapshot_keys", 0)),
            ("walstate_memtable_keys", "keys changed since the last checkpoint",
             info.get("memtable_keys", 0)),
            ("walstate_failed", "1 if the engine refuses writes after an I/O failure",
             1 if info.get("failed") else 0),
            ("walstate_archive_lag_bytes", "durable WAL not yet in the archive (bytes)",
             arch.get("lag_bytes", 0)),
            ("walstate_archive_lag_seconds", "how long the oldest durable write not yet in "
             "the archive has waited", arch.get("lag_seconds", 0.0)),
            ("walstate_archived_lsn", "every record up to this LSN is in the archive",
             arch.get("archived_lsn", 0)),
            ("walstate_archive_failing", "1 while WAL archiving fails",
             1 if arch.get("failing") else 0),
        )
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        c = CounterMetricFamily("walstate_archive_failures", "WAL archiving failures")
        c.add_metric([], float(arch.get("failures", 0)))
        yield c
        yield self._fsync_histogram()

    def _fsync_histogram(self) -> HistogramMetricFamily:
        wal = getattr(self.db, "_wal", None)
        hist: list[int] = [0] * FSYNC_BUCKETS
        total_ns = 0
        if wal is not None:
            try:
                st = wal.stats()
                hist, total_ns = list(st["fsync_hist"]), int(st["fsync_ns_total"])
            except ClosedError:
                pass
        buckets, acc = [], 0
        for b, n in enumerate(hist):
            acc += n
            buckets.append((repr(2 ** (b + 1) / 1e6), float(acc)))
        buckets.append(("+Inf", float(acc)))
        h = HistogramMetricFamily("walstate_fsync_seconds", "WAL fdatasync latency")
        h.add_metric([], buckets, sum_value=total_ns / 1e9)
        return h


class MetricsServer:
    """What :func:`serve` returns: ``port``, ``url``, ``close()`` (= ``shutdown()``)."""

    def __init__(self, db: Any, registry: CollectorRegistry, server: Any,
                 thread: threading.Thread, undo: Any) -> None:
        self.db = db
        self.registry = registry
        self._server = server
        self._thread = thread
        self._undo = undo
        self.addr, self.port = server.server_address[:2]
        self.url = f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None
        self._undo()

    shutdown = close

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def instrument(db: Any, registry: CollectorRegistry) -> Any:
    """Times this engine's writes and checkpoints into histograms in
    ``registry`` through the engine's observer hook (``Engine.observe``);
    returns a function that removes it."""
    put_h = Histogram("walstate_put_latency_seconds", "latency of put/delete/batch commit "
                      "(durable per the sync mode)", registry=registry, buckets=PUT_BUCKETS)
    ck_h = Histogram("walstate_checkpoint_duration_seconds", "checkpoint duration",
                     registry=registry, buckets=CHECKPOINT_BUCKETS)

    def observe(event: str, seconds: float) -> None:
        (ck_h if event == "checkpoint" else put_h).observe(seconds)

    db.observe(observe)

    def undo() -> None:
        try:
            db.observe(None)
        except ClosedError:
            pass

    return undo


def serve(db: Any, port: int, addr: str = "127.0.0.1") -> MetricsServer:
    """Serves ``db``'s metrics at http://addr:port/metrics (port 0: any free
    port, see ``.port``) from a daemon thread until ``close()``."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(db))
    undo = instrument(db, registry)
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except BaseException:
        undo()
        raise
    return MetricsServer(db, registry, server, thread, undo)
