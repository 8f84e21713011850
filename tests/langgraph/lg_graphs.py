"""A 20-step LangGraph StateGraph used by the LangGraph tests; run as a script it
is the child process that the SIGKILL test kills and resumes:

    python lg_graphs.py DIR THREAD_ID [DURABILITY]

prints ``durable STEP`` after every checkpoint put that returned and ``wrote N``
after node N's writes were stored (so the parent knows what was acknowledged),
and ``done STATE_JSON`` at the end. DURABILITY is LangGraph's (``"sync"``: each
step's checkpoint is stored before the next step starts; ``"async"``, its
default: stored while the next step runs).
"""

from __future__ import annotations

import json
import operator
import sys
import threading
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph

STEPS = 20


class State(TypedDict):
    log: Annotated[list[int], operator.add]   # every node appends its number
    acc: int                                  # a running hash of the order


def _node(i: int):
    def run(state: State) -> dict[str, Any]:
        return {"log": [i], "acc": (state["acc"] * 31 + i) % 1_000_003}
    run.__name__ = f"n{i:02d}"
    return run


def build(checkpointer: Any = None, steps: int = STEPS) -> Any:
    g = StateGraph(State)
    prev = START
    for i in range(1, steps + 1):
        g.add_node(f"n{i:02d}", _node(i))
        g.add_edge(prev, f"n{i:02d}")
        prev = f"n{i:02d}"
    g.add_edge(prev, END)
    return g.compile(checkpointer=checkpointer)


INPUT: State = {"log": [], "acc": 7}


def expected(steps: int = STEPS) -> dict[str, Any]:
    """The final state of an uninterrupted run (no checkpointer)."""
    return dict(build(None, steps).invoke(dict(INPUT)))


def run_or_resume(graph: Any, thread_id: str, durability: str = "async") -> dict[str, Any]:
    """Runs the thread to its end, resuming from its last checkpoint if it has one."""
    config = {"configurable": {"thread_id": thread_id}}
    snap = graph.get_state(config)
    if snap.created_at is None:          # no checkpoint at all: start
        return dict(graph.invoke(dict(INPUT), config, durability=durability))
    # continue (a finished thread returns its final state; ``snap.next`` is empty
    # also when the next task's writes are stored but not yet checkpointed)
    return dict(graph.invoke(None, config, durability=durability))


def main() -> None:
    from walstate.langgraph import WalstateSaver

    path, thread_id = sys.argv[1], sys.argv[2]
    durability = sys.argv[3] if len(sys.argv) > 3 else "async"
    mu = threading.Lock()   # LangGraph puts from a background thread: one line at a time

    def say(*words: object) -> None:
        with mu:
            sys.stdout.write(" ".join(map(str, words)) + "\n")
            sys.stdout.flush()

    class Reporting(WalstateSaver):
        def put(self, config, checkpoint, metadata, new_versions):  # type: ignore[override]
            out = super().put(config, checkpoint, metadata, new_versions)
            say("durable", metadata.get("step"))
            return out

        def put_writes(self, config, writes, task_id, task_path=""):  # type: ignore[override]
            super().put_writes(config, writes, task_id, task_path)
            for channel, value in writes:
                if channel == "log":
                    say("wrote", value[-1])

    with Reporting.from_path(path, sync="always") as saver:
        say("ready")
        final = run_or_resume(build(saver), thread_id, durability)
    say("done", json.dumps(final))


if __name__ == "__main__":
    main()
