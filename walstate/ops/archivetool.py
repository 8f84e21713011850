"""The archive's tools: base backups into it, restore anywhere from it, and
``walstate archive ls|verify|prune`` (the layout is in walstate/archive.py and
docs/FORMAT.md, "The WAL archive").

Restore from an archive, on a machine that has nothing else:

1. the history (timeline) to restore: the one written to most recently, or
   ``timeline=``; its chain of parents, each used up to the LSN where the next
   one branched off;
2. the target: ``to_lsn``, or for ``to_time`` T the last LSN whose time mark
   is at or before T (every record up to it was acknowledged by then), or
   everything the archive holds;
3. the newest base backup on the chain at or below the target (none needed
   when the archive holds the WAL from the first record), downloaded and
   checked against its manifest's CRC32Cs;
4. the archived pieces above the backup, each checked against its CRC32C and
   written at its offset into its segment file, cut after the target;
5. the assembled log read with the C reader (every record CRC); it is cut
   where it stops continuing (a hole, damage) with a note, and an error if
   that is below the target or the backup;
6. the marker, BACKUP_LABEL, and a TIMELINE saying the directory's own writes
   start a new history (claimed in the archive when it first ships).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc

from ..archive import (
    ARCHIVE_VERSION,
    PieceName,
    base_prefix,
    claim_timeline,
    decode_piece,
    ensure_archive,
    list_base_backups,
    list_pieces,
    list_timelines,
    pending_timeline,
    read_archive_marker,
    timeline_chain,
    write_timeline_file,
)
from ..archivestore import ArchiveError, Store, open_store
from ..errors import CorruptionError, WalStateError
from ..layout import (
    FORMAT_VERSION,
    MARKER,
    Layout,
    fsync_dir,
    make_dirs,
    read_marker,
    write_atomic,
)
from ..wal import WalReader, list_segments, segment_name
from .progress import Progress

RECORD_HEADER = 28
SEGMENT_HEADER = 64
LSN_JUMP = 1 << 32
RETRIES = 3


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
    timeline: int | None = None
    base_backup: str | None = None
    archive: str | None = None
    wal_bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- base backups -------------------------------------------------------------------
def backup_to_archive(src_dir: str, location: str, *, label: str | None = None,
                      progress: Progress | None = None) -> Result:
    """A hot base backup of ``src_dir`` stored in the archive at ``location``."""
    from . import backup as bk

    t0 = time.time()
    store = open_store(location)
    src = Layout(os.path.abspath(src_dir))
    marker = read_marker(src)
    if marker is None:
        raise CorruptionError(f"{src.root} is not a walstate directory (no {src.marker})",
                              path=src.marker)
    system_id = int(marker["system_id"])
    ensure_archive(store, system_id, marker, create=True)
    tmp = tempfile.mkdtemp(prefix="walstate-base-")
    try:
        local = os.path.join(tmp, "b")
        res = bk.backup(src.root, local, label=label, progress=progress)
        tl = claim_timeline(store, src, res.lsn)
        created = time.time()
        prefix = base_prefix(tl, res.lsn, created)
        files: dict[str, dict[str, int]] = {}
        names = ["snapshot/data.mdb"] + [f"wal/{os.path.basename(p)}"
                                         for _f, p in list_segments(os.path.join(local, "wal"))]
        names += [MARKER, "BACKUP_LABEL"]
        total = 0
        for name in names:
            path = os.path.join(local, *name.split("/"))
            files[name] = {"size": os.path.getsize(path), "crc32c": _file_crc(path)}
            store.put_file(f"{prefix}/{name}", path)
            total += files[name]["size"]
        manifest = {"archive_version": ARCHIVE_VERSION, "system_id": system_id,
                    "timeline": tl, "lsn": res.lsn, "checkpoint_lsn": res.checkpoint_lsn,
                    "label": label, "started_at": t0, "created_at": created,
                    "source": src.root, "files": files, "bytes": total}
        store.put(f"{prefix}/MANIFEST.json", json.dumps(manifest, sort_keys=True).encode())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Result(f"{store.url}/{prefix}", res.lsn, res.checkpoint_lsn, res.segments, total,
                 label, attempts=res.attempts, notes=res.notes, timeline=tl,
                 base_backup=prefix, archive=store.url, seconds=time.time() - t0)
    return out


def _file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while buf := f.read(1 << 20):
            crc = _crc.crc32c(buf, crc)
    return crc


# ---- assembling a log from pieces -----------------------------------------------------
def _choose_pieces(pieces: list[PieceName]) -> list[PieceName]:
    """One timeline's pieces without redundancy: a consolidated segment replaces
    the chunks it covers (both exist for a moment while consolidating)."""
    segs = {p.segment: p for p in pieces if p.kind == "seg"}
    out = []
    for p in pieces:
        s = segs.get(p.segment)
        if p.kind == "chunk" and s is not None and p.last <= s.last:
            continue
        out.append(p)
    out.sort(key=lambda p: (p.first, p.kind != "seg"))
    dedup: list[PieceName] = []
    for p in out:
        if dedup and p.last <= dedup[-1].last:
            continue
        dedup.append(p)
    return dedup


def cut_offset(data: bytes, base_offset: int, limit: int) -> int:
    """Length of the prefix of ``data`` (a piece at ``base_offset`` of its
    segment) holding the records with LSN <= ``limit``."""
    p = SEGMENT_HEADER if base_offset == 0 else 0
    while p + RECORD_HEADER <= len(data):
        length, lsn = struct.unpack_from("<IQ", data, p + 4)
        if lsn > limit:
            return p
        p += RECORD_HEADER + length
    return len(data)


def _piece_limit_lsn(header: dict, data: bytes, t: float) -> int | None:
    """The last LSN of the piece acknowledged by time ``t`` (its marks), or None."""
    best = None
    for lsn, when in header.get("marks") or []:
        if when <= t:
            best = lsn if best is None else max(best, lsn)
    return best


class _Plan:
    def __init__(self, store: Store, timeline: int | None) -> None:
        self.store = store
        self.marker = read_archive_marker(store)
        if self.marker is None:
            raise ArchiveError(f"{store.url} is not a walstate archive (no WALSTATE_ARCHIVE "
                               "object): check the URL and the endpoint (AWS_ENDPOINT_URL)")
        self.system_id = int(self.marker["system_id"])
        self.timelines = list_timelines(store)
        all_pieces = list_pieces(store)
        self.by_tl: dict[int, list[PieceName]] = {}
        for p in all_pieces:
            self.by_tl.setdefault(p.timeline, []).append(p)
        known = set(self.timelines) | set(self.by_tl)
        if timeline is None:
            # the most recently written history (a restored copy that took over
            # from a lost machine; the original if the copy stopped writing first)
            timeline = max(known, default=1, key=lambda tl: (
                max((p.time for p in self.by_tl.get(tl, [])), default=0.0), tl))
        elif timeline not in known:
            raise ArchiveError(f"the archive {store.url} has no timeline {timeline} (it has "
                               f"{sorted(known) or 'none'})")
        self.timeline = timeline
        self.chain = timeline_chain(self.timelines, timeline)
        # the pieces of the history, in order, each timeline up to its bound
        self.pieces: list[tuple[PieceName, int | None]] = []
        for tl, bound in self.chain:
            for p in _choose_pieces(self.by_tl.get(tl, [])):
                if bound is not None and p.first > bound:
                    break
                self.pieces.append((p, bound))
        self.backups = list_base_backups(store)

    def target_for_time(self, t: float) -> tuple[int, list[str]]:
        """The last LSN whose records were all acknowledged at or before ``t``."""
        best = 0
        notes: list[str] = []
        for p, bound in self.pieces:
            if p.time <= t:
                best = p.last if bound is None else min(p.last, bound)
                continue
            header, data = decode_piece(self.store.get(p.key), p.key)
            lim = _piece_limit_lsn(header, data, t)
            if lim is not None:
                best = lim if bound is None else min(lim, bound)
            break
        base_best = 0
        for b in self.backups:
            if self._on_chain(b) and b.get("created_at", 0) <= t:
                base_best = max(base_best, int(b["lsn"]))
        if best < base_best:
            best = base_best
        if best == 0:
            notes.append("nothing in the archive was acknowledged at or before --to-time")
        return best, notes

    def _on_chain(self, b: dict) -> bool:
        for tl, bound in self.chain:
            if b.get("timeline") == tl:
                return bound is None or int(b["lsn"]) <= bound
        return False

    def choose_backup(self, target: int | None) -> dict | None:
        best = None
        for b in self.backups:
            if int(b.get("system_id", self.system_id)) != self.system_id:
                continue
            if not self._on_chain(b):
                continue
            if target is not None and int(b["lsn"]) > target:
                continue
            if best is None or int(b["lsn"]) > int(best["lsn"]):
                best = b
        return best

    def starts_at_first_record(self) -> bool:
        return bool(self.pieces) and self.pieces[0][0].first == 1 and \
            self.pieces[0][0].segment == 1


def _write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.ftruncate(fd, offset + len(data))
    finally:
        os.close(fd)


def _assemble(plan: _Plan, wal_dir: str, above: int, target: int | None,
              progress: Progress | None = None) -> tuple[int, int]:
    """Writes the pieces holding LSNs > ``above`` (up to ``target``) into
    ``wal_dir``; returns (pieces, bytes)."""
    n = nbytes = 0
    for p, bound in plan.pieces:
        if p.last <= above:
            continue
        limit = bound
        if target is not None:
            limit = target if limit is None else min(limit, target)
        if limit is not None and p.first > limit:
            continue
        blob = plan.store.get(p.key)
        header, data = decode_piece(blob, p.key)
        if header.get("system_id") not in (None, plan.system_id):
            raise CorruptionError(f"the archived piece {p.key} belongs to system_id "
                                  f"{header.get('system_id')}", path=p.key)
        off = int(header["offset"])
        if limit is not None and p.last > limit:
            data = data[:cut_offset(data, off, limit)]
            if not data:
                continue
        _write_at(os.path.join(wal_dir, segment_name(int(header["segment"]))), off, data)
        n += 1
        nbytes += len(data)
        if progress is not None:
            progress.advance(len(blob))
    return n, nbytes


def _scan(wal_dir: str, system_id: int, from_lsn: int) -> Any:
    """Reads the whole log assembled from archived pieces (C reader, every
    CRC; its newest segment ends where its records do); returns its LogEnd."""
    with WalReader(wal_dir, system_id, from_lsn, copy=True) as r:
        for _batch in r.iter_arrays():
            pass
        return r.end


def _empty_snapshot(snap_dir: str, system_id: int) -> None:
    from ..snapshot import META_CHECKPOINT, Snapshot

    make_dirs(snap_dir)
    snap = Snapshot(snap_dir, map_size=1 << 20, read_only=False, create=True)
    try:
        snap.write([], durable=True, meta={META_CHECKPOINT: {
            "format_version": FORMAT_VERSION, "system_id": system_id, "id": 0, "lsn": 0,
            "reason": "init", "started_at": time.time(), "finished_at": time.time(),
            "keys_written": 0, "snapshot_bytes": 0, "wal_bytes_removed": 0}})
    finally:
        snap.close()
    lock = os.path.join(snap_dir, "lock.mdb")
    if os.path.exists(lock):
        os.unlink(lock)


def _download_backup(store: Store, b: dict, dest: str) -> int:
    total = 0
    for name, meta in sorted(b["files"].items()):
        if name in (MARKER, "BACKUP_LABEL"):
            continue
        path = os.path.join(dest, *name.split("/"))
        make_dirs(os.path.dirname(path))
        store.get_file(f"{b['prefix']}/{name}", path)
        if os.path.getsize(path) != meta["size"] or _file_crc(path) != meta["crc32c"]:
            raise CorruptionError(f"the base backup {b['prefix']} is damaged: {name} does "
                                  "not match its manifest (size or CRC32C)",
                                  path=f"{b['prefix']}/{name}")
        total += meta["size"]
    return total


def restore_archive(location: str, dest: str, *, to_lsn: int | None = None,
                    to_time: float | None = None, timeline: int | None = None,
                    base_dir: str | None = None, progress: Progress | None = None) -> Result:
    """Makes ``dest`` (missing or empty) a data directory holding the archive's
    history up to the target (see the module doc). ``base_dir``: a local backup
    directory to start from instead of the archive's base backups."""
    from . import backup as bk

    if to_lsn is not None and to_time is not None:
        raise ValueError("give --to-lsn or --to-time, not both")
    store = open_store(location)
    dest = os.path.abspath(dest)
    bk._fresh_dest(dest)  # noqa: SLF001
    last_exc: Exception | None = None
    for attempt in range(1, RETRIES + 1):
        try:
            res = _restore_once(store, dest, to_lsn, to_time, timeline, base_dir,
                                progress or Progress("restore", enabled=False))
            res.attempts = attempt
            return res
        except FileNotFoundError as exc:
            # a piece went away between listing and reading (consolidated or
            # pruned meanwhile): list again
            last_exc = exc
            bk._clear_dest(dest)  # noqa: SLF001
        except BaseException:
            bk._clear_dest(dest)  # noqa: SLF001
            raise
    raise ArchiveError(f"restore from {store.url}: objects kept vanishing while reading "
                       f"({last_exc})")


