"""Test hooks, inert unless enabled: named kill points and fault injection.

Kill points are named steps (the C layer's and this package's share one
namespace); a subprocess enables one with the environment variable
``WALSTATE_KILLPOINT=name[:nth]``, which SIGKILLs it the nth time the step
is reached. ``WALSTATE_SYNC_TRACE=path`` makes the C log append
"segment offset" after every fdatasync: the durable prefix of each segment.

In process (walstate.testing.stateful), ``on_step(callback)`` calls
``callback(name)`` at every Python-side step instead: the callback may record
the files as they are and raise to end the operation there, as a kill would.
"""

from __future__ import annotations

import errno as _errno
import os
import signal
from collections.abc import Callable

from . import checkpoint
from ._native import lib

OPS = {"write": lib.WAL_OP_WRITE, "fdatasync": lib.WAL_OP_FDATASYNC,
       "fallocate": lib.WAL_OP_FALLOCATE, "rename": lib.WAL_OP_RENAME,
       "unlink": lib.WAL_OP_UNLINK, "open": lib.WAL_OP_OPEN, "read": lib.WAL_OP_READ}

KILL_POINTS_C = ("append_after_write", "append_after_fdatasync", "rotate_after_sync",
                 "rotate_after_create", "segment_create_before_rename",
                 "segment_create_after_rename", "remove_before_unlink", "remove_after_fsync")
KILL_POINTS_PY = ("checkpoint_after_freeze", "checkpoint_chunk", "checkpoint_before_commit",
                  "checkpoint_after_commit", "checkpoint_before_remove",
                  "checkpoint_after_remove", "recovery_after_replay", "recovery_after_cut",
                  "create_snapshot_dir", "create_snapshot_env", "create_snapshot_meta",
                  "create_before_marker")

_state = {"name": "", "nth": 0, "seen": 0}


def _py_killpoint(name: str) -> None:
    if name == _state["name"]:
        _state["seen"] += 1
        if _state["seen"] >= _state["nth"]:
            os.kill(os.getpid(), signal.SIGKILL)


def killpoint(name: str, nth: int = 1) -> None:
    """SIGKILL this process the nth time step ``name`` is reached ("" disables)."""
    _state.update(name=name, nth=max(nth, 1), seen=0)
    lib.wal_test_killpoint(name.encode(), max(nth, 1))
    checkpoint._killpoint = _py_killpoint if name else None


def on_step(callback: Callable[[str], None] | None) -> None:
    """In-process mode: ``callback(name)`` at every Python-side step (any thread),
    in place of a kill point; None turns it off. The C-side steps keep SIGKILL."""
    _state.update(name="", nth=0, seen=0)
    checkpoint._killpoint = callback


def hit(name: str) -> None:
    """A Python-side kill point."""
    if checkpoint._killpoint is not None:
        checkpoint._killpoint(name)


def fault(op: str, nth: int, err: int = _errno.EIO, persistent: bool = False) -> None:
    """Make the nth (1-based) ``op`` call of the C log fail with ``err`` (0: a short
    write); once, or from then on. nth=0 disables."""
    lib.wal_test_fault(OPS[op], nth, err, 1 if persistent else 0)


def calls(op: str) -> int:
    """How many ``op`` calls the C log made since its fault was set."""
    return lib.wal_test_calls(OPS[op])


def clear() -> None:
    for op in OPS:
        fault(op, 0)
    killpoint("")


def sync_trace(path: str) -> None:
    rc = lib.wal_test_sync_trace(path.encode())
    if rc:
        raise OSError(-rc, "cannot open the sync trace", path)


def _from_env() -> None:
    spec = os.environ.get("WALSTATE_KILLPOINT")
    if spec:
        name, _, nth = spec.partition(":")
        killpoint(name, int(nth or 1))
    trace = os.environ.get("WALSTATE_SYNC_TRACE")
    if trace:
        sync_trace(trace)


_from_env()
