"""Getting a data directory ready for the engine: the checks made before any
file is changed, the lock, the creation of a new directory, and what is left
by a creation that was cut short.

Creation writes, in order: the directory (its parent fsynced), LOCK,
snapshot/ with an empty LMDB environment whose metadata is checkpoint 0
(fsynced, snapshot/ fsynced), wal/ (fsynced with its parent), and last the
marker WALSTATE (temp file, fsync, rename, fsync). Nothing is acknowledged
before the marker exists, so a directory without a marker holds nothing a
user was promised: whatever a cut-short creation left -- any prefix of those
steps, after a SIGKILL, a power cut, a full disk or a map_size the machine
cannot map -- is cleared and the creation redone by the next open. Only
files that may hold a user's data stop it: WAL records, or a snapshot with
keys or a checkpoint LSN (a directory whose marker was lost).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from typing import Any

from . import _hooks
from .errors import ConfigError, CorruptionError, MismatchError, WalStateError
from .layout import (
    FORMAT_VERSION,
    LOCK,
    MARKER,
    SNAPSHOT_DIR,
    WAL_DIR,
    DirLock,
    Layout,
    check_access,
    copy_end,
    fsync_dir,
    make_dirs,
    write_marker,
)
from .snapshot import META_CHECKPOINT, Snapshot
from .wal import WalReader, finish_copy, list_segments

log = logging.getLogger("walstate")


def check_map_size(map_size: int) -> None:
    """ConfigError if this machine cannot map ``map_size`` bytes (its address
    space, or a ulimit -v), before anything is changed: an anonymous mapping of
    that length that reserves nothing and is dropped at once."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        probe = mmap.mmap(-1, map_size, flags=flags, prot=0)
    except (OSError, OverflowError, ValueError) as exc:
        raise ConfigError("map_size", f"{map_size} bytes cannot be mapped on this machine "
                          f"({exc}); choose a smaller map_size") from None
    probe.close()


def lock_directory(lay: Layout, *, read_only: bool) -> DirLock | None:
    """Checks that the files of ``lay`` may be used (PermissionError naming the
    first that may not, before anything is changed); for a writer, creates the
    directory if missing and takes its lock."""
    files = [lay.root, lay.marker, lay.wal, lay.snapshot, lay.snapshot_data]
    if read_only:
        if not os.path.isdir(lay.root):
            raise FileNotFoundError(2, "no walstate directory (read-only open creates "
                                    "nothing)", lay.root)
        check_access(files, write=False)
        return None
    if os.path.isdir(lay.root):
        check_access([*files, lay.lock, lay.snapshot_lock], write=True)
    make_dirs(lay.root)
    return DirLock(lay)


def check_marker(lay: Layout, marker: dict) -> None:
    if marker["format_version"] != FORMAT_VERSION:
        raise MismatchError(f"{lay.root} has format version {marker['format_version']}; "
                            f"this walstate reads version {FORMAT_VERSION}")


def create(lay: Layout, *, map_size: int) -> tuple[dict, Snapshot]:
    """Makes a new data directory in ``lay.root`` (which exists and is locked by
    us): returns its marker and its open snapshot. See the module docstring."""
    clear_interrupted(lay, map_size=map_size)
    system_id = (int.from_bytes(os.urandom(8), "little") >> 1) | 1
    make_dirs(lay.snapshot)
    _hooks.hit("create_snapshot_dir")
    snap = Snapshot(lay.snapshot, map_size=map_size, read_only=False, create=True)
    try:
        _hooks.hit("create_snapshot_env")
        now = time.time()
        snap.write([], durable=True, meta={META_CHECKPOINT: {
            "format_version": FORMAT_VERSION, "system_id": system_id, "id": 0, "lsn": 0,
            "reason": "init", "started_at": now, "finished_at": now,
            "keys_written": 0, "snapshot_bytes": 0, "wal_bytes_removed": 0}})
        _hooks.hit("create_snapshot_meta")
        make_dirs(lay.wal)
        fsync_dir(lay.wal)
        fsync_dir(lay.root)
        _hooks.hit("create_before_marker")
        marker = write_marker(lay, system_id)
    except BaseException:
        snap.close()
        raise
    log.info("initialised %s (system_id %d)", lay.root, system_id)
    return marker, snap


