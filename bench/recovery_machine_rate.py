"""Examples per second of walstate.testing.stateful.RecoveryMachine, side by side
with a baseline: the same rules (puts and batches on a walstate engine, 20 steps)
as a plain hypothesis RuleBasedStateMachine that never crashes.

    PYTHONPATH=. python bench/recovery_machine_rate.py [--examples N] [--rounds R]

Prints, per round, examples/s of the baseline, of the RecoveryMachine with one
crash or power loss per example (``max_restarts = 1``), and of the worked
example of docs/TESTING.md (the fixed Bank, default ``max_restarts``), and
the ratios against the baseline. A figure to read, not an assertion.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import walstate
from walstate.testing.stateful import DEFAULT_OPTIONS, RecoveryMachine

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "TESTING.md")


def doc_example() -> dict:
    """The worked example of docs/TESTING.md (its python blocks), run."""
    with open(DOC) as f:
        text = f.read()
    part = text[text.index("## A worked example"):]
    part = part[:part.index("\n## ", 5)]
    ns: dict = {"__name__": "testing_doc"}
    exec(compile("\n".join(re.findall(r"```python\n(.*?)```", part, re.S)), DOC, "exec"), ns)
    return ns

KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e"])
VALUES = st.binary(max_size=64)


class PlainMachine(RuleBasedStateMachine):
    """The baseline: puts and batches on a fresh engine, no crash."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="walstate-rate-", dir="/dev/shm"
                                    if os.access("/dev/shm", os.W_OK) else None)
        self.db = walstate.open(os.path.join(self.dir, "db"), **DEFAULT_OPTIONS)
        self.model: dict[bytes, bytes] = {}

    @rule(key=KEYS, value=VALUES)
    def put(self, key, value):
        self.db.put(key, value)
        self.model[key] = value

    @rule(pairs=st.lists(st.tuples(KEYS, VALUES), max_size=4))
    def batch(self, pairs):
        with self.db.batch() as b:
            for k, v in pairs:
                b.put(k, v)
        self.model.update(pairs)

    @invariant()
    def reads(self):
        assert self.db.get(b"a") == self.model.get(b"a")

    def teardown(self):
        self.db._abandon()
        shutil.rmtree(self.dir, ignore_errors=True)


class OneCrash(RecoveryMachine):
    """The same rules under the RecoveryMachine, one crash per example."""

    max_restarts = 1

    @rule(key=KEYS, value=VALUES)
    def put(self, key, value):
        self.db.put(key, value)

    @rule(pairs=st.lists(st.tuples(KEYS, VALUES), max_size=4))
    def batch(self, pairs):
        with self.db.batch() as b:
            for k, v in pairs:
                b.put(k, v)

    @invariant()
    def reads(self):
        self.db.get(b"a")


def rate(machine: type, n: int) -> tuple[float, int]:
    s = settings(max_examples=n, stateful_step_count=20, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))
    crashes = [0]
    if issubclass(machine, RecoveryMachine):
        class Counted(machine):  # type: ignore[misc, valid-type]
            def teardown(self) -> None:
                crashes[0] += self.restarts
                super().teardown()
        Counted.__name__ = machine.__name__
        machine = Counted
    t0 = time.perf_counter()
    run_state_machine_as_test(machine, settings=s)
    return n / (time.perf_counter() - t0), crashes[0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    fixed_bank = doc_example()["FixedBank"]

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{a.examples} examples x 20 steps per figure")
    for r in range(a.rounds):
        base, _ = rate(PlainMachine, a.examples)
        one, n1 = rate(OneCrash, a.examples)
        bank, nb = rate(fixed_bank, a.examples)
        print(f"round {r + 1}: baseline {base:6.1f}/s | RecoveryMachine, 1 crash "
              f"{one:6.1f}/s (x{one / base:.2f}; {n1 / a.examples:.2f} restarts/example) | "
              f"docs' FixedBank {bank:6.1f}/s (x{bank / base:.2f}; "
              f"{nb / a.examples:.2f} restarts/example)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
