"""Instructions per WAL append, counted by callgrind (stable on a noisy
machine). Appends N records (16-byte key, 100-byte value, sync none) through
Engine.put, or with --wal through Wal.put_serialized alone. Run:

  valgrind --tool=callgrind --dump-instr=no --callgrind-out-file=cg.out \\
      python bench/callgrind_append.py 100000
  callgrind_annotate --inclusive=yes cg.out | grep -E 'wal_put|append_pieces|wal_crc32c'

and divide wal_put's inclusive count by N. Run it once more with N=0: the
difference of the totals divided by N is the whole put, interpreter included.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import walstate

n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
only_wal = "--wal" in sys.argv
keys = [b"%016d" % (i % 100_000) for i in range(n)]
val = os.urandom(100)
d = tempfile.mkdtemp(prefix="walstate-cg-")
try:
    db = walstate.open(os.path.join(d, "ws"), sync="none", max_wal_size=1 << 40)
    put = db._wal.put_serialized if only_wal else db.put  # noqa: SLF001
    for k in keys:
        put(k, val)
    db._abandon()  # noqa: SLF001 - no shutdown checkpoint in the count
finally:
    shutil.rmtree(d, ignore_errors=True)
