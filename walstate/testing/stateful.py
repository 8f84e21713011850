"""Fuzz *your* recovery with hypothesis: :class:`RecoveryMachine`.

::

    from hypothesis import strategies as st
    from hypothesis.stateful import invariant, rule
    from walstate.testing.stateful import RecoveryMachine

    class Bank(RecoveryMachine):
        options = {"sync": "always"}

        @rule(amount=st.integers(1, 50))
        def transfer(self, amount):
            a, b = (int(self.db.get(k, b"100")) for k in (b"alice", b"bob"))
            with self.db.batch() as tx:            # two puts here would be the bug
                tx.put(b"alice", b"%d" % (a - amount))
                tx.put(b"bob", b"%d" % (b + amount))

        @invariant()
        def money_is_conserved(self):
            assert sum(int(self.db.get(k, b"100")) for k in (b"alice", b"bob")) == 200

    TestBank = Bank.TestCase

Your rules use ``self.db``, an engine opened with the class attribute
``options`` (a :class:`RecordedEngine`: the engine's methods, with every write
recorded as attempted and as acknowledged). The machine adds rules of its own:

``crash(where, skip, seed)``
    what SIGKILL leaves: every byte handed to the OS survives, what sat in the
    engine's buffers does not.
``power_loss(flavor, where, skip, seed)``
    only what was fsynced survives, in one of the crash simulator's flavours
    (``durable``, ``subset``, ``torn``, ``zeros``, ``garbage``: see
    docs/TESTING.md).
``reopen()``
    a clean close and open.

``where`` is ``"between writes"``; ``"next write: before|torn|after"`` (inside
the next write of your rules after ``skip`` more writes -- a batch is one
write -- before it started, with a prefix of its bytes in the file, or with
all of them there but not yet acknowledged: your rule stops there, as a
killed process would); ``"checkpoint: <step>"`` (the machine runs a
checkpoint and crashes at that step); or ``"recovery: <step>"`` (crash now,
then crash again at that step of the recovery, then recover). After every
recovery the machine checks walstate's own guarantee -- it opens, and its
contents equal the state after some prefix of the attempted writes that
includes every acknowledged one (else :class:`RecoveryError`) -- calls
``after_recovery(recovery)`` and then hypothesis runs your invariants and
rules on the recovered engine. A failure of your rules or invariants carries a
note saying whether it happened before any crash (your model or your
application is wrong even without crashes) or after which crash.

Everything runs in this process (no subprocess per example); data
directories go to /dev/shm when it is writable (the simulated crash does not
depend on the disk). What this cannot see that the LD_PRELOAD tracer of
:func:`walstate.testing.crash_check` can is listed in docs/TESTING.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

try:
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, multiple, rule
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("walstate.testing.stateful needs hypothesis: "
                      "pip install 'walstate[testing]'") from exc

from .. import _hooks
from .._native import lib
from ..layout import SNAPSHOT_DATA, SNAPSHOT_DIR, WAL_DIR
from ..wal import segment_name
from . import History, _drop, check_recovered, run_op
from .crashsim import FLAVORS, SECTOR, read_tree

__all__ = ["CHECKPOINT_STEPS", "RECOVERY_STEPS", "WHERE", "RecordedEngine", "Recovery",
           "RecoveryError", "RecoveryMachine"]

RULE_MARKERS = ("hypothesis_stateful_rule", "hypothesis_stateful_initialize_rule")
CHECKPOINT_STEPS = ("checkpoint_after_freeze", "checkpoint_chunk", "checkpoint_before_commit",
                    "checkpoint_after_commit", "checkpoint_before_remove",
                    "checkpoint_after_remove")
# the steps of open() after a crash: the replay, the cut of a torn tail, the
# checkpoint that ends recovery (when anything was replayed)
RECOVERY_STEPS = ("recovery_after_replay", "recovery_after_cut", "checkpoint_before_commit",
                  "checkpoint_after_commit", "checkpoint_after_remove")
WRITE_POINTS = ("before", "torn", "after")
WHERE = ("between writes", *(f"next write: {p}" for p in WRITE_POINTS),
         *(f"checkpoint: {s}" for s in CHECKPOINT_STEPS),
         *(f"recovery: {s}" for s in RECOVERY_STEPS))
# half the crashes go inside a write of your rules (where your atomicity lives),
# the other half between writes, inside a checkpoint or inside a recovery
WHERE_STRATEGY = st.one_of(st.sampled_from(WHERE[1:4]),
                           st.sampled_from((WHERE[0], *WHERE[4:])))
SEG_HDR = lib.WAL_SEG_HDR_SIZE
DEFAULT_OPTIONS: dict[str, Any] = {"segment_size": 64 * 1024, "max_wal_size": 256 * 1024,
                                   "checkpoint_timeout": 3600.0}
_SEG = f"{WAL_DIR}/"
_LMDB = f"{SNAPSHOT_DIR}/{SNAPSHOT_DATA}"


class RecoveryError(AssertionError):
    """walstate's own guarantee failed after a simulated crash: the directory did
    not open, or its contents are no prefix of the writes that includes every
    acknowledged one, or an LSN was reused. (Not your application's bug.)"""


class _Crash(BaseException):
    """Ends the user's code at the crash point, as SIGKILL would (a
    BaseException, so that ``except Exception`` does not swallow it)."""


@dataclass(frozen=True)
class Recovery:
    """What one restart found: ``kept`` of the ``attempted`` writes since the
    previous restart survived (a prefix, with all ``acknowledged`` ones);
    ``lost`` are the others, as ("P", key, value) / ("D", key) / ("B", [...])."""

    number: int                 # restarts in this example, this one included
    crash: str                  # what happened, e.g. "power loss (torn) in a write: after"
    attempted: int
    acknowledged: int
    kept: int
    state: dict[bytes, bytes] = field(repr=False)
    lost: tuple[tuple, ...] = field(repr=False)


@dataclass
class _Arm:
    kind: str                   # "kill" | "power"
    flavor: str
    point: str                  # before | torn | after | a step name
    skip: int
    rng: random.Random
    thread: int


# ---- the recording handle --------------------------------------------------------------------

class _RecordedBatch:
    def __init__(self, owner: RecordedEngine) -> None:
        self._owner = owner
        self._ops: list[tuple] = []
        self.lsn: int | None = None

    def put(self, key: bytes, value: bytes) -> None:
        self._owner._alive()
        self._ops.append(("P", bytes(key), bytes(value)))

    def delete(self, key: bytes) -> None:
        self._owner._alive()
        self._ops.append(("D", bytes(key)))

    def get(self, key: bytes, default: Any = None) -> Any:
        k = bytes(key)
        for op in reversed(self._ops):
            if op[1] == k:
                return op[2] if op[0] == "P" else default
        return self._owner.get(k, default)

    def __enter__(self) -> _RecordedBatch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        ops, self._ops = self._ops, []
        if exc_type is None and ops:
            self.lsn = self._owner._write(("B", ops))


class RecordedEngine(MutableMapping):
    """``self.db`` of a :class:`RecoveryMachine`: the engine, with every write
    recorded (attempted, then acknowledged once durable per ``sync``). The same
    object stays valid across crashes: the machine swaps the engine inside.
    Every other attribute is the engine's own (``engine`` is the engine)."""

    def __init__(self, machine: RecoveryMachine, engine: Any) -> None:
        self._m = machine
        self._db = engine
        self._mu = threading.RLock()

    @property
    def engine(self) -> Any:
        return self._db

    def _alive(self) -> None:
        if self._m._pending is not None:
            raise _Crash()  # the process is dead: nothing after the crash point runs

    def _write(self, op: tuple) -> Any:
        m = self._m
        self._alive()
        with self._mu:
            h = m._history
            seq = m._seq = m._seq + 1
            h.ops.append((seq, op))
            arm = m._take_write_arm()
            if arm is not None and arm.point == "before":
                m._crash_here(arm, where="next write: before")
            pre = m._wal_pos()
            db = self._db
            try:
                lsn = run_op(db, op)
            except BaseException as exc:
                h.status[seq] = "F:" + type(exc).__name__
                raise
            m._last_write = (pre, m._wal_pos())
            if arm is not None:
                m._crash_here(arm, where=f"next write: {arm.point}", in_write=m._last_write)
            if type(lsn) is not int or lsn <= m._max_lsn:
                raise RecoveryError(f"the write returned LSN {lsn!r} after LSN {m._max_lsn}: "
                                    "LSNs must strictly increase and never be reused")
            m._max_lsn = lsn
            if m._always:
                h.status[seq] = "K"
                h.durable_seq = seq
            else:
                h.status[seq] = "R"
            return lsn

    def _durable(self, fn: Callable[[], Any]) -> Any:
        self._alive()
        with self._mu:
            seq = self._m._seq
            out = fn()
            h = self._m._history
            h.durable_seq = max(h.durable_seq, seq)
            return out

    # writes
    def put(self, key: bytes, value: bytes) -> int:
        return self._write(("P", bytes(key), bytes(value)))

    def delete(self, key: bytes) -> int:
        return self._write(("D", bytes(key)))

    def batch(self) -> _RecordedBatch:
        self._alive()
        return _RecordedBatch(self)

    def sync(self) -> int:
        return self._durable(self._db.sync)

    def checkpoint(self) -> Any:
        return self._durable(self._db.checkpoint)

    def close(self) -> None:
        self._durable(self._db.close)

    # the mapping interface
    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.put(key, value)

    def __delitem__(self, key: bytes) -> None:
        if key not in self:
            raise KeyError(key)
        self.delete(key)

    def __getitem__(self, key: bytes) -> bytes:
        self._alive()
        v = self._db.get(key)
        if v is None:
            raise KeyError(key)
        return v

    def __contains__(self, key: object) -> bool:
        self._alive()
        return key in self._db

    def __iter__(self) -> Iterator[bytes]:
        self._alive()
        return (k for k, _v in self._db.items())

    def __len__(self) -> int:
        self._alive()
        try:
            return len(self._db)
        except TypeError:
            return sum(1 for _ in self._db.items())

    def get(self, key: bytes, default: Any = None) -> Any:
        self._alive()
        return self._db.get(key, default)

    def items(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._alive()
        return self._db.items(*args, **kwargs)

    def __enter__(self) -> RecordedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_m", "_db", "_mu"):
            raise AttributeError(name)
        self._alive()
        return getattr(self._db, name)

    def __repr__(self) -> str:
        return f"<RecordedEngine {self._db!r}>"


# ---- the machine -----------------------------------------------------------------------------

_current: list[RecoveryMachine] = []   # the machine whose engine is live (one at a time)


def _on_step(name: str) -> None:
    if _current:
        _current[-1]._step(name)


def _workdir() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _guard(fn: Callable[..., Any], has_targets: bool) -> Callable[..., Any]:
    """A user rule: a crash inside it ends it (as a kill ends the process) and the
    machine recovers before hypothesis goes on; a failure is annotated."""

    @functools.wraps(fn)
    def run(self: RecoveryMachine, *args: Any, **kwargs: Any) -> Any:
        self._in_rule += 1
        try:
            out = fn(self, *args, **kwargs)
        except _Crash:
            out = multiple() if has_targets else None
        except BaseException as exc:
            if self._pending is None:
                self._annotate(exc)
            raise
        finally:
            self._in_rule -= 1
        if self._pending is not None and not self._in_rule:
            self._finish_crash(None)
        return out

    run._walstate_guarded = True  # type: ignore[attr-defined]
    return run


class RecoveryMachine(RuleBasedStateMachine):
    """A hypothesis state machine to subclass: your rules act on ``self.db``; the
    machine crashes, cuts the power and reopens between and inside them, and
    checks every recovery (see the module docstring).

    Class attributes: ``options`` (``walstate.open`` options, over small
    segments so that rotation happens: ``DEFAULT_OPTIONS``), ``flavors`` (the
    power-loss flavours drawn), ``max_restarts`` (crashes, power losses and
    reopens per example [3]: each costs a recovery, and the steps between
    them are where your rules run), ``workdir`` (where the data directories
    go; default /dev/shm when writable, else the temporary directory).
    """

    options: ClassVar[dict[str, Any]] = {}
    flavors: ClassVar[tuple[str, ...]] = FLAVORS
    workdir: ClassVar[str | None] = None
    max_restarts: ClassVar[int] = 3

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = [f for f in cls.flavors if f not in FLAVORS]
        if bad:
            raise ValueError(f"{cls.__name__}.flavors: unknown {bad}; known: {FLAVORS}")
        for name, value in list(vars(cls).items()):
            for marker in RULE_MARKERS:
                r = getattr(value, marker, None)
                if r is not None and not getattr(r.function, "_walstate_guarded", False):
                    guarded = _guard(r.function, bool(r.targets))
                    object.__setattr__(r, "function", guarded)
                    direct = _guard(value, bool(r.targets))   # a direct call is guarded too
                    direct.__dict__.update(value.__dict__)
                    setattr(cls, name, direct)

    def __init__(self) -> None:
        super().__init__()
        opts = dict(DEFAULT_OPTIONS)
        opts.update(type(self).options)
        if opts.get("read_only"):
            raise ValueError(f"{type(self).__name__}.options: read_only=True: the machine "
                             "needs a writable engine")
        if opts.get("recovery") == "strict":
            raise ValueError(f"{type(self).__name__}.options: recovery='strict' refuses the "
                             "torn tail a crash leaves by design; use 'tolerate_tail' or "
                             "'point_in_time'")
        self._options = opts
        self._dir = tempfile.mkdtemp(prefix="walstate-machine-",
                                     dir=type(self).workdir or _workdir())
        self.path = os.path.join(self._dir, "db")
        self._history = History()
        self._base: dict[bytes, bytes] = {}
        self._seq = -1
        self._max_lsn = 0
        self._in_rule = 0
        self._write_arm: _Arm | None = None
        self._step_arm: _Arm | None = None
        self._pending: tuple[dict[str, bytes | None], str] | None = None
        self._last_write: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
        self._lmdb_durable: bytes | None = None
        self.crashes = 0                          # simulated crashes so far
        self.restarts = 0                         # reopens so far (crashes and clean)
        self.last_recovery: Recovery | None = None
        _current.append(self)
        _hooks.on_step(_on_step)
        # the engine's recovery messages (a cut torn tail...) go to logging only:
        # without this, logging's last resort would print each one to stderr
        self._quiet = logging.NullHandler()
        logging.getLogger("walstate").addHandler(self._quiet)
        try:
            engine = self._open()
        except BaseException:
            self._release()
            raise
        self._always = engine.config.sync == "always"
        self.db = RecordedEngine(self, engine)

    # ---- hooks for subclasses --------------------------------------------------------------
    def after_recovery(self, recovery: Recovery) -> None:
        """Called after every reopen (crash or clean), once walstate's guarantee
        held, before your invariants run: rebuild what your objects keep in
        memory, or reconcile your model with ``recovery``."""

    # ---- the machine's rules ---------------------------------------------------------------
    def _may_restart(self) -> bool:
        # Not while a crash waits for the next write (that write comes first), nor
        # past the budget. A no-op then, not a precondition: a precondition would
        # make the rules drawn after it depend on the steps before, which keeps
        # the shrinker from deleting steps.
        return self.restarts < type(self).max_restarts and self._write_arm is None

    @rule(where=WHERE_STRATEGY, skip=st.integers(0, 3), seed=st.integers(0, 2**16))
    def crash(self, where: str, skip: int, seed: int) -> None:
        """SIGKILL at ``where``: the files as the OS has them survive."""
        if not self._may_restart():
            return
        self._crash("kill", "", where, skip, seed)

    @rule(flavor=st.sampled_from(FLAVORS), where=WHERE_STRATEGY,
          skip=st.integers(0, 3), seed=st.integers(0, 2**16))
    def power_loss(self, flavor: str, where: str, skip: int, seed: int) -> None:
        """Power cut at ``where``: only what was fsynced survives, as ``flavor``."""
        if not self._may_restart():
            return
        if flavor not in type(self).flavors:
            flavor = type(self).flavors[0]
        self._crash("power", flavor, where, skip, seed)

    @rule()
    def reopen(self) -> None:
        """A clean close and open: every write must be there."""
        if not self._may_restart():
            return
        self._write_arm = None
        self.db.close()
        what = "clean close and open"
        self._recovered(what, self._open_checked(what))

    # ---- crashing --------------------------------------------------------------------------
    def _crash(self, kind: str, flavor: str, where: str, skip: int, seed: int) -> None:
        rng = random.Random(seed)
        self._write_arm = None
        me = threading.get_ident()
        if where.startswith("next write: "):
            self._write_arm = _Arm(kind, flavor, where.split(": ", 1)[1], skip, rng, me)
            return
        if where.startswith("checkpoint: "):
            step = where.split(": ", 1)[1]
            self._step_arm = _Arm(kind, flavor, step, 0, rng, me)
            try:
                self.db.checkpoint()
            except _Crash:
                pass
            finally:
                self._step_arm = None
            if self._pending is None:
                return  # the step was not reached: a plain checkpoint
            self._finish_crash(None)
            return
        step = where.split(": ", 1)[1] if where.startswith("recovery: ") else None
        self._crash_here(_Arm(kind, flavor, "now", 0, rng, me), "between writes", raise_=False)
        self._finish_crash(step)

    def _take_write_arm(self) -> _Arm | None:
        arm = self._write_arm
        if arm is None or not self._in_rule or threading.get_ident() != arm.thread:
            return None
        if arm.skip > 0:
            arm.skip -= 1
            return None
        self._write_arm = None
        return arm

    _POINTS: ClassVar[dict[str, str]] = {
        "before": "before it started", "torn": "with a prefix of its bytes in the file",
        "after": "written, not yet acknowledged"}

    def _describe(self, arm: _Arm, where: str) -> str:
        what = "SIGKILL" if arm.kind == "kill" else f"power loss ({arm.flavor})"
        if where.startswith("next write: "):
            return f"{what} inside a write, {self._POINTS[arm.point]}"
        if where.startswith("checkpoint step "):
            return f"{what} inside a checkpoint, at {where[len('checkpoint step '):]}"
        return f"{what} {where}"

    def _crash_here(self, arm: _Arm, where: str, in_write: Any = None,
                    from_step: bool = False, raise_: bool = True) -> None:
        """Records the files as the crash leaves them; then (``raise_``) ends the
        caller's code."""
        engine = self.db._db if hasattr(self, "db") else None
        ck = getattr(engine, "_checkpointer", None)
        # no background checkpoint may change files while they are read
        mu = ck._run_mu if ck is not None and not from_step else contextlib.nullcontext()
        with mu:
            pos = self._wal_pos()
            image = read_tree(self.path)
        if arm.kind == "power":
            self._cut_power(image, pos, arm, in_write)
        elif arm.point == "torn" and in_write is not None:
            self._tear(image, in_write, arm.rng)
        self._pending = (image, self._describe(arm, where))
        if raise_:
            raise _Crash()

    def _wal_pos(self) -> tuple[int, int, int]:
        """(first LSN of the current segment, its end, its durable prefix)."""
        try:
            st_ = self.db._db._wal.stats()
        except Exception:
            return (0, 0, 0)
        return (st_["seg_first_lsn"], st_["seg_end"], st_["seg_synced"])  # type: ignore[return-value]

    @staticmethod
    def _sectors(lo: int, hi: int) -> list[tuple[int, int]]:
        out, s = [], lo
        while s < hi:
            e = min((s // SECTOR + 1) * SECTOR, hi)
            out.append((s, e))
            s = e
        return out

    def _write_range(self, in_write: Any) -> tuple[str, int, int] | None:
        pre, post = in_write
        if not post[0]:
            return None
        lo = pre[1] if pre[0] == post[0] else SEG_HDR
        return f"{_SEG}{segment_name(post[0])}", lo, post[1]

    def _tear(self, image: dict[str, bytes | None], in_write: Any, rng: random.Random) -> None:
        """A kill during the write: a prefix of its bytes reached the file."""
        r = self._write_range(in_write)
        if r is None or image.get(r[0]) is None:
            return
        rel, lo, hi = r
        data = bytearray(image[rel])  # type: ignore[arg-type]
        hi = min(hi, len(data))
        if hi <= lo:
            return
        cuts = [a for a, _b in self._sectors(lo, hi)]
        cut = rng.choice(cuts)
        data[cut:hi] = bytes(hi - cut)
        image[rel] = bytes(data)

    def _cut_power(self, image: dict[str, bytes | None], pos: tuple[int, int, int],
                   arm: _Arm, in_write: Any) -> None:
        """Turns the files as the OS has them into what a power cut leaves: the
        current segment keeps its fsynced prefix (older segments were synced when
        the log rotated), data.mdb its content at the last durable commit."""
        rng, flavor = arm.rng, arm.flavor
        first, end, synced = pos
        if in_write is not None:  # the cut came before the write's fdatasync
            pre = in_write[0]
            synced = min(synced, pre[2] if pre[0] == first else SEG_HDR)
        rel = f"{_SEG}{segment_name(first)}" if first else ""
        if image.get(rel) is not None:
            data = bytearray(image[rel])  # type: ignore[arg-type]
            end = min(end, len(data))
            if end > synced:
                last = self._write_range(self._last_write) if self._last_write else None
                if flavor in ("durable", "zeros"):
                    data[synced:end] = bytes(end - synced)
                elif flavor == "garbage":
                    data[synced:end] = rng.randbytes(end - synced)
                elif flavor == "subset":
                    for a, b in self._sectors(synced, end):
                        if rng.random() < 0.5:
                            data[a:b] = bytes(b - a)
                else:  # torn: everything unsynced landed but some sectors of the last write
                    if last is not None and last[0] == rel:
                        for a, b in self._sectors(max(last[1], synced), min(last[2], end)):
                            if rng.random() < 0.5:
                                data[a:b] = bytes(b - a)
                image[rel] = bytes(data)
        cur = image.get(_LMDB)
        dur = self._lmdb_durable
        if cur is not None and dur is not None and cur != dur:
            if flavor == "subset" and rng.random() < 0.5:
                return  # every LMDB write since its last durable commit landed
            grown = len(cur) - len(dur)
            if flavor == "zeros" and grown > 0:
                dur = dur + bytes(grown)
            elif flavor == "garbage" and grown > 0:
                dur = dur + rng.randbytes(grown)
            image[_LMDB] = dur

    def _step(self, name: str) -> None:
        """The in-process kill point callback (any thread)."""
        if name == "checkpoint_after_commit":
            self._note_lmdb_durable()
        arm = self._step_arm
        if arm is not None and arm.point == name and threading.get_ident() == arm.thread:
            self._step_arm = None
            self._crash_here(arm, f"checkpoint step {arm.point}", from_step=True)

    def _note_lmdb_durable(self) -> None:
        try:
            with open(os.path.join(self.path, _LMDB), "rb") as f:
                self._lmdb_durable = f.read()
        except OSError:
            self._lmdb_durable = None

    # ---- recovering ------------------------------------------------------------------------
    def _open(self) -> Any:
        import walstate

        db = walstate.open(self.path, **self._options)
        self._note_lmdb_durable()
        return db

    def _restore(self, image: dict[str, bytes | None]) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for rel, content in sorted(image.items()):
            p = os.path.join(self.path, rel)
            if content is None:
                os.makedirs(p, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(content)
        if not image:
            os.makedirs(self.path, exist_ok=True)

    def _finish_crash(self, recovery_step: str | None) -> None:
        assert self._pending is not None
        image, what = self._pending
        self._write_arm = None
        self._drop_engine()
        self._pending = None
        self._restore(image)
        self.crashes += 1
        if recovery_step is not None:
            self._step_arm = _Arm("kill", "", recovery_step, 0, random.Random(0),
                                  threading.get_ident())
            try:
                db = self._open_checked(what)
            except _Crash:
                image2, _w = self._pending  # type: ignore[misc]
                self._pending = None
                self._restore(image2)
                what += f", then SIGKILL in the recovery at {recovery_step}"
                db = self._open_checked(what)
            else:
                what += f" (the recovery did not reach {recovery_step})"
            finally:
                self._step_arm = None
        else:
            db = self._open_checked(what)
        self._recovered(what, db)

    def _open_checked(self, what: str) -> Any:
        try:
            return self._open()
        except _Crash:
            raise
        except Exception as exc:
            raise RecoveryError(f"after {what}: the directory does not open: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _recovered(self, what: str, db: Any) -> None:
        """Checks walstate's guarantee on the reopened engine and rebases the history."""
        got = {bytes(k): bytes(v) for k, v in db.items()}
        h = self._history
        bad, kept = check_recovered(self._base, h, got)
        if bad:
            with contextlib.suppress(Exception):
                _drop(db)
            raise RecoveryError(f"after {what}: {bad}")
        attempted = [op for s, op in h.ops if not h.status.get(s, "").startswith("F:")
                     or h.status[s] == "F:EngineFailedError"]
        rec = Recovery(number=self.restarts + 1, crash=what, attempted=len(attempted),
                       acknowledged=h.acknowledged, kept=kept, state=got,
                       lost=tuple(attempted[kept:]))
        self.restarts += 1
        self.last_recovery = rec
        self._base = got
        self._history = History()
        self._last_write = None
        self._always = db.config.sync == "always"
        if hasattr(self, "db"):
            self.db._db = db
        self.after_recovery(rec)

    def _drop_engine(self) -> None:
        db = getattr(self, "db", None)
        engine = db._db if db is not None else None
        if engine is None or engine._closed:
            return
        try:
            _drop(engine)
        except Exception:  # a failed engine is dropped all the same
            pass

    # ---- reporting -------------------------------------------------------------------------
    def _annotate(self, exc: BaseException) -> None:
        if isinstance(exc, RecoveryError) or getattr(exc, "_walstate_noted", False):
            return
        with contextlib.suppress(AttributeError, TypeError):
            exc._walstate_noted = True  # type: ignore[attr-defined]
        r = self.last_recovery
        if self.crashes == 0:
            note = ("walstate.testing.stateful: this failed BEFORE ANY CRASH (no crash or "
                    "power loss had been simulated in this example): your rules or "
                    "invariants fail on a running engine, so the model or the application "
                    "is wrong even without crashes.")
        else:
            note = (f"walstate.testing.stateful: this failed after crash {self.crashes} "
                    f"(the last restart: {r.crash if r else '?'}). walstate's own guarantee "
                    "held (the recovered contents are the state after "
                    f"{r.kept if r else '?'} of the {r.attempted if r else '?'} writes "
                    "attempted since the previous restart, every acknowledged one "
                    "included): your application's use of the engine does not survive "
                    "that crash.")
        exc.add_note(note)

    def check_invariants(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().check_invariants(*args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            self._annotate(exc)
            raise

    def teardown(self) -> None:
        try:
            self._drop_engine()
        finally:
            self._release()

    def _release(self) -> None:
        logging.getLogger("walstate").removeHandler(self._quiet)
        if self in _current:
            _current.remove(self)
        if not _current:
            _hooks.on_step(None)
        shutil.rmtree(self._dir, ignore_errors=True)

