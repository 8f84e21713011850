"""The ``walstate`` command: info, dump, verify, checkpoint, repair, doctor,
backup, restore, bench, demo. The work of repair, doctor, backup and restore
lives in walstate/ops/repair.py, doctor.py and backup.py; this is the dispatcher.

Exit codes: 0 success, 1 a failure the command reports (corruption, locked,
...), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .. import codec
from ..errors import WalStateError
from ..layout import Layout, lock_is_held, read_json, read_lock_holder, read_marker
from ..wal import WalReader, list_segments
from .progress import Progress


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=_jsonable, sort_keys=True))


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0: {text!r}")
    return v


def _require_dir(path: str) -> Layout:
    lay = Layout(os.path.abspath(path))
    if not os.path.isdir(lay.root):
        raise FileNotFoundError(2, "no such directory", lay.root)
    return lay


def _require_database(path: str) -> Layout:
    """The layout of an existing walstate directory: maintenance commands never
    create a database (nor finish a creation that was cut short)."""
    lay = _require_dir(path)
    if read_marker(lay) is None:
        raise FileNotFoundError(2, f"not a walstate directory (no {os.path.basename(lay.marker)} "
                                "marker); this command never creates a database", lay.root)
    return lay


# ---- argument types (a bad value is a usage error: exit 2) --------------------
U64_MAX = (1 << 64) - 1
RECORD_TYPES = ("PUT", "DELETE", "BATCH", "SESSION", "SHUTDOWN")


def _lsn(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an LSN (an integer): {text!r}") from None
    if not 0 <= n <= U64_MAX:
        raise argparse.ArgumentTypeError(f"an LSN is 0..{U64_MAX}, not {text}")
    return n


def _record_type(text: str) -> str:
    name = text.upper()
    if name not in RECORD_TYPES:
        raise argparse.ArgumentTypeError(f"unknown record type {text!r} (the types: "
                                         f"{', '.join(RECORD_TYPES)})")
    return name


def _byte_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes (an integer): {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a size in bytes must be > 0, not {text}")
    return n


# ---- info -------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    import walstate

    lay = _require_dir(args.dir)
    with walstate.open(lay.root, read_only=True) as db:
        info = db.info()
    info["locked"] = lock_is_held(lay)
    info["backup_label"] = read_json(lay.backup_label)
    if info.get("archive") is None:
        from ..archive import read_status

        info["archive"] = read_status(lay)
    info["lock_holder"] = read_lock_holder(lay) if info["locked"] else None
    if args.json:
        _print_json(info)
        return 0
    ck = info["last_checkpoint"]
    rec = info["recovery"]
    lines = [
        ("path", info["path"]),
        ("system_id", info["system_id"]),
        ("format_version", info["format_version"]),
        ("last_lsn", info["last_lsn"]),
        ("durable_lsn", info["durable_lsn"]),
        ("checkpoint_lsn", info["checkpoint_lsn"]),
        ("last_checkpoint", "none" if ck is None else
         f"id {ck.id} lsn {ck.lsn} reason {ck.reason} finished {ck.finished_at:.3f} "
         f"({ck.finished_at - ck.started_at:.3f} s)"),
        ("wal_bytes", info["wal_bytes"]),
        ("wal_segments", info["wal_segments"]),
        ("snapshot_bytes", info["snapshot_bytes"]),
        ("snapshot_keys", info["snapshot_keys"]),
        ("unreplayed_records", rec["records_replayed"]),
        ("estimated_replay_seconds", f"{rec['seconds']:.3f}"),
        ("tail", f"{rec['end']} ({rec['truncated_bytes']} bytes would be cut)"),
        ("lock", "free" if not info["locked"] else f"held by {info['lock_holder']}"),
    ]
    bl = info["backup_label"]
    if bl:
        lines.append(("backup_label", f"{bl.get('label') or '(no label)'}: {bl.get('kind')} "
                      f"at LSN {bl.get('lsn')}, created {bl.get('created_at', 0):.3f}"))
    arch = info["archive"]
    if arch:
        state = ("FAILING: " + str(arch.get("last_error")) if arch.get("failing") else
                 "holes " + str(arch.get("holes")) if arch.get("abandoned") else "ok")
        lines.append(("archive", f"{arch.get('url') or arch.get('dir')} timeline "
                      f"{arch.get('timeline')} up to LSN "
                      f"{arch.get('archived_lsn', arch.get('last_archived_lsn'))}, lag "
                      f"{float(arch.get('lag_seconds') or 0):.1f} s / {arch.get('lag_bytes')} "
                      f"bytes, {arch.get('failures')} failure(s); {state}"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0


# ---- dump -------------------------------------------------------------------
def _describe(rtype: int, payload: bytes) -> tuple[str, list[dict[str, Any]]]:
    name = codec.TYPE_NAMES.get(rtype)
    if name is None:
        name = {codec.SHUTDOWN: "SHUTDOWN", codec.SESSION: "SESSION"}.get(rtype, f"TYPE{rtype:#x}")
    ops = []
    try:
        for k, v in codec.decode(rtype, payload):
            ops.append({"op": "put" if v is not None else "delete", "key": k,
                        "value_size": None if v is None else len(v)})
    except ValueError as exc:
        ops.append({"op": "undecodable", "error": str(exc)})
    return name, ops


def _key_text(k: bytes) -> str:
    from ..tasks import describe_key

    task = describe_key(k)
    if task is not None:
        return task
    try:
        s = k.decode()
        if s.isprintable():
            return repr(s)
    except UnicodeDecodeError:
        pass
    return "0x" + k.hex()


def cmd_dump(args: argparse.Namespace) -> int:
    lay = _require_dir(args.dir)
    marker = read_marker(lay) or {}
    types = set(args.type) if args.type else None
    prefix = args.key_prefix.encode() if args.key_prefix is not None else None
    with WalReader(lay.wal, int(marker.get("system_id", 0)), args.from_lsn) as r:
        for rec in r:
            if args.to_lsn is not None and rec.lsn > args.to_lsn:
                break
            name, ops = _describe(rec.type, rec.payload)
            if types and name not in types:
                continue
            if prefix is not None and not any(o.get("key", b"").startswith(prefix)
                                              for o in ops):
                continue
            if args.json:
                _print_json({"lsn": rec.lsn, "type": name, "segment": rec.segment,
                             "offset": rec.offset, "size": len(rec.payload),
                             "ops": [{**o, "key": o["key"].hex(), "key_text": _key_text(o["key"])}
                                     if "key" in o else o
                                     for o in ops]})
            else:
                if rec.type == codec.BATCH:
                    print(f"{rec.lsn:>12} BATCH    {len(ops)} ops")
                    for o in ops:
                        vs = "" if o.get("value_size") is None else f" value {o['value_size']} B"
                        print(f"{'':>12}   {o['op']:<6} {_key_text(o.get('key', b''))}{vs}")
                elif ops:
                    o = ops[0]
                    vs = "" if o.get("value_size") is None else f" value {o['value_size']} B"
                    print(f"{rec.lsn:>12} {name:<8} {_key_text(o.get('key', b''))}{vs}")
                else:
                    print(f"{rec.lsn:>12} {name:<8}")
        end = r.end
    if end.status == "none":
        status, stop, ok = "to_lsn", f"stopped at --to-lsn {args.to_lsn}", True
    else:
        status, stop, ok = end.status, _end_text(end), end.status == "clean"
    if args.json:
        _print_json({"end": status, "detail": stop, "path": end.path, "offset": end.offset,
                     "last_lsn": end.last_lsn})
    else:
        print(f"# end: {stop}", file=sys.stderr)
    return 0 if ok else 1


def _end_text(end: Any) -> str:
    from .._native import lib, strerror

    if end.status == "clean":
        return f"clean end after LSN {end.last_lsn}"
    if end.status == "torn":
        return (f"torn tail in {end.path} at offset {end.offset} ({end.cut_bytes} bytes after "
                f"LSN {end.last_lsn}; recovery cuts it)")
    if end.missing_segment:
        return f"the newest segment {end.path} is missing (wal/LAST says it was created)"
    if end.bad_last or end.rc == lib.WAL_ESHORT:
        return end.describe()
    return (f"{strerror(end.rc)}: {end.path or '(no segment)'} at offset {end.offset}, "
            f"expected LSN {end.expected_lsn}")


# ---- verify -----------------------------------------------------------------
def verify(path: str, progress: Progress | None = None) -> list[str]:
    """Every problem found in the directory at ``path`` (empty: clean)."""
    from .._opening import check_marker
    from ..errors import CorruptionError, MismatchError
    from ..snapshot import Snapshot

    lay = _require_dir(path)
    problems: list[str] = []
    try:
        marker = read_marker(lay)
    except CorruptionError as exc:
        return [str(exc)]
    if marker is None:
        return [f"{lay.marker}: creation marker missing (not a walstate directory?)"]
    try:
        check_marker(lay, marker)
    except MismatchError as exc:
        return [str(exc)]
    system_id = int(marker["system_id"])
    snap_lsn = None
    try:
        snap = Snapshot(lay.snapshot, map_size=1 << 20, read_only=True, create=False)
    except (WalStateError, OSError) as exc:
        problems.append(f"snapshot: {exc}")
    else:
        try:
            meta = snap.check_meta(system_id)
            snap_lsn = int(meta["lsn"])
            n = sum(1 for _ in snap.items(None, None))  # reads every page of the data
            if n != snap.entries():
                problems.append(f"snapshot: iterated {n} keys but LMDB counts {snap.entries()}")
        except (WalStateError, MismatchError) as exc:
            problems.append(f"snapshot: {exc}")
        except Exception as exc:  # lmdb errors on damaged pages
            problems.append(f"snapshot: unreadable: {exc}")
        finally:
            snap.close()
    segs = list_segments(lay.wal)
    if not segs:
        problems.append(f"{lay.wal}: no WAL segment")
    else:
        prog = progress or Progress("verify", enabled=False)
        prog.total = sum(os.path.getsize(p) for _l, p in segs if os.path.exists(p))
        with WalReader(lay.wal, system_id, 0) as r:
            for _lsn, _t, payload in r.iter_raw():
                prog.advance(codec.REC_HEADER + len(payload))
            end = r.end
        prog.done()
        if end.status != "clean":
            problems.append(f"WAL: {_end_text(end)}")
        if snap_lsn is not None and segs[0][0] > snap_lsn + 1:
            problems.append(f"WAL: starts at LSN {segs[0][0]} but the snapshot holds writes "
                            f"only up to LSN {snap_lsn} (gap)")
    if not problems:  # what the files say, open must agree with (read-only: changes nothing)
        import walstate

        try:
            walstate.open(lay.root, read_only=True).close()
        except (WalStateError, OSError) as exc:
            problems.append(f"open refuses the directory: {exc}")
    return problems


def cmd_verify(args: argparse.Namespace) -> int:
    problems = verify(args.dir, Progress("verify", enabled=None if not args.json else False))
    if args.json:
        _print_json({"ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            print(f"PROBLEM: {p}")
    else:
        print(f"{os.path.abspath(args.dir)}: OK (every WAL record and the snapshot check out)")
    return 1 if problems else 0


# ---- checkpoint -------------------------------------------------------------
def cmd_checkpoint(args: argparse.Namespace) -> int:
    import walstate

    lay = _require_database(args.dir)
    info = None
    if not lock_is_held(lay):
        try:
            with walstate.open(lay.root) as db:
                info = db.checkpoint()
        except walstate.LockedError:
            pass  # a writer started meanwhile: ask it
    if info is None:
        info = _checkpoint_running_writer(lay, args.timeout)
        if info is None:
            return 1
    if args.json:
        _print_json(info)
    else:
        print(f"checkpoint {info.id}: lsn {info.lsn}, {info.keys_written} keys, "
              f"{info.wal_bytes_removed} WAL bytes removed, "
              f"{info.finished_at - info.started_at:.3f} s")
    return 0


def _checkpoint_running_writer(lay: Layout, timeout: float) -> Any:
    """Asks the process holding ``lay`` to checkpoint (walstate/control.py);
    its CheckpointInfo, or None once the failure is reported."""
    from .. import control
    from ..checkpoint import CheckpointInfo

    holder = read_lock_holder(lay) or {}
    who = f"the writer holding {lay.root} (pid {holder.get('pid', '?')})"
    try:
        reply = control.request(lay.root, "checkpoint", timeout=timeout)
    except control.NoAnswer as exc:
        print(f"walstate checkpoint: {who} did not answer: {exc}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"walstate checkpoint: {who} failed to checkpoint: {reply.get('type')}: "
              f"{reply.get('error')}", file=sys.stderr)
        return None
    return CheckpointInfo(**reply["result"])


# ---- repair / doctor / backup / restore ------------------------------------------
def cmd_repair(args: argparse.Namespace) -> int:
    from . import repair

    _require_dir(args.dir)
    if args.apply:
        findings = repair.apply(args.dir, accept_data_loss=args.accept_data_loss)
    else:
        findings = repair.diagnose(args.dir)
    remaining = [f for f in findings if not f.applied and f.kind not in repair.HARMLESS]
    if args.json:
        _print_json({"dir": os.path.abspath(args.dir), "applied": args.apply,
                     "findings": [f.as_dict() for f in findings], "ok": not remaining})
    elif not findings:
        print(f"{os.path.abspath(args.dir)}: nothing to repair (the log reads cleanly from the "
              "checkpoint on)")
    else:
        for f in findings:
            print(f"{f.kind}: {f.detail}")
            if args.apply:
                print(f"  -> {f.result or 'nothing to do'}")
            elif f.action:
                need = " (needs --accept-data-loss)" if f.data_loss else ""
                print(f"  would: {f.action}{need}")
            elif f.kind == "interrupted_creation":
                print(f"  would: {f.result}")
            else:
                print("  would: nothing (repair cannot fix this: restore from a backup)"
                      if f.kind not in ("old_damage", "locked") else "  would: nothing")
        if not args.apply and any(f.fixable for f in findings):
            print("dry run: nothing changed; run again with --apply")
    return 1 if remaining else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..config import Config
    from . import doctor

    opts = {k: v for k, v in (("max_wal_size", args.max_wal_size),
                              ("map_size", args.map_size)) if v is not None}
    checks = doctor.run_checks(args.dir, Config(**opts))
    failed = any(c.status == "FAIL" for c in checks)
    if args.json:
        _print_json({"ok": not failed, "checks": [c.as_dict() for c in checks]})
    else:
        for c in checks:
            print(f"{c.status:<4}  {c.name:<12}  {c.detail}")
    return 1 if failed else 0


def _is_archive(location: str) -> bool:
    """An archive URL, or a directory that is an archive (has its marker)."""
    from ..archivestore import is_url
    from ..layout import ARCHIVE_MARKER

    return is_url(location) or os.path.exists(os.path.join(location, ARCHIVE_MARKER))


def cmd_backup(args: argparse.Namespace) -> int:
    from . import backup

    _require_dir(args.dir)
    quiet = args.json or args.quiet
    if _is_archive(args.dest) or args.archive:
        from .archivetool import backup_to_archive

        res = backup_to_archive(args.dir, args.dest, label=args.label,
                                progress=Progress("backup", enabled=None if not quiet else False))
        if args.json:
            _print_json(res.as_dict())
        elif not args.quiet:
            print(f"base backup {res.label or '(no label)'} in {res.path}: every write up to "
                  f"LSN {res.lsn} (snapshot LSN {res.checkpoint_lsn}, timeline {res.timeline}, "
                  f"{res.bytes} bytes)")
        return 0
    res = backup.backup(args.dir, args.dest, label=args.label,
                        progress=Progress("backup", enabled=None if not quiet else False))
    if args.json:
        _print_json(res.as_dict())
    elif not args.quiet:
        print(f"backup {res.label or '(no label)'} in {res.path}: every write up to LSN "
              f"{res.lsn} (snapshot LSN {res.checkpoint_lsn}, {res.segments} WAL segment(s), "
              f"{res.bytes} bytes, {res.attempts} attempt(s))")
        for n in res.notes:
            print(f"  note: {n}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from . import backup

    try:
        to_time = backup.parse_time(args.to_time) if args.to_time is not None else None
    except ValueError as exc:
        print(f"walstate restore: --to-time: {exc}", file=sys.stderr)
        return 2
    if args.to_lsn is not None and args.to_lsn < 0:
        print("walstate restore: --to-lsn must be >= 0", file=sys.stderr)
        return 2
    progress = Progress("restore", enabled=None if not args.json else False)
    if _is_archive(args.source):
        from .archivetool import restore_archive

        res = restore_archive(args.source, args.dest, to_lsn=args.to_lsn, to_time=to_time,
                              timeline=args.timeline, progress=progress)
        if args.json:
            _print_json(res.as_dict())
        else:
            print(f"restored {res.archive} (timeline {res.timeline}, base backup "
                  f"{res.base_backup or 'none'}) into {res.path}: every write up to LSN "
                  f"{res.lsn}")
            for n in res.notes:
                print(f"  note: {n}")
        return 0
    _require_dir(args.source)
    archive = args.archive
    if archive is None and not args.no_archive:
        label = read_json(Layout(os.path.abspath(args.source)).backup_label) or {}
        archive = label.get("archive_dir")
        if archive and not (os.path.isdir(archive) and _is_archive(archive)):
            archive = None
    res = backup.restore(args.source, args.dest, archive_dir=archive, to_lsn=args.to_lsn,
                         to_time=to_time, progress=progress, timeline=args.timeline)
    if args.json:
        _print_json({**res.as_dict(), "archive_dir": archive})
    else:
        print(f"restored {os.path.abspath(args.source)} into {res.path}: every write up to LSN "
              f"{res.lsn} (archive: {archive or 'none'})")
        for n in res.notes:
            print(f"  note: {n}")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from . import archivetool

    if args.archive_command == "ls":
        out = archivetool.ls(args.url)
        if args.json:
            _print_json(out)
            return 0
        print(f"archive {out['url']} (layout version {out['archive_version']}, system_id "
              f"{out['system_id']}, {out['bytes']} bytes)")
        for t in out["timelines"]:
            parent = (f", from timeline {t['parent']} at LSN {t['branch_lsn']}"
                      if t["parent"] is not None else "")
            print(f"  timeline {t['timeline']}{parent}: WAL LSN {t['first_lsn']}..{t['last_lsn']}"
                  f", {t['segments']} segment(s) + {t['chunks']} chunk(s), {t['bytes']} bytes"
                  + (f", last acknowledged write at {t['last_time']:.3f}" if t["last_time"]
                     else ""))
            for h in t["holes"]:
                print(f"    HOLE: LSNs {h[0]}..{h[1]} are missing (restores stop there)")
        if not out["base_backups"]:
            print("  no base backups")
        for b in out["base_backups"]:
            print(f"  base backup {b['prefix']}: timeline {b['timeline']}, LSN {b['lsn']} "
                  f"(snapshot {b['checkpoint_lsn']}), {b['bytes']} bytes, created "
                  f"{b['created_at']:.3f}" + (f", label {b['label']}" if b["label"] else ""))
        return 0
    if args.archive_command == "verify":
        out = archivetool.verify(args.url)
        if args.json:
            _print_json(out)
        else:
            for p in out["problems"]:
                print(f"DAMAGE  {p}")
            print(f"{'ok' if out['ok'] else 'DAMAGED'}: {out['pieces']} WAL piece(s), "
                  f"{out['bytes']} bytes, {out['base_backups']} base backup(s) checked")
        return 0 if out["ok"] else 1
    if args.keep is not None and args.keep < 1:
        print("walstate archive prune: --keep must be >= 1", file=sys.stderr)
        return 2
    out = archivetool.prune(args.url, keep=args.keep, keep_days=args.keep_days,
                            apply=args.apply)
    if args.json:
        _print_json(out)
    else:
        verb = "deleted" if args.apply else "would delete (dry run; --apply deletes)"
        print(f"keeping base backups: {', '.join(out['keep_backups']) or 'none'}")
        print(f"{verb}: {len(out['delete_backups'])} base backup(s), {out['delete_objects']} "
              f"object(s), {out['delete_bytes']} bytes")
    return 0


# ---- tasks ------------------------------------------------------------------
def cmd_tasks(args: argparse.Namespace) -> int:
    """Counts by status, a list, one task, or retry of FAILED tasks. Read-only
    (beside a running writer) except ``retry``, which opens DIR for writing."""
    import time

    import walstate

    from ..tasks import Status, TaskStore, decode_payload

    lay = _require_dir(args.dir)
    status = None
    if args.status is not None:
        try:
            status = Status[args.status.upper()]
        except KeyError:
            print(f"walstate tasks: --status must be one of "
                  f"{', '.join(s.name for s in Status)}, not {args.status!r}", file=sys.stderr)
            return 2
    if args.action in ("counts", "list") and args.ids:
        print(f"walstate tasks {args.action}: takes no task ids", file=sys.stderr)
        return 2
    if args.action == "show" and len(args.ids) != 1:
        print("walstate tasks show: give exactly one task id", file=sys.stderr)
        return 2
    if args.action == "retry" and not args.ids and not args.all:
        print("walstate tasks retry: give task ids, or --all for every FAILED task",
              file=sys.stderr)
        return 2

    def payload_view(state: Any, raw: bytes, cid: int) -> Any:
        if cid and not args.raw:
            try:
                obj = decode_payload(raw, cid)
            except Exception as exc:  # noqa: BLE001 - shown, not fatal
                return {"codec": ("json", "pickle")[cid - 1], "undecodable": str(exc)}
            if cid == 1:
                return {"codec": "json", "value": obj}
            return {"codec": "pickle", "repr": repr(obj)}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return {"codec": "bytes", "size": len(raw), "text": text, "hex": raw.hex()}

    def as_dict(tasks: TaskStore, state: Any) -> dict[str, Any]:
        from ..tasks import _decode_rec, _id_bytes, _record_key

        rec = _decode_rec(state.task_id, tasks._db.get(_record_key(_id_bytes(state.task_id))))
        out = {"task_id": state.task_id, "status": state.status.name,
               "attempts": state.attempts, "updated_at": state.updated_at,
               "error": state.error, "payload": payload_view(state, rec.payload, rec.codec),
               "owner": None}
        if state.owner is not None:
            out["owner"] = {"token": state.owner, **(tasks.owner_info(state.owner) or {})}
        return out

    if args.action == "retry":
        done, refused = [], []
        with walstate.open(lay.root) as db:
            tasks = TaskStore(db)
            ids = args.ids or [t.task_id for t in tasks.list(status=Status.FAILED)]
            for task_id in ids:
                try:
                    tasks.retry(task_id)
                    done.append(task_id)
                except KeyError:
                    refused.append((task_id, "no such task"))
                except walstate.InvalidTransitionError as exc:
                    refused.append((task_id, str(exc)))
        if args.json:
            _print_json({"retried": done, "refused": dict(refused)})
        else:
            for task_id in done:
                print(f"retried {task_id}")
            for task_id, why in refused:
                print(f"not retried {task_id}: {why}", file=sys.stderr)
        return 1 if refused else 0

    with walstate.open(lay.root, read_only=True) as db:
        tasks = TaskStore(db)  # payloads stay bytes: payload_view decodes (or not, --raw)
        if args.action == "counts":
            counts = {s.name: n for s, n in tasks.counts().items()}
            if status is not None:
                counts = {status.name: counts[status.name]}
            if args.json:
                _print_json(counts)
            else:
                for name, n in counts.items():
                    print(f"{name:<8} {n}")
                if status is None:
                    print(f"{'total':<8} {sum(counts.values())}")
            return 0
        if args.action == "list":
            shown = 0
            for state in tasks.list(status=status):
                if args.limit is not None and shown >= args.limit:
                    break
                shown += 1
                if args.json:
                    _print_json(as_dict(tasks, state))
                    continue
                age = time.time() - state.updated_at
                error = "" if state.error is None else f"  error: {state.error.splitlines()[0]}"
                print(f"{state.status.name:<8} {state.task_id}  attempts {state.attempts}  "
                      f"updated {age:.0f} s ago{error}")
            return 0
        state = tasks.get(args.ids[0])
        if state is None:
            print(f"walstate tasks show: no task {args.ids[0]!r} in {lay.root}", file=sys.stderr)
            return 1
        info = as_dict(tasks, state)
    if args.json:
        _print_json(info)
        return 0
    for name in ("task_id", "status", "attempts", "updated_at", "error"):
        print(f"{name:<10}  {info[name]}")
    pv = info["payload"]
    if pv["codec"] == "json":
        shown = json.dumps(pv["value"])
    elif pv["codec"] == "pickle":
        shown = pv.get("repr", pv.get("undecodable"))
    else:
        shown = repr(pv["text"]) if pv["text"] is not None else "0x" + pv["hex"]
    print(f"{'payload':<10}  ({pv['codec']}) {shown}")
    owner = info["owner"]
    if owner:
        print(f"{'owner':<10}  pid {owner.get('pid')} on {owner.get('host')}, heartbeat "
              f"{owner.get('heartbeat')}, {'alive' if owner.get('alive') else 'gone'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import benchmark

    return benchmark.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .. import demo

    return demo.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="walstate",
                                description="Inspect, check and exercise walstate directories.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="what info() returns, human-readable (read-only)")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("dump", help="one line per WAL record")
    s.add_argument("dir")
    s.add_argument("--from-lsn", type=_lsn, default=0)
    s.add_argument("--to-lsn", type=_lsn, default=None)
    s.add_argument("--key-prefix", default=None)
    s.add_argument("--type", action="append", type=_record_type,
                   help="PUT, DELETE, BATCH, SESSION, SHUTDOWN (repeatable)")
    s.add_argument("--json", action="store_true", help="JSON lines")
    s.set_defaults(func=cmd_dump)

    s = sub.add_parser("verify", help="check every checksum of WAL and snapshot; exit 1 on "
                       "any problem")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("checkpoint", help="checkpoint now: asks the running writer of DIR "
                       "(if any) to, or opens (recovering), checkpoints and closes")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=_seconds, default=300.0,
                   help="seconds to wait for a running writer's checkpoint (default 300)")
    s.set_defaults(func=cmd_checkpoint)

    s = sub.add_parser("repair", help="classify WAL damage and say what would be done (dry "
                       "run); --apply does it")
    s.add_argument("dir")
    s.add_argument("--dry-run", action="store_true", help="the default: change nothing")
    s.add_argument("--apply", action="store_true", help="cut a torn tail, move foreign "
                   "segments aside (cut bytes kept in .broken files)")
    s.add_argument("--accept-data-loss", action="store_true", help="with --apply: also cut "
                   "mid-log damage, keeping the valid prefix only")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("doctor", help="pre-flight checks: path, permissions, space, "
                       "filesystem, lock, LMDB map, .broken files, WAL, archive")
    s.add_argument("dir")
    s.add_argument("--max-wal-size", type=_byte_size, default=None, help="bytes (default: "
                   "the engine's default)")
    s.add_argument("--map-size", type=_byte_size, default=None, help="bytes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("backup", help="hot, consistent backup into DEST: a data directory, "
                       "or a base backup into an archive (s3://bucket/prefix or an archive "
                       "directory)")
    s.add_argument("dir")
    s.add_argument("dest")
    s.add_argument("--label", default=None, help="a name kept with the backup")
    s.add_argument("--archive", action="store_true", help="DEST is an archive directory "
                   "(created if missing), not a data directory")
    s.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("restore", help="restore from an archive (URL or directory: the newest "
                       "base backup that serves the target, then the archived WAL) or from a "
                       "backup directory (plus an archive's WAL) into DEST")
    s.add_argument("source", metavar="SOURCE")
    s.add_argument("dest")
    s.add_argument("--archive", "--archive-dir", dest="archive", default=None,
                   help="with a backup directory as SOURCE: the archive whose WAL rolls it "
                   "forward (default: the one the backup's source used, if a directory)")
    s.add_argument("--no-archive", action="store_true", help="restore the backup alone")
    s.add_argument("--timeline", type=int, default=None, help="the history to restore "
                   "(default: the newest; see `walstate archive ls`)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--to-lsn", type=_lsn, default=None, help="stop after this LSN exactly")
    g.add_argument("--to-time", default=None, help="epoch seconds or ISO 8601: every write "
                   "acknowledged at or before T - archive_interval, none acknowledged after T")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("archive", help="look after a WAL archive: ls, verify, prune")
    asub = s.add_subparsers(dest="archive_command", metavar="ACTION")
    asub.required = True
    a = asub.add_parser("ls", help="histories (timelines), base backups, LSN ranges, holes, "
                        "sizes")
    a.add_argument("url", metavar="URL")
    a.add_argument("--json", action="store_true")
    a = asub.add_parser("verify", help="check every checksum; exit 1 on damage")
    a.add_argument("url", metavar="URL")
    a.add_argument("--json", action="store_true")
    a = asub.add_parser("prune", help="delete old base backups and the WAL only they need "
                        "(dry run unless --apply)")
    a.add_argument("url", metavar="URL")
    a.add_argument("--keep", "--keep-last", "--keep-backups", dest="keep", type=int,
                   default=None, help="keep the last N base backups (default 2 unless "
                   "--keep-days)")
    a.add_argument("--keep-days", "--days", dest="keep_days", type=float, default=None,
                   help="keep base backups younger than D days")
    a.add_argument("--apply", action="store_true", help="delete (default: only say what)")
    a.add_argument("--dry-run", action="store_true", help="the default")
    a.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_archive)

    s = sub.add_parser("bench", help="throughput against sqlite3, LMDB, RocksDB, LevelDB and raw "
                       "loops")
    s.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--ops", type=int, default=None,
                   help="durable puts per contender (the other workloads scale with it)")
    s.add_argument("--records", type=int, default=None,
                   help="records recovered / dirty keys checkpointed")
    s.add_argument("--max-wal-mib", type=int, default=None,
                   help="max_wal_size of the memory workload, MiB")
    s.add_argument("--repeat", type=int, default=None, help="repetitions (median reported)")
    s.add_argument("--only", default=None, help="comma-separated workloads: durable-1, "
                   "durable-4t, batch-1000, fast, get-snapshot, get-memtable, recovery, reopen, "
                   "checkpoint, ckpt-latency-none, ckpt-latency-always, memory, archive")
    s.add_argument("--markdown", action="store_true", help="the tables as Markdown")
    s.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw throughput bars and a put-latency CDF (needs matplotlib)")
    s.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("tasks", help="task states: counts by status, list, show one, retry "
                       "FAILED ones (read-only except retry)")
    s.add_argument("dir")
    s.add_argument("action", nargs="?", default="counts",
                   choices=["counts", "list", "show", "retry"])
    s.add_argument("ids", nargs="*", metavar="ID", help="show: one task id; retry: task ids")
    s.add_argument("--status", default=None, help="counts/list: only this status")
    s.add_argument("--limit", type=int, default=None, help="list: at most this many")
    s.add_argument("--all", action="store_true", help="retry: every FAILED task")
    s.add_argument("--raw", action="store_true", help="show/list: do not decode payloads "
                   "(a pickle payload is decoded by unpickling it)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("demo", help="the crash-and-resume demonstration", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_demo)
    sub.add_parser("crashtest", add_help=False, help="simulate power loss at many points of "
                   "a traced workload on this disk and check every recovery")
    return p


def _run(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:  # the demo parses its own options (and --help)
        from .. import demo

        return int(demo.main(argv[1:]) or 0)
    if argv[:1] == ["crashtest"]:  # walstate.testing parses its own options (and --help)
        from ..testing import crashtest_main

        return crashtest_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)  # bad usage: a message and exit 2
    import lmdb

    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise
    except (WalStateError, OSError, ValueError, lmdb.Error) as exc:
        # a failure the command reports: one line, exit 1 (no traceback)
        print(f"walstate {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, (WalStateError, OSError)):
        text = f"{type(exc).__name__}: {text}"  # e.g. lmdb.DiskError: what LMDB said
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Exit codes: 0 success, 1 a failure the command reports,
    2 bad usage; 141 (as SIGPIPE) when stdout is closed early (``| head``),
    quietly; 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = _run(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # the reader went away: stop quietly, as Unix tools do; stdout goes to
        # /dev/null so that the interpreter's last flush does not complain again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        return 128 + 13
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