def clear_interrupted(lay: Layout, *, map_size: int) -> None:
    """No marker: removes what a cut-short creation left (see the module
    docstring); CorruptionError if anything there may hold a user's data."""
    if os.path.exists(lay.marker + ".tmp"):
        os.unlink(lay.marker + ".tmp")
    if not (os.path.lexists(lay.wal) or os.path.lexists(lay.snapshot)):
        return
    if holds_data(lay, map_size):
        raise CorruptionError(
            f"{lay.root} holds walstate data but its creation marker {lay.marker} is "
            "missing; refusing to start a new database over it", path=lay.marker)
    log.warning("%s: an earlier creation was cut short; creating it again", lay.root)
    if os.path.isdir(lay.wal):
        for name in os.listdir(lay.wal):  # segments, spares, temp files: all empty
            os.unlink(os.path.join(lay.wal, name))
        fsync_dir(lay.wal)
    if os.path.isdir(lay.snapshot):
        for p in (lay.snapshot_data, lay.snapshot_lock):
            if os.path.lexists(p):
                os.unlink(p)
        fsync_dir(lay.snapshot)


CREATION_LEFTOVERS = (LOCK, MARKER + ".tmp", WAL_DIR, SNAPSHOT_DIR)


def unmarked_state(lay: Layout, *, map_size: int = 1 << 20) -> str:
    """What a directory without a marker is to ``open`` (changes nothing):
    "missing" or "empty" (open creates a database), "interrupted" (what a
    cut-short creation left: open clears it and creates again), "data" (files
    that may hold a user's data: open refuses), "other" (only files that are
    not walstate's: open creates a database beside them)."""
    if not os.path.isdir(lay.root):
        return "missing"
    names = set(os.listdir(lay.root))
    if not names:
        return "empty"
    ours = names & set(CREATION_LEFTOVERS)
    if not ours:
        return "other"
    if (os.path.lexists(lay.wal) or os.path.lexists(lay.snapshot)) and holds_data(
            lay, map_size, read_only=True):
        return "data"
    return "interrupted"


def holds_data(lay: Layout, map_size: int, *, read_only: bool = False) -> bool:
    """Whether wal/ or snapshot/ may hold a user's data (see clear_interrupted)."""
    return _wal_has_records(lay) or _snapshot_has_data(lay, map_size, read_only)


def _wal_has_records(lay: Layout) -> bool:
    if not os.path.isdir(lay.wal) or not list_segments(lay.wal):
        return False  # a creation makes wal/ empty; its first segment comes after the marker
    try:
        with WalReader(lay.wal) as r:
            return any(True for _ in r.iter_raw())
    except (WalStateError, OSError):
        return True  # unreadable segments: not ours to remove


def _snapshot_has_data(lay: Layout, map_size: int, read_only: bool = False) -> bool:
    """Whether snapshot/ holds keys or a checkpoint past 0. An LMDB environment
    that does not open is one whose creation was cut short (LMDB writes its
    first pages when it creates the file) unless it is large."""
    if not os.path.exists(lay.snapshot_data):
        return False
    try:
        snap = Snapshot(lay.snapshot, map_size=map_size, read_only=read_only, create=False)
    except (WalStateError, OSError):
        # a cut-short creation leaves at most LMDB's first pages and checkpoint 0
        return os.path.getsize(lay.snapshot_data) > (1 << 20)
    try:
        meta = snap.meta()
        return snap.entries() > 0 or bool(meta and meta.get("lsn"))
    finally:
        snap.close()


def check_copy(lay: Layout, rec: Any, *, read_only: bool) -> None:
    """A directory made by ``walstate backup`` holds a copy of the log cut at the
    end of its records (layout.copy_end): replay read it as such, so here it
    must reach the LSN the backup recorded, or records are missing. Opened for
    writing, the copy becomes a live log (wal.finish_copy)."""
    want = copy_end(lay.root)
    if want is None:
        return
    if rec.last_lsn < want:
        raise CorruptionError(
            f"{lay.root} is a backup holding writes up to LSN {want} ({lay.backup_label}), "
            f"but its WAL ends after LSN {rec.last_lsn}: records are missing (a partial "
            "copy of the backup?)", path=lay.wal, lsn=rec.last_lsn + 1)
    if not read_only and rec.end is not None:
        finish_copy(lay.wal, rec.end)
