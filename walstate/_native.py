"""The only importer of the compiled C WAL; maps its return codes to exceptions.

C returns 0, a negative errno, or a WAL_E* code (<= -1000). ``raise_for``
is the one table that turns those into the exceptions of walstate.errors (docs/API.md).
"""

from __future__ import annotations

import errno
import os

from .errors import (
    CorruptionError,
    DiskFullError,
    EngineFailedError,
    MismatchError,
    WalStateError,
)

try:
    from ._walc import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "walstate's C extension (walstate._walc) is not built: install with "
        "`pip install .` or `pip install -e .` (python -m pytest from a plain "
        "`pip install .` imports the unbuilt source tree; run plain `pytest`)"
    ) from exc

try:  # the engine's hot path, recovery's table and the fold's sort in C (csrc/speedups*)
    from . import _speedups as speedups
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "walstate's C extension walstate._speedups is not built: install with "
        "`pip install .` or `pip install -e .`") from exc

__all__ = ["ffi", "lib", "raise_for", "speedups", "strerror"]

# Codes whose meaning is "the data on disk is wrong".
_MISMATCH = {lib.WAL_EMISMATCH, lib.WAL_EVERSION, lib.WAL_EGAP}
_CORRUPT = {lib.WAL_ECORRUPT, lib.WAL_ETORN, lib.WAL_ESHORT}


def strerror(rc: int) -> str:
    """The C layer's message for a return code."""
    return ffi.string(lib.wal_strerror(rc)).decode()


def raise_for(rc: int, what: str, path: str | os.PathLike[str] | None = None, *,
              poisoned: bool = False, offset: int | None = None,
              lsn: int | None = None) -> None:
    """Raise the exception for C return code ``rc`` (does nothing for rc >= 0).

    ``what`` names the operation; ``poisoned`` says the log refused or lost a
    write so that durability is unknown (EngineFailedError).
    """
    if rc >= 0:
        return
    p = os.fspath(path) if path is not None else None
    where = f" ({p})" if p else ""
    msg = f"{what}{where}: {strerror(rc)}"
    if rc == lib.WAL_EPOISONED or poisoned:
        raise EngineFailedError(
            f"{msg}; the write-ahead log failed and durability is unknown: writes are "
            "refused until the directory is reopened (which recovers from disk)")
    if rc == -errno.ENOSPC:
        raise DiskFullError(f"{msg}; free some space and retry: nothing acknowledged is lost", p)
    if rc in (-errno.EACCES, -errno.EPERM, -errno.EROFS):
        raise PermissionError(-rc, msg, p)
    if rc in _CORRUPT:
        raise CorruptionError(msg, path=p, offset=offset, lsn=lsn)
    if rc in _MISMATCH:
        raise MismatchError(msg)
    if rc in (lib.WAL_EINVAL, lib.WAL_ETOOBIG):
        raise ValueError(msg)
    if -1000 < rc < 0:
        raise OSError(-rc, msg, p)
    raise WalStateError(msg)