def _restore_once(store: Store, dest: str, to_lsn: int | None, to_time: float | None,
                  timeline: int | None, base_dir: str | None, progress: Progress) -> Result:
    from . import backup as bk

    t0 = time.time()
    plan = _Plan(store, timeline)
    system_id = plan.system_id
    notes: list[str] = []
    target = to_lsn
    if to_time is not None:
        target, more = plan.target_for_time(to_time)
        notes += more
    dl = Layout(dest)
    make_dirs(dl.wal)
    base_label: str | None = None
    snap_lsn = 0
    base_lsn = 0
    nbytes = 0
    if base_dir is not None:
        bl = Layout(os.path.abspath(base_dir))
        m = read_marker(bl)
        if m is None or int(m["system_id"]) != system_id:
            raise WalStateError(f"the backup {bl.root} is not of the archive's system "
                                f"{system_id}")
        label = bk.read_json(bl.backup_label) or {}
        base_lsn = int(label.get("lsn") or 0)
        if to_time is not None:
            created = label.get("created_at") or bk.newest_mtime(bl)
            if created > to_time and base_lsn > (target or 0):
                raise WalStateError(f"the backup {bl.root} was taken at {created:.3f}, "
                                    f"after --to-time {to_time:.3f}: restore from an older "
                                    "backup")
        make_dirs(dl.snapshot)
        nbytes += bk.copy_durable(os.path.join(bl.snapshot, "data.mdb"),
                                  os.path.join(dl.snapshot, "data.mdb"), keep_mtime=False)
        for first, path in list_segments(bl.wal):
            nbytes += bk.copy_durable(path, os.path.join(dl.wal, segment_name(first)))
        base_label = bl.root
    else:
        b = plan.choose_backup(target)
        if b is not None:
            nbytes += _download_backup(store, b, dest)
            base_lsn = int(b["lsn"])
            base_label = b["prefix"]
        elif plan.starts_at_first_record():
            _empty_snapshot(dl.snapshot, system_id)
        else:
            first = plan.pieces[0][0].first if plan.pieces else None
            raise ArchiveError(
                f"the archive {store.url} has no base backup that serves this target and "
                f"its WAL does not start at the first record (it starts at LSN {first}): "
                "nothing to restore from" + (" (--to-time before its first backup?)"
                                             if to_time is not None else ""))
    from ..snapshot import Snapshot

    snap = Snapshot(dl.snapshot, map_size=1 << 20, read_only=True, create=False)
    try:
        snap_lsn = int(snap.check_meta(system_id)["lsn"])
    finally:
        snap.close()
    if target is not None and target < snap_lsn:
        raise WalStateError(f"the base backup's snapshot already holds writes up to LSN "
                            f"{snap_lsn}, above the target LSN {target}: restore from an "
                            "older backup")
    if target is not None and base_lsn > target:
        # the backup's own WAL goes past the target: cut it there
        end = _cut_at(dl.wal, system_id, snap_lsn + 1, target)
        del end
    _n, wal_bytes = _assemble(plan, dl.wal, base_lsn, target, progress)
    nbytes += wal_bytes
    end = _scan(dl.wal, system_id, snap_lsn + 1)
    lsn = max(end.last_lsn, snap_lsn)
    if end.status != "clean":
        from .._native import strerror

        why = "torn tail" if end.status == "torn" else strerror(end.rc)
        if lsn < base_lsn:
            raise CorruptionError(f"the base backup's WAL is damaged ({why}) at {end.path} "
                                  f"offset {end.offset}", path=end.path, offset=end.offset)
        notes.append(f"the archive's WAL stops continuing at LSN {lsn}: {why} in "
                     f"{os.path.basename(end.path)} at offset {end.offset}")
    bk.finish_copied_log(dl.wal, end)
    if to_lsn is not None and lsn < to_lsn:
        raise WalStateError(f"the backup and archive reach only LSN {lsn}, below --to-lsn {to_lsn}"
                            + (f" ({notes[-1]})" if notes else ""))
    marker = (plan.marker.get("marker") or {"format_version": FORMAT_VERSION,
                                            "system_id": system_id,
                                            "created_at": plan.marker.get("created_at")})
    write_atomic(dl.marker, json.dumps(marker).encode())
    tl_meta = {"timeline": None, "parent": plan.timeline, "branch_lsn": lsn, "token": None}
    write_timeline_file(dest, tl_meta)
    write_atomic(dl.backup_label, json.dumps({
        "label": None, "lsn": lsn, "checkpoint_lsn": snap_lsn, "system_id": system_id,
        "kind": "restore", "restored_at": time.time(), "restored_from": store.url,
        "archive": store.url, "timeline": plan.timeline, "base_backup": base_label,
        "to_lsn": to_lsn, "to_time": to_time, "created_at": time.time()},
        sort_keys=True).encode())
    for _f, p in list_segments(dl.wal):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(dl.wal)
    fsync_dir(dest)
    fsync_dir(os.path.dirname(dest))
    progress.done()
    return Result(dest, lsn, snap_lsn, len(list_segments(dl.wal)), nbytes, None, notes=notes,
                  timeline=plan.timeline, base_backup=base_label, archive=store.url,
                  wal_bytes=wal_bytes, seconds=time.time() - t0)


