"""Crash recovery: the snapshot's LSN, then the WAL after it, then the tail.

The snapshot holds everything up to its checkpoint LSN S. The WAL must
continue it without a gap (its records from S+1 on are replayed into a
table the engine starts with). How the log ends is the reader's verdict
(wal_reader.c, classify_stop); what is done about it depends on the mode:

  ============== =========== =================== =====================
  end            strict      tolerate_tail       point_in_time
  ============== =========== =================== =====================
  clean          ok          ok                  ok
  torn tail      error       cut (keep .broken)  cut (keep .broken)
  corruption     error       error               cut there, report
  ============== =========== =================== =====================

A read-only open cuts nothing: it reports what it would cut and stops there.
Recovery changes no file until the cut, and the cut is idempotent, so a crash
during recovery followed by another recovery gives the same state.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import _hooks, codec
from ._native import ffi, lib
from ._native import speedups as _speedups
from .errors import CorruptionError, MismatchError, WalStateError
from .wal import LogEnd, WalReader, cut

log = logging.getLogger("walstate")

# Records per call of the C reader (a call never spans two segments).
REPLAY_BATCH = 1 << 16


def apply_records(table: Any, data: Any, offs: Any, lens: Any, types: Any, i: int,
                  n: int) -> int:
    """PUT and DELETE records i.. of a reader batch into ``table`` (a
    walstate._speedups.Replay, the table kept in C); returns the index of the
    first record of another type."""
    try:
        return table.apply(data, ffi.buffer(offs, 8 * n), ffi.buffer(lens, 8 * n),
                           ffi.buffer(types, n), i, n)
    except ValueError as exc:
        raise CorruptionError(f"WAL payload does not decode: {exc}") from None


@dataclass
class Recovered:
    """What recovery found: the table to start with and the report for info()."""

    table: dict[bytes, bytes | None]
    last_lsn: int
    report: dict = field(default_factory=dict)
    end: LogEnd | None = None


def replay(wal_dir: str, *, system_id: int, snapshot_lsn: int, mode: str,
           read_only: bool) -> Recovered:
    """Reads the WAL after ``snapshot_lsn`` and applies the tail policy of ``mode``."""
    t0 = time.monotonic()
    log.info("recovery: replaying %s from LSN %d (mode %s)", wal_dir, snapshot_lsn + 1, mode)
    table = _speedups.Replay()  # key -> value, None for a delete
    records = nbytes = 0
    last = snapshot_lsn
    last_type = 0
    ignored = ignored_bytes = 0
    decode = codec.decode
    # wal/END (a clean close's end hint) spares reading the folded records and
    # the zero fill of the newest segment; "strict" checks every byte it can
    hint = mode != "strict"
    with WalReader(wal_dir, system_id, snapshot_lsn + 1, end_hint=hint) as reader:
        for data, n, lsns, types, offs, lens in reader.iter_arrays(REPLAY_BATCH):
            i = 0
            while i < n:
                # PUT and DELETE records in C, others one by one here
                i = apply_records(table, data, offs, lens, types, i, n)
                if i < n:
                    rtype = types[i]
                    if not rtype & codec.IGNORABLE:
                        payload = data[offs[i]:offs[i] + lens[i]]
                        try:
                            for k, v in decode(rtype, payload):
                                table[k] = v
                        except ValueError as exc:
                            raise CorruptionError(f"WAL record {lsns[i]} does not decode: "
                                                  f"{exc}", lsn=lsns[i]) from None
                    else:
                        ignored += 1
                        ignored_bytes += lens[i]
                    i += 1
            records += n
            nbytes += codec.REC_HEADER * n + sum(ffi.unpack(lens, n))
            last, last_type = lsns[n - 1], types[n - 1]
        end = reader.end
    records -= ignored
    nbytes -= codec.REC_HEADER * ignored + ignored_bytes

    truncated = 0
    why = end.describe()  # before a cut changes what it describes
    if end.status == "error":
        if end.rc == lib.WAL_EGAP:
            raise MismatchError(
                f"the snapshot holds writes up to LSN {snapshot_lsn} but the WAL in {wal_dir} "
                f"starts above LSN {snapshot_lsn + 1}: the WAL does not belong to this "
                "snapshot, or segments are missing")
        if end.rc in (lib.WAL_ECORRUPT, lib.WAL_ESHORT) and mode == "point_in_time":
            truncated = _cut(wal_dir, end, read_only, why)
        else:
            end.raise_error("recovering the write-ahead log")
    elif end.status == "torn":
        if mode == "strict":
            raise CorruptionError(
                f"torn or garbage tail in {end.path} at offset {end.offset} "
                f"({end.cut_bytes} bytes); strict recovery refuses it (open with "
                "recovery='tolerate_tail' to cut it)", path=end.path, offset=end.offset,
                lsn=end.expected_lsn)
        truncated = _cut(wal_dir, end, read_only, "torn tail")
    last = max(last, end.last_lsn, snapshot_lsn)
    table = table.table()
    seconds = time.monotonic() - t0
    report = {"from_lsn": snapshot_lsn + 1, "to_lsn": last, "records_replayed": records,
              "bytes_replayed": nbytes, "seconds": seconds, "truncated_bytes": truncated,
              "mode": mode, "end": end.status,
              "wal_bytes_read": end.bytes_read, "end_hint": end.end_hint,
              "clean_shutdown": last_type == codec.SHUTDOWN and not truncated,
              "stopped_at": None if end.status == "clean" else
              {"path": end.cut_path, "offset": end.offset, "lsn": end.expected_lsn,
               "why": why}}
    log.info("recovery: replayed %d records (%d bytes) up to LSN %d in %.3f s; cut %d bytes",
             records, nbytes, last, seconds, truncated)
    return Recovered(table, last, report, end)


def _log_state(wal_dir: str, snapshot: Any) -> tuple:
    """What a concurrent writer changes under a read-only replay: the snapshot's
    checkpoint and fold metadata, the segment names and wal/LAST."""
    try:
        names = tuple(sorted(os.listdir(wal_dir)))
    except OSError:
        names = ()
    try:
        with open(os.path.join(wal_dir, "LAST"), "rb") as f:
            last = f.read(64)
    except OSError:
        last = b""
    cp, fold = snapshot.meta_state()
    return (json.dumps(cp, sort_keys=True), json.dumps(fold, sort_keys=True), names, last)


def replay_read_only(wal_dir: str, snapshot: Any, *, system_id: int,
                     mode: str) -> tuple[dict, Recovered]:
    """replay() for a read-only open beside a writer that may checkpoint meanwhile:
    a segment removed under the replay (FileNotFoundError, a gap, a segment
    that wal/LAST names not yet listed) is retried from the snapshot's new
    checkpoint, as long as something moved since the attempt began; an error
    on a log nobody changed is the log's. Returns (checkpoint metadata, what
    was recovered); the snapshot then serves this view only (Snapshot.set_view).
    """
    for attempt in range(20):
        before = _log_state(wal_dir, snapshot)
        meta = snapshot.check_meta(system_id)
        try:
            rec = replay(wal_dir, system_id=system_id, snapshot_lsn=int(meta["lsn"]), mode=mode,
                         read_only=True)
        except (OSError, CorruptionError, MismatchError) as exc:
            if _log_state(wal_dir, snapshot) == before:
                raise
            log.info("read-only recovery: the log changed under the replay (%s); again "
                     "(attempt %d)", exc, attempt + 2)
            continue
        snapshot.set_view(rec.last_lsn)
        return meta, rec
    raise WalStateError(f"read-only open of {wal_dir}: a writer kept removing segments under "
                        "the replay; retry")


def _cut(wal_dir: str, end: LogEnd, read_only: bool, what: str) -> int:
    if read_only:
        log.warning("recovery (read-only): would cut %s in %s at offset %d (%d bytes)", what,
                    end.cut_path, end.offset, end.cut_bytes)
        return end.cut_bytes
    n = cut(wal_dir, end.segment, end.offset)
    _hooks.hit("recovery_after_cut")
    log.warning("recovery: cut %s in %s at offset %d: %d bytes kept in .broken file(s)", what,
                end.cut_path, end.offset, n)
    return n
