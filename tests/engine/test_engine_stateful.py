"""The engine against a plain dict model, on walstate.testing.stateful's
RecoveryMachine: hypothesis drives put / delete / batch / checkpoint and the
machine's own crash (SIGKILL), power loss (fsynced data only, in every
flavour) and clean reopen -- between writes, inside a write, inside a
checkpoint and inside a recovery -- in random order.

The machine checks the engine's guarantee after every restart; this test keeps
its own model too and checks it independently: under sync="always" every
write that returned survives a crash or a power loss, so the recovered state is
the model, plus at most the write in flight; under sync="none" it is the
model after some prefix of the committed operations that contains every
operation made durable (before a returned ``sync()``, ``checkpoint()`` or
``close()``). LSNs strictly increase across every restart.
"""

from __future__ import annotations

import pytest
from enginehelpers import KiB, apply_op, matching_prefixes, run_op, state
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from walstate.testing.stateful import Recovery, RecoveryMachine

KEYS = st.one_of(st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]),
                 st.binary(min_size=1, max_size=24))
VALUES = st.one_of(
    st.binary(max_size=32),
    # big values push the WAL across segments and past max_wal_size (checkpoints)
    st.builds(lambda n, b: bytes([b]) * n, st.integers(500, 6000), st.integers(0, 255)),
)
OPS = st.lists(st.one_of(st.tuples(st.just("P"), KEYS, VALUES), st.tuples(st.just("D"), KEYS)),
               max_size=6)

SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class _Base(RecoveryMachine):
    options = {"sync": "always", "segment_size": 64 * KiB, "max_wal_size": 64 * KiB,
               "wal_buffer_size": 4096}
    max_restarts = 6

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[bytes, bytes] = {}
        self.base: dict[bytes, bytes] = {}   # the state at the last restart
        self.history: list = []              # operations committed (returned) since
        self.inflight = None                 # the operation being written
        self.durable_n = 0                   # how many of history are durable
        self.last_lsn = 0

    # ---- writes --------------------------------------------------------
    def commit(self, op) -> None:
        self.inflight = op
        lsn = run_op(self.db, op)
        self.inflight = None
        if op[0] == "B" and not op[1]:
            assert lsn is None  # an empty batch writes nothing
            return
        assert type(lsn) is int and lsn > self.last_lsn, (lsn, self.last_lsn)
        self.last_lsn = lsn
        apply_op(self.model, op)
        self.history.append(op)
        if self.options["sync"] == "always":
            self.durable_n = len(self.history)

    @rule(key=KEYS, value=VALUES)
    def put(self, key, value):
        self.commit(("P", key, value))

    @rule(key=KEYS)
    def delete(self, key):
        self.commit(("D", key))

    @rule(ops=OPS)
    def batch(self, ops):
        self.commit(("B", [tuple(o) for o in ops]))

    @rule(ops=OPS)
    def batch_that_raises(self, ops):
        records = self.db.stats()["wal_records"]
        with pytest.raises(ZeroDivisionError):
            with self.db.batch() as b:
                for o in ops:
                    b.put(o[1], o[2]) if o[0] == "P" else b.delete(o[1])
                1 / 0  # noqa: B018 -- the exception that discards the batch
        assert b.lsn is None and self.db.stats()["wal_records"] == records

    @rule()
    def checkpoint(self):
        ci = self.db.checkpoint()
        assert ci.lsn >= self.last_lsn and ci.reason == "manual"
        self.durable_n = len(self.history)

    # ---- restarts (the machine's crash / power_loss / reopen rules) ------
    def after_recovery(self, recovery: Recovery) -> None:
        got = recovery.state
        ops = self.history + ([self.inflight] if self.inflight is not None else [])
        fits = matching_prefixes(self.base, ops, got)
        if recovery.crash == "clean close and open":
            assert got == self.model, "a clean close and open changed the contents"
            assert self.db.info()["last_lsn"] >= self.last_lsn
        else:
            assert any(n >= self.durable_n for n in fits), (
                f"after {recovery.crash}: the recovered state is not the state after a "
                f"prefix of the {len(ops)} operations that contains the {self.durable_n} "
                f"durable ones (prefixes that fit: {fits})")
        # the engine's own check agrees with this model
        assert recovery.kept in fits or got == self.base
        self.base = dict(got)
        self.model = dict(got)
        self.history = []
        self.inflight = None
        self.durable_n = 0
        # LSNs are never reused, not even those of the writes a crash lost:
        # self.last_lsn stays the highest LSN handed out

    @invariant()
    def reads_match_the_model(self):
        assert state(self.db) == self.model
        for k in (b"a", b"b", b"zz"):
            assert self.db.get(k) == self.model.get(k)
            assert (k in self.db) == (k in self.model)


class SyncAlways(_Base):
    """sync="always": every write that returned survives a crash and a power loss."""


class SyncNone(_Base):
    """sync="none": a crash keeps a prefix that contains every durable write."""

    options = {**_Base.options, "sync": "none"}

    @rule()
    def sync(self):
        durable = self.db.sync()
        assert durable >= self.last_lsn
        self.durable_n = len(self.history)


TestSyncAlways = SyncAlways.TestCase
TestSyncAlways.settings = SETTINGS
TestSyncNone = SyncNone.TestCase
TestSyncNone.settings = SETTINGS
