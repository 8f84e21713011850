"""The public surface of each public module, pinned: a rename or a removal (or
a new public name) is a deliberate act that changes this file too."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "walstate": ["Batch", "CheckpointInfo", "ClosedError", "Config", "ConfigError",
                 "CorruptionError", "DiskFullError", "Engine", "EngineFailedError",
                 "InvalidTransitionError", "LockedError", "MismatchError", "ReadOnlyError",
                 "StaleReadError", "WalStateError", "open"],
    "walstate.errors": ["ClosedError", "ConfigError", "CorruptionError", "DiskFullError",
                        "EngineFailedError", "InvalidTransitionError", "LockedError",
                        "MismatchError", "ReadOnlyError", "StaleReadError",
                        "WalStateError"],
    "walstate.config": ["RECOVERY_MODES", "SYNC_MODES", "Config"],
    "walstate.tasks": ["InvalidTransitionError", "RunningTask", "Status", "TaskState", "TaskStore",
                       "TasksFailedError"],
    "walstate.aio": ["DEFAULT_WORKERS", "AsyncBatch", "AsyncEngine", "open"],
    "walstate.langgraph": ["AsyncWalstateSaver", "WalstateSaver"],
    "walstate.testing": ["CrashCheckResult", "Failure", "RecordingEngine", "check_recovered",
                         "crash_check", "crashtest_main", "expected_states", "mixed_workload"],
    "walstate.testing.stateful": ["CHECKPOINT_STEPS", "RECOVERY_STEPS", "WHERE", "RecordedEngine",
                                  "Recovery", "RecoveryError", "RecoveryMachine"],
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_are_pinned(name: str) -> None:
    mod = importlib.import_module(name)
    assert sorted(mod.__all__) == sorted(PUBLIC[name])
    for attr in mod.__all__:
        assert getattr(mod, attr) is not None, f"{name}.{attr} is listed but missing"


def test_every_error_is_a_walstate_error_exported_from_the_top() -> None:
    import walstate
    import walstate.errors as errors

    for attr in errors.__all__:
        cls = getattr(errors, attr)
        assert issubclass(cls, errors.WalStateError)
        assert getattr(walstate, attr) is cls
