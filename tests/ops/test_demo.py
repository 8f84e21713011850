"""`walstate demo`: the crash-and-resume demonstration passes, and its verification can fail."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from walstate import demo
from walstate.demo import STEPS, Ack

REPO = Path(__file__).resolve().parents[2]


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


def test_demo_pool_stage_kills_workers_and_the_engine_and_verifies(tmp_path):
    proc = run_demo("--tasks", "50", "--crashes", "2", "--seed", "5", "--pool-items", "900",
                    "--dir", str(tmp_path / "db"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.split("\npool: ", 1)[1]
    assert "3 worker processes" in out
    assert "SIGKILL worker" in out or "SIGKILL the engine's process" in out
    assert "pool verification passed: all 900 items SUCCESS" in out


def test_demo_no_pool_skips_the_pool_stage(tmp_path):
    proc = run_demo("--tasks", "20", "--crashes", "1", "--seed", "1", "--no-pool",
                    "--dir", str(tmp_path / "db"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\npool: " not in proc.stdout


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


# -- the verification itself, on hand-made acknowledgement trails -------------------


def trail_of(tid, *events):
    """Acks from (kind, attempts, step) triples, with the right cursor/result values."""
    cursors = demo.expected_cursors(tid)
    result = demo.result_of(cursors[STEPS])
    acks = []
    for kind, attempts, step in events:
        value = "-" if kind == "create" else (
            result.hex() if kind == "finish" else cursors[step].hex())
        acks.append(Ack(1, kind, tid, attempts, step, value))
    return acks, cursors, result


def check(tid, events, **kw):
    acks, cursors, result = trail_of(tid, *events)
    return demo._check_trail(tid, acks, cursors, result, **kw)


FULL = [("create", 0, 0), ("start", 1, 0)] + [("progress", 1, s) for s in range(1, STEPS + 1)] + [
    ("finish", 1, STEPS)]


def test_trail_of_an_uninterrupted_task_is_clean():
    assert check("t", FULL) == []


def test_trail_resumed_at_the_last_acknowledged_step_or_one_later_is_clean():
    head = [("create", 0, 0), ("start", 1, 0), ("progress", 1, 1), ("progress", 1, 2)]
    for resume in (2, 3):
        rest = [("start", 2, resume)] + [("progress", 2, s) for s in range(resume + 1, STEPS + 1)]
        assert check("t", head + rest + [("finish", 2, STEPS)]) == []


def test_trail_resumed_before_the_last_acknowledged_step_is_lost_progress():
    events = [("start", 1, 0), ("progress", 1, 1), ("progress", 1, 2), ("start", 2, 1)]
    assert any("resumed at step 1" in p for p in check("t", events))


def test_trail_with_a_gap_is_a_missing_acknowledgement():
    events = [("start", 1, 0), ("progress", 1, 1), ("progress", 1, 3)]
    assert any("acknowledgement is missing" in p for p in check("t", events))


def test_trail_with_anything_after_finish_is_an_error():
    assert any("after its finish" in p for p in check("t", FULL + [("start", 2, STEPS)]))
    assert any("after its finish" in p for p in check("t", [("start", 2, 5)], finished=True))


def test_trail_finished_early_or_with_a_wrong_cursor_is_an_error():
    assert any("finished after step 1" in p for p in check(
        "t", [("start", 1, 0), ("progress", 1, 1), ("finish", 1, 1)]))
    acks, cursors, result = trail_of("t", ("start", 1, 0), ("progress", 1, 1))
    acks[1].value = "00" * 32
    assert any("cursor of step 1 is wrong" in p
               for p in demo._check_trail("t", acks, cursors, result))


def test_cursor_encoding_round_trips():
    cursor = demo.expected_cursors("t")[3]
    assert demo.decode_cursor(demo.encode_cursor(3, cursor)) == (3, cursor)


# -- progress display ---------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(tty):
    out = Terminal() if tty else io.StringIO()
    bar = demo._Progress(out, 100)
    for done in range(101):
        bar.update(done, 1)
        if done == 50:
            bar.message("  crash 1")
    text = out.getvalue()
    if tty:
        assert "\r" in text and "[####" in text and "100/100 tasks" in text
    else:
        assert "\r" not in text and "\x1b" not in text
        assert text.count("tasks done") == 11  # 0%, 10%, ..., 100%
    assert "  crash 1\n" in text
