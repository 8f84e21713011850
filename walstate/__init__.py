"""walstate: an embeddable crash-safe state engine.

Every write is appended to a C write-ahead log before it is acknowledged;
checkpoints fold the log into an LMDB snapshot; recovery replays the log
after the snapshot. See README.md and docs/API.md.
"""

from .checkpoint import CheckpointInfo
from .config import Config
from .engine import Batch, Engine, open
from .errors import (
    ClosedError,
    ConfigError,
    CorruptionError,
    DiskFullError,
    EngineFailedError,
    InvalidTransitionError,
    LockedError,
    MismatchError,
    ReadOnlyError,
    StaleReadError,
    WalStateError,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CheckpointInfo",
    "ClosedError",
    "Config",
    "ConfigError",
    "CorruptionError",
    "DiskFullError",
    "Engine",
    "EngineFailedError",
    "InvalidTransitionError",
    "LockedError",
    "MismatchError",
    "ReadOnlyError",
    "StaleReadError",
    "WalStateError",
    "open",
]
