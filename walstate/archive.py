"""Continuous WAL archiving: a background shipper uploads the durable WAL to an
archive (a directory or ``s3://bucket/prefix``, see walstate/archivestore.py),
and a checkpoint removes a segment only once the archive holds it.

The archive's layout (docs/FORMAT.md, "The WAL archive"), relative to its root::

    WALSTATE_ARCHIVE                 JSON {archive_version, system_id, marker, created_at}
    timelines/<tl:08x>.json          one per history: {timeline, parent, branch_lsn, token, ...}
    wal/<tl:08x>/<seg:016x>/<first:016x>-<last:016x>.chunk   records of a segment as they come
    wal/<tl:08x>/<seg:016x>/<first:016x>-<last:016x>.seg     a complete segment (consolidated)
    base/<tl:08x>-<lsn:016x>-<ms>/...  a base backup; MANIFEST.json (written last) lists it

A *piece* (chunk or consolidated segment) is a byte range of one local
segment file holding whole records only, all of them durable locally when
read: ``PIECE_MAGIC``, u32 header length, a JSON header (segment, offset,
first/last LSN, length, CRC32C of the bytes, time marks), the bytes. A time
mark ``[lsn, t]`` says every record up to ``lsn`` had been acknowledged by
wall-clock time ``t`` (``restore --to-time``).

Rules:

- Writers never wait: the shipper is a thread that reads the WAL files with
  the C reader (record boundaries and CRCs) up to the durable LSN, every
  ``archive_interval / 2`` seconds, and uploads what is new as one chunk per
  segment; once a segment is complete it uploads it whole (``.seg``) and
  deletes its chunks.
- A failing store (down, refusing, full) is retried with back-off, reported
  in ``info()["archive"]`` (and DIR/ARCHIVE_STATUS for other processes), and
  the WAL stays on disk: a checkpoint removes only segments the archive
  holds, until more than ``max_archive_lag_bytes`` wait -- then they go
  anyway, with a loud error, and the archive has a hole (``holes``).
- The archive belongs to one ``system_id``; each history in it has its own
  timeline: DIR/TIMELINE names the directory's (absent: timeline 1); a
  restored or backed-up copy starts a new one (parent, branch LSN) the first
  time it ships, so two writers of one history never interleave.

Which segments a checkpoint at LSN X removes mirrors wal_remove_below in
csrc/wal_segment.c: segment i goes when a later segment exists and starts at
or below X + 1; never the last one.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import secrets
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import crc32c as _crc

from .archivestore import ArchiveError, S3Store, Store, normalize, open_store
from .errors import WalStateError
from .layout import ARCHIVE_MARKER, Layout, fsync_dir, read_json, read_marker, write_atomic
from .wal import WalReader, list_segments

log = logging.getLogger("walstate")

COPY_CHUNK = 1 << 20
ARCHIVE_VERSION = 2
PIECE_MAGIC = b"WSARCPC2"
TIMELINE_FILE = "TIMELINE"
RECORD_HEADER = 28
SEGMENT_HEADER = 64
MAX_SEGMENTS_PER_CYCLE = 8
MAX_BACKOFF = 5.0


def copy_durable(src: str, dst: str, *, keep_mtime: bool = True,
                 limit: int | None = None) -> int:
    """Publishes a copy of file ``src`` (its first ``limit`` bytes) at ``dst``:
    ``dst.tmp``, fsync, rename, fsync of dst's directory. Returns the bytes
    copied. FileNotFoundError if ``src`` vanished."""
    tmp = dst + ".tmp"
    n = 0
    with open(src, "rb") as fin:
        st = os.fstat(fin.fileno())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while limit is None or n < limit:
                want = COPY_CHUNK if limit is None else min(COPY_CHUNK, limit - n)
                buf = fin.read(want)
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


# ---- names and pieces ---------------------------------------------------------------
def timeline_key(tl: int) -> str:
    return f"timelines/{tl:08x}.json"


def piece_key(tl: int, seg: int, first: int, last: int, kind: str, t: float) -> str:
    """``t``: the time of the piece's last mark (every record in it was
    acknowledged by then), in milliseconds, so that a listing says it."""
    return f"wal/{tl:08x}/{seg:016x}/{first:016x}-{last:016x}-{int(t * 1000):013d}.{kind}"


@dataclass(frozen=True)
class PieceName:
    key: str
    timeline: int
    segment: int
    first: int
    last: int
    kind: str  # "chunk" or "seg"
    size: int
    time: float  # every record in it was acknowledged by then


def parse_piece_key(key: str, size: int = 0) -> PieceName | None:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "wal":
        return None
    try:
        tl = int(parts[1], 16)
        seg = int(parts[2], 16)
        rng, _, kind = parts[3].partition(".")
        a, b, t = rng.split("-")
        first, last, ms = int(a, 16), int(b, 16), int(t)
    except ValueError:
        return None
    if kind not in ("chunk", "seg"):
        return None
    return PieceName(key, tl, seg, first, last, kind, size, ms / 1000.0)


def encode_piece(header: dict, data: bytes) -> bytes:
    header = {**header, "length": len(data), "crc32c": _crc.crc32c(data)}
    h = json.dumps(header, sort_keys=True).encode()
    return PIECE_MAGIC + struct.pack("<I", len(h)) + h + data


def decode_piece(blob: bytes, where: str = "piece") -> tuple[dict, bytes]:
    """(header, data); CorruptionError if the object is damaged."""
    from .errors import CorruptionError

    if len(blob) < 12 or blob[:8] != PIECE_MAGIC:
        raise CorruptionError(f"the archived object {where} is not a WAL piece (bad magic)",
                              path=where)
    (hlen,) = struct.unpack_from("<I", blob, 8)
    try:
        header = json.loads(blob[12:12 + hlen])
    except ValueError:
        raise CorruptionError(f"the archived object {where} has a damaged header",
                              path=where) from None
    data = blob[12 + hlen:]
    if len(data) != header.get("length") or _crc.crc32c(data) != header.get("crc32c"):
        raise CorruptionError(f"the archived object {where} is damaged (length or CRC32C of "
                              "its bytes does not match its header)", path=where)
    return header, data


def list_pieces(store: Store, tl: int | None = None) -> list[PieceName]:
    prefix = "wal/" if tl is None else f"wal/{tl:08x}/"
    out = []
    for key, size in store.list(prefix):
        p = parse_piece_key(key, size)
        if p is not None:
            out.append(p)
    out.sort(key=lambda p: (p.timeline, p.first, -p.last, p.kind != "seg"))
    return out


def read_archive_marker(store: Store) -> dict | None:
    try:
        return json.loads(store.get(ARCHIVE_MARKER))
    except FileNotFoundError:
        return None
    except ValueError:
        raise ArchiveError(f"{store.url}/{ARCHIVE_MARKER} is unreadable") from None


def ensure_archive(store: Store, system_id: int, marker: dict | None, *,
                   create: bool = True) -> dict:
    """The archive's marker, created if missing (``create``); ArchiveError if
    the archive belongs to another system."""
    store.check()
    m = read_archive_marker(store)
    if m is None:
        if not create:
            raise ArchiveError(f"{store.url} is not a walstate archive (no {ARCHIVE_MARKER})")
        store.put(ARCHIVE_MARKER, json.dumps({
            "archive_version": ARCHIVE_VERSION, "system_id": system_id, "marker": marker,
            "created_at": time.time()}, sort_keys=True).encode(), if_absent=True)
        m = read_archive_marker(store) or {}
    if int(m.get("system_id", -1)) != system_id:
        raise ArchiveError(f"the WAL archive {store.url} belongs to system_id "
                           f"{m.get('system_id')}, this directory is {system_id}: give each "
                           "data directory its own archive")
    if int(m.get("archive_version", 0)) > ARCHIVE_VERSION:
        raise ArchiveError(f"the archive {store.url} has layout version "
                           f"{m.get('archive_version')}; this walstate knows {ARCHIVE_VERSION}")
    return m


def list_timelines(store: Store) -> dict[int, dict]:
    out = {}
    for key, _size in store.list("timelines/"):
        name = key.rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        try:
            tl = int(name[:-5], 16)
            out[tl] = json.loads(store.get(key))
        except (ValueError, FileNotFoundError):
            continue
    return out


def timeline_chain(timelines: dict[int, dict], tl: int) -> list[tuple[int, int | None]]:
    """[(timeline, last LSN of it that the history of ``tl`` uses or None)],
    oldest first."""
    chain: list[tuple[int, int | None]] = []
    bound: int | None = None
    seen = set()
    cur: int | None = tl
    while cur is not None and cur not in seen:
        seen.add(cur)
        chain.append((cur, bound))
        meta = timelines.get(cur) or {}
        parent = meta.get("parent")
        bound = int(meta.get("branch_lsn") or 0) if parent is not None else None
        cur = int(parent) if parent is not None else None
    chain.reverse()
    return chain


def read_timeline_file(layout: Layout) -> dict | None:
    return read_json(os.path.join(layout.root, TIMELINE_FILE))


def write_timeline_file(root: str, data: dict) -> None:
    write_atomic(os.path.join(root, TIMELINE_FILE), json.dumps(data, sort_keys=True).encode())


def pending_timeline(layout: Layout, branch_lsn: int) -> dict:
    """The TIMELINE of a copy of ``layout``'s directory holding its history up
    to ``branch_lsn``: a new timeline, claimed when the copy first ships."""
    cur = read_timeline_file(layout)
    if cur is None:
        return {"timeline": None, "parent": 1, "branch_lsn": branch_lsn, "token": None}
    if cur.get("timeline") is not None:
        return {"timeline": None, "parent": int(cur["timeline"]), "branch_lsn": branch_lsn,
                "token": None}
    # a copy of a copy that never shipped: its own records after the branch are
    # not in the archive, the new copy ships them on its own timeline
    return {"timeline": None, "parent": cur.get("parent"),
            "branch_lsn": min(int(cur.get("branch_lsn") or 0), branch_lsn), "token": None}


def claim_timeline(store: Store, layout: Layout, last_lsn: int) -> int:
    """The timeline this directory ships to, claimed in the archive (and
    recorded in DIR/TIMELINE) if needed; see the module doc."""
    cur = read_timeline_file(layout)
    if cur is None:
        cur = {"timeline": 1, "parent": None, "branch_lsn": 0,
               "token": secrets.token_hex(16)}
        write_timeline_file(layout.root, cur)
    existing = list_timelines(store)
    tl = cur.get("timeline")
    if tl is not None and cur.get("token"):
        meta = existing.get(int(tl))
        if meta is not None and meta.get("token") == cur["token"]:
            return int(tl)
        if meta is None:
            if _put_timeline(store, int(tl), cur, layout):
                return int(tl)
            existing = list_timelines(store)
            if (existing.get(int(tl)) or {}).get("token") == cur["token"]:
                return int(tl)
        # another directory ships this history already: this one is a copy that
        # goes on from here on a timeline of its own
        log.warning("timeline %d of %s belongs to another directory: %s starts a new one "
                    "at LSN %d", tl, store.url, layout.root, last_lsn)
        cur = {"timeline": None, "parent": int(tl), "branch_lsn": last_lsn, "token": None}
    for _ in range(50):
        new = max(existing, default=0) + 1
        cand = {"timeline": new, "parent": cur.get("parent"),
                "branch_lsn": int(cur.get("branch_lsn") or 0), "token": secrets.token_hex(16)}
        if _put_timeline(store, new, cand, layout):
            write_timeline_file(layout.root, cand)
            log.info("%s ships to %s as timeline %d (from timeline %s at LSN %d)",
                     layout.root, store.url, new, cand["parent"], cand["branch_lsn"])
            return new
        existing = list_timelines(store)
    raise ArchiveError(f"could not claim a timeline in {store.url}")


def _put_timeline(store: Store, tl: int, cur: dict, layout: Layout) -> bool:
    body = json.dumps({"timeline": tl, "parent": cur.get("parent"),
                       "branch_lsn": int(cur.get("branch_lsn") or 0), "token": cur["token"],
                       "created_at": time.time(), "source": layout.root}, sort_keys=True)
    if not store.put(timeline_key(tl), body.encode(), if_absent=True):
        return False
    try:  # read back: a store without conditional writes may have let a rival through
        return json.loads(store.get(timeline_key(tl))).get("token") == cur["token"]
    except (FileNotFoundError, ValueError):
        return False


def read_status(layout: Layout) -> dict | None:
    """The persisted archiving state of a data directory (None: never archived)."""
    return read_json(layout.archive_status)


def check_archive_dir(archive_dir: str, system_id: int, create: bool) -> None:
    """Makes sure ``archive_dir`` is this system's archive (creating it if
    ``create``). WalStateError if it belongs to another system."""
    store = open_store(archive_dir)
    if not create and read_archive_marker(store) is None:
        if os.path.isdir(archive_dir):
            return
        raise FileNotFoundError(2, "no WAL archive here", archive_dir)
    ensure_archive(store, system_id, None, create=create)


def _segment_prev_lsn(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(SEGMENT_HEADER)
    except OSError:
        return None
    if len(head) < SEGMENT_HEADER:
        return None
    return struct.unpack_from("<Q", head, 48)[0]


# ---- the shipper ------------------------------------------------------------------
class Archiver:
    """Ships the WAL of one open writer to its archive (see the module doc).

    ``start(wal)`` starts the thread, ``stop()`` ends it (one last upload if
    the store works); ``before_remove`` is called by the checkpointer."""

    def __init__(self, location: str, layout: Layout, system_id: int, config: Any) -> None:
        self.location = normalize(location)
        self.store = open_store(self.location)
        self.layout = layout
        self.system_id = system_id
        self.interval = float(getattr(config, "archive_interval", 1.0))
        self.max_lag_bytes = getattr(config, "max_archive_lag_bytes", None)
        self.backup_bytes = getattr(config, "archive_backup_bytes", None)
        self.period = max(min(self.interval / 2, 5.0), 0.01)
        self.margin = min(0.02, self.interval / 20)
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wal: Any = None
        self._ready = False
        self.timeline: int | None = None
        self.next_lsn = 1
        self._pieces: dict[int, list[list[Any]]] = {}  # seg -> [[key, first, last, kind, marks]]
        self._seg_end: dict[int, int] = {}
        self._pending_since: float | None = None
        self._since_backup = 0
        self._need_backup = False
        self._backup_proc: subprocess.Popen | None = None
        self._backup_started = 0.0
        self._saved_at = 0.0
        self._busy_since: float | None = None
        self._local_errors = 0
        self._caught_up_at = time.time()
        if isinstance(self.store, S3Store):
            # boto3's import and client set-up take a few hundred ms holding the GIL:
            # here, in open(), rather than in the shipper while writers run
            try:
                self.store.client  # noqa: B018
            except ArchiveError as exc:
                log.error("WAL archive %s: %s", self.location, exc)
        old = read_status(layout) or {}
        same = old.get("url") == self.location
        self.status: dict[str, Any] = {
            "url": self.location,
            "dir": self.location,
            "timeline": None,
            "archived_lsn": int(old.get("archived_lsn", 0)) if same else 0,
            "last_archived_lsn": int(old.get("archived_lsn", 0)) if same else 0,
            "archived_segments": int(old.get("archived_segments", 0)) if same else 0,
            "uploads": 0,
            "bytes_uploaded": 0,
            "failures": int(old.get("failures", 0)) if same else 0,
            "last_error": old.get("last_error") if same else None,
            "last_error_at": old.get("last_error_at") if same else None,
            "last_upload_at": old.get("last_upload_at") if same else None,
            "lag_bytes": 0,
            "lag_seconds": 0.0,
            "failing": False,
            "abandoned": bool(old.get("abandoned", False)) if same else False,
            "holes": list(old.get("holes", []))[-20:] if same else [],
            "base_backups": int(old.get("base_backups", 0)) if same else 0,
            "last_backup_error": None,
        }

    @classmethod
    def from_config(cls, config: Any, layout: Layout, system_id: int) -> Archiver | None:
        loc = getattr(config, "archive", None) or config.archive_dir
        if loc is None or config.read_only:
            return None
        return cls(loc, layout, system_id, config)

    # ---- control ------------------------------------------------------------------
    def start(self, wal: Any) -> None:
        if self._thread is not None or wal is None:
            return
        self._wal = wal
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="walstate-archiver",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        t = self._thread
        if t is None:
            return
        self._stop.set()
        if t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.warning("the WAL archiver did not finish its last upload within %.0f s "
                            "(the store is slow or down); what it missed ships at the next "
                            "open", timeout)
        self._thread = None
        self._save(force=True)

    def wait_archived(self, lsn: int | None = None, timeout: float = 30.0) -> bool:
        """Waits until every record up to ``lsn`` (default: the durable LSN now) is
        in the archive; False on timeout. For tests and tools, never for writers."""
        if lsn is None:
            lsn = self._durable_lsn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._mu:
                if self._ready and self.status["archived_lsn"] >= lsn:
                    return True
            time.sleep(0.01)
        return False

    def info(self) -> dict[str, Any]:
        with self._mu:
            out = dict(self.status)
            now = time.time()
            caught_up = self._caught_up_at
            busy = self._busy_since
        # every record durable at _caught_up_at is archived: a newer durable one
        # has waited at most since then
        try:
            durable = self._durable_lsn()
        except Exception:  # noqa: BLE001 - closed: what the shipper last knew
            durable = out["archived_lsn"]
        out["lag_seconds"] = (max(now - caught_up, 0.0) if durable > out["archived_lsn"]
                              else 0.0)
        stall = max(5.0, 4 * self.interval)
        if busy is not None and now - busy > stall and not out["failing"]:
            # an upload that hangs (a store that stopped answering) shows before
            # the client's timeouts end it
            out["failing"] = True
            out["last_error"] = (f"an upload to {self.location} has been waiting for "
                                 f"{now - busy:.0f} s: the store is slow or unreachable")
        return out

    # ---- the loop -----------------------------------------------------------------
    def _loop(self) -> None:
        backoff = self.period
        while True:
            t0 = time.monotonic()
            ok = self._cycle()
            if self._stop.is_set():
                if ok:
                    self._cycle()  # what became durable meanwhile (close flushed it)
                return
            if ok:
                backoff = self.period
                wait = self.period - (time.monotonic() - t0)
            else:
                backoff = min(backoff * 2, MAX_BACKOFF)
                wait = backoff
            if wait > 0:
                self._stop.wait(wait)

    def _cycle(self) -> bool:
        self._busy_since = time.time()
        try:
            return self._cycle_inner()
        finally:
            self._busy_since = None

    def _cycle_inner(self) -> bool:
        try:
            if not self._ready:
                self._setup()
            self._ship()
            self._consolidate()
            self._maybe_backup()
        except Exception as exc:  # noqa: BLE001 - the shipper must survive anything
            if not isinstance(exc, (ArchiveError, OSError, WalStateError)):
                log.exception("WAL archiver: unexpected error")
            self._failed(exc)
            return False
        with self._mu:
            if self.status["failing"]:
                log.warning("WAL archiving to %s works again", self.location)
            self.status["failing"] = False
        self._save()
        return True

    def _failed(self, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, ArchiveError) else f"archiving to {self.location}: {exc}"
        lag = self._estimate_lag_bytes()
        with self._mu:
            first = not self.status["failing"]
            self.status.update(failing=True, last_error=msg, last_error_at=time.time(),
                               failures=self.status["failures"] + 1)
            if lag is not None:
                self.status["lag_bytes"] = max(lag, self.status["lag_bytes"])
            if self._pending_since is None:
                self._pending_since = time.time()
        if first:
            log.error("WAL archiving failed: %s; the WAL stays on local disk and shipping "
                      "resumes by itself", msg)
        self._save(force=first)

    def _estimate_lag_bytes(self) -> int | None:
        """Local WAL bytes holding records not yet archived (segment files; the
        newest one up to where the writer is)."""
        try:
            st = self._wal.stats() if self._wal is not None else None
            segs = list_segments(self.layout.wal)
        except Exception:  # noqa: BLE001 - an estimate only
            return None
        with self._mu:
            nxt = self.next_lsn
        total = 0
        for i, (first, path) in enumerate(segs):
            nxt_first = segs[i + 1][0] if i + 1 < len(segs) else None
            if nxt_first is not None and nxt_first <= nxt:
                continue
            if nxt_first is None and st is not None and st.get("seg_first_lsn") == first:
                total += int(st.get("seg_end") or 0)
                continue
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < 2.0:
            return
        self._saved_at = now
        try:
            with self._mu:
                data = json.dumps(self.status, sort_keys=True).encode()
            write_atomic(self.layout.archive_status, data)
        except OSError as exc:  # the in-memory state (info()) still says it all
            log.error("cannot write %s: %s", self.layout.archive_status, exc)

    # ---- set-up: marker, timeline, what the archive already holds ---------------
    def _setup(self) -> None:
        marker = read_marker(self.layout)
        ensure_archive(self.store, self.system_id, marker, create=True)
        last = self._durable_lsn()
        tl = claim_timeline(self.store, self.layout, last)
        tlf = read_timeline_file(self.layout) or {}
        pieces = list_pieces(self.store, tl)
        by_seg: dict[int, list[list[Any]]] = {}
        top = 0
        for p in pieces:
            by_seg.setdefault(p.segment, []).append([p.key, p.first, p.last, p.kind, None])
            top = max(top, p.last)
        if top:
            nxt = top + 1
        elif tlf.get("parent") is not None:
            nxt = int(tlf.get("branch_lsn") or 0) + 1
        else:
            nxt = 1
        newest_base = 0
        for b in list_base_backups(self.store):
            if b.get("timeline") == tl:
                newest_base = max(newest_base, int(b.get("lsn", 0)))
        segs = list_segments(self.layout.wal)
        since = sum(p.size for p in pieces if p.first > newest_base)
        with self._mu:
            self._since_backup = since
            self.timeline = tl
            self._pieces = by_seg
            self.next_lsn = nxt
            self.status.update(timeline=tl, archived_lsn=max(nxt - 1, 0),
                               last_archived_lsn=max(nxt - 1, 0))
            # the archive cannot restore this history from its start by itself: a
            # base backup is needed (an archive set at creation starts at LSN 1)
            if not newest_base and tlf.get("parent") is None:
                start = pieces[0].first if pieces else (segs[0][0] if segs else 1)
                self._need_backup = start > 1
        self._ready = True

    def _durable_lsn(self) -> int:
        wal = self._wal
        if wal is None:
            return 0
        return int(wal.stats()["durable_lsn"])

    # ---- shipping -----------------------------------------------------------------
    def _ship(self) -> None:
        durable = self._durable_lsn()  # read first: what is <= it was durable by now
        t_obs = time.time()
        with self._mu:
            nxt = self.next_lsn
        if durable < nxt:
            with self._mu:
                self._caught_up_at = t_obs
                self._pending_since = None
                self.status["lag_bytes"] = 0
            return
        segs = list_segments(self.layout.wal)
        if not segs:
            return
        if nxt < segs[0][0]:
            prev = _segment_prev_lsn(segs[0][1])
            if prev is not None and prev >= nxt and nxt > 1:  # removed unarchived: a hole
                self._hole(nxt, segs[0][0] - 1)
            nxt = segs[0][0]
        # the C reader checks every record's CRC and finds the boundaries; a batch
        # holds records of one segment, payload i at off[i] (its header 28 before)
        batches: list[tuple[int, int, int, int]] = []  # first lsn, last lsn, start, end
        try:
            with WalReader(self.layout.wal, self.system_id, nxt) as r:
                for _data, n, lsn, _typ, off, ln in r.iter_arrays():
                    k = n
                    if lsn[n - 1] > durable:
                        k = 0
                        while k < n and lsn[k] <= durable:
                            k += 1
                    if k == 0:
                        break
                    batches.append((lsn[0], lsn[k - 1], off[0] - RECORD_HEADER,
                                    off[k - 1] + ln[k - 1]))
                    if k < n or len(batches) > 64 * MAX_SEGMENTS_PER_CYCLE:
                        break
            # listed after reading: every segment the reader saw is in it (a
            # segment made meanwhile too); a batch belongs to the newest segment
            # starting at or below its first LSN
            segs = list_segments(self.layout.wal)
        except (OSError, WalStateError) as exc:
            # the writer rotates segments and checkpoints remove them while this
            # reads: a transient local error is retried quietly a few times
            self._local_errors += 1
            if self._local_errors >= 3:
                raise WalStateError(f"reading the local WAL to archive it: {exc}") from exc
            log.debug("archiver: reading the WAL: %s (retrying)", exc)
            return
        firsts = [f for f, _p in segs]
        groups: list[list[int]] = []  # [seg, start_off, end_off, first, last]
        later_seen: set[int] = set()
        for first, last, start, end in batches:
            i = bisect.bisect_right(firsts, first) - 1
            if i < 0:
                break
            seg = firsts[i]
            if groups and groups[-1][0] == seg:
                if groups[-1][2] != start:  # not contiguous: stop here, next cycle
                    break
                groups[-1][2] = end
                groups[-1][4] = last
                continue
            if groups:
                later_seen.add(groups[-1][0])
            if len(groups) >= MAX_SEGMENTS_PER_CYCLE:
                break
            groups.append([seg, 0 if first == seg else start, end, first, last])
        self._local_errors = 0
        if not groups:
            return
        with self._mu:
            if self._pending_since is None:
                self._pending_since = t_obs
            self.status["lag_bytes"] = sum(g[2] - g[1] for g in groups)
        paths = dict(segs)
        stamp = t_obs + self.margin
        for seg, start, end, first, last in groups:
            path = paths.get(seg)
            if path is None:
                raise WalStateError(f"the WAL segment {seg:016x} vanished while archiving")
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            if len(data) != end - start:
                raise WalStateError(f"short read of {path} while archiving")
            whole = start == 0 and seg in later_seen
            marks = [[last, stamp]]
            kind = "seg" if whole else "chunk"
            key = piece_key(self.timeline or 1, seg, first, last, kind, stamp)
            blob = encode_piece({"archive_version": ARCHIVE_VERSION, "system_id": self.system_id,
                                 "timeline": self.timeline, "segment": seg, "offset": start,
                                 "first_lsn": first, "last_lsn": last, "marks": marks}, data)
            self.store.put(key, blob)
            with self._mu:
                lst = self._pieces.setdefault(seg, [])
                lst.append([key, first, last, kind, marks])
                self._seg_end[seg] = end
                self.next_lsn = last + 1
                self.status["archived_lsn"] = last
                self.status["last_archived_lsn"] = last
                self.status["uploads"] += 1
                self.status["bytes_uploaded"] += len(blob)
                self.status["last_upload_at"] = time.time()
                self.status["lag_bytes"] = max(self.status["lag_bytes"] - len(data), 0)
                self._since_backup += len(data)
                if kind == "seg":
                    self.status["archived_segments"] += 1
        with self._mu:
            if self.next_lsn > durable:
                self._caught_up_at = t_obs
                self._pending_since = None
                self.status["lag_bytes"] = 0

    def _marks_of(self, seg: int) -> list[list[float]]:
        marks: list[list[float]] = []
        for p in self._pieces.get(seg, []):
            if p[4] is None:
                header, _data = decode_piece(self.store.get(p[0]), p[0])
                p[4] = header.get("marks") or [[p[2], header.get("t", 0)]]
            marks.extend(p[4])
        return marks

    def _consolidate(self) -> None:
        """Uploads each complete segment shipped as chunks whole and deletes its chunks."""
        with self._mu:
            nxt = self.next_lsn
            todo = [s for s, ps in self._pieces.items()
                    if any(p[3] == "chunk" for p in ps) and not any(p[3] == "seg" for p in ps)]
        segs = list_segments(self.layout.wal)
        paths = dict(segs)
        firsts = [f for f, _p in segs]
        for seg in sorted(todo):
            later = [f for f in firsts if f > seg]
            ps = sorted(self._pieces[seg], key=lambda p: p[1])
            if not later or nxt < later[0] or seg not in paths:
                continue
            if ps[0][1] != seg:  # its start is not in the archive: leave the chunks
                continue
            end = self._seg_end.get(seg)
            last = ps[-1][2]
            if end is None:  # shipped before this process: find the end by reading
                end = self._end_offset(seg, last)
                if end is None:
                    continue
            marks = self._marks_of(seg)
            with open(paths[seg], "rb") as f:
                data = f.read(end)
            if len(data) != end:
                continue
            key = piece_key(self.timeline or 1, seg, seg, last, "seg",
                            max((m[1] for m in marks), default=time.time()))
            self.store.put(key, encode_piece({
                "archive_version": ARCHIVE_VERSION, "system_id": self.system_id,
                "timeline": self.timeline, "segment": seg, "offset": 0, "first_lsn": seg,
                "last_lsn": last, "marks": marks}, data))
            old = [p[0] for p in ps if p[3] == "chunk"]
            with self._mu:
                self._pieces[seg] = [[key, seg, last, "seg", marks]]
                self.status["archived_segments"] += 1
                self.status["uploads"] += 1
            self.store.delete(old)
            # forget old segments (their state is no longer needed)
            for s in [s for s in self._pieces if s < seg and s not in paths]:
                self._pieces.pop(s, None)
                self._seg_end.pop(s, None)

    def _end_offset(self, seg: int, last: int) -> int | None:
        with WalReader(self.layout.wal, self.system_id, seg) as r:
            for rec in r:
                if rec.segment != seg:
                    break
                if rec.lsn == last:
                    return rec.offset + RECORD_HEADER + len(rec.payload)
        return None

    def _hole(self, first: int, last: int) -> None:
        with self._mu:
            if self.status["holes"] and self.status["holes"][-1][0] == first:
                return
            self.status["holes"] = (self.status["holes"] + [[first, last]])[-20:]
            self.status["abandoned"] = True
        log.critical("WAL ARCHIVE HOLE: LSNs %d..%d were removed before they were archived; "
                     "point-in-time restore cannot cross them: take a new base backup",
                     first, last)

    # ---- base backups by policy ---------------------------------------------------
    def _maybe_backup(self) -> None:
        proc = self._backup_proc
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return
            self._backup_proc = None
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            if rc == 0:
                with self._mu:
                    self.status["base_backups"] += 1
                    self.status["last_backup_error"] = None
                log.info("base backup into %s done", self.location)
            else:
                with self._mu:
                    self.status["last_backup_error"] = out.strip()[-500:]
                    self._need_backup = True
                log.error("automatic base backup into %s failed: %s", self.location,
                          out.strip()[-500:])
                self._backup_started = time.monotonic()
            return
        due = self._need_backup or (self.backup_bytes is not None
                                    and self._since_backup >= self.backup_bytes)
        if not due or time.monotonic() - self._backup_started < 30.0 and self._need_backup \
                and self._backup_started:
            return
        self._need_backup = False
        self._since_backup = 0
        self._backup_started = time.monotonic()
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        self._backup_proc = subprocess.Popen(
            [sys.executable, "-m", "walstate.ops.cli", "backup", self.layout.root,
             self.location, "--label", "auto", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, close_fds=True)

    # ---- what a checkpoint may remove -----------------------------------------------
    def before_remove(self, lsn: int) -> int:
        """The LSN to pass to ``Wal.remove_below`` so that only archived segments go
        (or all of them past max_archive_lag_bytes). Never raises."""
        todo, keep_first = removable_segments(self.layout.wal, lsn)
        if keep_first is None:
            return 0
        if not todo:
            return keep_first - 1
        with self._mu:
            nxt = self.next_lsn if self._ready else 0
        firsts = [f for f, _p in todo] + [keep_first]
        done = 0
        for i in range(len(todo)):
            if nxt >= firsts[i + 1]:
                done += 1
            else:
                break
        bound = firsts[done] - 1
        lag = 0
        for _first, path in todo[done:]:
            try:
                lag += os.path.getsize(path)
            except OSError:
                pass
        if done < len(todo) and self.max_lag_bytes is not None and lag > self.max_lag_bytes:
            hole = [max(nxt, todo[done][0]), keep_first - 1]
            with self._mu:
                self.status["holes"] = (self.status["holes"] + [hole])[-20:]
                self.status["abandoned"] = True
                self.next_lsn = max(self.next_lsn, keep_first)
            log.critical(
                "WAL ARCHIVE ABANDONED: %d bytes of WAL wait for the archive, more than "
                "max_archive_lag_bytes=%d; removing them WITHOUT archiving. The archive "
                "now misses LSNs %d..%d: point-in-time restore cannot cross them; fix the "
                "archive and take a new backup", lag, self.max_lag_bytes, hole[0], hole[1])
            self._save(force=True)
            return lsn
        return bound


# ---- base backups in the archive ----------------------------------------------------
def base_prefix(tl: int, lsn: int, created_at: float) -> str:
    return f"base/{tl:08x}-{lsn:016x}-{int(created_at * 1000):013d}"


def list_base_backups(store: Store) -> list[dict]:
    """The complete base backups (those with a MANIFEST.json), oldest first."""
    out = []
    for key, _size in store.list("base/"):
        if key.endswith("/MANIFEST.json") and key.count("/") == 2:
            try:
                m = json.loads(store.get(key))
            except (FileNotFoundError, ValueError):
                continue
            m["prefix"] = key.rsplit("/", 1)[0]
            out.append(m)
    out.sort(key=lambda m: (m.get("created_at", 0), m.get("lsn", 0)))
    return out


__all__ = ["ARCHIVE_VERSION", "Archiver", "check_archive_dir", "copy_durable", "list_pieces",
           "read_status", "removable_segments"]
