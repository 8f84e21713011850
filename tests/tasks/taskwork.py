"""Functions that TaskStore.map runs in its worker processes during the tests
(module-level, so that spawn/forkserver workers can import them)."""

from __future__ import annotations

import os
import time


def square(x: int) -> int:
    return x * x


def square_logged(x: int, log: str | None = None) -> tuple[int, int]:
    """x*x and the worker's pid; one line per execution in ``log`` or else
    $TASKWORK_LOG (one O_APPEND write, never torn), and $TASKWORK_SLEEP seconds
    of "work". (Pass ``log`` with functools.partial in a long-lived process: a
    forkserver keeps the environment it started with.)"""
    log = log or os.environ.get("TASKWORK_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"%d %d\n" % (x, os.getpid()))
        finally:
            os.close(fd)
    delay = float(os.environ.get("TASKWORK_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    return x * x, os.getpid()


def fail_on_multiples_of_3(x: int) -> int:
    if x % 3 == 0:
        raise ValueError(f"{x} is a multiple of 3")
    return x


def die_on_7(x: int) -> int:
    if x == 7:
        os._exit(3)  # the worker process dies, as a crash in native code would
    return x


def fail_first_time(x: str, where: str) -> str:
    """Fails the first time it sees x (a marker file in ``where``), then works."""
    marker = os.path.join(where, f"seen-{x}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"first try of {x}")
    return x.upper()
