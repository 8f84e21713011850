"""Shared helpers of the engine suites (test_engine_api/_stateful/_crash.py).

Also a small program: ``python tests/enginehelpers.py writer DIR OPTIONS_JSON``
is the crash victim of test_engine_crash.py. It opens DIR, prints
``R <digest of the recovered state>``, then forever performs the operations
of ``writer_ops(seed, ...)``, printing ``A <seq>`` before each and
``K <seq> <lsn>`` after it returned (and ``S <seq> <lsn>`` after a returned
``db.sync()``), each line flushed, until it is killed. The lines are short
(the parent regenerates the operations from the seed) so that the writer
spends its time writing, not printing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from walstate.testing import apply_op  # the one dict model of the op encoding below

HERE = os.path.dirname(os.path.abspath(__file__))
SEG_HDR = 64   # docs/FORMAT.md: segment header bytes
REC_HDR = 28   # docs/FORMAT.md: record header bytes
KiB = 1024
MiB = 1024 * KiB

# An operation as the suites keep it: ("P", key, value), ("D", key) or
# ("B", [("P", key, value) | ("D", key), ...]) -- one WAL record each.
Op = tuple


# ---- state -----------------------------------------------------------------
def state(db) -> dict[bytes, bytes]:
    """Everything ``db.items()`` yields, as a dict (and checks the key order)."""
    out = {}
    prev = None
    for k, v in db.items():
        assert prev is None or prev < k, f"items() out of order: {prev!r} then {k!r}"
        prev = k
        out[k] = v
    return out


def digest(st: dict[bytes, bytes]) -> str:
    h = hashlib.sha256()
    for k in sorted(st):
        v = st[k]
        h.update(len(k).to_bytes(4, "little") + k + len(v).to_bytes(4, "little") + v)
    return h.hexdigest()


def run_op(db, op: Op) -> int:
    """Performs one operation on the engine; returns its LSN."""
    if op[0] == "P":
        return db.put(op[1], op[2])
    if op[0] == "D":
        return db.delete(op[1])
    with db.batch() as b:
        for sub in op[1]:
            if sub[0] == "P":
                b.put(sub[1], sub[2])
            else:
                b.delete(sub[1])
    return b.lsn


def matching_prefixes(base: dict[bytes, bytes], ops: list[Op],
                      got: dict[bytes, bytes]) -> list[int]:
    """Every n such that ``got`` is ``base`` after ops[:n]."""
    model = dict(base)
    out = [0] if model == got else []
    for n, op in enumerate(ops, 1):
        apply_op(model, op)
        if model == got:
            out.append(n)
    return out


def op_to_json(op: Op) -> str:
    def enc(o: Op) -> list:
        if o[0] == "P":
            return ["P", o[1].hex(), o[2].hex()]
        if o[0] == "D":
            return ["D", o[1].hex()]
        return ["B", [enc(s) for s in o[1]]]
    return json.dumps(enc(op))


def op_from_json(text: str) -> Op:
    def dec(o: list) -> Op:
        if o[0] == "P":
            return ("P", bytes.fromhex(o[1]), bytes.fromhex(o[2]))
        if o[0] == "D":
            return ("D", bytes.fromhex(o[1]))
        return ("B", [dec(s) for s in o[1]])
    return dec(json.loads(text))


# ---- files -----------------------------------------------------------------
def tree_digest(path: str) -> dict[str, str]:
    """{relative path: sha256 of the content (or "dir")} of everything under path."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = "dir"
        for f in files:
            p = os.path.join(root, f)
            if not os.path.isfile(p):
                continue  # the CONTROL socket
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def segments(db_dir: str) -> list[str]:
    """Paths of the WAL segments of a data directory, in LSN order."""
    wal = os.path.join(db_dir, "wal")
    names = sorted(n for n in os.listdir(wal) if len(n) == 20 and n.endswith(".seg"))
    return [os.path.join(wal, n) for n in names]


def broken_files(db_dir: str) -> list[str]:
    wal = os.path.join(db_dir, "wal")
    return sorted(n for n in os.listdir(wal) if n.endswith(".broken"))


def put_record_size(key: bytes, value: bytes) -> int:
    """On-disk bytes of one PUT record (docs/FORMAT.md)."""
    return REC_HDR + 2 + len(key) + len(value)


def data_end(path: str) -> int:
    """Offset just past the last non-zero byte of a file."""
    with open(path, "rb") as f:
        data = f.read()
    return len(data.rstrip(b"\0"))


