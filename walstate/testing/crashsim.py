"""Simulated power loss in user space: trace what a process does to the files
under one directory, then rebuild the disk states a power cut could leave.

The tracer is an LD_PRELOAD library (``_crashsim/preload.c``, compiled here
with the system C compiler on first use) that logs every write, pwrite(v),
fsync, fdatasync, rename, unlink, (f)truncate, fallocate, mkdir and open of a
file under ``root``, with the bytes written. :class:`Trace` reads that log;
:func:`crash_states` replays it against a model of a POSIX file system and,
at chosen points, writes out a directory as the disk could hold it after a
power cut there:

``durable``
    only what was made durable: file data up to its last fsync/fdatasync
    (or written through an ``O_DSYNC`` descriptor), and directory entries
    (create, rename, unlink, mkdir) whose directory was fsynced after them.
``subset``
    durable, plus a random subset of the unsynced writes, and a random
    subset of the unsynced directory operations (in order).
``torn``
    every unsynced operation kept except the last write, which is torn at
    512-byte sectors (a random subset of its sectors landed).
``zeros`` / ``garbage``
    unsynced writes lost but the file sizes they grew kept (the inode
    reached the journal, the data did not): the newly grown space reads as
    zeros, or as garbage.

This models what POSIX promises, not one file system: it is stricter than
ext4 (which orders metadata in its journal), so a program that survives it
survives those too.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["FLAVORS", "CrashState", "Trace", "build_preload", "crash_states", "read_tree"]

FLAVORS = ("durable", "subset", "torn", "zeros", "garbage")
SECTOR = 512

# event types (preload.c)
OPEN, CLOSE, WRITE, FSYNC, FDATASYNC, MSYNC, RENAME, UNLINK, RMDIR, TRUNCATE, FTRUNCATE, \
    FALLOCATE, MKDIR, MARK, SYNCALL = range(1, 16)
NAMES = {v: k for k, v in dict(
    OPEN=OPEN, CLOSE=CLOSE, WRITE=WRITE, FSYNC=FSYNC, FDATASYNC=FDATASYNC, MSYNC=MSYNC,
    RENAME=RENAME, UNLINK=UNLINK, RMDIR=RMDIR, TRUNCATE=TRUNCATE, FTRUNCATE=FTRUNCATE,
    FALLOCATE=FALLOCATE, MKDIR=MKDIR, MARK=MARK, SYNCALL=SYNCALL).items()}
_REC = struct.Struct("<6I2Q")
O_CREAT, O_TRUNC, O_DSYNC, O_SYNC_BITS = os.O_CREAT, os.O_TRUNC, os.O_DSYNC, os.O_SYNC
FALLOC_FL_KEEP_SIZE = 1

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_crashsim", "preload.c")
_build_mu = threading.Lock()


def build_preload(cache_dir: str | None = None) -> str:
    """Compiles the tracer (once per source version) and returns the path of the
    shared library. Raises RuntimeError if no C compiler works here."""
    with open(_SOURCE, "rb") as f:
        src = f.read()
    tag = hashlib.sha256(src).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"walstate-crashsim-{os.getuid()}")
    out = os.path.join(cache_dir, f"crashsim-{tag}.so")
    with _build_mu:
        if os.path.exists(out):
            return out
        os.makedirs(cache_dir, exist_ok=True)
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or \
            shutil.which("clang")
        if cc is None:
            raise RuntimeError("crashsim needs a C compiler (gcc, cc or clang) to build its "
                               "LD_PRELOAD tracer")
        tmp = f"{out}.{os.getpid()}.tmp"
        res = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", tmp,
                              _SOURCE, "-ldl", "-lpthread"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the crashsim tracer failed:\n{res.stderr}")
        os.replace(tmp, out)
    return out


def preload_env(lib: str, root: str, trace: str, mark: str) -> dict[str, str]:
    """Environment variables that make a child process trace ``root``."""
    pre = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{lib} {pre}".strip(), "CRASHSIM_ROOT": os.path.realpath(root),
            "CRASHSIM_TRACE": trace, "CRASHSIM_MARK": mark}


@dataclass(frozen=True)
class Event:
    type: int
    fd: int
    flags: int
    path: str
    path2: str
    offset: int
    length: int
    data: bytes

    def __str__(self) -> str:
        extra = f" -> {self.path2}" if self.path2 else ""
        return (f"{NAMES.get(self.type, self.type)} fd={self.fd} {self.path}{extra} "
                f"off={self.offset} len={self.length} flags={self.flags:#o}")


class Trace:
    """The events of one trace file, in order."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            raw = f.read()
        self.events: list[Event] = []
        o = 0
        while o + _REC.size <= len(raw):
            t, fd, fl, pl, p2l, _pad, off, ln = _REC.unpack_from(raw, o)
            o += _REC.size
            p = raw[o:o + pl].decode("utf-8", "surrogateescape")
            o += pl
            p2 = raw[o:o + p2l].decode("utf-8", "surrogateescape")
            o += p2l
            data = b""
            if t in (WRITE, MARK):
                data = raw[o:o + ln]
                o += ln
            if fd == 0xFFFFFFFF:
                fd = -1
            self.events.append(Event(t, fd, fl, p, p2, off, ln, data))
        self.truncated = o != len(raw)

    def __len__(self) -> int:
        return len(self.events)

    def marks(self) -> list[tuple[int, str]]:
        """(event index, line) of every mark line, in order."""
        out = []
        for i, e in enumerate(self.events):
            if e.type == MARK:
                for line in e.data.decode("utf-8", "replace").splitlines():
                    if line:
                        out.append((i, line))
        return out


