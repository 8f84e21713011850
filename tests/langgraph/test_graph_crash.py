"""A real 20-step StateGraph on WalstateSaver, its process SIGKILLed at a random
step and resumed with the same thread_id, again and again: the final state equals
an uninterrupted run's, and no checkpoint whose put returned is ever lost.

Each run picks LangGraph's durability at random. Under ``"sync"`` a node's writes
are stored against a checkpoint that is already durable, so once put_writes
returned they are part of the recovered state. Under ``"async"`` (LangGraph's
default) the writes of step N+1 may be stored before step N's checkpoint: a
crash then keeps them on disk, but under a checkpoint that LangGraph never
stored, and step N+1 runs again -- LangGraph's semantics, not a loss."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("langgraph.graph")

import lg_graphs  # noqa: E402

from walstate.langgraph import WalstateSaver  # noqa: E402

CHILD = Path(lg_graphs.__file__)


def _check_on_disk(path: Path, thread_id: str, acked: int | None, wrote: int = 0,
                   durability: str = "sync") -> int:
    """Opens the directory (recovering) and checks the thread's newest checkpoint:
    at least the last acknowledged step, its state exactly the steps so far, and
    the graph's state (checkpoint + pending writes) holds every acknowledged
    node's writes (``wrote``)."""
    with WalstateSaver.from_path(str(path)) as saver:
        graph = lg_graphs.build(saver)
        snap = graph.get_state({"configurable": {"thread_id": thread_id}})
        if snap.created_at is None:
            assert acked is None, f"step {acked} was acknowledged, nothing recovered"
            return -2
        step = snap.metadata["step"]
        assert acked is None or step >= acked, f"acknowledged step {acked} lost (have {step})"
        tup = saver.get_tuple({"configurable": {"thread_id": thread_id}})
        assert tup.checkpoint["channel_values"].get("log", []) == list(range(1, max(step, 0) + 1))
        log = snap.values["log"]
        assert log == list(range(1, len(log) + 1)), log          # no gap, no duplicate
        assert len(log) in (max(step, 0), max(step, 0) + 1)
        if durability == "sync":
            assert len(log) >= wrote, f"node {wrote}'s acknowledged writes lost: {log}"
        steps = [t.metadata["step"] for t in saver.list({"configurable": {
            "thread_id": thread_id, "checkpoint_ns": ""}})]
        assert steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps)
        return step


def _campaign(tmp_path: Path, kills: int, seed: int) -> None:
    """Graphs run on threads agent-0, agent-1, ...: each run of the child is
    SIGKILLed at a random step past the one recovered last time (somewhere up to
    4 ms into the next step), until ``kills`` kills; each thread is resumed until
    it finishes."""
    rng = random.Random(seed)
    path = tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    want = lg_graphs.expected()
    n_killed = 0
    threads = 0
    while n_killed < kills:
        thread_id = f"agent-{threads}"
        threads += 1
        recovered = -2          # the newest step on disk (-2: nothing yet)
        done_state = None
        runs = 0
        while done_state is None:
            runs += 1
            assert runs <= lg_graphs.STEPS + 3, "the graph never finished"
            target = (rng.randint(recovered + 1, lg_graphs.STEPS)
                      if n_killed < kills and recovered < lg_graphs.STEPS else None)
            durability = rng.choice(["sync", "async"])
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(path), thread_id, durability],
                stdout=subprocess.PIPE, text=True, env=env)
            acked: int | None = None
            wrote = 0
            assert proc.stdout is not None
            for line in proc.stdout:
                word, _, rest = line.strip().partition(" ")
                if word == "durable":
                    acked = int(rest)
                    if target is not None and acked >= target:
                        time.sleep(rng.random() * 0.004)   # somewhere inside the next step
                        proc.send_signal(signal.SIGKILL)
                        break
                elif word == "wrote":
                    wrote = int(rest)
                elif word == "done":
                    done_state = json.loads(rest)
            proc.stdout.close()
            rc = proc.wait(timeout=60)
            if done_state is None:
                assert rc == -signal.SIGKILL, f"child exited with {rc} without finishing"
                n_killed += 1
                if acked is None:      # killed by a resume that had nothing new to put
                    acked = recovered if recovered >= -1 else None
                recovered = _check_on_disk(path, thread_id, acked, wrote, durability)
        assert done_state == want, (thread_id, done_state, runs)
        assert _check_on_disk(path, thread_id, lg_graphs.STEPS) == lg_graphs.STEPS
    assert n_killed == kills


def test_sigkill_at_random_steps_then_resume(tmp_path: Path) -> None:
    _campaign(tmp_path, kills=5, seed=1)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_50_times(tmp_path: Path) -> None:
    _campaign(tmp_path, kills=50, seed=2)
