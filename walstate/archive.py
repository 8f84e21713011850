"""WAL archiving: before a checkpoint removes WAL segments, copy them to
``archive_dir`` so that a backup plus the archive can be rolled forward to
any later LSN (``walstate restore``).

Rules (docs/OPERATIONS.md, "Archiving"):

- A segment is removed only after its archived copy is durable: written to
  ``<name>.tmp``, fsynced, renamed, the archive directory fsynced. Its mtime
  is kept: it is the time of the segment's last record, which is what
  ``restore --to-time`` goes by.
- A segment that cannot be archived is kept, and so is every later one (the
  archive stays a contiguous log); the failure is logged, counted and shown
  in ``info()["archive"]``, ``walstate info`` and ``walstate doctor`` (the
  state is persisted in DIR/ARCHIVE_STATUS for processes other than the
  writer).
- Once more than ``max_archive_lag_bytes`` of checkpointed WAL waits for the
  archive, the segments are removed without archiving (so that a broken
  archive cannot fill the disk), with a loud error; the archive then has a
  hole that no restore can cross, recorded in the status as ``holes``.

Which segments a checkpoint at LSN X removes mirrors wal_remove_below in
csrc/wal_segment.c: segment i goes when a later segment exists and starts at
or below X + 1; never the last one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .errors import WalStateError
from .layout import ARCHIVE_MARKER, Layout, fsync_dir, make_dirs, read_json, write_atomic
from .wal import list_segments, segment_name

log = logging.getLogger("walstate")

COPY_CHUNK = 1 << 20


def copy_durable(src: str, dst: str, *, keep_mtime: bool = True) -> int:
    """Publishes a copy of file ``src`` at ``dst``: ``dst.tmp``, fsync, rename,
    fsync of dst's directory. Returns the bytes copied. FileNotFoundError if
    ``src`` vanished (the caller decides whether that matters)."""
    tmp = dst + ".tmp"
    n = 0
    with open(src, "rb") as fin:
        st = os.fstat(fin.fileno())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while True:
                buf = fin.read(COPY_CHUNK)
                if not buf:
                    break
                view = memoryview(buf)
                while view:
                    w = os.write(fd, view)
                    view = view[w:]
                n += len(buf)
            if keep_mtime:
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
    os.rename(tmp, dst)
    fsync_dir(os.path.dirname(dst) or ".")
    return n


def removable_segments(wal_dir: str, lsn: int) -> tuple[list[tuple[int, str]], int | None]:
    """(segments a checkpoint at ``lsn`` removes, first LSN of the first one it
    keeps or None if there is no segment). Mirrors wal_remove_below."""
    segs = list_segments(wal_dir)
    out = []
    for i in range(len(segs) - 1):
        if segs[i + 1][0] > lsn + 1:
            break
        out.append(segs[i])
    keep = segs[len(out)][0] if segs else None
    return out, keep


def check_archive_dir(archive_dir: str, system_id: int, create: bool) -> None:
    """Makes sure ``archive_dir`` is this system's archive (creating it and its
    marker if ``create``). WalStateError if it belongs to another system."""
    marker_path = os.path.join(archive_dir, ARCHIVE_MARKER)
    marker = read_json(marker_path)
    if marker is None:
        if not create:
            if os.path.isdir(archive_dir):
                return
            raise FileNotFoundError(2, "no WAL archive here", archive_dir)
        make_dirs(archive_dir)
        write_atomic(marker_path, json.dumps({"system_id": system_id,
                                              "created_at": time.time()}).encode())
        return
    if int(marker.get("system_id", -1)) != system_id:
        raise WalStateError(f"the WAL archive {archive_dir} belongs to system_id "
                            f"{marker.get('system_id')}, this directory is {system_id}: give "
                            "each data directory its own archive_dir")


def archived_segments(archive_dir: str) -> list[tuple[int, str]]:
    """(first_lsn, path) of the archived segments, in LSN order."""
    return list_segments(archive_dir)


def read_status(layout: Layout) -> dict | None:
    """The persisted archiving state of a data directory (None: never archived)."""
    return read_json(layout.archive_status)


class Archiver:
    """Archives the segments a checkpoint is about to remove (see module doc).

    Used by the checkpointer only, under its run lock: not thread-safe itself.
    """

    def __init__(self, archive_dir: str, layout: Layout, system_id: int,
                 max_lag_bytes: int | None) -> None:
        self.dir = archive_dir
        self.layout = layout
        self.system_id = system_id
        self.max_lag_bytes = max_lag_bytes
        old = read_status(layout) or {}
        self.status: dict[str, Any] = {
            "dir": archive_dir,
            "last_archived_lsn": int(old.get("last_archived_lsn", 0)),
            "archived_segments": int(old.get("archived_segments", 0)),
            "failures": int(old.get("failures", 0)),
            "last_error": old.get("last_error"),
            "last_error_at": old.get("last_error_at"),
            "lag_bytes": int(old.get("lag_bytes", 0)),
            "failing": bool(old.get("failing", False)),
            "abandoned": bool(old.get("abandoned", False)),
            "holes": list(old.get("holes", []))[-20:],
        }

    @classmethod
    def from_config(cls, config: Any, layout: Layout, system_id: int) -> Archiver | None:
        if config.archive_dir is None or config.read_only:
            return None
        return cls(config.archive_dir, layout, system_id, config.max_archive_lag_bytes)

    def info(self) -> dict[str, Any]:
        return dict(self.status)

    def before_remove(self, lsn: int) -> int:
        """Archives what a checkpoint at ``lsn`` would remove; returns the LSN to
        pass to ``Wal.remove_below`` so that only archived segments go (or all of
        them, past max_archive_lag_bytes). Never raises for an archive failure."""
        before = dict(self.status)
        todo, keep_first = removable_segments(self.layout.wal, lsn)
        if keep_first is None:
            return 0
        if not todo:
            return keep_first - 1
        done = 0
        error: str | None = None
        try:
            check_archive_dir(self.dir, self.system_id, create=True)
            for i, (first, path) in enumerate(todo):
                dst = os.path.join(self.dir, segment_name(first))
                if not (os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(path)):
                    copy_durable(path, dst)
                nxt = todo[i + 1][0] if i + 1 < len(todo) else keep_first
                self.status["last_archived_lsn"] = max(self.status["last_archived_lsn"],
                                                       nxt - 1)
                self.status["archived_segments"] += 1
                done += 1
        except (OSError, WalStateError) as exc:
            error = f"archiving {todo[done][1]} to {self.dir}: {exc}"
        lag = 0
        for _first, path in todo[done:]:
            try:
                lag += os.path.getsize(path)
            except OSError:
                pass
        self.status["lag_bytes"] = lag
        bound = (todo[done][0] if done < len(todo) else keep_first) - 1
        if error is None:
            self.status["failing"] = False
        else:
            self.status.update(failures=self.status["failures"] + 1, last_error=error,
                               last_error_at=time.time(), failing=True)
            log.error("WAL archiving failed: %s; %d segment(s) (%d bytes) are kept until "
                      "the archive works again", error, len(todo) - done, lag)
            if self.max_lag_bytes is not None and lag > self.max_lag_bytes:
                hole = [todo[done][0], keep_first - 1]
                self.status["holes"] = (self.status["holes"] + [hole])[-20:]
                self.status.update(abandoned=True, lag_bytes=0)
                bound = lsn
                log.critical(
                    "WAL ARCHIVE ABANDONED: %d bytes of WAL wait for the archive, more than "
                    "max_archive_lag_bytes=%d; removing them WITHOUT archiving. The archive "
                    "now misses LSNs %d..%d: point-in-time restore cannot cross them; fix the "
                    "archive and take a new backup", lag, self.max_lag_bytes, hole[0], hole[1])
        if self.status != before:
            self._save()
        return bound

    def _save(self) -> None:
        try:
            write_atomic(self.layout.archive_status,
                         json.dumps(self.status, sort_keys=True).encode())
        except OSError as exc:  # the in-memory state (info()) still says it all
            log.error("cannot write %s: %s", self.layout.archive_status, exc)
