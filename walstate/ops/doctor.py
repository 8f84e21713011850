"""``walstate doctor``: the checks a careful operator makes before starting a
writer on a directory or restoring into it. Each check gives one line with
OK, WARN or FAIL; any FAIL makes the command exit 1. Changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .._opening import unmarked_state
from ..archive import read_status
from ..config import Config
from ..errors import WalStateError
from ..layout import FORMAT_VERSION, MARKER, Layout, lock_is_held, read_lock_holder, read_marker
from .repair import broken_files

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre",
              "afs", "sshfs", "fuse.sshfs", "gpfs", "beegfs")
VOLATILE_FS = ("tmpfs", "ramfs")
MAP_WARN_FRACTION = 0.8


@dataclass
class Check:
    name: str
    status: str  # "OK", "WARN", "FAIL"
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def _nearest_existing(path: str) -> str:
    p = path
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def filesystem_type(path: str) -> tuple[str, str]:
    """(fs type, mount point) of the filesystem holding ``path`` (from /proc)."""
    real = os.path.realpath(_nearest_existing(path))
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return fstype, best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = fields[4].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, right.split()[0]
    return fstype, best


def _check_path(lay: Layout) -> Check:
    if os.path.isdir(lay.root):
        try:
            marker = read_marker(lay)
        except WalStateError as exc:
            return Check("path", "FAIL", str(exc))
        if marker is None:
            state = unmarked_state(lay)
            if state == "interrupted":
                return Check("path", "WARN", f"{lay.root}: an earlier creation was cut short "
                             f"(no {MARKER}; left: {', '.join(sorted(os.listdir(lay.root)))}), "
                             "nothing was stored in it: the next open clears it and creates "
                             "the database again")
            if state == "data":
                return Check("path", "FAIL", f"{lay.root} holds walstate data but its creation "
                             f"marker {lay.marker} is missing: open refuses it (restore from a "
                             "backup, or put the marker back)")
            if state == "other":
                return Check("path", "WARN", f"{lay.root} exists, is not empty and is not a "
                             "walstate directory (open creates a database beside its files)")
            return Check("path", "OK", f"{lay.root} exists (empty: open creates a database)")
        if marker["format_version"] != FORMAT_VERSION:
            return Check("path", "FAIL", f"{lay.marker} says format version "
                         f"{marker['format_version']}; this walstate reads version "
                         f"{FORMAT_VERSION} (open refuses it)")
        return Check("path", "OK", f"{lay.root} is a walstate directory (system_id "
                     f"{marker['system_id']})")
    if os.path.exists(lay.root):
        return Check("path", "FAIL", f"{lay.root} exists and is not a directory")
    parent = _nearest_existing(lay.root)
    if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
        return Check("path", "OK", f"{lay.root} does not exist; it can be created in {parent}")
    return Check("path", "FAIL", f"{lay.root} does not exist and {parent} is not writable")


def _check_writable(lay: Layout) -> Check:
    paths = [lay.root, lay.wal, lay.snapshot, lay.marker, lay.lock,
             lay.snapshot_data, lay.snapshot_lock]
    paths += [p for _l, p in _segments(lay)]
    if not os.path.exists(lay.root):
        return Check("writable", "OK", "nothing to check yet")
    bad = [p for p in paths if os.path.exists(p)
           and not os.access(p, os.R_OK | os.W_OK | (os.X_OK if os.path.isdir(p) else 0))]
    if bad:
        return Check("writable", "FAIL", f"not readable and writable by uid {os.geteuid()}: "
                     + ", ".join(bad[:5]))
    return Check("writable", "OK", f"readable and writable by uid {os.geteuid()}")


def _segments(lay: Layout) -> list[tuple[int, str]]:
    from ..wal import list_segments

    return list_segments(lay.wal)


def _snapshot_bytes(lay: Layout) -> int:
    try:
        return os.path.getsize(lay.snapshot_data)
    except OSError:
        return 0


def _check_space(lay: Layout, cfg: Config) -> Check:
    st = os.statvfs(_nearest_existing(lay.root))
    free = st.f_bavail * st.f_frsize
    snap = _snapshot_bytes(lay)
    # OPERATIONS.md, Sizing: 2 x max_wal_size of WAL (one being folded, one
    # filling) plus a max_wal_size of checkpoint reserve, plus LMDB's copy-on-write
    need = 3 * cfg.max_wal_size + snap
    text = (f"{free / 2**20:.0f} MiB free; needs {need / 2**20:.0f} MiB (3 x max_wal_size "
            f"{cfg.max_wal_size / 2**20:.0f} MiB + snapshot {snap / 2**20:.0f} MiB)")
    if free < need:
        return Check("free_space", "FAIL", text)
    if free < 2 * need:
        return Check("free_space", "WARN", text)
    return Check("free_space", "OK", text)


def _check_fs(lay: Layout) -> Check:
    fstype, mnt = filesystem_type(lay.root)
    text = f"{fstype} (mounted at {mnt or '?'})"
    if fstype in NETWORK_FS or fstype.startswith("fuse"):
        return Check("filesystem", "WARN", f"{text}: a network/FUSE filesystem; fsync and "
                     "flock may not mean what walstate needs")
    if fstype in VOLATILE_FS:
        return Check("filesystem", "WARN", f"{text}: memory-backed; everything is lost at "
                     "reboot")
    return Check("filesystem", "OK", text)


def _check_lock(lay: Layout) -> Check:
    if not os.path.exists(lay.lock):
        return Check("lock", "OK", "free")
    if lock_is_held(lay):
        h = read_lock_holder(lay) or {}
        return Check("lock", "FAIL", f"held by pid {h.get('pid')} on {h.get('host', '?')} "
                     f"since {h.get('started_at', '?')}: a writer is running")
    return Check("lock", "OK", "free")


def _check_map(lay: Layout, cfg: Config) -> Check:
    data = lay.snapshot_data
    if not os.path.exists(data):
        return Check("lmdb_map", "OK", "no snapshot yet")
    import lmdb

    try:
        env = lmdb.open(lay.snapshot, readonly=True, lock=False, max_dbs=2, subdir=True,
                        create=False)
    except lmdb.Error as exc:
        return Check("lmdb_map", "FAIL", f"the snapshot cannot be opened: {exc}")
    try:
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = max(env.info()["map_size"], cfg.map_size)
    finally:
        env.close()
    text = (f"{used / 2**20:.1f} MiB used of a {size / 2**20:.0f} MiB map "
            f"({100 * used / size:.0f}%)")
    if used > MAP_WARN_FRACTION * size:
        return Check("lmdb_map", "WARN", text + ": the engine doubles the map when full; "
                     "raise map_size to avoid the pause")
    return Check("lmdb_map", "OK", text)


def _check_broken(lay: Layout) -> Check:
    files = broken_files(lay.root)
    if not files:
        return Check("broken_files", "OK", "none")
    size = sum(os.path.getsize(p) for p in files if os.path.exists(p))
    return Check("broken_files", "WARN", f"{len(files)} .broken file(s), {size} bytes, left by "
                 f"a cut ({', '.join(os.path.basename(p) for p in files[:3])}"
                 f"{'...' if len(files) > 3 else ''}): inspect, keep a copy elsewhere, delete")


def _check_wal(lay: Layout) -> Check:
    if read_marker(lay) is None:
        return Check("wal", "OK", "no database yet")
    from .repair import diagnose

    try:
        found = [f for f in diagnose(lay.root) if f.kind not in ("locked", "old_damage")]
    except (WalStateError, OSError) as exc:
        return Check("wal", "FAIL", str(exc))
    end = os.path.join(lay.wal, "END")
    if not found and os.path.lexists(end) and not os.path.isfile(end):
        return Check("wal", "WARN", f"the log reads cleanly, but {end} is not a file: "
                     "walstate leaves it alone, and a clean close cannot leave its end "
                     "hint there (the next open reads the whole newest segment)")
    if not found:
        return Check("wal", "OK", "the log reads cleanly from the checkpoint on")
    f = found[0]
    if f.kind == "torn_tail":
        return Check("wal", "WARN", f.detail + " (the next open cuts it)")
    return Check("wal", "FAIL", f"{f.kind}: {f.detail} (see `walstate repair`)")


def _check_open(lay: Layout, cfg: Config) -> Check:
    """What an open would say: a read-only open (it changes no file) runs the
    checks and the recovery a writer's open runs."""
    if read_marker(lay) is None:
        return Check("open", "OK", "no database yet")
    import walstate

    try:
        with walstate.open(lay.root, read_only=True, map_size=cfg.map_size) as db:
            rec = db.info()["recovery"]
    except (WalStateError, OSError) as exc:
        return Check("open", "FAIL", f"open refuses it: {exc}")
    return Check("open", "OK", f"opens: {rec['records_replayed']} record(s) to replay")


