"""A progress bar for long CLI operations: drawn on stderr when it is a
terminal, silent otherwise (pipes, logs, tests)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``p = Progress("backup", total_bytes); p.advance(n); p.done()``."""

    def __init__(self, what: str, total: int = 0, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.what = what
        self.total = total
        self.n = 0
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self._last = 0.0

    def advance(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and time.monotonic() - self._last > 0.1:
            self._draw()

    def _draw(self) -> None:
        self._last = time.monotonic()
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.what}: [{bar:<30}] {frac * 100:5.1f}%")
        else:
            self.stream.write(f"\r{self.what}: {self.n}")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
