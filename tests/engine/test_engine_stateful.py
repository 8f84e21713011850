"""The engine against a plain dict model: hypothesis drives put / delete /
batch / checkpoint / crash / reopen in random order.

crash abandons the engine as a killed process would (``Engine._abandon``: no
flush, no checkpoint; what sat in the WAL buffer is lost). Under
sync="always" every returned write is durable, so after a crash the state is
the model exactly. Under sync="none" the recovered state is the model after
some prefix of the committed operations that contains every operation made
durable (before a returned ``sync()``, ``checkpoint()`` or ``close()``).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from enginehelpers import KiB, apply_op, matching_prefixes, run_op, state
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import walstate

KEYS = st.one_of(st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]),
                 st.binary(min_size=1, max_size=24))
VALUES = st.one_of(
    st.binary(max_size=32),
    # big values push the WAL across segments and past max_wal_size (checkpoints)
    st.builds(lambda n, b: bytes([b]) * n, st.integers(500, 6000), st.integers(0, 255)),
)
OPS = st.lists(st.one_of(st.tuples(st.just("P"), KEYS, VALUES), st.tuples(st.just("D"), KEYS)),
               max_size=6)

SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class _Base(RuleBasedStateMachine):
    SYNC = "always"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="walstate-stateful-")
        self.path = os.path.join(self.dir, "db")
        self.db = walstate.open(self.path, **self.options())
        self.model: dict[bytes, bytes] = {}
        self.last_lsn = 0

    def options(self) -> dict:
        return {"sync": self.SYNC, "segment_size": 64 * KiB, "max_wal_size": 64 * KiB,
                "wal_buffer_size": 4096}

    def teardown(self) -> None:
        try:
            if self.db is not None:
                self.db.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- writes --------------------------------------------------------
    def commit(self, op) -> None:
        lsn = run_op(self.db, op)
        if op[0] == "B" and not op[1]:
            assert lsn is None  # an empty batch writes nothing
            return
        assert type(lsn) is int and lsn > self.last_lsn, (lsn, self.last_lsn)
        self.last_lsn = lsn
        apply_op(self.model, op)
        self.committed(op)

    def committed(self, op) -> None:
        """Hook: one operation was committed (and returned)."""

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
        self.made_durable()

    def made_durable(self) -> None:
        """Hook: everything committed so far is durable now."""

    # ---- restarts ------------------------------------------------------
    @rule()
    def reopen(self):
        self.db.close()
        self.db = None
        self.db = walstate.open(self.path, **self.options())
        assert state(self.db) == self.model
        assert self.db.info()["last_lsn"] >= self.last_lsn
        self.after_reopen()

    def after_reopen(self) -> None:
        """Hook: a clean close and open kept the model exactly."""

    @rule()
    def crash(self):
        self.db._abandon()
        self.db = None
        self.db = walstate.open(self.path, **self.options())
        self.after_crash(state(self.db))

    def after_crash(self, got: dict[bytes, bytes]) -> None:
        assert got == self.model

    @invariant()
    def reads_match_the_model(self):
        if self.db is None:
            return
        assert state(self.db) == self.model
        for k in (b"a", b"b", b"zz"):
            assert self.db.get(k) == self.model.get(k)
            assert (k in self.db) == (k in self.model)


class SyncAlways(_Base):
    """sync="always": every write that returned survives a crash."""


class SyncNone(_Base):
    """sync="none": a crash keeps a prefix that contains every durable write."""

    SYNC = "none"

    def __init__(self) -> None:
        super().__init__()
        self.base: dict[bytes, bytes] = {}   # the state known on disk
        self.history: list = []              # operations committed since
        self.durable_n = 0                   # how many of them are durable
        self.durable_lsn = 0

    def committed(self, op) -> None:
        self.history.append(op)

    def made_durable(self) -> None:
        self.durable_n = len(self.history)
        self.durable_lsn = self.last_lsn

    @rule()
    def sync(self):
        durable = self.db.sync()
        assert durable >= self.last_lsn
        self.made_durable()

    def after_reopen(self) -> None:
        self._rebase(self.model)
        self.durable_lsn = self.last_lsn

    def _rebase(self, got: dict[bytes, bytes]) -> None:
        self.base = dict(got)
        self.model = dict(got)
        self.history = []
        self.durable_n = 0

    def after_crash(self, got: dict[bytes, bytes]) -> None:
        fits = matching_prefixes(self.base, self.history, got)
        assert any(n >= self.durable_n for n in fits), (
            f"recovered state is not the state after a prefix of the {len(self.history)} "
            f"operations that contains the {self.durable_n} durable ones (prefixes that "
            f"fit: {fits})")
        self._rebase(got)
        # LSNs are never reused, not even those of the writes the crash lost:
        # self.last_lsn stays the highest LSN handed out


TestSyncAlways = SyncAlways.TestCase
TestSyncAlways.settings = SETTINGS
TestSyncNone = SyncNone.TestCase
TestSyncNone.settings = SETTINGS
