"""`walstate demo`: the crash-and-resume demonstration passes, and its verification can fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_demo(*args: str, env_extra: dict[str, str] | None = None):
    env = dict(os.environ)
    env.pop("WALSTATE_DEMO_BREAK", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "walstate.demo", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def test_demo_with_crashes_verifies_and_exits_0(tmp_path):
    proc = run_demo("--tasks", "300", "--crashes", "3", "--seed", "7",
                    "--dir", str(tmp_path / "db"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "verification passed" in out
    assert out.count("crash ") >= 3
    assert "records" in out and "torn bytes" in out  # what recovery did, per crash
    for line in ("tasks:", "crashes:", "recoveries:", "checkpoints:", "WAL written:",
                 "throughput:"):
        assert line in out
    # Not a terminal: plain progress lines, no carriage returns.
    assert "\r" not in out and "100%" in out


def test_demo_removes_its_temporary_directory(tmp_path):
    proc = run_demo("--tasks", "20", "--crashes", "1", "--seed", "1",
                    env_extra={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_demo_keep_keeps_the_temporary_directory(tmp_path):
    proc = run_demo("--tasks", "20", "--crashes", "1", "--seed", "1", "--keep",
                    env_extra={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(tmp_path.iterdir())) == 1


def test_demo_dropping_an_acknowledged_progress_record_fails_verification(tmp_path):
    proc = run_demo("--tasks", "300", "--crashes", "3", "--seed", "7",
                    "--dir", str(tmp_path / "db"), env_extra={"WALSTATE_DEMO_BREAK": "1"})
    assert proc.returncode != 0
    assert "verification FAILED" in proc.stdout
    assert "acknowledgement is missing" in proc.stdout


def test_demo_drop_ack_flag_fails_verification(tmp_path):
    proc = run_demo("--tasks", "50", "--crashes", "1", "--seed", "3", "--drop-ack",
                    "--dir", str(tmp_path / "db"))
    assert proc.returncode == 1
    assert "verification FAILED" in proc.stdout


def test_demo_rejects_bad_usage():
    assert run_demo("--tasks", "0").returncode == 2
    assert run_demo("--nonsense").returncode == 2
