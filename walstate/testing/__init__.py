"""Check that *your* use of walstate survives power loss: the crash-consistency
oracle and the power-loss simulator walstate's own campaign uses
(docs/RELIABILITY.md), as a public helper.

::

    import walstate.testing

    def workload(db, rng):            # module level: it runs in a subprocess
        tasks = TaskStore(db)         # db behaves like an Engine
        for i in range(50):
            tasks.create(f"job-{i}", payload=b"0")

    result = walstate.testing.crash_check(workload, runs=50)
    assert result.ok, result.summary()

:func:`crash_check` runs ``workload`` in a child process whose file
operations under the data directory are traced (an LD_PRELOAD library, built
with the system C compiler on first use: Linux only). ``db`` is a
:class:`RecordingEngine`: the engine, with every ``put``/``delete``/batch
reported to the trace before it starts and after it returns. From the trace
the harness rebuilds the disk states a power cut could leave at many points
(unsynced data dropped, a random subset kept, the last write torn at 512-byte
sectors, grown files zero- or garbage-filled, directory entries never
fsynced undone: see :mod:`walstate.testing.crashsim`), opens walstate on each, and
checks the oracle:

* it opens (a legitimate crash state never needs repair by hand);
* its contents equal the state after some prefix of the attempted writes,
  in order, that includes every acknowledged one (returned under
  ``sync="always"``, or before a returned ``sync()``/``checkpoint()``/
  ``close()``): nothing acknowledged lost, no hole, no torn batch, no
  invented value;
* recovery is repeatable: recovering again after abandoning the first
  recovery (and, every ``recovery_kill_every`` states, after a SIGKILL in the
  middle of recovery) gives the same contents;
* new writes work after recovery; and with ``chain=True`` every run starts
  from a crash state of the previous one, so recovery itself is traced and
  crashed, and writes made after a recovery must survive the next crash.

``check=fn`` calls ``fn(db)`` on every recovered crash state that passed the
oracle (``db`` the recovered engine): your application's own rules, e.g.
"a finished task has its result". An exception from it is a failure of kind
``check``, with its traceback.

The workload must be a module-level function ``workload(db, rng, *args,
**kwargs)`` (``rng`` a seeded ``random.Random``; ``args``/``kwargs`` given to
:func:`crash_check` are pickled to the child) and make its writes from one
thread. An exception in it is reported as a failure of kind ``workload`` with
the workload's own traceback -- your code failed, not recovery. The engine's
recovery messages (a cut torn tail, ...) go to the ``walstate`` logger only. Reads return
real results; only writes are recorded. With ``chain=True`` (the default) a
run starts on the directory a crash of the previous run left, so the
workload must cope with existing data -- as the application does when it
restarts after a crash.

For fast, shrinking search with hypothesis, in process, see
:mod:`walstate.testing.stateful` (``RecoveryMachine``; docs/TESTING.md).

``crashtest_main`` is ``walstate crashtest [DIR] --runs N``: the same campaign
with a built-in mixed workload, against the disk under DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..layout import Layout, not_files
from . import crashsim
from .crashsim import FLAVORS, Trace, build_preload, crash_points, crash_states, read_tree

__all__ = ["CrashCheckResult", "Failure", "RecordingEngine", "check_recovered", "crash_check",
           "crashtest_main", "expected_states", "mixed_workload"]

Workload = Callable[..., None]   # workload(db: RecordingEngine, rng, *args, **kwargs)
Check = Callable[[Any], None]
WORKLOAD_FAILED = 3   # the child's exit status when the workload raised
PROBE_KEY = b"\xffwalstate.testing.probe"
_WORLD_DB = "db"


# ---- the workload side ----------------------------------------------------------------------

def _enc(op: tuple) -> list:
    if op[0] == "P":
        return ["P", op[1].hex(), op[2].hex()]
    if op[0] == "D":
        return ["D", op[1].hex()]
    return ["B", [_enc(o) for o in op[1]]]


def _dec(j: list) -> tuple:
    if j[0] == "P":
        return ("P", bytes.fromhex(j[1]), bytes.fromhex(j[2]))
    if j[0] == "D":
        return ("D", bytes.fromhex(j[1]))
    return ("B", [_dec(o) for o in j[1]])


class _RecordingBatch:
    def __init__(self, owner: RecordingEngine) -> None:
        self._owner = owner
        self._ops: list[tuple] = []
        self.lsn: int | None = None

    def put(self, key: bytes, value: bytes) -> None:
        self._ops.append(("P", bytes(key), bytes(value)))

    def delete(self, key: bytes) -> None:
        self._ops.append(("D", bytes(key)))

    def __enter__(self) -> _RecordingBatch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and self._ops:
            self.lsn = self._owner._write(("B", self._ops))
        self._ops = []



def run_op(db: Any, op: tuple) -> int:
    """Performs one operation of the op encoding (("P", k, v), ("D", k) or
    ("B", [ops])) on ``db`` as one WAL record; returns its LSN."""
    if op[0] == "P":
        return db.put(op[1], op[2])
    if op[0] == "D":
        return db.delete(op[1])
    with db.batch() as b:
        for o in op[1]:
            if o[0] == "P":
                b.put(o[1], o[2])
            else:
                b.delete(o[1])
    return b.lsn

class RecordingEngine:
    """An :class:`~walstate.Engine` that reports each write: "A seq op" before it
    starts, "K seq" (durable) or "R seq" (returned, not yet durable) after it
    returns, "F seq error" if it raised, and "S seq" once a ``sync()``,
    ``checkpoint()`` or ``close()`` made every write up to ``seq`` durable.
    Everything else is the engine's own method."""

    def __init__(self, db: Any, mark: Callable[[str], None]) -> None:
        self._db = db
        self._mark = mark
        self._mu = threading.Lock()
        self._seq = -1
        self._always = db.config.sync == "always"

    @property
    def engine(self) -> Any:
        return self._db

    def _write(self, op: tuple) -> int:
        db = self._db
        with self._mu:  # the commit order is the mark order
            self._seq += 1
            seq = self._seq
            self._mark(f"A {seq} {json.dumps(_enc(op))}")
            try:
                lsn = run_op(db, op)
            except BaseException as exc:
                self._mark(f"F {seq} {type(exc).__name__}")
                raise
            self._mark(f"{'K' if self._always else 'R'} {seq}")
            return lsn

    def put(self, key: bytes, value: bytes) -> int:
        return self._write(("P", bytes(key), bytes(value)))

    def delete(self, key: bytes) -> int:
        return self._write(("D", bytes(key)))

    def batch(self) -> _RecordingBatch:
        return _RecordingBatch(self)

    def _durable(self, fn: Callable[[], Any]) -> Any:
        with self._mu:
            seq = self._seq
        out = fn()
        self._mark(f"S {seq}")
        return out

    def sync(self) -> int:
        return self._durable(self._db.sync)

    def checkpoint(self) -> Any:
        return self._durable(self._db.checkpoint)

    def close(self) -> None:
        self._durable(self._db.close)

    def __enter__(self) -> RecordingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: object) -> bool:
        return key in self._db

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def mixed_workload(db: RecordingEngine, rng: random.Random) -> None:
    """The built-in workload of ``walstate crashtest``: puts of 1 B..24 KiB
    (crossing segments), deletes, batches, manual checkpoints and syncs, over
    a small key space so that values are overwritten."""
    for _ in range(rng.randrange(40, 120)):
        r = rng.random()
        key = b"key%03d" % rng.randrange(150)
        if r < 0.55:
            size = rng.choice((1, 10, 100, 700, 3000)) if rng.random() < 0.95 else 24000
            db.put(key, rng.randbytes(size))
        elif r < 0.7:
            db.delete(key)
        elif r < 0.9:
            with db.batch() as b:
                for _ in range(rng.randrange(2, 9)):
                    k = b"key%03d" % rng.randrange(150)
                    if rng.random() < 0.8:
                        b.put(k, rng.randbytes(rng.randrange(1, 800)))
                    else:
                        b.delete(k)
        elif r < 0.95:
            db.sync()
        else:
            db.checkpoint()