def _cut_at(wal_dir: str, system_id: int, from_lsn: int, target: int) -> None:
    from . import backup as bk

    found = None
    with WalReader(wal_dir, system_id, target + 1, copy=True) as r:
        for rec in r:
            found = (rec.segment, rec.offset)
            break
    if found is not None:
        bk._cut_quietly(wal_dir, *found)  # noqa: SLF001


# ---- walstate archive ls | verify | prune ------------------------------------------------
def ls(location: str) -> dict[str, Any]:
    store = open_store(location)
    marker = read_archive_marker(store)
    if marker is None:
        raise ArchiveError(f"{store.url} is not a walstate archive (no WALSTATE_ARCHIVE)")
    timelines = list_timelines(store)
    pieces = list_pieces(store)
    by_tl: dict[int, list[PieceName]] = {}
    for p in pieces:
        by_tl.setdefault(p.timeline, []).append(p)
    tls = []
    for tl in sorted(set(timelines) | set(by_tl)):
        ps = _choose_pieces(by_tl.get(tl, []))
        raw = by_tl.get(tl, [])
        meta = timelines.get(tl, {})
        holes, jumps = [], []
        for a, b in zip(ps, ps[1:], strict=False):
            if b.first == a.last + 1:
                continue
            if b.first == b.segment and b.first - a.last - 1 == LSN_JUMP:
                jumps.append([a.last, b.first])
            else:
                holes.append([a.last + 1, b.first - 1])
        tls.append({
            "timeline": tl, "parent": meta.get("parent"), "branch_lsn": meta.get("branch_lsn"),
            "created_at": meta.get("created_at"), "source": meta.get("source"),
            "first_lsn": ps[0].first if ps else None, "last_lsn": ps[-1].last if ps else None,
            "last_time": ps[-1].time if ps else None,
            "chunks": sum(1 for p in raw if p.kind == "chunk"),
            "segments": sum(1 for p in raw if p.kind == "seg"),
            "bytes": sum(p.size for p in raw), "holes": holes, "lsn_jumps": jumps})
    backups = []
    for b in list_base_backups(store):
        backups.append({k: b.get(k) for k in ("prefix", "timeline", "lsn", "checkpoint_lsn",
                                              "created_at", "label", "bytes")})
    total = sum(s for _k, s in store.list(""))
    return {"url": store.url, "archive_version": marker.get("archive_version"),
            "system_id": marker.get("system_id"), "created_at": marker.get("created_at"),
            "timelines": tls, "base_backups": backups, "bytes": total}


