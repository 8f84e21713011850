"""Every option of walstate.Config with bad values (types, ranges, nan, inf,
bools, huge ints): a ConfigError naming the option, from Config(...) and from
open(), before anything is created; and a map_size the machine cannot map is
a ConfigError on a healthy directory, which stays as it was."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import walstate
from walstate.snapshot import Snapshot

NAN, INF = float("nan"), float("inf")

# Values that are wrong for every option of that kind.
NUMBER_BAD = [NAN, INF, -INF, True, False, "1", None, [1], 1j]
INT_BAD = [NAN, INF, True, "1", None, 1.5, 2 ** 64, 10 ** 30, -1]
BAD = {
    "sync": ["sometimes", None, True, 1, ["always"], "ALWAYS"],
    "recovery": ["yolo", None, 0, "Strict"],
    "sync_interval": [*NUMBER_BAD, 0, -1.0, 1e10, 1e-9, 10 ** 23],
    "checkpoint_timeout": [*NUMBER_BAD, 0, -5, 1e12, 1e-9],
    "max_wal_size": [*INT_BAD, 0],
    "checkpoint_completion_target": [*NUMBER_BAD, -0.1, 1.5],
    "segment_size": [*INT_BAD, 0, 100, 1 << 50],
    "read_only": ["yes", 1, 0, None, NAN],
    "map_size": [*INT_BAD, 0, 1000, 2 ** 63],
    "max_recovery_seconds": [*[v for v in NUMBER_BAD if v is not None], 0, -1, 1e12],
    "wal_buffer_size": [*INT_BAD, 0, 1 << 40],
    "archive_dir": ["", 5, b"/tmp/x", "a\0b", True],
    "archive": ["", 5, b"/tmp/x", "a\0b", True, "s3://", "s3:///x", "ftp://x/y", "s3://B_ad/x"],
    "archive_interval": [*NUMBER_BAD, 0, -1, 1e6],
    "archive_backup_bytes": [*[v for v in INT_BAD if v is not None], 0],
    "max_archive_lag_bytes": [v for v in INT_BAD if v is not None],
    "slow_fsync_seconds": [*NUMBER_BAD, -1, 1e10],
}
CASES = [(o, v) for o, vs in BAD.items() for v in vs]


def test_every_option_has_bad_values_here():
    names = {f.name for f in __import__("dataclasses").fields(walstate.Config)}
    assert names == set(BAD), names ^ set(BAD)


@pytest.mark.parametrize("option,value", CASES, ids=[f"{o}={v!r}" for o, v in CASES])
def test_bad_value_is_a_config_error_naming_the_option(tmp_path, option, value):
    path = str(tmp_path / "db")
    with pytest.raises(walstate.ConfigError) as ei:
        walstate.Config(**{option: value})
    assert str(ei.value).startswith(option + ":"), ei.value
    assert ei.value.option == option
    with pytest.raises(walstate.ConfigError) as ei:
        walstate.open(path, **{option: value})
    assert ei.value.option == option
    assert not os.path.exists(path)  # nothing created


@pytest.mark.parametrize("option,value", [
    ("sync_interval", 0.001), ("sync_interval", 86400), ("checkpoint_timeout", 1e6),
    ("max_wal_size", 1), ("checkpoint_completion_target", 0), ("checkpoint_completion_target", 1),
    ("map_size", 1 << 20), ("max_recovery_seconds", 0.001), ("slow_fsync_seconds", 0),
    ("max_archive_lag_bytes", 0), ("segment_size", 4096),
])
def test_values_at_the_bounds_are_accepted(option, value):
    assert getattr(walstate.Config(**{option: value}), option) == value


def test_a_sync_interval_of_a_day_keeps_the_flusher_alive(tmp_path):
    with walstate.open(tmp_path / "db", sync="interval", sync_interval=86400.0) as db:
        db.put(b"k", b"v")
        assert db._flusher is not None and db._flusher.is_alive()  # noqa: SLF001
        assert db.sync() >= 1


def _healthy(tmp_path) -> str:
    path = str(tmp_path / "db")
    with walstate.open(path) as db:
        db.put(b"k", b"v")
    return path


def _tree(path: str) -> dict[str, bytes]:
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


@pytest.mark.parametrize("map_size", [1 << 56, (1 << 63) - 1])
def test_a_map_size_the_machine_cannot_map_is_a_config_error(tmp_path, map_size):
    path = _healthy(tmp_path)
    before = _tree(path)
    with pytest.raises(walstate.ConfigError) as ei:
        walstate.open(path, map_size=map_size)
    assert ei.value.option == "map_size" and "cannot be mapped" in str(ei.value)
    assert _tree(path) == before  # nothing changed, LOCK included
    with walstate.open(path) as db:  # and it opens as it did
        assert db.get(b"k") == b"v"
    fresh = str(tmp_path / "new")
    with pytest.raises(walstate.ConfigError):
        walstate.open(fresh, map_size=map_size)
    assert not os.path.exists(fresh)


def test_snapshot_open_tells_cannot_map_from_damage(tmp_path):
    """The snapshot's own translation (behind open's check): LMDB's ENOMEM from
    mmap is ConfigError(map_size), not CorruptionError."""
    path = _healthy(tmp_path)
    with pytest.raises(walstate.ConfigError) as ei:
        Snapshot(os.path.join(path, "snapshot"), map_size=1 << 56, read_only=True,
                 create=False)
    assert ei.value.option == "map_size"


def test_map_size_over_an_address_space_limit(tmp_path):
    """Under ``ulimit -v`` (RLIMIT_AS) the default 1 GiB map does not fit: the
    error names map_size, and a smaller one opens."""
    path = _healthy(tmp_path)
    code = (
        "import resource, walstate\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "try:\n"
        f"    walstate.open({path!r})\n"
        "except walstate.ConfigError as e:\n"
        "    print('CONFIG', e.option)\n"
        f"with walstate.open({path!r}, map_size=64 << 20) as db:\n"
        "    print('GOT', db.get(b'k'))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "CONFIG map_size" in res.stdout, res.stdout + res.stderr
    assert "GOT b'v'" in res.stdout, res.stdout + res.stderr
