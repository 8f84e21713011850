"""Engine options: the frozen ``Config`` dataclass and its validation."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields

from .errors import ConfigError

MiB = 1024 * 1024
DAY = 86400.0
YEAR = 365 * DAY
MAX_BYTES = 1 << 62             # sizes in bytes: far above any disk, well inside int64
MAX_MAP_SIZE = (1 << 63) - 1    # LMDB's map size: a size_t the mmap length must fit in
__all__ = ["RECOVERY_MODES", "SYNC_MODES", "Config"]

SYNC_MODES = ("always", "interval", "none")
RECOVERY_MODES = ("tolerate_tail", "strict", "point_in_time")


class UnknownOptionError(ConfigError, TypeError):
    """An option name walstate does not know (a ConfigError, and a TypeError as
    for any unexpected keyword argument)."""


@dataclass(frozen=True)
class Config:
    """Options of :func:`walstate.open`; see README.md (Options) for meanings."""

    sync: str = "always"
    sync_interval: float = 1.0
    checkpoint_timeout: float = 300.0
    max_wal_size: int = 256 * MiB
    checkpoint_completion_target: float = 0.9
    segment_size: int = 16 * MiB
    recovery: str = "tolerate_tail"
    read_only: bool = False
    map_size: int = 1024 * MiB
    max_recovery_seconds: float | None = None
    wal_buffer_size: int = 1 * MiB
    # WAL archiving (walstate/archive.py): a directory or s3://bucket/prefix the WAL
    # is shipped to continuously; None disables archiving. archive_dir is the same
    # option under its older name.
    archive: str | None = None
    archive_dir: str | None = None
    # every acknowledged write is in the archive at most this long after (seconds)
    archive_interval: float = 1.0
    # a base backup into the archive after this much archived WAL (bytes; None: never
    # by itself), so that a restore replays at most about this much
    archive_backup_bytes: int | None = 1024 * MiB
    # unarchived WAL retained at most (bytes) before segments are removed anyway
    max_archive_lag_bytes: int | None = None
    # an fsync slower than this is logged as a warning (checked off the write path)
    slow_fsync_seconds: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("sync", self.sync, SYNC_MODES)
        _check_choice("recovery", self.recovery, RECOVERY_MODES)
        # intervals: below the low bound a background thread would spin, above the
        # high one a timer cannot wait that long (and no one means it)
        _check_seconds("sync_interval", self.sync_interval, low=0.001, high=DAY)
        _check_seconds("checkpoint_timeout", self.checkpoint_timeout, low=0.01, high=YEAR)
        _check_int("max_wal_size", self.max_wal_size, low=1, high=MAX_BYTES)
        _check_number("checkpoint_completion_target", self.checkpoint_completion_target,
                      low=0.0, high=1.0)
        _check_int("segment_size", self.segment_size, low=4096, high=1 << 40)
        if not isinstance(self.read_only, bool):
            raise ConfigError("read_only", f"must be a bool, not {self.read_only!r}")
        # LMDB's map size is a size_t; what the machine can map is checked at open
        _check_int("map_size", self.map_size, low=1 * MiB, high=MAX_MAP_SIZE)
        if self.max_recovery_seconds is not None:
            _check_seconds("max_recovery_seconds", self.max_recovery_seconds, low=0.0,
                           high=YEAR, open_low=True)
        _check_int("wal_buffer_size", self.wal_buffer_size, low=4096, high=1 << 30)
        self._check_archive()
        _check_seconds("archive_interval", self.archive_interval, low=0.0, high=DAY,
                       open_low=True)
        if self.archive_backup_bytes is not None:
            _check_int("archive_backup_bytes", self.archive_backup_bytes, low=1, high=MAX_BYTES)
        if self.max_archive_lag_bytes is not None:
            _check_int("max_archive_lag_bytes", self.max_archive_lag_bytes, low=0,
                       high=MAX_BYTES)
        _check_seconds("slow_fsync_seconds", self.slow_fsync_seconds, low=0.0, high=DAY)

    def _check_archive(self) -> None:
        from .archivestore import normalize

        values = {}
        for name in ("archive", "archive_dir"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (str, os.PathLike)) or not os.fspath(v) or "\0" in str(
                    os.fspath(v)):
                raise ConfigError(name, f"must be a directory, an s3://bucket/prefix URL or "
                                  f"None, not {v!r}")
            try:
                values[name] = normalize(v if isinstance(v, str) else os.fsdecode(
                    os.fspath(v)))
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        if len(set(values.values())) > 1:
            raise ConfigError("archive", f"archive={values['archive']!r} and archive_dir="
                              f"{values['archive_dir']!r} name different archives (they are "
                              "one option)")
        if values:
            loc = next(iter(values.values()))
            object.__setattr__(self, "archive", loc)
            object.__setattr__(self, "archive_dir", loc)

    @classmethod
    def from_options(cls, config: Config | None, options: dict[str, object]) -> Config:
        """Build a Config from ``config`` and/or keyword options; unknown names are errors."""
        names = {f.name for f in fields(cls)}
        for name in options:
            if name not in names:
                raise UnknownOptionError(name, "unknown option (the options are: "
                                         + ", ".join(sorted(names)) + ")")
        if config is None:
            return cls(**options)  # type: ignore[arg-type]
        if not isinstance(config, Config):
            raise ConfigError("config", f"must be a walstate.Config, not {type(config).__name__}")
        return dataclasses.replace(config, **options) if options else config


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")


def _check_number(name: str, value: object, low: float | None = None,
                  high: float | None = None) -> None:
    """A finite int or float (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, not {value!r}")
    if low is not None and value < low:
        raise ConfigError(name, f"must be >= {_fmt(low)}, not {value!r}")
    if high is not None and value > high:
        raise ConfigError(name, f"must be <= {_fmt(high)}, not {value!r}")


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_seconds(name: str, value: object, low: float, high: float,
                   open_low: bool = False) -> None:
    """A duration in seconds: a finite number in [low, high] ((low, high] with
    ``open_low``)."""
    _check_number(name, value, high=high)
    if open_low and value <= low:  # type: ignore[operator]
        raise ConfigError(name, f"must be > {low:g} seconds, not {value!r}")
    if value < low:  # type: ignore[operator]
        raise ConfigError(name, f"must be >= {low:g} seconds, not {value!r}")


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an int, not {value!r}")
    _check_number(name, value, low, high)