def verify(location: str) -> dict[str, Any]:
    """Checks every checksum: each piece's CRC32C, every record's CRC (the C
    reader over each timeline's assembled log) and each base backup's files."""
    store = open_store(location)
    plan0 = _Plan(store, None)
    problems: list[str] = []
    checked = {"pieces": 0, "bytes": 0, "records_checked_to": {}, "base_backups": 0}
    for tl in sorted(set(plan0.timelines) | set(plan0.by_tl)):
        plan = _Plan(store, tl)
        with tempfile.TemporaryDirectory(prefix="walstate-verify-") as tmp:
            try:
                _n, nbytes = _assemble(plan, tmp, 0, None)
            except CorruptionError as exc:
                problems.append(str(exc))
                continue
            checked["pieces"] += _n
            checked["bytes"] += nbytes
            for _f, path in list_segments(tmp):
                with open(path, "rb") as f:
                    if f.read(8) != b"WALSTSEG":  # its start was pruned: CRC32C only
                        os.unlink(path)
            segs = list_segments(tmp)
            starts = [p.first for p, _b in plan.pieces
                      if p.first == p.segment and os.path.exists(
                          os.path.join(tmp, segment_name(p.segment)))]
            if not segs or not starts:
                continue
            end = _scan(tmp, plan.system_id, starts[0])
            checked["records_checked_to"][tl] = end.last_lsn
            if end.status != "clean":
                from .._native import lib, strerror

                where = f"{os.path.basename(end.path)} offset {end.offset}"
                if end.status == "error" and end.rc == lib.WAL_EGAP:
                    problems.append(f"timeline {tl}: a hole in the archived WAL after LSN "
                                    f"{end.last_lsn} (restores stop there)")
                else:
                    problems.append(f"timeline {tl}: damaged WAL in segment {where}: "
                                    f"{strerror(end.rc) if end.rc else end.status} after LSN "
                                    f"{end.last_lsn}")
    for b in plan0.backups:
        with tempfile.TemporaryDirectory(prefix="walstate-verify-") as tmp:
            try:
                _download_backup(store, b, tmp)
                checked["base_backups"] += 1
            except (CorruptionError, FileNotFoundError) as exc:
                problems.append(f"base backup {b['prefix']}: {exc}")
    return {"url": store.url, "ok": not problems, "problems": problems, **checked}


