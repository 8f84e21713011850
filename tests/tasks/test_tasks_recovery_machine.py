"""TaskStore on walstate.testing.stateful's RecoveryMachine: random transitions,
legal or not, with the machine's SIGKILLs and power losses between and inside
them (and inside checkpoints and recoveries), and clean reopens.

What test_tasks.py's crash tests check, here after every kind of crash:

* every transition is one atomic write: after any crash a task is before or
  after its last transition, never in between -- the store equals the model
  of the transitions that returned, plus at most the one in flight;
* one record and one index entry per task, none stale;
* after a crash, ``recover()`` (what the application runs when it restarts)
  moves exactly the tasks the model has RUNNING back to PENDING, keeping their
  last acknowledged progress payload and their attempt count, and a resumed
  task counts a second attempt.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from walstate.errors import InvalidTransitionError
from walstate.tasks import KEY_PREFIX, Status, TaskStore
from walstate.testing.stateful import Recovery, RecoveryMachine

IDS = st.sampled_from(["a", "b", "c", "a\x00", "é", "z" * 40])
PAYLOADS = st.binary(max_size=64)


class TaskRecovery(RecoveryMachine):
    options = {"sync": "always", "segment_size": 64 * 1024, "max_wal_size": 64 * 1024}
    max_restarts = 4

    def __init__(self) -> None:
        super().__init__()
        self.tasks = TaskStore(self.db)
        self.model: dict[str, tuple[Status, int, bytes, str | None]] = {}
        self.inflight: dict[str, tuple] | None = None   # {task id: its state if it lands}

    def attempt(self, tid, required, call, new):
        """Run ``call``; legal iff the model has ``tid`` in ``required`` status."""
        old = self.model.get(tid)
        legal = old is not None and old[0] is required if required else old is None
        before = self.db.stats()["wal_records"]
        if legal:
            self.inflight = {tid: new(old)}
            state = call()
            self.inflight = None
            self.model[tid] = new(old)
            assert (state.status, state.attempts, state.payload, state.error) == self.model[tid]
            assert self.db.stats()["wal_records"] == before + 1
        else:
            with pytest.raises(KeyError if old is None else InvalidTransitionError):
                call()
            assert self.db.stats()["wal_records"] == before

    @rule(tid=IDS, payload=PAYLOADS)
    def create(self, tid, payload):
        self.attempt(tid, None, lambda: self.tasks.create(tid, payload=payload),
                     lambda old: (Status.PENDING, 0, payload, None))

    @rule(tid=IDS)
    def start(self, tid):
        self.attempt(tid, Status.PENDING, lambda: self.tasks.start(tid),
                     lambda old: (Status.RUNNING, old[1] + 1, old[2], None))

    @rule(tid=IDS, payload=PAYLOADS)
    def progress(self, tid, payload):
        self.attempt(tid, Status.RUNNING, lambda: self.tasks.progress(tid, payload=payload),
                     lambda old: (Status.RUNNING, old[1], payload, None))

    @rule(tid=IDS, payload=st.none() | PAYLOADS)
    def finish(self, tid, payload):
        self.attempt(tid, Status.RUNNING, lambda: self.tasks.finish(tid, payload=payload),
                     lambda old: (Status.SUCCESS, old[1], old[2] if payload is None else payload,
                                  None))

    @rule(tid=IDS, error=st.text(max_size=20))
    def fail(self, tid, error):
        self.attempt(tid, Status.RUNNING, lambda: self.tasks.fail(tid, error=error),
                     lambda old: (Status.FAILED, old[1], old[2], error))

    @rule()
    def recover(self):
        running = sorted(tid for tid, m in self.model.items() if m[0] is Status.RUNNING)
        after = {tid: (Status.PENDING, *self.model[tid][1:]) for tid in running}
        before = self.db.stats()["wal_records"]
        self.inflight = after or None
        assert [t.task_id for t in self.tasks.recover(stale_after=0)] == running
        self.inflight = None
        self.model.update(after)
        # every move back to PENDING is in one atomic record
        assert self.db.stats()["wal_records"] == before + (1 if running else 0)

    @rule()
    def checkpoint(self):
        self.db.checkpoint()

    def after_recovery(self, recovery: Recovery) -> None:
        # the restarted application builds its store again
        self.tasks = TaskStore(self.db)
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            # the transition in flight (one write) either landed, all of it, or not
            if recovery.kept == recovery.attempted:
                self.model.update(inflight)
        self.store_equals_model()
        if recovery.crash != "clean close and open":
            # the resume loop: RUNNING when we died -> PENDING, payload and attempts kept
            running = {tid: m for tid, m in self.model.items() if m[0] is Status.RUNNING}
            got = self.tasks.recover(stale_after=0)
            assert sorted(t.task_id for t in got) == sorted(running)
            for t in got:
                _status, attempts, payload, _err = running[t.task_id]
                assert (t.status, t.attempts, t.payload) == (Status.PENDING, attempts, payload)
                self.model[t.task_id] = (Status.PENDING, attempts, payload, None)
            if got:  # a resumed task counts a second attempt
                t = self.tasks.start(got[0].task_id)
                assert t.attempts == got[0].attempts + 1 and t.payload == got[0].payload
                self.model[t.task_id] = (Status.RUNNING, t.attempts, t.payload, None)

    @invariant()
    def store_equals_model(self):
        listed = {t.task_id: (t.status, t.attempts, t.payload, t.error)
                  for t in self.tasks.list()}
        assert listed == self.model
        assert [t.task_id for t in self.tasks.list()] == sorted(self.model)
        for status in Status:
            assert [t.task_id for t in self.tasks.list(status=status)] == sorted(
                tid for tid, m in self.model.items() if m[0] is status)
        # One record and one index entry per task: no stale index entry left behind.
        for kind in (b"r", b"s"):
            prefix = KEY_PREFIX + kind
            stop = prefix[:-1] + bytes((prefix[-1] + 1,))
            assert len(list(self.db.items(prefix, stop))) == len(self.model), kind
        # the counters, kept in each transition's own record, equal the model's counts
        assert self.tasks.counts() == {s: sum(m[0] is s for m in self.model.values())
                                       for s in Status}


TaskRecovery.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_task_store_survives_every_crash = TaskRecovery.TestCase


def test_a_crash_inside_a_transition_leaves_it_whole():
    """Directly: a SIGKILL with the transition's record torn, and one after it was
    written: the task is before or after the transition."""
    m = TaskRecovery()
    try:
        m.create("t", b"p0")
        m.start("t")
        m.crash(where="next write: torn", skip=0, seed=7)
        m.progress("t", b"x" * 3000)        # torn: the progress is not there
        r = m.last_recovery
        assert m.model["t"][2] == b"p0" and (r.kept, r.attempted) == (2, 3)
        m.store_equals_model()
        m.crash(where="next write: after", skip=0, seed=0)
        m.finish("t", b"done")              # written, not acknowledged: it is there
        assert m.model["t"][0] is Status.SUCCESS and m.model["t"][2] == b"done"
        m.store_equals_model()
    finally:
        m.teardown()
