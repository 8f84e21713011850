"""Checkpoints: fold the changes since the last checkpoint into the LMDB
snapshot, then remove the WAL the snapshot made redundant.

Order (each step durable before the next):
  1. freeze the in-memory table at LSN X (writers go on in a fresh one);
  2. make the WAL durable up to X;
  3. fold the frozen table into LMDB in bounded chunks, each its own
     transaction, paced over checkpoint_completion_target of the interval;
  4. commit the checkpoint metadata (LSN X) -- from here recovery starts
     after X;
  5. drop the frozen table; remove WAL segments wholly below X.
A crash anywhere replays from the previous checkpoint's LSN: the chunks
already folded hold final values, and replaying PUT/DELETE is idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, Protocol

from ._native import speedups as _speedups
from .errors import ClosedError, DiskFullError, EngineFailedError, WalStateError
from .layout import FORMAT_VERSION
from .snapshot import META_CHECKPOINT, META_FOLD, Snapshot
from .wal import Wal

log = logging.getLogger("walstate")

REASONS = ("manual", "timeout", "wal_size", "shutdown", "recovery")
CHUNK_KEYS = 4096  # keys per LMDB transaction of a checkpoint


def _take(it: Iterator[Any], n: int) -> list[Any]:
    """Up to n items of ``it``, giving the GIL away every 256: writers whose C calls
    released it would otherwise wait a whole switch interval (5 ms) for it."""
    out: list[Any] = []
    while len(out) < n:
        part = list(islice(it, min(256, n - len(out))))
        if not part:
            break
        out += part
        time.sleep(0)
    return out


def _sorted_lazily(table: dict[bytes, bytes | None]) -> Iterator[tuple[bytes, bytes | None]]:
    """The items of ``table`` in key order, sorted in C without the GIL."""
    return iter(_speedups.sorted_items(table))


@dataclass(frozen=True)
class CheckpointInfo:
    """One completed checkpoint. ``lsn``: the snapshot holds every write up to it."""

    id: int
    lsn: int
    reason: str
    started_at: float
    finished_at: float
    keys_written: int
    snapshot_bytes: int
    wal_bytes_removed: int
    write_seconds: float = 0.0
    sync_seconds: float = 0.0
    wal_segments_removed: int = 0

    @classmethod
    def from_meta(cls, meta: dict) -> CheckpointInfo | None:
        if not meta.get("id"):
            return None
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in meta.items() if k in names})


def _kill(name: str) -> None:
    """Named kill point of the Python layer (see walstate._hooks)."""
    if _killpoint is not None:
        _killpoint(name)


_killpoint: Callable[[str], None] | None = None


class Host(Protocol):
    """What the checkpointer needs from the engine."""

    def _freeze(self) -> tuple[int, dict[bytes, bytes | None]]: ...
    def _unfreeze(self, folded: bool) -> None: ...
    def _fail(self, exc: BaseException) -> None: ...
    def _wal_bytes_since_checkpoint(self) -> int: ...


class Checkpointer:
    """Runs checkpoints on request and, in a background thread, on size and time."""

    def __init__(self, host: Host, wal: Wal, snapshot: Snapshot, *, system_id: int,
                 config: Any, clock: Callable[[], float], last: CheckpointInfo | None,
                 last_lsn: int) -> None:
        self.host = host
        self.wal = wal
        self.snapshot = snapshot
        self.system_id = system_id
        self.config = config
        self.clock = clock
        self.last = last
        self.last_lsn = last_lsn  # LSN of the last complete checkpoint
        self.next_id = (last.id if last else 0) + 1
        self.count = 0
        self.seconds_total = 0.0
        self.last_error: BaseException | None = None
        self.last_time = clock()
        self._run_mu = threading.Lock()
        self._cv = threading.Condition()
        self._requested: str | None = None
        self._running = False
        self._stop = False
        self._thread: threading.Thread | None = None
        # bytes/second of replay measured at open; the default is conservative
        self.replay_rate = 50e6
        self.observer: Any = None  # Engine.observe's function
        self.archiver: Any = None  # walstate.archive.Archiver when an archive is set
        self._slow_fsyncs = 0  # fsyncs above slow_fsync_seconds already logged

    # ---- background scheduling --------------------------------------------
    def start(self) -> None:
        if self.archiver is not None:
            self.archiver.start(self.wal)
        self._thread = threading.Thread(target=self._loop, name="walstate-checkpointer",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self.archiver is not None:
            self.archiver.stop()

    def request(self, reason: str) -> None:
        """Asks the background thread for a checkpoint (non-blocking)."""
        with self._cv:
            if self._requested is None:
                self._requested = reason
                self._cv.notify_all()

    def throttle(self) -> None:
        """Back-pressure, called by a writer that finds more than max_wal_size of
        WAL since the last freeze: while a checkpoint is running or requested,
        waits (at most 30 s) until one freezes the table -- so that the WAL on
        disk stays near 2 x max_wal_size when checkpoints fall behind the
        writers. A checkpoint that fails (a full disk) stops the wait."""
        deadline = time.monotonic() + 30.0
        limit = self.config.max_wal_size
        with self._cv:
            while (self.host._wal_bytes_since_checkpoint() > limit and not self._stop
                   and (self._running or self._requested is not None)):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("writers waited 30 s for a checkpoint to catch up; going on")
                    return
                self._cv.wait(min(left, 0.1))

    def wake(self) -> None:
        """Makes the background thread re-check its triggers now (tests, clock jumps)."""
        with self._cv:
            self._cv.notify_all()

    def due(self) -> str | None:
        """The reason a checkpoint is due now, or None."""
        since = self.host._wal_bytes_since_checkpoint()
        if since <= 0:
            return None
        if since > self.config.max_wal_size:
            return "wal_size"
        limit = self.config.max_recovery_seconds
        if limit is not None and since / self.replay_rate > limit:
            return "wal_size"
        elapsed = self.clock() - self.last_time
        if elapsed >= self.config.checkpoint_timeout or elapsed < 0:
            # a clock that jumped backwards restarts the interval from now
            if elapsed < 0:
                self.last_time = self.clock()
                return None
            return "timeout"
        return None

    def _loop(self) -> None:
        while True:
            self._watch_fsync()
            with self._cv:
                if self._stop:
                    return
                reason, self._requested = self._requested, None
                if reason is None:
                    reason = self.due()
                if reason is None:
                    left = self.config.checkpoint_timeout - (self.clock() - self.last_time)
                    self._cv.wait(timeout=min(max(left, 0.01), 1.0))
                    continue
            try:
                self.run(reason, paced=True)
            except ClosedError:
                return  # the engine is closing
            except WalStateError as exc:
                log.error("checkpoint (%s) failed: %s", reason, exc)
                with self._cv:
                    if not self._stop:
                        self._cv.wait(timeout=1.0)  # do not spin on a full disk
            except Exception as exc:  # a bug must not kill the scheduler silently
                log.exception("checkpoint (%s) failed: %s", reason, exc)
                with self._cv:
                    if not self._stop:
                        self._cv.wait(timeout=1.0)

    # ---- the checkpoint itself --------------------------------------------
    def _target_seconds(self, reason: str) -> float:
        """How long a paced checkpoint may take (checkpoint_completion_target)."""
        if reason not in ("timeout", "wal_size"):
            return 0.0
        interval = self.config.checkpoint_timeout
        elapsed = max(self.clock() - self.last_time, 1e-3)
        since = self.host._wal_bytes_since_checkpoint()
        if since > 0:  # time until the WAL would trigger the next checkpoint
            interval = min(interval, elapsed * self.config.max_wal_size / since)
        return self.config.checkpoint_completion_target * interval

    def run(self, reason: str, paced: bool = False) -> CheckpointInfo:
        """Runs one checkpoint to completion; returns its info once durable."""
        with self._run_mu:
            if self._stop and reason != "shutdown":
                # the engine is closing: its shutdown checkpoint is the last one
                raise ClosedError("the engine is closing: no checkpoint after its shutdown "
                                  "checkpoint")
            self._set_running(True)
            t0 = time.perf_counter()
            try:
                return self._run(reason, paced)
            finally:
                self._set_running(False)
                if self.observer is not None:
                    self.observer("checkpoint", time.perf_counter() - t0)

    def _set_running(self, running: bool) -> None:
        with self._cv:
            self._running = running
            self._cv.notify_all()  # throttled writers re-check

    def _run(self, reason: str, paced: bool) -> CheckpointInfo:
        started_at = time.time()
        t0 = time.monotonic()
        target = self._target_seconds(reason) if paced else 0.0
        prev_lsn = self.last_lsn
        lsn, frozen = self.host._freeze()
        with self._cv:
            self._cv.notify_all()  # the WAL since the freeze is empty again
        _kill("checkpoint_after_freeze")
        folded = False
        try:
            self.wal.sync(lsn)
            keys = len(frozen)
            wal_at_start = self.host._wal_bytes_since_checkpoint()
            done = 0
            # In key order (LMDB then touches each page once), but without one big
            # sort: that would hold the GIL -- and every writer -- for its whole run.
            it = _sorted_lazily(frozen)
            while chunk := _take(it, CHUNK_KEYS):
                done += len(chunk)
                self.snapshot.write(chunk, {META_FOLD: {
                    "from_lsn": prev_lsn, "to_lsn": lsn, "keys_done": done, "keys": keys}})
                _kill("checkpoint_chunk")
                if target > 0 and done < keys:
                    self._pace(t0, target, done / keys, wal_at_start)
            write_s = time.monotonic() - t0
            _kill("checkpoint_before_commit")
            t1 = time.monotonic()
            cid = self.next_id
            meta = {"format_version": FORMAT_VERSION, "system_id": self.system_id, "id": cid,
                    "lsn": lsn, "reason": reason, "started_at": started_at,
                    "finished_at": time.time(), "keys_written": keys,
                    "snapshot_bytes": self.snapshot.size_bytes(), "wal_bytes_removed": 0}
            self.snapshot.write([], {META_CHECKPOINT: meta, META_FOLD: {}}, durable=True)
            sync_s = time.monotonic() - t1
            folded = True
            _kill("checkpoint_after_commit")
        except (EngineFailedError, OSError) as exc:
            if not isinstance(exc, DiskFullError):
                self.host._fail(exc)
            raise
        finally:
            self.host._unfreeze(folded)
        self.next_id = cid + 1
        self.last_lsn = lsn
        self.last_time = self.clock()
        _kill("checkpoint_before_remove")
        removed_bytes = removed_segs = 0
        try:
            # archive_dir: only segments safely archived may go (walstate/archive.py)
            bound = self.archiver.before_remove(lsn) if self.archiver is not None else lsn
            removed_bytes, removed_segs = self.wal.remove_below(bound)
        except OSError as exc:
            # the checkpoint stands; the segments go at the next one
            log.warning("checkpoint %d: removing old WAL failed: %s", cid, exc)
        _kill("checkpoint_after_remove")
        info = CheckpointInfo(
            id=cid, lsn=lsn, reason=reason, started_at=started_at, finished_at=time.time(),
            keys_written=keys, snapshot_bytes=self.snapshot.size_bytes(),
            wal_bytes_removed=removed_bytes, write_seconds=write_s, sync_seconds=sync_s,
            wal_segments_removed=removed_segs)
        self.last = info
        self.count += 1
        self.seconds_total += info.finished_at - started_at
        log.info("checkpoint %d complete (%s): lsn=%d keys=%d snapshot=%d bytes; write=%.3f s, "
                 "sync=%.3f s, total=%.3f s; WAL removed %d segment(s), %d bytes", cid, reason,
                 lsn, keys, info.snapshot_bytes, write_s, sync_s,
                 info.finished_at - started_at, removed_segs, removed_bytes)
        if target > 0 and info.finished_at - started_at > 1.5 * target + 1.0:
            log.warning("checkpoint %d fell behind schedule: it took %.1f s, its target was "
                        "%.1f s (checkpoint_completion_target); the WAL grows past "
                        "max_wal_size meanwhile: the disk is too slow for this write rate",
                        cid, info.finished_at - started_at, target)
        return info

    def _watch_fsync(self) -> None:
        """Warns about fsyncs slower than ``slow_fsync_seconds`` (from the C log's
        latency histogram; off the write path: the background loop calls it)."""
        if self.wal is None:
            return
        try:
            st = self.wal.stats()
        except WalStateError:
            return
        limit_us = self.config.slow_fsync_seconds * 1e6
        # bucket b holds latencies in [2^b, 2^(b+1)) microseconds
        slow = sum(n for b, n in enumerate(st["fsync_hist"]) if 2 ** b >= limit_us)
        if slow > self._slow_fsyncs:
            log.warning("%d WAL fsync(s) took longer than %.3f s (slowest %.3f s): the "
                        "disk is slow or overloaded; writes wait that long under "
                        "sync='always'", slow - self._slow_fsyncs,
                        self.config.slow_fsync_seconds, st["fsync_ns_max"] / 1e9)
            self._slow_fsyncs = slow

    def _pace(self, t0: float, target: float, progress: float, wal_at_start: int) -> None:
        """Sleeps while the checkpoint is ahead of schedule, on time and on WAL."""
        while True:
            elapsed = time.monotonic() - t0
            wal_progress = ((self.host._wal_bytes_since_checkpoint() - wal_at_start)
                            / max(self.config.max_wal_size, 1))
            ahead = progress * target - elapsed
            if ahead <= 0 or wal_progress >= progress or self._stop:
                return
            time.sleep(min(ahead, 0.05))

    def info_dict(self) -> dict | None:
        return asdict(self.last) if self.last else None


def fsync_latency(hist: list[int], max_ns: int) -> dict[str, float]:
    """p50/p99/max fsync latency in seconds from the C log's log2 histogram."""
    total = sum(hist)
    if not total:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}

    def q(frac: float) -> float:
        need, seen = frac * total, 0
        for b, n in enumerate(hist):
            seen += n
            if seen >= need:
                return min((2 ** (b + 1)) * 1e-6, max_ns / 1e9)  # bucket's upper bound
        return max_ns / 1e9

    return {"count": total, "p50": q(0.5), "p99": q(0.99), "max": max_ns / 1e9}


