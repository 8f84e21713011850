"""Hot backups and point-in-time restore (``walstate backup`` / ``walstate restore``).

A backup is an ordinary data directory: a consistent copy of the LMDB
snapshot (checkpoint LSN S), the WAL segments from the one holding S + 1 to
the end of the log as it was while copying (cut after the last valid record,
LSN L), the creation marker (same system_id) and DIR/BACKUP_LABEL (label, L,
S, time). Opening it replays S + 1..L: the backup holds exactly the writes up
to L, a prefix of the source's history.

Consistency while a writer (another process) runs:

- The snapshot is copied with LMDB's own copy (``mdb_env_copy2``, compacting)
  inside a read transaction. To keep the writer from reusing the pages that
  transaction reads, the backup registers as a reader in the writer's
  ``snapshot/lock.mdb`` (LMDB's reader table: a slot is written there, no
  data changes). If lock.mdb cannot be opened for writing and no writer holds
  the directory, the copy runs without it (nothing can change the pages).
- Then the WAL. A checkpoint of the writer may remove the segments the
  snapshot copy needs meanwhile: then the whole backup is retried.
- The last segment is being appended to while it is copied, so the copy may
  end in a partial record, or (the copy reads pages in order while the
  writer writes) miss a record whose successor it caught. The copy is read
  back with the WAL reader: an invalid record in the last segment is copied
  again from the source from its offset until the copy ends cleanly or in a
  torn tail, which is cut.

Restore copies a backup, adds archived segments that continue its WAL (an
archived copy of the backup's last segment is complete and replaces the
partial one), and cuts the log at the first record above ``--to-lsn``.
The WAL holds no time stamps, so ``--to-time T`` works at segment
granularity: it keeps every archived segment last written (mtime) at or
before T and stops before the first one written later.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb

from ..archive import copy_durable, pending_timeline, read_status, write_timeline_file
from ..errors import CorruptionError, WalStateError
from ..layout import (
    MARKER,
    SNAPSHOT_DATA,
    Layout,
    fsync_dir,
    lock_is_held,
    make_dirs,
    read_json,
    read_marker,
    write_atomic,
)
from ..snapshot import Snapshot
from ..wal import LogEnd, WalReader, cut, finish_copy, list_segments, segment_name
from .progress import Progress

log = logging.getLogger("walstate")

RETRIES = 10
TAIL_RECOPIES = 50


class _Retry(Exception):
    """The source changed under the backup in a way that needs a fresh start."""


@dataclass
class Result:
    path: str
    lsn: int
    checkpoint_lsn: int
    segments: int
    bytes: int
    label: str | None
    attempts: int = 1
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fresh_dest(dest: str) -> None:
    if os.path.exists(dest):
        if not os.path.isdir(dest) or os.listdir(dest):
            raise FileExistsError(17, "the destination exists and is not an empty directory",
                                  dest)
    make_dirs(dest)


def _clear_dest(dest: str) -> None:
    """Empties a destination this module filled itself (a failed attempt)."""
    for name in os.listdir(dest):
        p = os.path.join(dest, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    fsync_dir(dest)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_to_end(wal_dir: str, system_id: int, from_lsn: int,
                 stop_above: int | None = None, *,
                 copy: bool | None = None) -> tuple[LogEnd | None, int, Any]:
    """Reads the log; returns (end, last LSN read, first record above
    ``stop_above`` or None). end is None when stopped at that record.
    ``copy``: as WalReader's (True for a log this module is assembling)."""
    last = 0
    with WalReader(wal_dir, system_id, from_lsn, copy=copy) as r:
        for rec in r:
            if stop_above is not None and rec.lsn > stop_above:
                return None, last, rec
            last = rec.lsn
        return r.end, last, None


def _cut_quietly(wal_dir: str, segment: int, offset: int) -> int:
    """wal.cut, then drops the .broken copies it made: in a backup or restore
    destination they are copies of data that stays in the source."""
    before = set(os.listdir(wal_dir))
    n = cut(wal_dir, segment, offset)
    for name in set(os.listdir(wal_dir)) - before:
        if name.endswith(".broken"):
            os.unlink(os.path.join(wal_dir, name))
    fsync_dir(wal_dir)
    return n


def finish_copied_log(wal_dir: str, end: LogEnd) -> None:
    """Makes a log assembled from copies (a restore) a live one: cut where
    reading stopped when it did not end cleanly; and the newest segment, copied
    only up to the end of its records, gets the size its header records back
    (wal.cut zero-fills it), so that the writer appends into it and a later
    read finds no segment cut short."""
    if end.status != "clean":
        if end.path:
            _cut_quietly(wal_dir, end.segment, end.offset)
        return
    finish_copy(wal_dir, end)