def _check_archive(lay: Layout) -> Check:
    st = read_status(lay)
    if st is None:
        return Check("archive", "OK", "WAL archiving never ran here")
    d = st.get("url") or st.get("dir")
    lag = f"lag {float(st.get('lag_seconds') or 0):.1f} s, {st.get('lag_bytes', 0)} bytes"
    if st.get("failing"):
        return Check("archive", "FAIL", f"archiving to {d} fails ({st.get('failures')} "
                     f"failure(s)); {lag} of WAL wait on local disk; last error: "
                     f"{st.get('last_error')}")
    if d and "://" not in d and not (os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)):
        return Check("archive", "FAIL", f"the archive directory {d} is missing or not "
                     "writable")
    if st.get("abandoned"):
        return Check("archive", "WARN", f"WAL was removed without archiving (holes at "
                     f"LSNs {st.get('holes')}): restores cannot cross them; take a new backup")
    if st.get("last_backup_error"):
        return Check("archive", "WARN", f"archiving to {d} works, but the last automatic base "
                     f"backup failed: {st.get('last_backup_error')}")
    return Check("archive", "OK", f"archiving to {d} (timeline {st.get('timeline')}), up to "
                 f"LSN {st.get('archived_lsn', st.get('last_archived_lsn'))}, {lag}")


def run_checks(path: str, config: Config | None = None) -> list[Check]:
    """Every check, in order; never raises for what it finds."""
    cfg = config or Config()
    lay = Layout(os.path.abspath(path))
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("path", lambda: _check_path(lay)),
        ("writable", lambda: _check_writable(lay)),
        ("free_space", lambda: _check_space(lay, cfg)),
        ("filesystem", lambda: _check_fs(lay)),
        ("lock", lambda: _check_lock(lay)),
        ("lmdb_map", lambda: _check_map(lay, cfg)),
        ("broken_files", lambda: _check_broken(lay)),
        ("wal", lambda: _check_wal(lay)),
        ("open", lambda: _check_open(lay, cfg)),
        ("archive", lambda: _check_archive(lay)),
    ]
    out = []
    for name, fn in checks:
        try:
            out.append(fn())
        except (OSError, WalStateError) as exc:
            out.append(Check(name, "FAIL", f"check failed: {exc}"))
        if name == "path" and out[-1].status == "FAIL":
            break
    return out
