"""The bench's child processes: ``python -m walstate.benchmark CMD ...``."""

import sys

from .runner import _child_main

sys.exit(_child_main(sys.argv[1:]))