# ---- backup -------------------------------------------------------------------
def _copy_snapshot(src: Layout, dest_snap: str) -> None:
    """LMDB's consistent (compacting) copy of the source snapshot."""
    make_dirs(dest_snap)
    env = None
    try:
        env = lmdb.open(src.snapshot, readonly=True, lock=True, max_dbs=2, subdir=True,
                        create=False)
    except lmdb.Error as exc:
        if "already open in this process" in str(exc):
            raise WalStateError(f"backup: {exc}: LMDB allows one open of an environment per "
                                "process; back up from another process") from None
        if lock_is_held(src):
            raise WalStateError(
                f"backup: cannot register as an LMDB reader in {src.snapshot}/lock.mdb "
                f"({exc}); a hot backup needs write access to that file") from None
        env = lmdb.open(src.snapshot, readonly=True, lock=False, max_dbs=2, subdir=True,
                        create=False)
    try:
        env.copy(dest_snap, compact=True)
    except lmdb.MapResizedError:
        raise _Retry("the snapshot map grew during the copy") from None
    finally:
        env.close()
    _fsync_file(os.path.join(dest_snap, SNAPSHOT_DATA))
    fsync_dir(dest_snap)


def _recopy_from(src: str, dst: str, offset: int) -> None:
    """Copies src[offset:] over dst[offset:] and fsyncs dst."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        fin.seek(offset)
        fout.seek(offset)
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _backup_once(src: Layout, dest: str, system_id: int, progress: Progress) -> Result:
    dl = Layout(dest)
    _copy_snapshot(src, dl.snapshot)
    snap = Snapshot(dl.snapshot, map_size=1 << 20, read_only=True, create=False)
    try:
        snap_lsn = int(snap.check_meta(system_id)["lsn"])
    finally:
        snap.close()
    segs = list_segments(src.wal)
    start = [i for i, (first, _p) in enumerate(segs) if first <= snap_lsn + 1]
    if not start:
        raise _Retry(f"the WAL segment holding LSN {snap_lsn + 1} was removed by a checkpoint")
    segs = segs[start[-1]:]
    make_dirs(dl.wal)
    total = 0
    progress.total = sum(os.path.getsize(p) for _f, p in segs if os.path.exists(p))
    # the last segment is preallocated to segment_size: copy it only up to the end
    # of its records (as they are now; later ones are not in the backup)
    last_first, last_src = segs[-1]
    limit = None
    try:
        end0, _l, _r = _read_to_end(src.wal, system_id, last_first)
        if end0 is not None and end0.status in ("clean", "torn") and \
                end0.segment == last_first and end0.offset > 0:
            limit = end0.offset
    except (OSError, WalStateError):
        limit = None
    for first, path in segs:
        try:
            n = copy_durable(path, os.path.join(dl.wal, segment_name(first)),
                             limit=limit if first == last_first else None)
        except FileNotFoundError:
            raise _Retry(f"{path} was removed during the backup") from None
        total += n
        progress.advance(n)
    # the copied log must read cleanly up to its end; only the last segment may
    # have caught the writer mid-record (see module doc)
    for _ in range(TAIL_RECOPIES):
        end, _last, _rec = _read_to_end(dl.wal, system_id, snap_lsn + 1, copy=True)
        assert end is not None
        if end.status == "error" and end.segment == last_first and end.offset > 0 and \
                os.path.exists(last_src):
            _recopy_from(last_src, os.path.join(dl.wal, segment_name(last_first)), end.offset)
            time.sleep(0.001)
            continue
        break
    notes = []
    if end.status == "error":
        from .._native import lib

        if end.rc == lib.WAL_EGAP:
            raise _Retry("the copied WAL does not reach back to the snapshot")
        raise CorruptionError(f"backup: the source WAL is damaged ({end.path} at offset "
                              f"{end.offset}, expected LSN {end.expected_lsn}): run "
                              "`walstate verify` on it", path=end.path, offset=end.offset,
                              lsn=end.expected_lsn)
    if end.status == "torn":
        # the backup's newest segment, a copy: it ends where its records do
        tail = os.path.join(dl.wal, segment_name(end.segment))
        os.truncate(tail, end.offset)
        _fsync_file(tail)
        notes.append(f"the log was copied while being written: cut after LSN {end.last_lsn}")
    lsn = max(end.last_lsn, snap_lsn)
    fsync_dir(dl.wal)
    return Result(dest, lsn, snap_lsn, len(segs), total, None, notes=notes)


def _system_id(lay: Layout, what: str) -> int:
    """The directory's system_id from its creation marker; CorruptionError without one."""
    marker = read_marker(lay)
    if marker is None:
        raise CorruptionError(f"{lay.root} is not {what} (no {lay.marker})", path=lay.marker)
    return int(marker["system_id"])


