"""``walstate demo``: a worker is SIGKILLed again and again, and no acknowledged work is lost.

The parent process (``main``) starts a worker process (``--worker``, hidden)
that works through a queue of tasks in a :class:`~walstate.tasks.TaskStore`.
Each task is a small deterministic computation in ``STEPS`` steps (a hash
chain); after every step the worker records the chain's head as the task's
progress cursor, and at the end the result. After every transition returns
(durable: ``sync="always"``) the worker reports it on stdout: that is an
*acknowledgement*.

The parent SIGKILLs the worker at seeded random points spread over the run,
one of them while a ``db.checkpoint()`` runs in a background thread of the
worker (the WAL is kept small, so automatic checkpoints run throughout too).
After each kill the parent opens the directory itself (crash recovery), shows
what recovery did, checks that every acknowledged transition is there, puts
the interrupted tasks back to PENDING with ``tasks.recover()`` and starts a
new worker, which resumes each task from its cursor.

Then the pool stage: ``tasks.map`` over worker processes in another
directory; the parent SIGKILLs one of the map's workers and then the
engine's process, a few times, at random moments, shows the counts recorded
at each crash, runs the map to the end and verifies every item's result,
that the counts equal a scan and that nothing is left RUNNING.

At the end of the first stage the parent verifies, with its own computation and independently
of the worker: every task is SUCCESS with the right result, finished once,
and the acknowledgements of every task form an unbroken chain in which each
resumption starts at or after the last acknowledged step. Exit status 0 only
if that holds. ``WALSTATE_DEMO_BREAK=1`` (or the hidden ``--drop-ack``) drops
one acknowledged progress record from the verification input, to show that
the verification can fail.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

STEPS = 5  # progress records per task
ROUNDS = 64  # sha256 rounds per step: the "work"
# Small WAL and segments so that checkpoints (and segment removal) happen
# throughout the run; "always" so that an acknowledgement means durable.
ENGINE_OPTIONS: dict[str, Any] = {
    "sync": "always",
    "max_wal_size": 256 * 1024,
    "segment_size": 64 * 1024,
    "checkpoint_timeout": 2.0,
}
STATS_EVERY = 100  # worker reports engine counters every this many acks
READ_TIMEOUT = 120.0  # seconds without a line from the worker: it is stuck


# -- the work, computed the same way by worker and verifier -----------------------


def task_id(n: int) -> str:
    return f"task-{n:05d}"


def first_cursor(tid: str) -> bytes:
    return hashlib.sha256(b"walstate demo\x00" + tid.encode()).digest()


def next_cursor(cursor: bytes) -> bytes:
    for _ in range(ROUNDS):
        cursor = hashlib.sha256(cursor).digest()
    return cursor


def result_of(cursor: bytes) -> bytes:
    return hashlib.sha256(b"result\x00" + cursor).digest()


def expected_cursors(tid: str) -> list[bytes]:
    """The cursor after each step 0..STEPS (0: before any work)."""
    cursors = [first_cursor(tid)]
    for _ in range(STEPS):
        cursors.append(next_cursor(cursors[-1]))
    return cursors


def encode_cursor(step: int, cursor: bytes) -> bytes:
    return bytes((step,)) + cursor


def decode_cursor(payload: bytes) -> tuple[int, bytes]:
    return payload[0], payload[1:]


# -- the worker process ------------------------------------------------------------


def _say(*fields: object) -> None:
    # One write(2) per line, shorter than PIPE_BUF: a kill never tears a line.
    os.write(1, (" ".join(map(str, fields)) + "\n").encode())


def run_worker(path: str, n_tasks: int, checkpoint_after: int) -> int:
    """Create missing tasks, recover, work every PENDING task; report every ack."""
    import walstate
    from walstate.tasks import Status, TaskStore

    db = walstate.open(path, **ENGINE_OPTIONS)
    tasks = TaskStore(db)
    acks = 0
    checkpointer: threading.Thread | None = None

    def checkpoint() -> None:
        _say("ckpt-begin")
        db.checkpoint()
        _say("ckpt-end")

    def acked(*fields: object) -> None:
        nonlocal acks, checkpointer
        _say("ack", *fields)
        acks += 1
        if acks % STATS_EVERY == 0:
            _say("stats", json.dumps(db.stats()))
        if checkpoint_after and acks % checkpoint_after == 0 and not (
                checkpointer and checkpointer.is_alive()):
            # In the background, like the automatic ones: the work goes on meanwhile.
            checkpointer = threading.Thread(target=checkpoint, daemon=True)
            checkpointer.start()

    _say("recovered", len(tasks.recover()))
    for n in range(n_tasks):
        tid = task_id(n)
        if tasks.get(tid) is None:  # idempotent: a previous worker may have created it
            tasks.create(tid, payload=encode_cursor(0, first_cursor(tid)))
            acked("create", tid, 0, 0, "-")
    for task in tasks.list(status=Status.PENDING):
        state = tasks.start(task.task_id)
        step, cursor = decode_cursor(state.payload)
        acked("start", state.task_id, state.attempts, step, cursor.hex())
        while step < STEPS:
            cursor = next_cursor(cursor)
            step += 1
            tasks.progress(state.task_id, payload=encode_cursor(step, cursor))
            acked("progress", state.task_id, state.attempts, step, cursor.hex())
        result = result_of(cursor)
        tasks.finish(state.task_id, payload=result)
        acked("finish", state.task_id, state.attempts, step, result.hex())
    if checkpointer is not None:
        checkpointer.join()
    _say("stats", json.dumps(db.stats()))
    db.close()
    _say("done")
    return 0


# -- the parent: kill, recover, resume, verify ---------------------------------------


@dataclass
class Ack:
    run: int
    kind: str  # create, start, progress, finish
    task_id: str
    attempts: int
    step: int
    value: str  # hex: the cursor after ``step`` (start, progress) or the result (finish)


@dataclass
class Crash:
    at_percent: float
    during_checkpoint: bool
    recovery: dict[str, Any]
    open_seconds: float
    back_to_pending: int


@dataclass
class Run:
    acks: list[Ack] = field(default_factory=list)
    last_ack: dict[str, Ack] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    crashes: list[Crash] = field(default_factory=list)
    wal_bytes_written: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)
    # Tasks found in the directory before the first worker ran (a reused --dir):
    # task id -> (status name, attempts, step); their earlier history is unknown.
    baseline: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    expected_acks: int = 0  # acks the whole work takes without crashes


class _Lines:
    """Lines from a pipe with a timeout; keeps reading after the writer died."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, b""

    def __iter__(self) -> Iterator[str]:
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                yield line.decode()
            ready, _, _ = select.select([self.fd], [], [], READ_TIMEOUT)
            if not ready:
                raise TimeoutError(f"no output from the worker for {READ_TIMEOUT:.0f} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return  # EOF; a partial last line was never acknowledged
            self.buf += chunk


class _Progress:
    def __init__(self, out: TextIO, total: int) -> None:
        self.out, self.total = out, total
        self.tty = out.isatty()
        self.shown = -1
        self.last = 0.0

    def update(self, done: int, crashes: int) -> None:
        if self.tty:
            now = time.monotonic()
            if now - self.last < 0.1 and done < self.total:
                return
            self.last = now
            width = 30
            filled = width * done // max(self.total, 1)
            self.out.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] "
                           f"{done}/{self.total} tasks, crashes: {crashes} ")
            self.out.flush()
        else:
            tenth = 10 * done // max(self.total, 1)
            if tenth > self.shown:
                self.shown = tenth
                self.out.write(f"  {10 * tenth:3d}%  {done}/{self.total} tasks done, "
                               f"crashes: {crashes}\n")
                self.out.flush()

    def message(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
        self.out.write(text + "\n")
        self.out.flush()
        self.last = 0.0


def _worker_env() -> dict[str, str]:
    # The worker must import this very walstate, installed or not.
    import walstate

    env = dict(os.environ)
    root = str(Path(walstate.__file__ or __file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _kill_points(rng: random.Random, total: int, crashes: int) -> list[int]:
    """Ack counts at which to kill: one in each of ``crashes`` equal slices of 5%..85%
    of the ``total`` acks the work needs without crashes."""
    lo, hi = 0.05, 0.85
    width = (hi - lo) / max(crashes, 1)
    return [int(total * rng.uniform(lo + width * i, lo + width * (i + 1))) for i in range(crashes)]


def _check_durable(tasks: Any, run: Run) -> None:
    """After a crash, before recover(): every acknowledged transition is on disk."""
    from walstate.tasks import Status

    for tid, ack in run.last_ack.items():
        state = tasks.get(tid)
        where = f"after crash {len(run.crashes) + 1}: {tid}"
        if state is None:
            run.problems.append(f"{where}: acknowledged {ack.kind} lost; the task is gone")
            continue
        if ack.kind == "finish" or state.status is Status.SUCCESS:
            run.finished.add(tid)  # also a finish that was durable but not acknowledged
            if state.status is not Status.SUCCESS:
                run.problems.append(f"{where}: acknowledged finish lost ({state.status.name})")
            elif state.payload != result_of(expected_cursors(tid)[STEPS]):
                run.problems.append(f"{where}: SUCCESS with a wrong result")
            continue
        if ack.kind == "create":
            continue
        if state.status is not Status.RUNNING:
            run.problems.append(f"{where}: acknowledged {ack.kind} lost ({state.status.name})")
            continue
        step, cursor = decode_cursor(state.payload)
        if step < ack.step:
            run.problems.append(f"{where}: acknowledged progress step {ack.step} lost "
                                f"(the cursor on disk is at step {step})")
        elif step > STEPS or cursor != expected_cursors(tid)[step]:
            run.problems.append(f"{where}: the cursor on disk is not the expected one")
        if state.attempts < ack.attempts:
            run.problems.append(f"{where}: acknowledged start {ack.attempts} lost")


def _recover(path: Path, run: Run, at_percent: float, during_checkpoint: bool) -> Crash:
    """Open the crashed directory (crash recovery), check it, recover() the tasks."""
    import walstate
    from walstate.tasks import TaskStore

    t0 = time.perf_counter()
    db = walstate.open(path, **ENGINE_OPTIONS)
    open_seconds = time.perf_counter() - t0
    try:
        recovery = dict(db.info()["recovery"])
        tasks = TaskStore(db)
        _check_durable(tasks, run)
        back = len(tasks.recover())
        run.wal_bytes_written += db.stats().get("wal_bytes_written", 0)
    finally:
        db.close()
    return Crash(at_percent, during_checkpoint, recovery, open_seconds, back)


def _take_baseline(path: Path, n_tasks: int, run: Run) -> int:
    """Record the demo tasks already in a reused directory; recover() them."""
    import walstate
    from walstate.tasks import Status, TaskStore

    if not path.exists() or not any(path.iterdir()):
        return 0
    with walstate.open(path, **ENGINE_OPTIONS) as db:
        tasks = TaskStore(db)
        tasks.recover()
        for n in range(n_tasks):
            state = tasks.get(task_id(n))
            if state is None:
                continue
            step = STEPS if state.status is Status.SUCCESS else decode_cursor(state.payload)[0]
            run.baseline[state.task_id] = (state.status.name, state.attempts, step)
            if state.status is Status.SUCCESS:
                run.finished.add(state.task_id)
            else:  # start, the remaining steps, finish; instead of create + all
                run.expected_acks -= (STEPS + 3) - (STEPS - step + 2)
    return len(run.baseline)


def _verify(path: Path, n_tasks: int, run: Run, drop_ack: bool) -> tuple[list[str], int, Any]:
    """Check the final state and every acknowledgement against our own computation.

    Returns the problems found, how many starts resumed from a progress
    cursor, and the directory's last CheckpointInfo.
    """
    import walstate
    from walstate.tasks import Status, TaskStore

    problems = list(run.problems)
    acks = list(run.acks)
    if drop_ack:
        # The test hook: lose one acknowledged progress record (one followed by
        # another acknowledgement of the same attempt) from the verification input.
        for i, ack in enumerate(acks[:-1]):
            nxt = acks[i + 1:]
            if ack.kind == "progress" and any(
                    a.task_id == ack.task_id and a.attempts == ack.attempts for a in nxt[:50]):
                del acks[i]
                break
    by_task: dict[str, list[Ack]] = {}
    for ack in acks:
        by_task.setdefault(ack.task_id, []).append(ack)
    resumed = 0
    with walstate.open(path, **ENGINE_OPTIONS) as db:
        tasks = TaskStore(db)
        for n in range(n_tasks):
            tid = task_id(n)
            cursors = expected_cursors(tid)
            result = result_of(cursors[STEPS])
            state = tasks.get(tid)
            if state is None:
                problems.append(f"{tid}: missing")
                continue
            if state.status is not Status.SUCCESS or state.payload != result:
                problems.append(f"{tid}: {state.status.name}, "
                                f"{'right' if state.payload == result else 'wrong'} result")
            trail = by_task.get(tid, [])
            starts = [a for a in trail if a.kind == "start"]
            before, base_attempts, base_step = run.baseline.get(tid, ("", 0, 0))
            if state.attempts < 1:
                problems.append(f"{tid}: never started")
            low = base_attempts + len(starts)
            if not low <= state.attempts <= low + len(run.crashes):
                problems.append(f"{tid}: {state.attempts} attempts on disk, "
                                f"{len(starts)} acknowledged starts")
            problems += _check_trail(tid, trail, cursors, result, base_step, base_attempts,
                                     before == "SUCCESS")
            resumed += sum(1 for a in starts if a.step > 0)
        last_checkpoint = db.info().get("last_checkpoint")
    return problems, resumed, last_checkpoint


def _check_trail(tid: str, trail: list[Ack], cursors: list[bytes], result: bytes,
                 last_step: int = 0, attempts: int = 0, finished: bool = False) -> list[str]:
    """One task's acknowledgements must form an unbroken chain.

    Within an attempt: start at step r, then progress r+1, r+2, ..., then
    finish after step STEPS. A new attempt resumes at the last acknowledged
    step, or one later (a write can be durable when the kill comes before
    its acknowledgement). Nothing follows a finish. ``last_step``,
    ``attempts`` and ``finished`` describe the task before the first worker.
    """
    problems: list[str] = []
    step = None  # the current attempt's step; None outside an attempt
    for ack in trail:
        where = f"{tid} attempt {ack.attempts}"
        if finished:
            problems.append(f"{where}: acknowledged {ack.kind} after its finish")
            break
        if ack.kind == "create":
            if attempts:
                problems.append(f"{where}: created again")
            continue
        if ack.kind == "start":
            if ack.attempts <= attempts:
                problems.append(f"{where}: attempts did not increase")
            if not last_step <= ack.step <= last_step + 1:
                problems.append(f"{where}: resumed at step {ack.step}, but step {last_step} "
                                f"was the last acknowledged")
            attempts, step = ack.attempts, ack.step
        elif step is None or ack.attempts != attempts:
            problems.append(f"{where}: acknowledged {ack.kind} outside a started attempt")
            break
        elif ack.kind == "progress":
            if ack.step != step + 1:
                problems.append(f"{where}: acknowledged progress step {ack.step} follows "
                                f"step {step}: an acknowledgement is missing")
            step = ack.step
        elif ack.kind == "finish":
            if step != STEPS:
                problems.append(f"{where}: finished after step {step} of {STEPS}")
            if ack.value != result.hex():
                problems.append(f"{where}: acknowledged a wrong result")
            finished = True
            continue
        if not 0 <= ack.step <= STEPS or ack.value != cursors[ack.step].hex():
            problems.append(f"{where}: acknowledged cursor of step {ack.step} is wrong")
        last_step = max(last_step, ack.step)
    return problems


def _crash_line(number: int, crash: Crash) -> str:
    rec = crash.recovery
    return (
        f"  crash {number} at {crash.at_percent:.0f}% of the work: SIGKILL"
        f"{' during a checkpoint' if crash.during_checkpoint else ''}; recovery replayed "
        f"{rec.get('records_replayed', 0)} records ({_human_bytes(rec.get('bytes_replayed', 0))})"
        f" in {1000 * rec.get('seconds', 0.0):.1f} ms (open: {1000 * crash.open_seconds:.1f} ms),"
        f" cut {rec.get('truncated_bytes', 0)} torn bytes; recover(): {crash.back_to_pending}"
        f" RUNNING task(s) -> PENDING"
    )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def run_demo(path: Path, n_tasks: int, crashes: int, seed: int, drop_ack: bool,
             out: TextIO) -> int:
    rng = random.Random(seed)
    run = Run(expected_acks=n_tasks * (STEPS + 3))
    bar = _Progress(out, n_tasks)
    found = _take_baseline(path, n_tasks, run)
    if found:
        run.expected_acks -= (STEPS + 3) * len(run.finished)
        bar.message(f"  reusing {path}: {found} of the tasks exist, {len(run.finished)} "
                    f"of them done")
    kill_at = _kill_points(rng, run.expected_acks, crashes)
    # Which kill waits for a checkpoint; if that kill misses it, the next one
    # tries again (a few extra kills at most).
    checkpoint_kill = rng.randrange(crashes) if crashes else None
    extra_kills = 3
    stderr = tempfile.TemporaryFile()  # the worker's, shown if it fails
    try:
        t_start = time.perf_counter()
        worker_runs = 0
        while True:
            worker_runs += 1
            kill_index = len(run.crashes)
            target = kill_at[kill_index] if kill_index < len(kill_at) else None
            wait_checkpoint = target is not None and kill_index == checkpoint_kill
            checkpoint_after = 0
            if target is not None and wait_checkpoint:
                checkpoint_after = max(1, target - len(run.acks))
            cmd = [sys.executable, "-m", "walstate.demo", "--worker", str(path),
                   "--tasks", str(n_tasks), "--checkpoint-after", str(checkpoint_after)]
            stderr.seek(0)
            stderr.truncate()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=_worker_env())
            assert proc.stdout is not None
            killed = False
            in_checkpoint = False
            stats: dict[str, Any] = {}
            done = False
            try:
                for line in _Lines(proc.stdout.fileno()):
                    kind, _, rest = line.partition(" ")
                    if kind == "ack":
                        k, tid, attempts, step, value = rest.split(" ")
                        ack = Ack(worker_runs, k, tid, int(attempts), int(step), value)
                        run.acks.append(ack)
                        run.last_ack[tid] = ack
                        if k == "finish":
                            run.finished.add(tid)
                        bar.update(len(run.finished), len(run.crashes))
                    elif kind == "stats":
                        stats = json.loads(rest)
                    elif kind == "ckpt-begin":
                        in_checkpoint = True
                    elif kind == "ckpt-end":
                        in_checkpoint = False
                    elif kind == "done":
                        done = True
                    if killed:
                        continue
                    if (wait_checkpoint and in_checkpoint) or (
                            not wait_checkpoint and target is not None and len(run.acks) >= target):
                        # A random moment: not right after an acknowledgement (but
                        # soon enough near the end that there is still work to kill).
                        near_end = run.expected_acks - len(run.acks) < 100
                        delay = 0.0005 if wait_checkpoint or near_end else 0.003
                        time.sleep(rng.uniform(0, delay))
                        os.kill(proc.pid, signal.SIGKILL)
                        killed = True  # keep reading: what it wrote before dying was acknowledged
            finally:
                if proc.poll() is None and not done:
                    proc.kill()
                proc.stdout.close()
                proc.wait()
            run.wal_bytes_written += stats.get("wal_bytes_written", 0)
            run.checkpoints += stats.get("checkpoints", 0)
            if killed and proc.returncode == -signal.SIGKILL:
                percent = min(100.0, 100.0 * len(run.acks) / max(run.expected_acks, 1))
                crash = _recover(path, run, percent, in_checkpoint)
                run.crashes.append(crash)
                if wait_checkpoint and not in_checkpoint:
                    # Missed: checkpoint() returned before the kill. The next kill tries
                    # again; add one if this was the last (a few times at most).
                    assert checkpoint_kill is not None
                    checkpoint_kill += 1
                    if checkpoint_kill == len(kill_at) and extra_kills > 0:
                        extra_kills -= 1
                        kill_at.append(len(run.acks) + max(20, n_tasks // 10))
                bar.message(_crash_line(len(run.crashes), crash))
                continue
            if proc.returncode == 0 and done:
                break
            stderr.seek(0)
            bar.message(f"walstate demo: the worker failed (exit status {proc.returncode}):\n"
                        + stderr.read().decode(errors="replace"))
            return 1
    except TimeoutError as exc:
        bar.message(f"walstate demo: the worker hangs: {exc}")
        return 1
    finally:
        stderr.close()
    elapsed = time.perf_counter() - t_start
    bar.update(len(run.finished), len(run.crashes))
    if bar.tty:
        out.write("\n")

    problems, resumed, last_checkpoint = _verify(path, n_tasks, run, drop_ack)
    during = sum(c.during_checkpoint for c in run.crashes)
    rec_ms = ", ".join(f"{1000 * c.recovery.get('seconds', 0.0):.1f}" for c in run.crashes)
    worked = n_tasks - sum(1 for st, _, _ in run.baseline.values() if st == "SUCCESS")
    short = ""
    if len(run.crashes) < crashes:
        short = f" (of {crashes} planned: the work ran out first; try more --tasks)"
    out.write(
        f"\nreport\n"
        f"  tasks:        {n_tasks} x {STEPS} steps, {len(run.acks)} acknowledged transitions "
        f"in {worker_runs} worker runs\n"
        f"  crashes:      {len(run.crashes)} SIGKILLs{short}, {during} during a checkpoint\n"
        f"  recoveries:   {len(run.crashes)} (ms: {rec_ms or '-'})\n"
        f"  resumed:      {resumed} task starts continued from a progress cursor\n"
        f"  checkpoints:  {getattr(last_checkpoint, 'id', 0)} in the directory, at least "
        f"{run.checkpoints} of them while a worker ran (max_wal_size "
        f"{_human_bytes(ENGINE_OPTIONS['max_wal_size'])})\n"
        f"  WAL written:  at least {_human_bytes(run.wal_bytes_written)}\n"
        f"  throughput:   {worked / elapsed:.0f} tasks/s, {len(run.acks) / elapsed:.0f} "
        f"durable transitions/s ({elapsed:.1f} s including crashes and recoveries)\n"
    )
    if problems:
        out.write(f"\nverification FAILED ({len(problems)} problems):\n")
        for p in problems[:20]:
            out.write(f"  {p}\n")
        if len(problems) > 20:
            out.write(f"  ... and {len(problems) - 20} more\n")
        return 1
    out.write(f"\nverification passed: all {n_tasks} tasks SUCCESS with the expected result, "
              f"each finished once; no acknowledged transition lost across "
              f"{len(run.crashes)} crash{'es' if len(run.crashes) != 1 else ''}\n")
    return 0


# -- the pool: TaskStore.map over worker processes, its parent and workers killed -----

POOL_PROCESSES = 3
POOL_ITEM_SECONDS = 0.004


def pool_work(n: int) -> str:
    """One item of the pool stage: a hash chain, deterministic (the verifier
    computes it too)."""
    cursor = first_cursor(f"item-{n:05d}")
    for _ in range(STEPS):
        cursor = next_cursor(cursor)
    time.sleep(POOL_ITEM_SECONDS)  # the rest of the "work": waiting on something
    return result_of(cursor).hex()


def run_pool_worker(path: str, n_items: int) -> int:
    """The engine's process of the pool stage: map to the end (a worker killed
    in the middle of an item alone fails it: run again)."""
    import walstate
    from walstate import demo as this  # pool_work by its module's name, for the workers
    from walstate.tasks import TasksFailedError, TaskStore

    with walstate.open(path, **ENGINE_OPTIONS) as db:
        tasks = TaskStore(db)
        _say("pid", os.getpid())
        for _ in range(100):
            try:
                tasks.map(this.pool_work, range(n_items), processes=POOL_PROCESSES,
                          key=lambda n: f"item-{n:05d}")
                break
            except TasksFailedError:
                continue
    _say("done")
    return 0


def _descendants(pid: int) -> dict[int, int]:
    """pid -> depth below ``pid`` of its live descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    depth: dict[int, int] = {}
    frontier, level = [pid], 0
    while frontier:
        level += 1
        frontier = [p for p, pp in parents.items() if pp in frontier and p not in depth]
        depth.update((p, level) for p in frontier)
    return depth


def run_pool_demo(path: Path, n_items: int, kills: int, seed: int, out: TextIO) -> int:
    """Start the map; SIGKILL a worker, then the engine's process, ``kills``
    times at random moments, showing the counts after each; then let it finish
    and verify every result and every count."""

    rng = random.Random(seed ^ 0x9E3779B9)
    out.write(f"\npool: tasks.map over {n_items} items in {POOL_PROCESSES} worker processes "
              f"(the engine's process records every transition)\n")
    out.flush()
    # A killed engine's process leaves its multiprocessing temp dir (pymp-*) behind:
    # give the runs their own TMPDIR, removed at the end.
    env = _worker_env()
    env["TMPDIR"] = tempfile.mkdtemp(prefix="wsd-")
    try:
        return _pool_runs(path, n_items, kills, rng, out, env)
    finally:
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)


def _pool_runs(path: Path, n_items: int, kills: int, rng: random.Random, out: TextIO,
               env: dict[str, str]) -> int:
    import walstate
    from walstate.tasks import Status, TaskStore

    t_start = time.perf_counter()
    runs = worker_kills = parent_kills = 0
    while True:
        runs += 1
        proc = subprocess.Popen([sys.executable, "-m", "walstate.demo", "--pool-worker",
                                 str(path), "--pool-items", str(n_items)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "pid N": the engine is open
        last = parent_kills >= kills
        if not last:
            workers: list[int] = []
            deadline = time.monotonic() + 5
            while not workers and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)  # the map's workers (under its forkserver) are up
                workers = [p for p, d in _descendants(proc.pid).items() if d == 2]
            time.sleep(rng.uniform(0.05, 0.4))
            if workers and proc.poll() is None:
                victim = rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                    worker_kills += 1
                    out.write(f"  run {runs}: SIGKILL worker {victim}\n")
                except ProcessLookupError:
                    pass
                time.sleep(rng.uniform(0.05, 0.4))
            if proc.poll() is None:
                proc.kill()
                parent_kills += 1
        stdout, stderr = proc.communicate(timeout=READ_TIMEOUT)
        if proc.returncode == -signal.SIGKILL:
            with walstate.open(path, read_only=True) as db:
                counts = TaskStore(db).counts()
            shown = ", ".join(f"{s.name} {n}" for s, n in counts.items())
            out.write(f"  run {runs}: SIGKILL the engine's process; recorded: {shown}\n")
            out.flush()
            continue
        if proc.returncode == 0 and b"done" in line + stdout:
            break
        out.write(f"walstate demo: the pool run failed (exit status {proc.returncode}):\n"
                  + stderr.decode(errors="replace"))
        return 1
    elapsed = time.perf_counter() - t_start
    problems = []
    with walstate.open(path) as db:
        tasks = TaskStore(db)
        left = tasks.recover()
        states = {t.task_id: t for t in tasks.list() if t.task_id.startswith("item-")}
        counts, scan = tasks.counts(), dict.fromkeys(Status, 0)
        for t in tasks.list():
            scan[t.status] += 1
    import pickle

    if left:
        problems.append(f"{len(left)} tasks were left RUNNING")
    if counts != scan:
        problems.append(f"counts {counts} differ from a scan {scan}")
    for n in range(n_items):
        state = states.get(f"item-{n:05d}")
        if state is None or state.status is not Status.SUCCESS:
            problems.append(f"item-{n:05d} is {state and state.status.name}, not SUCCESS")
        elif pickle.loads(state.payload) != pool_work(n):
            problems.append(f"item-{n:05d} has a wrong result")
    attempts = sum(t.attempts for t in states.values())
    short = "" if parent_kills >= kills else f" (of {kills} planned: the work ran out first)"
    out.write(f"  {runs} runs, {parent_kills} engine kills{short}, {worker_kills} worker kills, "
              f"{attempts} attempts for {n_items} items, {elapsed:.1f} s\n")
    if problems:
        out.write(f"\npool verification FAILED ({len(problems)} problems):\n")
        for p in problems[:20]:
            out.write(f"  {p}\n")
        return 1
    out.write(f"\npool verification passed: all {n_items} items SUCCESS with the expected "
              f"result, counts equal a scan, nothing left RUNNING\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="walstate demo",
        description="Crash-and-resume demonstration: a worker processes tasks and is "
                    "SIGKILLed repeatedly; recovery loses nothing that was acknowledged.",
    )
    parser.add_argument("--tasks", type=int, default=2000, metavar="N",
                        help="number of tasks (default 2000)")
    parser.add_argument("--crashes", type=int, default=4, metavar="K",
                        help="number of SIGKILLs, at least (default 4)")
    parser.add_argument("--dir", metavar="PATH",
                        help="data directory (default: a temporary directory, removed "
                             "afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--seed", type=int, help="random seed for the kill points")
    parser.add_argument("--pool-items", type=int, default=None, metavar="N",
                        help="items of the pool stage (default: --tasks, within 600..2000)")
    parser.add_argument("--no-pool", action="store_true", help="skip the pool stage")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--pool-worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-after", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--drop-ack", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    if args.crashes < 0:
        parser.error("--crashes must be at least 0")

    pool_items = (args.pool_items if args.pool_items is not None
                  else min(max(args.tasks, 600), 2000))
    if pool_items < 1:
        parser.error("--pool-items must be at least 1")
    if args.worker:
        return run_worker(args.worker, args.tasks, args.checkpoint_after)
    if args.pool_worker:
        return run_pool_worker(args.pool_worker, pool_items)

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    drop_ack = args.drop_ack or os.environ.get("WALSTATE_DEMO_BREAK") == "1"
    tmp = None
    if args.dir:
        path = Path(args.dir)
    else:
        tmp = tempfile.mkdtemp(prefix="walstate-demo-")
        path = Path(tmp) / "db"
    print(f"walstate demo: {args.tasks} tasks, {args.crashes} crashes, seed {seed}, "
          f"data in {path}", flush=True)
    try:
        status = run_demo(path, args.tasks, args.crashes, seed, drop_ack, sys.stdout)
        if status == 0 and not args.no_pool:
            status = run_pool_demo(path.parent / (path.name + "-pool"), pool_items,
                                   max(1, min(args.crashes, 3)), seed, sys.stdout)
    finally:
        if tmp is not None:
            if args.keep:
                print(f"kept {path}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