# ---- the file system model ------------------------------------------------------------------

@dataclass
class _Op:
    """An unsynced data operation on one inode."""

    kind: str            # "w" write, "t" truncate, "a" fallocate (size-growing)
    offset: int
    data: bytes = b""
    size: int = 0        # "t": new size; "a": end offset
    forced: bool = False  # durable on its own (O_DSYNC descriptor)
    seq: int = 0


@dataclass
class _Inode:
    ino: int
    is_dir: bool
    durable: bytearray = field(default_factory=bytearray)
    pending: list[_Op] = field(default_factory=list)


@dataclass
class _DirOp:
    """An entry change not yet known durable: ("link", path, ino), ("unlink", path),
    ("rename", old, new)."""

    kind: str
    a: str
    b: str = ""
    ino: int = 0
    dirs: tuple[int, ...] = ()
    durable: bool = False
    seq: int = 0


def _parent(p: str) -> str:
    return os.path.dirname(p)


class _Model:
    def __init__(self, root: str, initial: dict[str, bytes | None]) -> None:
        self.root = root
        self.inodes: dict[int, _Inode] = {}
        self.ns: dict[str, int] = {}          # current names
        self.base_ns: dict[str, int] = {}     # names durable before any pending dir op
        self.dirops: list[_DirOp] = []
        self.fds: dict[int, tuple[int, bool]] = {}  # fd -> (ino, O_DSYNC)
        self.seq = 0
        self.unmodelled: list[str] = []
        self._new(root, None)
        for rel, content in sorted(initial.items()):
            self._new(os.path.join(root, rel) if rel else root, content)
        self.base_ns = dict(self.ns)

    def _new(self, path: str, content: bytes | None) -> int:
        if path in self.ns:
            return self.ns[path]
        ino = len(self.inodes) + 1
        self.inodes[ino] = _Inode(ino, content is None, bytearray(content or b""))
        self.ns[path] = ino
        return ino

    def _dir_ino(self, path: str) -> int:
        return self.ns.get(_parent(path), 0)

    def _dirop(self, op: _DirOp) -> None:
        self.seq += 1
        op.seq = self.seq
        self.dirops.append(op)

    def apply(self, e: Event) -> None:
        t = e.type
        if t == OPEN:
            ino = self.ns.get(e.path)
            if ino is None:
                if not e.flags & O_CREAT:
                    self.unmodelled.append(f"open of an unknown file: {e}")
                ino = len(self.inodes) + 1
                self.inodes[ino] = _Inode(ino, False)
                self.ns[e.path] = ino
                self._dirop(_DirOp("link", e.path, ino=ino, dirs=(self._dir_ino(e.path),)))
            elif e.flags & O_TRUNC:
                self._data(ino, _Op("t", 0, size=0))
            self.fds[e.fd] = (ino, bool(e.flags & (O_DSYNC | O_SYNC_BITS)))
        elif t == CLOSE:
            self.fds.pop(e.fd, None)
        elif t == WRITE:
            ino, dsync = self.fds[e.fd]
            self._data(ino, _Op("w", e.offset, data=e.data, forced=dsync))
        elif t == FTRUNCATE:
            self._data(self.fds[e.fd][0], _Op("t", 0, size=e.offset))
        elif t == TRUNCATE:
            self._data(self.ns[e.path], _Op("t", 0, size=e.offset))
        elif t == FALLOCATE:
            if not e.flags & FALLOC_FL_KEEP_SIZE:
                self._data(self.fds[e.fd][0], _Op("a", e.offset, size=e.offset + e.length))
        elif t in (FSYNC, FDATASYNC):
            self._sync(self.fds[e.fd][0])
        elif t == SYNCALL:
            for ino in list(self.inodes):
                self._sync(ino)
        elif t == MSYNC:
            self.unmodelled.append(f"msync of a shared mapping: {e}")
        elif t == MKDIR:
            ino = len(self.inodes) + 1
            self.inodes[ino] = _Inode(ino, True)
            self.ns[e.path] = ino
            self._dirop(_DirOp("link", e.path, ino=ino, dirs=(self._dir_ino(e.path),)))
        elif t in (UNLINK, RMDIR):
            self._dirop(_DirOp("unlink", e.path, dirs=(self._dir_ino(e.path),)))
            self.ns.pop(e.path, None)
        elif t == RENAME:
            dirs = tuple({self._dir_ino(e.path), self._dir_ino(e.path2)})
            self._dirop(_DirOp("rename", e.path, e.path2, dirs=dirs))
            _rename(self.ns, e.path, e.path2)
        # MARK: nothing on disk

    def _data(self, ino: int, op: _Op) -> None:
        self.seq += 1
        op.seq = self.seq
        node = self.inodes[ino]
        node.pending.append(op)

    def _sync(self, ino: int) -> None:
        node = self.inodes[ino]
        if node.is_dir:
            for d in self.dirops:
                if ino in d.dirs:
                    d.durable = True
            # fold the durable prefix of entry changes into base_ns
            while self.dirops and self.dirops[0].durable:
                _apply_dirop(self.base_ns, self.dirops.pop(0))
            return
        for op in node.pending:
            _apply_data(node.durable, op, None)
        node.pending = []

    # ---- building a crash state --------------------------------------------------------------
    def pending_writes(self) -> list[tuple[int, _Op]]:
        out = [(ino, op) for ino, n in self.inodes.items() for op in n.pending if op.kind == "w"
               and not op.forced]
        out.sort(key=lambda x: x[1].seq)
        return out

    def has_pending(self) -> bool:
        return bool(self.dirops) or any(op for n in self.inodes.values() for op in n.pending
                                        if not op.forced)

    def materialize(self, dest: str, flavor: str, rng: random.Random) -> dict:
        """Writes the crash state ``flavor`` under dest (which mirrors root)."""
        info: dict = {"flavor": flavor, "dropped_writes": 0, "kept_writes": 0,
                      "dropped_dirops": 0, "torn": None}
        ns = dict(self.base_ns)
        for d in self.dirops:
            keep = d.durable
            if not keep and flavor == "subset":
                keep = rng.random() < 0.5
            elif not keep and flavor == "torn":
                keep = True
            if keep:
                _apply_dirop(ns, d)
            else:
                info["dropped_dirops"] += 1
        last = self.pending_writes()
        torn_op = last[-1][1] if flavor == "torn" and last else None
        for path, ino in sorted(ns.items()):
            rel = os.path.relpath(path, self.root)
            out = os.path.join(dest, rel) if rel != "." else dest
            if not os.path.isdir(os.path.dirname(out)) and out != dest:
                continue  # an entry in a directory that did not survive
            node = self.inodes[ino]
            if node.is_dir:
                os.makedirs(out, exist_ok=True)
                continue
            buf = bytearray(node.durable)
            durable_size = len(buf)
            covered: list[tuple[int, int]] = []
            for op in node.pending:
                if op.forced:
                    keep = True
                elif flavor == "durable":
                    keep = False
                elif flavor == "subset":
                    keep = rng.random() < 0.5
                elif flavor == "torn":
                    keep = True
                else:  # zeros / garbage: sizes survive, written data does not
                    keep = op.kind != "w"
                    if op.kind == "w" and op.offset + len(op.data) > len(buf):
                        buf.extend(bytes(op.offset + len(op.data) - len(buf)))
                if op.kind == "w":
                    info["kept_writes" if keep else "dropped_writes"] += 1
                if not keep:
                    continue
                if op is torn_op:
                    info["torn"] = _apply_torn(buf, op, rng, covered)
                else:
                    _apply_data(buf, op, covered)
            if flavor == "garbage" and len(buf) > durable_size:
                for a, b in _gaps(durable_size, len(buf), covered):
                    buf[a:b] = rng.randbytes(b - a)
            with open(out, "wb") as f:
                f.write(buf)
        return info