def backup(src_dir: str, dest: str, *, label: str | None = None,
           progress: Progress | None = None) -> Result:
    """A consistent copy of the data directory ``src_dir`` in ``dest`` (which
    must not exist or be empty), taken while a writer may run. Returns what the
    backup holds: every write up to ``Result.lsn``."""
    src = Layout(os.path.abspath(src_dir))
    dest = os.path.abspath(dest)
    system_id = _system_id(src, "a walstate directory")
    _fresh_dest(dest)
    progress = progress or Progress("backup", enabled=False)
    started = time.time()
    last_exc: Exception | None = None
    for attempt in range(1, RETRIES + 1):
        try:
            res = _backup_once(src, dest, system_id, progress)
            break
        except _Retry as exc:
            log.info("backup of %s: %s; starting again (attempt %d)", src.root, exc, attempt)
            last_exc = exc
            _clear_dest(dest)
        except BaseException:
            _clear_dest(dest)
            raise
    else:
        raise WalStateError(f"backup of {src.root} failed {RETRIES} times: {last_exc}; "
                            "checkpoints remove the WAL faster than it can be copied")
    res.attempts = attempt
    res.label = label
    with open(src.marker, "rb") as f:
        write_atomic(os.path.join(dest, MARKER), f.read())
    write_timeline_file(dest, pending_timeline(src, res.lsn))
    write_atomic(Layout(dest).backup_label, json.dumps({
        "label": label, "lsn": res.lsn, "checkpoint_lsn": res.checkpoint_lsn,
        "system_id": system_id, "started_at": started, "created_at": time.time(),
        "source": src.root, "kind": "backup",
        "archive_dir": (read_status(src) or {}).get("url")}, sort_keys=True).encode())
    fsync_dir(dest)
    fsync_dir(os.path.dirname(dest))
    progress.done()
    log.info("backup of %s to %s: LSN %d (snapshot LSN %d), %d segment(s), %d attempt(s)",
             src.root, dest, res.lsn, res.checkpoint_lsn, res.segments, attempt)
    return res


# ---- restore ------------------------------------------------------------------
def parse_time(text: str) -> float:
    """Epoch seconds from "1712345678.5" or ISO 8601 ("2024-04-05T12:00:00",
    local time unless it names a zone)."""
    import math

    try:
        t = float(text)
    except ValueError:
        from datetime import datetime

        try:
            t = datetime.fromisoformat(text).timestamp()
        except ValueError:
            raise ValueError(f"not a time: {text!r} (epoch seconds or ISO 8601)") from None
    if not math.isfinite(t):
        raise ValueError(f"not a time: {text!r} (a finite number of epoch seconds or ISO "
                         "8601)")
    return t


def newest_mtime(lay: Layout) -> float:
    """The newest modification time of a directory's snapshot and WAL files: a
    bound on when its last write was made (a plain copy has no BACKUP_LABEL)."""
    newest = 0.0
    for d in (lay.snapshot, lay.wal):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            if name.endswith(".seg") or name == "data.mdb":
                try:
                    newest = max(newest, os.stat(os.path.join(d, name)).st_mtime)
                except OSError:
                    pass
    return newest


def restore(backup_dir: str, dest: str, *, archive_dir: str | None = None,
            to_lsn: int | None = None, to_time: float | None = None,
            progress: Progress | None = None, timeline: int | None = None) -> Result:
    """Makes ``dest`` a data directory holding the backup's state, rolled
    forward with the archive's WAL if ``archive_dir`` (a directory or URL) is
    given: up to LSN ``to_lsn`` exactly, to the last write acknowledged at or
    before ``to_time``, or as far as the archive goes."""
    if to_lsn is not None and to_time is not None:
        raise ValueError("give --to-lsn or --to-time, not both")
    if archive_dir is not None:
        from .archivetool import restore_archive

        res = restore_archive(archive_dir, dest, to_lsn=to_lsn, to_time=to_time,
                              timeline=timeline, base_dir=backup_dir, progress=progress)
        return Result(res.path, res.lsn, res.checkpoint_lsn, res.segments, res.bytes,
                      res.label, notes=res.notes)
    bl = Layout(os.path.abspath(backup_dir))
    dest = os.path.abspath(dest)
    system_id = _system_id(bl, "a walstate backup")
    label = read_json(bl.backup_label) or {}
    if to_time is not None:
        # a backup holds every write up to its end: it serves --to-time only if it
        # was taken at or before T. A plain copy of a data directory has no label:
        # its files' times bound when its last write was made.
        created = label.get("created_at") or newest_mtime(bl)
        if created > to_time:
            what = "was taken" if label.get("created_at") else "holds writes made"
            raise WalStateError(f"the backup {bl.root} {what} at {created:.3f}, after "
                                f"--to-time {to_time:.3f}: restore from an older backup, or "
                                "from the WAL archive")
    _fresh_dest(dest)
    try:
        return _restore(bl, dest, system_id, label, None, to_lsn, to_time,
                        progress or Progress("restore", enabled=False))
    except BaseException:
        _clear_dest(dest)
        raise