def _load_workload(spec: dict) -> Workload:
    mod = None
    if spec["module"] != "__main__":
        try:
            mod = importlib.import_module(spec["module"])
        except ImportError:
            mod = None
    if mod is None:
        if not spec.get("file"):
            raise RuntimeError(f"cannot import the workload's module {spec['module']!r}")
        s = importlib.util.spec_from_file_location("_walstate_workload", spec["file"])
        assert s is not None and s.loader is not None
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    obj: Any = mod
    for part in spec["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


def _child_main(argv: Sequence[str] | None = None) -> int:
    """The traced child: opens the directory, runs the workload, closes."""
    import walstate

    args = list(sys.argv[1:] if argv is None else argv)
    with open(args[0]) as f:
        spec = json.load(f)
    sys.path[:0] = [p for p in spec.get("sys_path", []) if p not in sys.path]
    fn = _load_workload(spec["workload"])
    fd = os.open(spec["mark"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def mark(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    wargs, wkwargs = pickle.loads(bytes.fromhex(spec.get("args", ""))) if spec.get("args") \
        else ((), {})
    db = walstate.open(spec["db"], **spec["options"])
    mark("O")
    rec = RecordingEngine(db, mark)
    try:
        fn(rec, random.Random(spec["seed"]), *wargs, **wkwargs)
    except Exception:
        with open(spec["error"], "w") as f:
            f.write(traceback.format_exc())
        mark("W")
        db._abandon()
        return WORKLOAD_FAILED
    rec.close()
    mark("C")
    return 0


# ---- the oracle ----------------------------------------------------------------------------

def apply_op(state: dict[bytes, bytes], op: tuple) -> None:
    """Applies ("P", key, value), ("D", key) or ("B", [ops]) to a dict model."""
    if op[0] == "P":
        state[op[1]] = op[2]
    elif op[0] == "D":
        state.pop(op[1], None)
    else:
        for o in op[1]:
            apply_op(state, o)


@dataclass
class History:
    """What the workload reported up to a crash point."""

    ops: list[tuple[int, tuple]] = field(default_factory=list)  # (seq, op) attempted, in order
    status: dict[int, str] = field(default_factory=dict)        # seq -> K/R/F:<error>
    durable_seq: int = -1                                       # every seq <= this is durable
    opened: bool = False

    @classmethod
    def from_marks(cls, lines: Sequence[str]) -> History:
        h = cls()
        for line in lines:
            tag, _, rest = line.partition(" ")
            if tag == "A":
                seq, _, js = rest.partition(" ")
                h.ops.append((int(seq), _dec(json.loads(js))))
            elif tag in ("K", "R"):
                seq = int(rest)
                h.status[seq] = tag
                if tag == "K":
                    h.durable_seq = max(h.durable_seq, seq)
            elif tag == "F":
                seq, _, err = rest.partition(" ")
                h.status[int(seq)] = "F:" + err
            elif tag == "S":
                h.durable_seq = max(h.durable_seq, int(rest))
            elif tag == "O":
                h.opened = True
        return h

    @property
    def acknowledged(self) -> int:
        return sum(1 for s, _ in self.ops if s <= self.durable_seq
                   and not self.status.get(s, "").startswith("F"))


def expected_states(base: dict[bytes, bytes], history: History
                    ) -> tuple[int, list[dict[bytes, bytes]]]:
    """(index of the first allowed state, the states after each prefix of the
    attempted writes). Writes that raised a clean error (not EngineFailedError)
    are left out: the engine promises they were not committed."""
    cands = [(s, op) for s, op in history.ops
             if not (history.status.get(s, "").startswith("F")
                     and history.status[s] != "F:EngineFailedError")]
    states = [dict(base)]
    cur = dict(base)
    for _s, op in cands:
        apply_op(cur, op)
        states.append(dict(cur))
    need = sum(1 for s, _ in cands if s <= history.durable_seq)
    return need, states


def check_recovered(base: dict[bytes, bytes], history: History,
                    got: dict[bytes, bytes]) -> tuple[str | None, int]:
    """(None, k) if ``got`` is the state after the first k attempted writes with
    every acknowledged one included; else (what is wrong, -1)."""
    need, states = expected_states(base, history)
    for k in range(len(states) - 1, need - 1, -1):
        if states[k] == got:
            return None, k
    for k in range(need - 1, -1, -1):
        if states[k] == got:
            return (f"lost acknowledged writes: the state is that after {k} writes but "
                    f"{need} were acknowledged"), -1
    last = states[-1]
    missing = sorted(k for k in last if k not in got)[:3]
    extra = sorted(k for k in got if k not in last)[:3]
    wrong = sorted(k for k in got if k in last and got[k] != last[k])[:3]
    return (f"the state is no prefix of the history (need >= {need} of {len(states) - 1} "
            f"writes; vs. all: missing {missing}, extra {extra}, different {wrong})"), -1


def _items(db: Any) -> dict[bytes, bytes]:
    return {bytes(k): bytes(v) for k, v in db.items()}


def _drop(db: Any) -> None:
    """Ends an engine as a crash right after its last fsync would: no shutdown
    checkpoint, no SHUTDOWN record. (``Engine._abandon`` alone keeps the log's
    descriptors open, which a long campaign cannot afford.)"""
    wal, db._wal = db._wal, None
    db._abandon()
    if wal is not None:
        try:
            wal.close()   # nothing is buffered: recovery synced what it wrote
        except Exception:  # a failed log is dropped all the same
            wal.abandon()


# ---- the campaign ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    run: int
    events: int        # the crash point: how many trace events had happened
    flavor: str
    kind: str          # open | oracle | repeat | recovery_kill | new_writes | workload | check
    detail: str
    kept: str | None   # a copy of the crash state, when kept
    traceback: str | None = None   # workload/check: the traceback of your code


@dataclass(frozen=True)
class CrashCheckResult:
    """Counts of one :func:`crash_check` campaign. ``ok`` iff no failure."""

    seed: int
    runs: int
    trace_events: int
    crash_points: int
    crash_states: int
    states_by_flavor: dict[str, int]
    recoveries: int              # opens checked (each state is recovered twice)
    recovery_kills: int          # SIGKILLs during recovery followed by a check
    chained_runs: int            # runs that started from a crash state of the previous run
    ops_attempted: int
    ops_acknowledged: int
    seconds: float
    failures: tuple[Failure, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        fl = ", ".join(f"{k} {v}" for k, v in sorted(self.states_by_flavor.items()))
        lines = [
            f"crash check (seed {self.seed}): {self.runs} runs, {self.ops_attempted} writes "
            f"attempted ({self.ops_acknowledged} acknowledged), {self.trace_events} traced "
            f"events",
            f"  {self.crash_points} crash points -> {self.crash_states} crash states ({fl})",
            f"  {self.recoveries} recoveries, {self.recovery_kills} killed during recovery, "
            f"{self.chained_runs} runs started from a crash state",
            f"  failures: {len(self.failures)}  ({self.seconds:.1f} s)",
        ]
        for f in self.failures[:10]:
            lines.append(f"  FAIL run {f.run} after {f.events} events ({f.flavor}): "
                         f"{f.kind}: {f.detail}" + (f" [kept in {f.kept}]" if f.kept else ""))
        return "\n".join(lines)


def _workload_spec(fn: Workload) -> dict:
    mod = sys.modules.get(fn.__module__)
    return {"module": fn.__module__, "qualname": fn.__qualname__,
            "file": getattr(mod, "__file__", None)}


def _open(path: str, options: dict) -> Any:
    import walstate

    return walstate.open(path, **options)


def _kill_during_recovery(path: str, options: dict, timeout: float) -> int:
    code = ("import sys, json, walstate\n"
            "walstate.open(sys.argv[1], **json.loads(sys.argv[2]))\n")
    env = dict(os.environ, WALSTATE_KILLPOINT="recovery_after_replay")
    p = subprocess.run([sys.executable, "-c", code, path, json.dumps(options)], env=env,
                       capture_output=True, timeout=timeout)
    return p.returncode


class _Campaign:
    def __init__(self, workload: Workload, *, runs: int, seed: int, options: dict,
                 states_per_run: int, flavors: Sequence[str], work: str,
                 recovery_kill_every: int, chain: bool, keep_failures: bool,
                 timeout: float, log: Callable[[str], None] | None,
                 check: Check | None = None, args: bytes = b"") -> None:
        self.spec = _workload_spec(workload)
        self.check, self.args = check, args
        self.runs, self.seed, self.options = runs, seed, dict(options)
        self.states_per_run, self.flavors = states_per_run, tuple(flavors)
        self.work, self.kill_every, self.chain = work, recovery_kill_every, chain
        self.keep, self.timeout, self.log = keep_failures, timeout, log
        self.lib = build_preload()
        self.failures: list[Failure] = []
        self.n = {"events": 0, "points": 0, "states": 0, "recoveries": 0, "kills": 0,
                  "chained": 0, "attempted": 0, "acked": 0}
        self.by_flavor: dict[str, int] = {}

    def fail(self, run: int, st: Any, kind: str, detail: str,
             tb: str | None = None) -> None:
        kept = None
        if self.keep and st is not None and os.path.isdir(st.path):
            kept = os.path.join(self.work, "failures", f"run{run}-{os.path.basename(st.path)}")
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(st.path, kept, ignore=not_files)
        f = Failure(run, st.events if st else -1, st.flavor if st else "-", kind, detail, kept,
                    tb)
        self.failures.append(f)
        if self.log:
            self.log(f"FAIL run {run} after {f.events} events ({f.flavor}): {kind}: {detail}"
                     + (f"\n{tb}" if tb else ""))

    def run(self, start: str | None) -> None:
        start_dir: str | None = None   # pristine crash state to start the next run from
        base: dict[bytes, bytes] = {}
        if start is not None:
            start_dir = os.path.join(self.work, "start0")
            shutil.copytree(start, start_dir, ignore=not_files)
            if os.path.exists(Layout(start_dir).marker):  # else: an empty directory
                with _open(start_dir, {"read_only": True}) as db:
                    base = _items(db)
        for run in range(self.runs):
            nxt = self.one_run(run, start_dir, base)
            if self.chain and nxt is not None:
                start_dir, base = nxt
                self.n["chained"] += 1 if run + 1 < self.runs else 0
            else:
                start_dir, base = None, {}

    def one_run(self, run: int, start_dir: str | None, base: dict[bytes, bytes]
                ) -> tuple[str, dict[bytes, bytes]] | None:
        rng = random.Random(f"{self.seed}/{run}")
        rdir = os.path.join(self.work, f"run{run}")
        shutil.rmtree(rdir, ignore_errors=True)
        world = os.path.join(rdir, "world")
        os.makedirs(world)
        world = os.path.realpath(world)
        if start_dir is not None and os.path.isdir(start_dir):
            shutil.copytree(start_dir, os.path.join(world, _WORLD_DB), ignore=not_files)
        initial = read_tree(world)
        trace_path = os.path.join(rdir, "trace")
        mark_path = os.path.join(rdir, "marks")
        spec_path = os.path.join(rdir, "spec.json")
        error_path = os.path.join(rdir, "workload-error")
        with open(spec_path, "w") as f:
            json.dump({"workload": self.spec, "db": os.path.join(world, _WORLD_DB),
                       "options": self.options, "seed": rng.randrange(1 << 30),
                       "mark": mark_path, "sys_path": sys.path, "args": self.args.hex(),
                       "error": error_path}, f)
        env = dict(os.environ, **crashsim.preload_env(self.lib, world, trace_path, mark_path))
        env.pop("WALSTATE_KILLPOINT", None)
        code = "import sys; from walstate.testing import _child_main; sys.exit(_child_main())"
        try:
            p = subprocess.run([sys.executable, "-c", code, spec_path], env=env,
                               capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.fail(run, None, "workload", f"the workload did not finish in {self.timeout} s")
            return None
        trace = Trace(trace_path)
        if p.returncode == WORKLOAD_FAILED and os.path.exists(error_path):
            with open(error_path) as f:
                tb = f.read()
            last = tb.strip().splitlines()[-1] if tb.strip() else "?"
            self.fail(run, None, "workload", f"the workload raised {last} (your code, not a "
                      "crash: its writes up to there are still crashed and checked)", tb)
        elif p.returncode != 0:
            self.fail(run, None, "workload", f"exit {p.returncode}: {p.stderr[-2000:]}")
        marks = trace.marks()
        full = History.from_marks([m for _, m in marks])
        self.n["events"] += len(trace)
        self.n["attempted"] += len(full.ops)
        self.n["acked"] += full.acknowledged
        points = crash_points(trace, self.states_per_run, rng)
        self.n["points"] += len(points)
        work = os.path.join(rdir, "states")
        os.makedirs(work)
        chained: tuple[str, dict[bytes, bytes]] | None = None
        chain_pick = rng.randrange(len(points))
        mi = 0
        lines: list[str] = []
        for st in crash_states(trace, world, initial, work, points, self.flavors, rng):
            while mi < len(marks) and marks[mi][0] < st.events:
                lines.append(marks[mi][1])
                mi += 1
            hist = History.from_marks(lines)
            self.n["states"] += 1
            self.by_flavor[st.flavor] = self.by_flavor.get(st.flavor, 0) + 1
            pristine = None
            want_chain = (self.chain and chained is None and st.events >= points[chain_pick])
            want_kill = self.kill_every > 0 and self.n["states"] % self.kill_every == 0
            if want_chain or want_kill:
                pristine = st.path + ".pristine"
                shutil.copytree(st.path, pristine, ignore=not_files)
            got = self.check_state(run, st, base, hist, pristine if want_kill else None)
            if got is not None and want_chain:
                chained = (os.path.join(pristine, _WORLD_DB), got)  # type: ignore[arg-type]
            elif pristine is not None:
                shutil.rmtree(pristine, ignore_errors=True)
            shutil.rmtree(st.path, ignore_errors=True)
        if chained is not None:
            keep = os.path.join(self.work, f"start{run + 1}")
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(chained[0], keep)
            chained = (keep, chained[1])
        if start_dir is not None and start_dir.startswith(self.work):
            shutil.rmtree(start_dir, ignore_errors=True)
        shutil.rmtree(rdir, ignore_errors=True)
        return chained

    def check_state(self, run: int, st: Any, base: dict[bytes, bytes], hist: History,
                    pristine: str | None) -> dict[bytes, bytes] | None:
        """Recovers the crash state and checks the oracle; returns the recovered
        contents (None on failure)."""
        import walstate

        path = os.path.join(st.path, _WORLD_DB)
        if not os.path.isdir(path) or not os.path.exists(Layout(path).marker):
            # never initialised (no marker survived): nothing may have been acknowledged
            if hist.opened and hist.acknowledged:
                self.fail(run, st, "oracle", "the directory's creation marker is gone but "
                          f"{hist.acknowledged} writes were acknowledged")
                return None
            if base:
                self.fail(run, st, "oracle", "a directory that held data lost its marker")
                return None
            if not os.path.isdir(path):
                return {}
            # what a cut-short creation left: the next open must redo it (below)
        opts = {k: v for k, v in self.options.items() if k != "sync"}
        try:
            db = _open(path, opts)
        except Exception as exc:
            self.fail(run, st, "open", f"{type(exc).__name__}: {exc}")
            return None
        self.n["recoveries"] += 1
        try:
            got = _items(db)
        finally:
            _drop(db)
        bad, _k = check_recovered(base, hist, got)
        if bad:
            self.fail(run, st, "oracle", bad)
            return None
        try:
            db = _open(path, opts)
        except Exception as exc:
            self.fail(run, st, "repeat", f"second recovery failed: {type(exc).__name__}: {exc}")
            return None
        self.n["recoveries"] += 1
        try:
            again = _items(db)
            if again != got:
                self.fail(run, st, "repeat", "a second recovery gave another state")
                return None
            if self.check is not None:
                try:
                    self.check(db)
                except Exception as exc:
                    self.fail(run, st, "check", f"check({_WORLD_DB}) raised "
                              f"{type(exc).__name__}: {exc}", traceback.format_exc())
                    return None
            db.put(PROBE_KEY, b"probe")
            db.sync()
            if db.get(PROBE_KEY) != b"probe":
                self.fail(run, st, "new_writes", "a write after recovery did not read back")
                return None
            db.delete(PROBE_KEY)
        except walstate.WalStateError as exc:
            self.fail(run, st, "new_writes", f"{type(exc).__name__}: {exc}")
            return None
        finally:
            try:
                db.close()
            except walstate.WalStateError:
                _drop(db)
        if pristine is not None:
            kp = os.path.join(pristine + ".kill", _WORLD_DB)
            shutil.copytree(os.path.join(pristine, _WORLD_DB), kp, ignore=not_files)
            try:
                rc = _kill_during_recovery(kp, opts, self.timeout)
                if rc != -signal.SIGKILL:
                    self.fail(run, st, "recovery_kill", f"the kill point did not fire (exit {rc})")
                    return None
                self.n["kills"] += 1
                with _open(kp, opts) as db:
                    if _items(db) != got:
                        self.fail(run, st, "recovery_kill",
                                  "recovery after a crash during recovery gave another state")
                        return None
            except Exception as exc:
                self.fail(run, st, "recovery_kill", f"{type(exc).__name__}: {exc}")
                return None
            finally:
                shutil.rmtree(os.path.dirname(kp), ignore_errors=True)
        return got


@contextlib.contextmanager
def _recovery_messages_to_logging() -> Iterator[None]:
    """While crash states are recovered, the engine's messages about them (a cut
    torn tail...) reach the ``walstate`` logger's handlers only: without a
    handler, logging's last resort would print every one to stderr."""
    quiet = logging.NullHandler()
    lg = logging.getLogger("walstate")
    lg.addHandler(quiet)
    try:
        yield
    finally:
        lg.removeHandler(quiet)


def crash_check(workload: Workload, runs: int = 200, *, seed: int | None = None,
                options: dict | None = None, states_per_run: int = 12,
                flavors: Sequence[str] = FLAVORS, workdir: str | None = None,
                recovery_kill_every: int = 10, chain: bool = True,
                keep_failures: bool = True, timeout: float = 120.0,
                start: str | None = None,
                log: Callable[[str], None] | None = None,
                check: Check | None = None, args: Sequence[Any] = (),
                kwargs: dict[str, Any] | None = None) -> CrashCheckResult:
    """Runs ``workload`` ``runs`` times under the power-loss simulator and
    checks every simulated crash state against the oracle (see the module
    docstring). ``options`` are ``walstate.open`` options for the workload
    (default ``sync="always"``, small segments so that rotation and
    checkpoints happen). ``states_per_run`` crash points are taken from each
    trace, each rebuilt in every one of ``flavors``. ``start``: a closed
    walstate directory (or an empty directory) to copy as the first run's
    starting point (default: none, so the first run also crashes while
    creating the directory). ``workdir`` (default: a
    temporary directory, removed afterwards unless a failure was kept) is
    where the traced directories live: put it on the disk you care about.
    ``check``: ``check(db)`` on every recovered crash state (your invariants).
    ``args``/``kwargs``: passed to ``workload(db, rng, *args, **kwargs)`` in the
    child (pickled).

    Returns a :class:`CrashCheckResult`; raises RuntimeError when the tracer
    cannot be built (no C compiler) and ValueError on bad arguments.
    """
    if runs < 1 or states_per_run < 1:
        raise ValueError("runs and states_per_run must be >= 1")
    bad = [f for f in flavors if f not in FLAVORS]
    if bad:
        raise ValueError(f"unknown flavors {bad}; known: {FLAVORS}")
    if getattr(workload, "__name__", "") == "<lambda>" or "<locals>" in workload.__qualname__:
        raise ValueError("the workload must be a module-level function (it runs in a "
                         "subprocess)")
    if check is not None and not callable(check):
        raise ValueError(f"check must be a callable check(db), not {type(check).__name__}")
    try:
        packed = pickle.dumps((tuple(args), dict(kwargs or {})))
    except Exception as exc:
        raise ValueError(f"args/kwargs must be picklable (they go to the workload's "
                         f"process): {exc}") from exc
    seed = random.randrange(1 << 31) if seed is None else seed
    opts = {"sync": "always", "segment_size": 64 * 1024, "max_wal_size": 192 * 1024,
            "checkpoint_timeout": 3600.0}
    opts.update(options or {})
    own = workdir is None
    work = tempfile.mkdtemp(prefix="walstate-crashcheck-") if own else \
        tempfile.mkdtemp(prefix="crashcheck-", dir=workdir)
    t0 = time.monotonic()
    camp = _Campaign(workload, runs=runs, seed=seed, options=opts,
                     states_per_run=states_per_run, flavors=flavors, work=work,
                     recovery_kill_every=recovery_kill_every, chain=chain,
                     keep_failures=keep_failures, timeout=timeout, log=log, check=check,
                     args=packed)
    try:
        with _recovery_messages_to_logging():
            camp.run(start)
    except BaseException:
        if log:
            log(traceback.format_exc())
        raise
    finally:
        if not camp.failures or not keep_failures:
            shutil.rmtree(work, ignore_errors=True)
    n = camp.n
    return CrashCheckResult(
        seed=seed, runs=runs, trace_events=n["events"], crash_points=n["points"],
        crash_states=n["states"], states_by_flavor=dict(camp.by_flavor),
        recoveries=n["recoveries"], recovery_kills=n["kills"], chained_runs=n["chained"],
        ops_attempted=n["attempted"], ops_acknowledged=n["acked"],
        seconds=time.monotonic() - t0, failures=tuple(camp.failures))


def crashtest_main(argv: Sequence[str] | None = None) -> int:
    """``walstate crashtest [DIR] --runs N``: the power-loss campaign with the
    built-in mixed workload on the disk holding DIR (default: a temporary
    directory). Prints the counts; exit 0 if every crash state recovered
    correctly, 1 otherwise, 2 on bad usage."""
    p = argparse.ArgumentParser(
        prog="walstate crashtest",
        description="Simulate power loss at many points of a traced walstate workload on "
                    "this machine's disk and check every recovery (docs/RELIABILITY.md).")
    p.add_argument("dir", nargs="?", default=None,
                   help="where to run (default: a temporary directory)")
    p.add_argument("--runs", type=int, default=20, help="workload runs [20]")
    p.add_argument("--states", type=int, default=12,
                   help="crash points per run, each rebuilt in every flavor [12]")
    p.add_argument("--seed", type=int, default=None, help="reproduce an earlier campaign")
    p.add_argument("--sync", choices=("always", "interval", "none"), default="always")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.runs < 1 or args.states < 1:
        print("walstate crashtest: --runs and --states must be >= 1", file=sys.stderr)
        return 2
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    seed = random.randrange(1 << 31) if args.seed is None else args.seed
    if not args.json:
        print(f"walstate crashtest: seed {seed} (rerun with --seed {seed})", flush=True)
    try:
        res = crash_check(mixed_workload, runs=args.runs, seed=seed,
                          options={"sync": args.sync}, states_per_run=args.states,
                          workdir=args.dir,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
    except RuntimeError as exc:
        print(f"walstate crashtest: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out = {k: v for k, v in res.__dict__.items() if k != "failures"}
        out["failures"] = [f.__dict__ for f in res.failures]
        print(json.dumps(out, sort_keys=True))
    else:
        print(res.summary())
    return 0 if res.ok else 1