def _rename(ns: dict[str, int], a: str, b: str) -> None:
    moved = {p: i for p, i in ns.items() if p == a or p.startswith(a + "/")}
    for p in moved:
        ns.pop(p)
    for p in [q for q in ns if q == b or q.startswith(b + "/")]:
        ns.pop(p)
    for p, i in moved.items():
        ns[b + p[len(a):]] = i


def _apply_dirop(ns: dict[str, int], d: _DirOp) -> None:
    if d.kind == "link":
        ns[d.a] = d.ino
    elif d.kind == "unlink":
        for p in [q for q in ns if q == d.a or q.startswith(d.a + "/")]:
            ns.pop(p)
    elif d.a in ns:
        _rename(ns, d.a, d.b)


def _apply_data(buf: bytearray, op: _Op, covered: list[tuple[int, int]] | None) -> None:
    if op.kind == "w":
        end = op.offset + len(op.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[op.offset:end] = op.data
        if covered is not None:
            covered.append((op.offset, end))
    elif op.kind == "t":
        if op.size < len(buf):
            del buf[op.size:]
        else:
            buf.extend(bytes(op.size - len(buf)))
    elif op.kind == "a" and op.size > len(buf):
        if covered is not None:
            covered.append((len(buf), op.size))  # fallocated space reads as zeros
        buf.extend(bytes(op.size - len(buf)))


def _apply_torn(buf: bytearray, op: _Op, rng: random.Random,
                covered: list[tuple[int, int]]) -> dict:
    """Applies a random subset of op's 512-byte sectors (file-aligned)."""
    start, end = op.offset, op.offset + len(op.data)
    sectors = []
    s = start
    while s < end:
        e = min((s // SECTOR + 1) * SECTOR, end)
        sectors.append((s, e))
        s = e
    mode = rng.choice(("prefix", "random"))
    if mode == "prefix":
        n = rng.randrange(len(sectors) + 1)
        kept = sectors[:n]
    else:
        kept = [x for x in sectors if rng.random() < 0.5]
    if kept and kept[-1][1] > len(buf):
        buf.extend(bytes(kept[-1][1] - len(buf)))
    for a, b in kept:
        buf[a:b] = op.data[a - start:b - start]
        covered.append((a, b))
    return {"offset": start, "length": end - start, "sectors": len(sectors),
            "kept": len(kept), "mode": mode}


def _gaps(lo: int, hi: int, covered: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    pos = lo
    for a, b in sorted(covered):
        if b <= pos:
            continue
        if a > pos:
            yield pos, min(a, hi)
        pos = max(pos, b)
        if pos >= hi:
            return
    if pos < hi:
        yield pos, hi


def read_tree(root: str) -> dict[str, bytes | None]:
    """{relative path: content, or None for a directory} of everything under root."""
    out: dict[str, bytes | None] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            out[rel] = None
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.isfile(p):
                continue  # a socket (DIR/CONTROL) has no content
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@dataclass(frozen=True)
class CrashState:
    """One simulated post-crash directory: the world after ``events`` events of
    the trace (so marks up to there were written), rebuilt as ``flavor``."""

    path: str
    events: int
    flavor: str
    info: dict


def crash_points(trace: Trace, n: int, rng: random.Random) -> list[int]:
    """``n`` event counts to crash after: the moments just before and after
    syncs, renames and unlinks are favoured, the rest random."""
    total = len(trace)
    if total == 0:
        return [0]
    interesting = [i for i, e in enumerate(trace.events)
                   if e.type in (FSYNC, FDATASYNC, RENAME, UNLINK, FTRUNCATE, FALLOCATE)]
    pts = {total}
    while len(pts) < min(n, total + 1):
        if interesting and rng.random() < 0.6:
            i = rng.choice(interesting) + rng.choice((0, 1))
        else:
            i = rng.randrange(total + 1)
        pts.add(min(i, total))
    return sorted(pts)


def crash_states(trace: Trace, root: str, initial: dict[str, bytes | None], work: str,
                 points: Sequence[int], flavors: Sequence[str] = FLAVORS,
                 rng: random.Random | None = None) -> Iterator[CrashState]:
    """For each crash point (a number of trace events), yields one directory per
    flavor, under ``work``, mirroring ``root`` as a power cut there could leave
    it. Flavors that would equal ``durable`` (nothing unsynced) are skipped.
    The caller may delete each directory once done with it."""
    rng = rng or random.Random(0)
    model = _Model(os.path.realpath(root), initial)
    todo = sorted(set(points))
    k = 0
    for n in todo:
        while k < n:
            model.apply(trace.events[k])
            k += 1
        if model.unmodelled:
            raise RuntimeError("the trace holds operations crashsim cannot model: "
                               + "; ".join(model.unmodelled[:3]))
        pending = model.has_pending()
        for fl in flavors:
            if fl != "durable" and not pending:
                continue
            dest = os.path.join(work, f"crash-{n:06d}-{fl}")
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            info = model.materialize(dest, fl, rng)
            yield CrashState(dest, n, fl, info)