def _restore(bl: Layout, dest: str, system_id: int, label: dict, archive_dir: str | None,
             to_lsn: int | None, to_time: float | None, progress: Progress) -> Result:
    dl = Layout(dest)
    segs = list_segments(bl.wal)
    extra: list[tuple[int, str]] = []
    progress.total = (os.path.getsize(bl.snapshot_data)
                      + sum(os.path.getsize(p) for _f, p in segs + extra))
    make_dirs(dl.snapshot)
    progress.advance(copy_durable(bl.snapshot_data,
                                  dl.snapshot_data, keep_mtime=False))
    snap = Snapshot(dl.snapshot, map_size=1 << 20, read_only=True, create=False)
    try:
        snap_lsn = int(snap.check_meta(system_id)["lsn"])
    finally:
        snap.close()
    if to_lsn is not None and to_lsn < snap_lsn:
        raise WalStateError(f"the backup's snapshot already holds writes up to LSN {snap_lsn}, "
                            f"above --to-lsn {to_lsn}: restore from an older backup")
    make_dirs(dl.wal)
    for first, path in segs:
        progress.advance(copy_durable(path, os.path.join(dl.wal, segment_name(first))))
    notes: list[str] = []
    added = 0
    for first, path in extra:
        if to_lsn is not None and first > to_lsn + 1:
            break
        if to_time is not None and os.stat(path).st_mtime > to_time:
            notes.append(f"stopped before archived segment {segment_name(first)}: written "
                         f"after --to-time")
            break
        progress.advance(copy_durable(path, os.path.join(dl.wal, segment_name(first))))
        added += 1
    # read the assembled log; cut at the target, or where the archive stops
    # continuing it (a gap, a foreign or damaged archived segment)
    end, last, above = _read_to_end(dl.wal, system_id, snap_lsn + 1, to_lsn, copy=True)
    if above is not None:
        _cut_quietly(dl.wal, above.segment, above.offset)
        lsn = to_lsn
    else:
        assert end is not None
        lsn = max(end.last_lsn, snap_lsn)
        if end.status != "clean":
            from .._native import strerror

            why = "torn tail" if end.status == "torn" else strerror(end.rc)
            if not end.path or end.last_lsn < int(label.get("lsn") or 0):
                raise CorruptionError(f"the backup's own WAL is damaged ({why}) at "
                                      f"{end.path or bl.wal} offset {end.offset}: run "
                                      "`walstate verify` on the backup",
                                      path=end.path or bl.wal, offset=end.offset)
            notes.append(f"the WAL ends at LSN {lsn}: {why} in {os.path.basename(end.path)} "
                         f"at offset {end.offset}")
        finish_copied_log(dl.wal, end)
        if to_lsn is not None and lsn < to_lsn:
            raise WalStateError(f"the backup and archive reach only LSN {lsn}, below "
                                f"--to-lsn {to_lsn}" + (f" ({notes[-1]})" if notes else ""))
    with open(bl.marker, "rb") as f:
        write_atomic(dl.marker, f.read())
    write_timeline_file(dest, pending_timeline(bl, lsn))
    write_atomic(dl.backup_label, json.dumps({
        **label, "lsn": lsn, "checkpoint_lsn": snap_lsn, "system_id": system_id,
        "kind": "restore", "restored_at": time.time(), "restored_from": bl.root,
        "archive_dir": archive_dir, "to_lsn": to_lsn, "to_time": to_time,
        "backup_lsn": label.get("lsn")}, sort_keys=True).encode())
    fsync_dir(dl.wal)
    fsync_dir(dest)
    fsync_dir(os.path.dirname(dest))
    progress.done()
    log.info("restored %s to %s at LSN %d (%d archived segment(s))", bl.root, dest, lsn, added)
    return Result(dest, lsn, snap_lsn, len(list_segments(dl.wal)), progress.n,
                  label.get("label"), notes=notes)


__all__ = ["Result", "backup", "parse_time", "restore"]
