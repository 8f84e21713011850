"""The exception tree of walstate; every error the engine raises is one of these.

::

    WalStateError
     ├── LockedError            another process (or this one) holds the directory
     ├── CorruptionError        invalid data the recovery mode does not allow (.path .offset .lsn)
     ├── MismatchError          WAL and snapshot do not belong together
     ├── DiskFullError          ENOSPC on WAL or snapshot (also an OSError)
     ├── EngineFailedError      durability unknown after EIO; reopen to recover
     ├── ReadOnlyError          a write on a read-only open
     ├── ClosedError            a call after close()
     ├── ConfigError            a bad option (also a ValueError)
     └── InvalidTransitionError an illegal task state transition (walstate.tasks)

A permission problem raises the built-in ``PermissionError`` naming the path.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["ClosedError", "ConfigError", "CorruptionError", "DiskFullError",
           "EngineFailedError", "InvalidTransitionError", "LockedError", "MismatchError",
           "ReadOnlyError", "StaleReadError", "WalStateError"]


class WalStateError(Exception):
    """Base class of every walstate error."""


class LockedError(WalStateError):
    """Another process (or another open in this process) holds the directory."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class CorruptionError(WalStateError):
    """Invalid data that the recovery mode does not allow.

    ``path`` is the damaged file, ``offset`` the byte offset in it and ``lsn`` the
    LSN expected there; each is None where unknown.
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        offset: int | None = None,
        lsn: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.lsn = lsn


class MismatchError(WalStateError):
    """WAL and snapshot do not belong together (system_id, LSN gap, format version)."""


class DiskFullError(WalStateError, OSError):
    """The disk is full. Nothing acknowledged is lost; writes succeed again once
    space is freed."""

    def __init__(self, message: str, filename: str | None = None) -> None:
        OSError.__init__(self, _errno.ENOSPC, message, filename)

    def __str__(self) -> str:
        return self.strerror if self.filename is None else f"{self.strerror}: {self.filename!r}"


class EngineFailedError(WalStateError):
    """A write or fsync failed so that durability is unknown; the engine refuses
    writes until it is reopened (which recovers from disk)."""


class ReadOnlyError(WalStateError):
    """A write was attempted on a read-only open."""


class StaleReadError(WalStateError):
    """A read-only engine's view can no longer be served: a writer's checkpoint
    folded writes made after that view into the snapshot (the old values are
    gone). Nothing mixed was returned; reopen to read a newer state."""


class ClosedError(WalStateError):
    """The engine (or batch, or reader) was used after close()."""


class ConfigError(WalStateError, ValueError):
    """A bad option value; the message names the option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class InvalidTransitionError(WalStateError):
    """An illegal task state transition; nothing was written."""
