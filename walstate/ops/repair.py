"""``walstate repair``: classify the damage in a data directory and, when
asked, fix what can be fixed -- never deleting a byte without a copy.

Damage is judged as recovery judges it: the WAL is read from the snapshot's
checkpoint LSN + 1 (docs/FORMAT.md, "How a log ends"):

=================  ==========================================  ===============
kind               what --apply does                           data loss
=================  ==========================================  ===============
torn_tail          cut it (bytes kept in ``.broken``)          none: never
                                                               acknowledged
corruption         cut at the first invalid record, keep the   yes: needs
                   valid prefix                                --accept-data-loss
foreign_segment    move it and every later segment aside       when later
                   (renamed ``.broken``)                       segments exist
gap                move the segments after the gap aside       yes
stale_snapshot     nothing: the WAL does not reach back to     --
                   the snapshot; restore from a backup
snapshot_damaged   nothing: restore from a backup              --
old_damage         nothing: damage below the checkpoint,       --
                   which recovery never reads
interrupted_       nothing: no marker and nothing stored; the  none
creation           next open clears it and creates again
marker_missing     nothing: no marker but WAL records or       --
                   snapshot data; open refuses it
=================  ==========================================  ===============

Cutting is ``walstate.wal.cut`` (csrc/wal_repair.c): the cut bytes and the
renamed segments stay in DIR/wal as ``*.broken`` files.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .._native import lib, strerror
from .._opening import unmarked_state
from ..errors import CorruptionError, WalStateError
from ..layout import DirLock, Layout, lock_is_held, read_lock_holder, read_marker
from ..snapshot import Snapshot
from ..wal import LogEnd, WalReader, cut, list_segments


@dataclass
class Finding:
    kind: str
    detail: str
    action: str              # what --apply does ("" for nothing)
    data_loss: bool = False  # --apply needs --accept-data-loss
    path: str | None = None
    segment: int | None = None
    offset: int | None = None
    lsn: int | None = None   # LSN expected where the damage is
    applied: bool = False
    result: str = ""

    @property
    def fixable(self) -> bool:
        return bool(self.action) and self.segment is not None

    def as_dict(self) -> dict:
        return {**asdict(self), "fixable": self.fixable}


def _read(wal_dir: str, system_id: int, from_lsn: int) -> LogEnd:
    with WalReader(wal_dir, system_id, from_lsn) as r:
        for _ in r.iter_raw():
            pass
        return r.end


def _classify(end: LogEnd, wal_dir: str) -> Finding | None:
    """The finding for how the log read from the checkpoint ended."""
    name = os.path.basename(end.path) if end.path else "(no segment)"
    if end.status == "clean":
        return None
    if end.status == "torn":
        return Finding("torn_tail", f"torn tail in {name} at offset {end.offset}: "
                       f"{end.cut_bytes} bytes after LSN {end.last_lsn} that were never "
                       "acknowledged",
                       f"cut {end.cut_bytes} bytes at offset {end.offset} of {name} "
                       "(kept in a .broken file)", False, end.path, end.segment,
                       end.offset, end.expected_lsn)
    later = f" and the {end.later_segments} segment(s) after it" if end.later_segments else ""
    if end.rc == lib.WAL_EGAP:
        first = list_segments(wal_dir)
        where = f"starts at LSN {first[0][0]}" if first else "has no segment"
        return Finding("stale_snapshot", f"the snapshot holds writes up to LSN "
                       f"{end.expected_lsn - 1} but the WAL {where}: the LSNs in between are "
                       "gone (an older snapshot put back, or segments deleted)", "", True,
                       end.path or wal_dir, None, None, end.expected_lsn)
    if end.rc == lib.WAL_EMISMATCH:
        return Finding("foreign_segment", f"{name} belongs to system_id "
                       f"{end.found_system_id}, not to this directory",
                       f"move {name}{later} aside (renamed .broken)", end.later_segments > 0,
                       end.path, end.segment, 0, end.expected_lsn)
    if end.missing_segment or end.bad_last or end.rc == lib.WAL_ESHORT:
        fix = ("give it back its recorded size (zero-filled)" if end.rc == lib.WAL_ESHORT
               else "rewrite wal/LAST")
        return Finding("corruption", end.describe(),
                       f"keep the log up to LSN {end.last_lsn}: cut at offset {end.offset} of "
                       f"{os.path.basename(end.cut_path)}{later} and {fix}", True,
                       end.cut_path, end.segment, end.offset, end.expected_lsn)
    if end.rc == lib.WAL_ECORRUPT and end.offset == 0 and end.segment > end.expected_lsn:
        return Finding("gap", f"WAL segment(s) holding LSNs {end.expected_lsn}.."
                       f"{end.segment - 1} are missing: the log jumps from LSN "
                       f"{end.last_lsn} to segment {name}",
                       f"move {name}{later} aside (renamed .broken), keeping the log up to "
                       f"LSN {end.last_lsn}", True, end.path, end.segment, 0, end.expected_lsn)
    if end.rc == lib.WAL_ECORRUPT:
        what = "a bad segment header" if end.offset == 0 else "an invalid record"
        return Finding("corruption", f"{what} in {name} at offset {end.offset} (expected LSN "
                       f"{end.expected_lsn}) followed by valid data",
                       f"cut at offset {end.offset} of {name}{later}, keeping the log up to "
                       f"LSN {end.last_lsn} (the rest kept in .broken files)", True, end.path,
                       end.segment, end.offset, end.expected_lsn)
    return Finding("unreadable", f"{strerror(end.rc)} at {end.path or wal_dir} offset "
                   f"{end.offset}", "", True, end.path, None, end.offset, end.expected_lsn)


def diagnose(path: str, check_lock: bool = True) -> list[Finding]:
    """Every problem repair knows, as findings (empty: nothing to repair)."""
    lay = Layout(os.path.abspath(path))
    if not os.path.isdir(lay.root):
        raise FileNotFoundError(2, "no such directory", lay.root)
    marker = read_marker(lay)
    if marker is None:
        state = unmarked_state(lay)
        if state == "interrupted":
            return [Finding("interrupted_creation", f"an earlier creation of {lay.root} was "
                            f"cut short (no {lay.marker}, nothing stored yet)", "", False,
                            lay.root, result="nothing to do: the next open clears it and "
                            "creates the database again")]
        if state == "data":
            return [Finding("marker_missing", f"{lay.root} holds walstate data but its "
                            f"creation marker {lay.marker} is missing: open refuses it", "",
                            True, lay.marker)]
        raise CorruptionError(f"{lay.root} is not a walstate directory (no {lay.marker})",
                              path=lay.marker)
    system_id = int(marker["system_id"])
    out: list[Finding] = []
    if check_lock and lock_is_held(lay):
        holder = read_lock_holder(lay) or {}
        out.append(Finding("locked", f"a live process holds the directory (pid "
                           f"{holder.get('pid')} on {holder.get('host', '?')}): what is read "
                           "may be writes in flight; stop it before repairing", "", True))
    try:
        snap = Snapshot(lay.snapshot, map_size=1 << 20, read_only=True, create=False)
        try:
            snap_lsn = int(snap.check_meta(system_id)["lsn"])
        finally:
            snap.close()
    except (WalStateError, OSError) as exc:
        out.append(Finding("snapshot_damaged", f"the snapshot cannot be used: {exc}", "",
                           True, lay.snapshot))
        return out
    end = _read(lay.wal, system_id, snap_lsn + 1)
    f = _classify(end, lay.wal)
    if f is not None:
        out.append(f)
    # damage in segments wholly below the checkpoint: recovery never reads them
    segs = list_segments(lay.wal)
    if segs and segs[0][0] <= snap_lsn:
        whole = _read(lay.wal, system_id, 0)
        if whole.status == "error" and whole.expected_lsn <= snap_lsn:
            out.append(Finding("old_damage", f"{strerror(whole.rc)} in "
                               f"{os.path.basename(whole.path)} at offset {whole.offset} "
                               f"(LSN {whole.expected_lsn}), below the checkpoint LSN "
                               f"{snap_lsn}: recovery does not need it and the next checkpoint "
                               "removes it", "", False, whole.path, None, whole.offset,
                               whole.expected_lsn))
    return out


def apply(path: str, accept_data_loss: bool = False) -> list[Finding]:
    """Diagnoses and fixes what may be fixed under the directory lock; returns
    the findings with ``applied``/``result`` set. LockedError if a process
    holds the directory."""
    lay = Layout(os.path.abspath(path))
    lock = DirLock(lay)  # no writer may start while the log is cut
    try:
        findings = diagnose(path, check_lock=False)  # we hold it
        for f in findings:
            if f.kind in HARMLESS:
                f.result = f.result or "nothing to do"
                continue
            if not f.fixable:
                f.result = "not fixed: " + ("restore from a backup" if f.kind in (
                    "stale_snapshot", "snapshot_damaged", "unreadable",
                    "marker_missing") else "nothing to do")
                continue
            if f.data_loss and not accept_data_loss:
                f.result = "not fixed: drops acknowledged data; give --accept-data-loss"
                continue
            n = cut(lay.wal, f.segment, f.offset or 0)  # type: ignore[arg-type]
            f.applied = True
            f.result = f"done: {n} bytes set aside in .broken files"
    finally:
        lock.release()
    return findings


# findings that need no repair (the CLI exits 0 on them)
HARMLESS = ("old_damage", "interrupted_creation")


def broken_files(path: str) -> list[str]:
    """The ``.broken`` files in a data directory's WAL."""
    wal = Layout(os.path.abspath(path)).wal
    try:
        return sorted(os.path.join(wal, n) for n in os.listdir(wal) if n.endswith(".broken"))
    except FileNotFoundError:
        return []


__all__ = ["Finding", "apply", "broken_files", "diagnose"]
