"""The one place that knows the data directory's layout, and how files in it
are published durably.

::

    DIR/WALSTATE      creation marker (JSON: format_version, system_id, created_at),
                      written atomically once the directory is initialised
    DIR/LOCK          flock'ed by the writer; holds its pid, host and start time
    DIR/wal/          WAL segments <16 hex digits of first LSN>.seg (docs/FORMAT.md)
    DIR/snapshot/     the LMDB environment holding the checkpointed state
                      (LMDB's data.mdb and lock.mdb)
    DIR/BACKUP_LABEL  only in a directory made by ``walstate backup``/``restore``:
                      JSON {label, lsn, checkpoint_lsn, created_at, source, ...}
    DIR/ARCHIVE_STATUS  with ``archive_dir`` set: JSON state of WAL archiving
                      (last archived LSN, failures, last error), for info/doctor
    DIR/CONTROL       while a writer holds DIR: its control socket (walstate/control.py);
                      one left by a crash is stale and replaced by the next writer
    ARCHIVE/WALSTATE_ARCHIVE  the archive's owner (system_id); segments as in DIR/wal
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass

from .errors import DiskFullError, LockedError

FORMAT_VERSION = 1
MARKER = "WALSTATE"
LOCK = "LOCK"
WAL_DIR = "wal"
SNAPSHOT_DIR = "snapshot"
BACKUP_LABEL = "BACKUP_LABEL"
ARCHIVE_STATUS = "ARCHIVE_STATUS"
ARCHIVE_MARKER = "WALSTATE_ARCHIVE"
CONTROL = "CONTROL"
SNAPSHOT_DATA = "data.mdb"   # LMDB's own names, inside snapshot/
SNAPSHOT_LOCK = "lock.mdb"


@dataclass(frozen=True)
class Layout:
    root: str

    @property
    def marker(self) -> str:
        return os.path.join(self.root, MARKER)

    @property
    def lock(self) -> str:
        return os.path.join(self.root, LOCK)

    @property
    def wal(self) -> str:
        return os.path.join(self.root, WAL_DIR)

    @property
    def snapshot(self) -> str:
        return os.path.join(self.root, SNAPSHOT_DIR)

    @property
    def snapshot_data(self) -> str:
        return os.path.join(self.root, SNAPSHOT_DIR, SNAPSHOT_DATA)

    @property
    def snapshot_lock(self) -> str:
        return os.path.join(self.root, SNAPSHOT_DIR, SNAPSHOT_LOCK)

    @property
    def backup_label(self) -> str:
        return os.path.join(self.root, BACKUP_LABEL)

    @property
    def archive_status(self) -> str:
        return os.path.join(self.root, ARCHIVE_STATUS)


def not_files(directory: str, names: list[str]) -> set[str]:
    """For ``shutil.copytree(ignore=...)``: the entries that are neither files
    nor directories (the CONTROL socket), which a copy of DIR leaves out."""
    out = set()
    for n in names:
        try:
            st = os.lstat(os.path.join(directory, n))
        except OSError:
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            out.add(n)
    return out


def fsync_dir(path: str) -> None:
    """Makes the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str) -> None:
    """Creates ``path`` and missing parents, fsyncing each new entry's parent."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        make_dirs(parent)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    fsync_dir(parent)


def write_atomic(path: str, data: bytes) -> None:
    """Publishes ``data`` at ``path``: temp file, fsync, rename, fsync directory."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def read_marker(layout: Layout) -> dict | None:
    """The creation marker, or None if there is none."""
    try:
        with open(layout.marker, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(data)
        int(marker["system_id"])
        int(marker["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        from .errors import CorruptionError

        raise CorruptionError(f"the creation marker {layout.marker} is unreadable: {exc}",
                              path=layout.marker) from None
    return marker


def read_json(path: str) -> dict | None:
    """A small JSON file written by write_atomic, or None if missing/unreadable."""
    try:
        with open(path, "rb") as f:
            out = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def copy_end(root: str) -> int | None:
    """The LSN a backup's copy of the log reaches, or None for a live directory.

    ``walstate backup`` copies the newest segment only up to the end of its
    records (not the preallocated zeros after them), so that segment is
    shorter than its header records, which in a live directory only a partial
    copy or a truncate can do. BACKUP_LABEL (kind "backup") says the directory
    is such a copy and records the LSN its log must reach."""
    label = read_json(os.path.join(root, BACKUP_LABEL))
    if not label or label.get("kind") != "backup":
        return None
    try:
        return int(label.get("lsn") or 0)
    except (TypeError, ValueError):
        return 0


def write_marker(layout: Layout, system_id: int) -> dict:
    marker = {"format_version": FORMAT_VERSION, "system_id": system_id,
              "created_at": time.time()}
    write_atomic(layout.marker, json.dumps(marker).encode())
    return marker


def check_access(paths: list[str], write: bool) -> None:
    """PermissionError naming the first of ``paths`` (that exists) we may not use."""
    for p in paths:
        if not os.path.exists(p):
            continue
        mode = os.R_OK | (os.W_OK if write else 0) | (os.X_OK if os.path.isdir(p) else 0)
        if not os.access(p, mode):
            need = "read and write" if write else "read"
            raise PermissionError(errno.EACCES, f"permission denied: walstate needs to {need} "
                                  f"{p}", p)


# Directories held by this process: a second open of the same directory in
# one process is refused too (flock would let it through: same process).
_held: set[str] = set()
_held_mu = threading.Lock()


def _after_fork_in_child() -> None:
    """A child made by os.fork() holds no directory: the parent's DirLocks (whose
    flock the child shares, and whose LOCK file names the parent) are never
    released there (walstate.engine makes inherited engines inert), and an open
    of the same directory in the child meets the parent's flock: LockedError."""
    global _held_mu
    _held.clear()
    _held_mu = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def read_lock_holder(layout: Layout) -> dict | None:
    """What the holder wrote into LOCK (pid, host, started_at), if anything."""
    try:
        with open(layout.lock, "rb") as f:
            return json.loads(f.read() or b"null")
    except (OSError, ValueError):
        return None


def lock_is_held(layout: Layout) -> bool:
    """True if some process holds the directory's write lock (changes nothing)."""
    try:
        fd = os.open(layout.lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return os.path.realpath(layout.root) in _held


class DirLock:
    """The single-writer lock: an flock on DIR/LOCK held while the engine is open."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.key = os.path.realpath(layout.root)
        with _held_mu:
            if self.key in _held:
                raise LockedError(f"{layout.root} is already open for writing in this "
                                  f"process (pid {os.getpid()})", pid=os.getpid())
            _held.add(self.key)
        self.fd = -1
        try:
            existed = os.path.exists(layout.lock)
            self.fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
            if not existed:
                fsync_dir(layout.root)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}
            os.ftruncate(self.fd, 0)
            data = json.dumps(info).encode()
            if os.pwrite(self.fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, "short write", layout.lock)
        except BlockingIOError:
            self._undo()
            holder = read_lock_holder(layout) or {}
            pid = holder.get("pid")
            raise LockedError(
                f"{layout.root} is locked by another process: pid {pid} on host "
                f"{holder.get('host', '?')} since {holder.get('started_at', '?')}",
                pid=pid) from None
        except OSError as exc:
            self._undo()
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"taking the lock {layout.lock}: the disk is full; free "
                                    "some space and open again", layout.lock) from exc
            raise
        except BaseException:
            self._undo()
            raise

    def _undo(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._forget()

    def _forget(self) -> None:
        with _held_mu:
            _held.discard(self.key)

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = -1
            self._forget()
