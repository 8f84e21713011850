"""The Python face of the C write-ahead log: a writer handle and a reader.

Nothing here frames records or computes CRCs; the C layer does. Every
blocking C call releases the GIL (cffi API mode).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ._native import ffi, lib, raise_for
from .errors import ClosedError, CorruptionError
from .layout import copy_end

SEGMENT_SUFFIX = ".seg"


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record has LSN ``first_lsn``."""
    return f"{first_lsn:016x}{SEGMENT_SUFFIX}"


def list_segments(wal_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(first_lsn, path) of every segment in ``wal_dir``, in LSN order."""
    out = []
    try:
        names = os.listdir(wal_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if len(name) == 20 and name.endswith(SEGMENT_SUFFIX):
            try:
                lsn = int(name[:16], 16)
            except ValueError:
                continue
            if name == segment_name(lsn):
                out.append((lsn, os.path.join(wal_dir, name)))
    out.sort()
    return out


class Wal:
    """An open log for appending. Thread-safe; one per directory.

    ``put``/``delete``/``append`` buffer a record and return its LSN; it is
    durable once ``sync`` covers it. After a failed write or fdatasync the
    log is poisoned: every later call raises EngineFailedError.
    """

    def __init__(self, wal_dir: str, *, system_id: int, segment_size: int,
                 buffer_size: int = 1 << 20, min_next_lsn: int = 1,
                 covered_lsn: int = 0) -> None:
        self.dir = wal_dir
        opt = ffi.new("wal_options_t *")
        opt.system_id = system_id
        opt.segment_size = segment_size
        opt.buffer_size = buffer_size
        opt.min_next_lsn = min_next_lsn
        opt.covered_lsn = covered_lsn
        out = ffi.new("wal_t **")
        rc = lib.wal_open(os.fsencode(wal_dir), opt, out)
        raise_for(rc, "opening the write-ahead log", wal_dir)
        self._h = out[0]
        # calls that run without the GIL outside the engine's lock (sync, flush,
        # stats...) count themselves here; close() waits for them to leave
        self._users = 0
        self._users_cv = threading.Condition(threading.Lock())
        self._lsn = ffi.new("uint64_t *")
        self._put = lib.wal_put
        self._append = lib.wal_append

    def _fail(self, rc: int, what: str) -> None:
        if self._h is None:
            raise ClosedError("the write-ahead log is closed")
        raise_for(rc, what, self.dir, poisoned=self.poisoned())

    def put(self, key: bytes, value: bytes) -> int:
        """Buffers a PUT record; returns its LSN."""
        h = self._h
        if h is None:
            raise ClosedError("the write-ahead log is closed")
        out = ffi.new("uint64_t *")
        rc = self._put(h, key, len(key), value, len(value), out)
        if rc:
            self._fail(rc, "appending to the write-ahead log")
        return out[0]

    def put_serialized(self, key: bytes, value: bytes) -> int:
        """put() for callers that already serialize their appends (the engine
        holds its write lock): reuses one output cell, saving an allocation."""
        h = self._h
        if h is None:
            raise ClosedError("the write-ahead log is closed")
        rc = self._put(h, key, len(key), value, len(value), self._lsn)
        if rc:
            self._fail(rc, "appending to the write-ahead log")
        return self._lsn[0]

    def hot_args(self) -> tuple[int, int, int]:
        """(addresses of wal_put_nowait, of this handle, of wal_sync): the arguments
        of walstate._speedups.Hot.set_wal. Valid until close()."""
        if self._h is None:
            raise ClosedError("the write-ahead log is closed")
        put = int(ffi.cast("uintptr_t", ffi.addressof(lib, "wal_put_nowait")))
        sync = int(ffi.cast("uintptr_t", ffi.addressof(lib, "wal_sync")))
        return put, int(ffi.cast("uintptr_t", self._h)), sync

    def append(self, rtype: int, payload: bytes) -> int:
        """Buffers a record of type ``rtype``; returns its LSN."""
        h = self._h
        if h is None:
            raise ClosedError("the write-ahead log is closed")
        out = ffi.new("uint64_t *")
        rc = self._append(h, rtype, payload, len(payload), ffi.NULL, 0, out)
        if rc:
            self._fail(rc, "appending to the write-ahead log")
        return out[0]

    @contextmanager
    def _use(self) -> Iterator[Any]:
        """The handle, kept open (close() waits) until the block ends."""
        with self._users_cv:
            h = self._h
            if h is None:
                raise ClosedError("the write-ahead log is closed")
            self._users += 1
        try:
            yield h
        finally:
            with self._users_cv:
                self._users -= 1
                if not self._users:
                    self._users_cv.notify_all()

    def sync(self, lsn: int = 0) -> int:
        """Waits until ``lsn`` (0: everything appended) is durable; returns the durable LSN."""
        out = ffi.new("uint64_t *")
        with self._use() as h:
            rc = lib.wal_sync(h, lsn, out)
        if rc:
            self._fail(rc, "syncing the write-ahead log")
        return out[0]

    def flush(self) -> None:
        """Hands buffered records to the OS without fdatasync."""
        with self._use() as h:
            rc = lib.wal_flush(h)
        if rc:
            self._fail(rc, "writing the write-ahead log")

    def remove_below(self, lsn: int) -> tuple[int, int]:
        """Removes segments holding only LSNs <= lsn; returns (bytes, segments) removed."""
        nbytes = ffi.new("uint64_t *")
        nsegs = ffi.new("uint64_t *")
        with self._use() as h:
            rc = lib.wal_remove_below(h, lsn, nbytes, nsegs)
        raise_for(rc, "removing old WAL segments", self.dir)
        return nbytes[0], nsegs[0]

    def stats(self) -> dict[str, int | list[int]]:
        """Counters of the C log (see wal_stats_t)."""
        st = ffi.new("wal_stats_t *")
        with self._use() as h:
            lib.wal_get_stats(h, st)
        out: dict[str, int | list[int]] = {
            name: getattr(st, name) for name in (
                "next_lsn", "written_lsn", "durable_lsn", "appends", "bytes_appended",
                "fsyncs", "writes", "segments_created", "seg_first_lsn", "seg_end",
                "seg_synced", "fsync_ns_total", "fsync_ns_max", "poisoned",
                "open_bytes_read")
        }
        out["end_hint"] = _HINT[st.end_hint]
        out["fsync_hist"] = list(st.fsync_hist)
        return out

    def poisoned(self) -> bool:
        try:
            return self.stats()["poisoned"] != 0
        except ClosedError:
            return False

    def close(self) -> None:
        """Flushes, fdatasyncs and releases the log, once the calls in progress are
        done; idempotent."""
        with self._users_cv:
            h, self._h = self._h, None
            if h is None:
                return
            while self._users:
                self._users_cv.wait()
        rc = lib.wal_close(h)
        raise_for(rc, "closing the write-ahead log", self.dir, poisoned=rc != 0)

    def abandon(self) -> None:
        """Test hook: forget the handle without flushing (as if the process died)."""
        self._h = None


@dataclass(frozen=True)
class Record:
    """One WAL record as read from disk."""

    lsn: int
    type: int
    payload: bytes
    segment: int  # first LSN of the segment holding it
    offset: int   # byte offset of its header in that segment
    synced_lsn: int


@dataclass(frozen=True)
class LogEnd:
    """How reading the log ended.

    status: "clean", "torn" (a torn/garbage tail in the last segment) or
    "error" (``rc`` says which: corruption, mismatch, gap, I/O).
    bytes_read: segment bytes read from disk; end_hint: "used", "ignored" (wal/END
    present but not matching: full scan) or "none" (absent, or not asked for).
    """

    status: str
    rc: int
    last_lsn: int
    expected_lsn: int
    segment: int
    offset: int
    path: str
    cut_bytes: int
    later_segments: int
    found_system_id: int
    segments: int
    bytes: int
    bytes_read: int = 0
    end_hint: str = "none"

    @property
    def missing_segment(self) -> bool:
        """True if the log ends because a segment that wal/LAST names is gone."""
        return (self.status == "error" and self.rc == lib.WAL_ECORRUPT and bool(self.path)
                and self.path.endswith(SEGMENT_SUFFIX) and not os.path.exists(self.path))

    @property
    def bad_last(self) -> bool:
        """True if the log ends in an unreadable wal/LAST."""
        return (self.status == "error" and self.rc == lib.WAL_ECORRUPT
                and os.path.basename(self.path) == "LAST")

    @property
    def cut_path(self) -> str:
        """The segment file where reading stopped (``path`` may name another file:
        a missing newest segment, wal/LAST)."""
        if not self.path or not self.segment:
            return self.path
        return os.path.join(os.path.dirname(self.path), segment_name(self.segment))

    def describe(self) -> str:
        """What ended the log, in words."""
        if self.status == "clean":
            return f"clean end after LSN {self.last_lsn}"
        if self.status == "torn":
            return f"torn tail at offset {self.offset} ({self.cut_bytes} bytes)"
        if self.missing_segment:
            return (f"the newest WAL segment {os.path.basename(self.path)} is missing (wal/LAST "
                    f"says it was created); the segments on disk end after LSN {self.last_lsn}")
        if self.bad_last:
            return (f"wal/LAST is unreadable, so the end of the log cannot be checked; the "
                    f"segments on disk end after LSN {self.last_lsn}")
        if self.rc == lib.WAL_ESHORT:
            try:
                size = os.path.getsize(self.cut_path)
            except OSError:
                size = -1
            return (f"the newest WAL segment {os.path.basename(self.cut_path)} is cut short: "
                    f"{size} bytes, less than the size its header records (a partial copy or "
                    f"a truncate; a crash cannot do this): its records end after LSN "
                    f"{self.last_lsn} and later ones may be missing")
        return (f"corruption in {os.path.basename(self.cut_path)} at offset {self.offset}, "
                f"expected LSN {self.expected_lsn}")

    def raise_error(self, what: str = "reading the write-ahead log") -> None:
        """Raise the exception for an "error" end (nothing otherwise)."""
        if self.status != "error":
            return
        if self.missing_segment:
            raise CorruptionError(
                f"{what}: the newest WAL segment {self.path} is missing (wal/LAST says it "
                "was created; deleted, or lost in a copy or restore?): the writes it held "
                "cannot be recovered (recovery='point_in_time' keeps the log up to LSN "
                f"{self.last_lsn})", path=self.path, offset=0,
                lsn=self.expected_lsn or None)
        if self.bad_last or self.rc == lib.WAL_ESHORT:
            raise CorruptionError(
                f"{what}: {self.describe()} (recovery='point_in_time' keeps the log up to "
                f"LSN {self.last_lsn})", path=self.path, offset=self.offset,
                lsn=self.expected_lsn or None)
        extra = ""
        if self.rc == lib.WAL_EMISMATCH:
            extra = f"; it has system_id {self.found_system_id}"
        elif self.rc == lib.WAL_EGAP:
            extra = f"; LSN {self.expected_lsn} is not in the WAL"
        elif self.rc == lib.WAL_ECORRUPT:
            extra = f" at offset {self.offset}, expected LSN {self.expected_lsn}"
        try:
            raise_for(self.rc, what, self.path or None, offset=self.offset,
                      lsn=self.expected_lsn)
        except Exception as exc:
            if extra:
                exc.args = (str(exc.args[0] if exc.args else exc) + extra,) + exc.args[1:]
                if isinstance(exc, OSError):
                    exc.strerror = str(exc.strerror) + extra
            raise


_HINT = {lib.WAL_HINT_NONE: "none", lib.WAL_HINT_USED: "used",
         lib.WAL_HINT_IGNORED: "ignored"}
_STATUS = {lib.WAL_END_CLEAN: "clean", lib.WAL_END_TORN: "torn", lib.WAL_END_ERROR: "error",
           lib.WAL_END_NONE: "none"}


class WalReader:
    """Iterates the valid records with LSN >= from_lsn, in order; then ``end``
    says how the log ended. Errors do not raise during iteration: iteration
    stops and ``end.status == "error"``. Use as a context manager.

    ``end_hint``: use wal/END (the end a clean close recorded) when it matches
    the log, reading the newest segment only from the last record known at or
    below ``from_lsn`` to that end: for recovery, not for verification (records
    before that point are not checked, nor the zero tail).

    ``copy``: the log is a copy whose newest segment was cut at the end of its
    records (a backup, pieces from an archive), so its being shorter than its
    header records is no error; the caller checks that the log reaches the LSN
    the copy recorded. ``None``: a copy if the directory holding ``wal_dir`` is
    one made by ``walstate backup`` (layout.copy_end)."""

    def __init__(self, wal_dir: str, system_id: int = 0, from_lsn: int = 0, *,
                 end_hint: bool = False, copy: bool | None = None) -> None:
        self.dir = wal_dir
        out = ffi.new("wal_reader_t **")
        if copy is None:
            copy = copy_end(os.path.dirname(os.path.abspath(wal_dir))) is not None
        flags = (lib.WAL_READ_END_HINT if end_hint else 0) | (lib.WAL_READ_COPY if copy else 0)
        rc = lib.wal_reader_open_flags(os.fsencode(wal_dir), system_id, from_lsn, flags, out)
        raise_for(rc, "opening the write-ahead log for reading", wal_dir)
        self._r = out[0]
        self._end: LogEnd | None = None

    def __iter__(self) -> Iterator[Record]:
        rec = ffi.new("wal_record_t *")
        nxt = lib.wal_reader_next
        buf = ffi.buffer
        while self._r is not None:
            rc = nxt(self._r, rec)
            if rc != 1:
                break
            yield Record(rec.lsn, rec.type, buf(rec.payload, rec.len)[:], rec.seg_first_lsn,
                         rec.offset, rec.synced_lsn)

    def iter_raw(self) -> Iterator[tuple[int, int, bytes]]:
        """(lsn, type, payload) only: the fast path of replay."""
        rec = ffi.new("wal_record_t *")
        nxt = lib.wal_reader_next
        buf = ffi.buffer
        r = self._r
        if r is None:
            return
        while nxt(r, rec) == 1:
            yield rec.lsn, rec.type, buf(rec.payload, rec.len)[:]

    def iter_arrays(self, max_records: int = 32768) -> Iterator[tuple[Any, int, Any, Any, Any,
                                                                       Any]]:
        """Records in bulk, as the C reader left them: (data, n, lsns, types, offsets,
        lengths) where data is a buffer over the segment and the others are cffi
        arrays; record i's payload is data[offsets[i]:offsets[i] + lengths[i]].
        The arrays and the buffer are valid until the next iteration."""
        r = self._r
        if r is None:
            return
        lsn = ffi.new("uint64_t[]", max_records)
        typ = ffi.new("uint8_t[]", max_records)
        off = ffi.new("uint64_t[]", max_records)
        ln = ffi.new("uint64_t[]", max_records)
        base = ffi.new("const uint8_t **")
        batch, buf = lib.wal_reader_batch, ffi.buffer
        while True:
            n = batch(r, max_records, lsn, typ, off, ln, base)
            if n <= 0:
                return
            yield buf(base[0], off[n - 1] + ln[n - 1]), n, lsn, typ, off, ln

    def iter_batches(self, max_records: int = 32768
                     ) -> Iterator[tuple[bytes, list[int], list[int], list[int], list[int]]]:
        """Records in bulk as Python objects: (data, lsns, types, offsets, lengths)
        where record i's payload is data[offsets[i]:offsets[i] + lengths[i]]."""
        unpack = ffi.unpack
        for data, n, lsn, typ, off, ln in self.iter_arrays(max_records):
            offs, lens = unpack(off, n), unpack(ln, n)
            start = offs[0]
            chunk = data[start:]
            if start:
                offs = [o - start for o in offs]
            yield chunk, unpack(lsn, n), unpack(typ, n), offs, lens

    @property
    def end(self) -> LogEnd:
        if self._end is None:
            if self._r is None:
                raise ClosedError("the reader is closed")
            e = ffi.new("wal_end_t *")
            lib.wal_reader_end(self._r, e)
            le = LogEnd(_STATUS[e.status], e.rc, e.last_lsn, e.expected_lsn, e.seg_first_lsn,
                        e.offset, os.fsdecode(ffi.string(e.path)), e.cut_bytes,
                        e.later_segments, e.found_system_id, e.segments, e.bytes,
                        e.bytes_read, _HINT[e.end_hint])
            if le.status == "none":
                return le
            self._end = le
        return self._end

    def close(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            lib.wal_reader_close(r)

    def __enter__(self) -> WalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut(wal_dir: str, segment: int, offset: int) -> int:
    """Cuts the log at (segment, offset), keeping the cut bytes in .broken files;
    returns how many bytes were set aside."""
    out = ffi.new("uint64_t *")
    rc = lib.wal_cut(os.fsencode(wal_dir), segment, offset, out)
    raise_for(rc, "cutting the write-ahead log", wal_dir)
    return out[0]


def finish_copy(wal_dir: str, end: LogEnd) -> bool:
    """Makes a log that was read as a copy (``WalReader(copy=True)``) a live
    one, once it ended cleanly: its newest segment, copied only up to the end
    of its records, gets the size its header records back (wal.cut at that end
    zero-fills it), so the writer appends into it and no later read takes it
    for a segment cut short. Returns whether it had to."""
    if end.status != "clean" or not end.segment or end.offset <= lib.WAL_SEG_HDR_SIZE:
        return False
    path = os.path.join(wal_dir, segment_name(end.segment))
    with open(path, "rb") as f:
        header = f.read(lib.WAL_SEG_HDR_SIZE)
        size = os.fstat(f.fileno()).st_size
    if len(header) < 48 or size >= int.from_bytes(header[40:48], "little"):
        return False
    cut(wal_dir, end.segment, end.offset)
    return True


def crc32c(data: bytes, crc: int = 0) -> int:
    """The C layer's CRC32C (same values as the crc32c package)."""
    return lib.wal_crc32c(crc, data, len(data))