def corrupt(path: str, offset: int, how: str = "flip", data: bytes = b"") -> None:
    """Damages a file in place: "flip" one bit at offset, "zero" len(data) or 1
    bytes from offset, "write" data at offset, "truncate" the file at offset."""
    if how == "truncate":
        os.truncate(path, offset)
        return
    with open(path, "r+b") as f:
        f.seek(offset)
        if how == "flip":
            b = f.read(1)
            assert b, f"offset {offset} is past the end of {path}"
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x10]))
        elif how == "zero":
            f.write(b"\0" * max(len(data), 1))
        elif how == "write":
            f.write(data)
        else:
            raise ValueError(how)


# ---- time and processes ----------------------------------------------------
class FakeClock:
    """A monotonic seconds source the test advances by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def wait_for(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WALSTATE_KILLPOINT", None)
    env.pop("WALSTATE_SYNC_TRACE", None)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 60,
               prefix: Iterable[str] = ()) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (tests/ importable); captures output."""
    return subprocess.run([*prefix, sys.executable, "-c", code], env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)


def writer_cmd(path: str, **options: object) -> list[str]:
    return [sys.executable, os.path.join(HERE, "enginehelpers.py"), "writer", path,
            json.dumps(options)]


def parse_writer_output(text: str, **options: object) -> dict:
    """attempts: [(seq, op)], acked: {seq: lsn}, synced: [seq], ready: digest or None.
    ``options`` are the writer's (seed, nkeys, vmax) to regenerate its operations."""
    attempts: list[tuple[int, Op]] = []
    ops = writer_ops(**{k: v for k, v in options.items() if k in ("seed", "nkeys", "vmax")})
    acked: dict[int, int] = {}
    synced: list[int] = []
    ready = None
    for line in text.split("\n")[:-1]:  # a last line without "\n" was cut by the kill
        kind, _, rest = line.partition(" ")
        if kind == "R":
            ready = rest
        elif kind == "A":
            seq = int(rest)
            assert seq == len(attempts), "the writer skipped an operation"
            attempts.append((seq, next(ops)))
        elif kind == "K":
            seq, lsn = rest.split()
            acked[int(seq)] = int(lsn)
        elif kind == "S":
            synced.append(int(rest.split()[0]))
    return {"attempts": attempts, "acked": acked, "synced": synced, "ready": ready}


# ---- the crash victim --------------------------------------------------------
def _random_op(rng: random.Random, seq: int, nkeys: int, vmax: int, tag: int) -> Op:
    def key() -> bytes:
        return b"key%05d" % rng.randrange(nkeys)

    def value() -> bytes:
        return b"%d:%d:" % (tag, seq) + rng.randbytes(rng.randrange(vmax))

    r = rng.random()
    if r < 0.7:
        return ("P", key(), value())
    if r < 0.85:
        return ("D", key())
    ops = []
    for _ in range(rng.randrange(2, 6)):
        ops.append(("P", key(), value()) if rng.random() < 0.75 else ("D", key()))
    return ("B", ops)


def writer_ops(seed: int = 0, nkeys: int = 300, vmax: int = 400) -> Iterator[Op]:
    """The writer's operations, in order: a pure function of its options."""
    rng = random.Random(seed)
    seq = 0
    while True:
        yield _random_op(rng, seq, nkeys, vmax, seed)
        seq += 1


def writer_main(path: str, options_json: str) -> None:
    opts = json.loads(options_json)
    ops = writer_ops(opts.pop("seed", 0), opts.pop("nkeys", 300), opts.pop("vmax", 400))
    sync_every = opts.pop("sync_every", 0)
    chunk_keys = opts.pop("chunk_keys", None)
    import walstate
    import walstate.checkpoint

    if chunk_keys:
        walstate.checkpoint.CHUNK_KEYS = chunk_keys
    out = sys.stdout
    db = walstate.open(path, **opts)
    out.write(f"R {digest(state(db))}\n")
    out.flush()
    for seq, op in enumerate(ops):
        out.write(f"A {seq}\n")
        out.flush()
        lsn = run_op(db, op)
        out.write(f"K {seq} {lsn}\n")
        out.flush()
        if sync_every and seq % sync_every == sync_every - 1:
            durable = db.sync()
            out.write(f"S {seq} {durable}\n")
            out.flush()


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