def prune(location: str, *, keep: int | None = None, keep_days: float | None = None,
          apply: bool = False) -> dict[str, Any]:
    """Deletes base backups beyond the last ``keep`` (and older than ``keep_days``)
    and the WAL no kept backup needs. Dry run unless ``apply``."""
    store = open_store(location)
    plan = _Plan(store, None)
    if keep is None and keep_days is None:
        keep = 2
    backups = plan.backups  # oldest first
    now = time.time()
    kept = []
    for i, b in enumerate(backups):
        recent = keep is not None and i >= len(backups) - keep
        young = keep_days is not None and b.get("created_at", 0) >= now - keep_days * 86400
        if recent or young:
            kept.append(b)
    gone = [b for b in backups if b not in kept]
    delete: list[str] = []
    if kept:
        for b in gone:
            delete += [f"{b['prefix']}/{name}" for name in b["files"]] + [
                f"{b['prefix']}/MANIFEST.json"]
        cutoff = min(int(b["lsn"]) for b in kept)
        # a timeline that no kept backup serves keeps its whole history
        protected: set[int] = set()
        for tl in set(plan.timelines) | set(plan.by_tl):
            p = _Plan(store, tl)
            if not any(p._on_chain(b) for b in kept):  # noqa: SLF001
                protected |= {t for t, _b in p.chain}
        for tl, ps in plan.by_tl.items():
            if tl in protected:
                continue
            delete += [p.key for p in ps if p.last <= cutoff]
    sizes = dict(store.list(""))
    out = {"url": store.url, "apply": apply,
           "keep_backups": [b["prefix"] for b in kept],
           "delete_backups": [b["prefix"] for b in gone] if kept else [],
           "delete_objects": len(delete), "delete_bytes": sum(sizes.get(k, 0) for k in delete),
           "objects": delete}
    if apply and delete:
        # backups' manifests first: a half-deleted backup is never mistaken for one
        manifests = [k for k in delete if k.endswith("/MANIFEST.json")]
        store.delete(manifests)
        store.delete([k for k in delete if not k.endswith("/MANIFEST.json")])
    return out


__all__ = ["Result", "backup_to_archive", "ls", "prune", "restore_archive", "verify",
           "pending_timeline"]
