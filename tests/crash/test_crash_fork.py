"""An engine inherited through os.fork() (issue 12, item 2): in the child every
call raises ClosedError naming the owner's pid and changes nothing -- no
write, no checkpoint, no wal/END, no LOCK truncation, not even at the child's
interpreter exit -- and the parent goes on unharmed, through a SIGKILL.

Each scenario runs in a subprocess of its own: the child must exit normally
(atexit, finalizers), which a fork of the pytest process may not do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import walstate

SCRIPT = textwrap.dedent(r"""
    import json, os, signal, sys, threading, time, walstate
    import walstate.testing.crashsim
    path, out, busy = sys.argv[1], sys.argv[2], sys.argv[3] == "busy"
    db = walstate.open(path, segment_size=65536, sync=sys.argv[4])
    for i in range(300):
        db.put(b"p%04d" % i, b"v%d" % i)
    db.checkpoint()
    for i in range(300, 320):
        db.put(b"p%04d" % i, b"v%d" % i)
    db.sync()
    inherited = db.batch()
    inherited.put(b"from-parent-batch", b"x")
    stop = threading.Event()
    acked = [320]
    def writer():   # a parent thread in the middle of writes when the fork happens
        i = 10_000
        while not stop.is_set():
            db.put(b"t%06d" % i, b"w"); db.sync(); acked.append(i); i += 1
    if busy:
        t = threading.Thread(target=writer); t.start(); time.sleep(0.05)
    else:
        db.sync()
    tree = {k: v for k, v in walstate.testing.crashsim.read_tree(path).items()
            if not k.startswith("snapshot/lock.mdb")} if not busy else None
    lock = open(os.path.join(path, "LOCK")).read()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        res = {}
        def t_(name, fn):
            try:
                fn()
                res[name] = "returned"
            except walstate.ClosedError as e:
                res[name] = "ClosedError" if f"process {parent}" in str(e) else f"bad: {e}"
            except walstate.LockedError as e:
                res[name] = "LockedError" if str(parent) in str(e) else f"bad: {e}"
            except BaseException as e:
                res[name] = f"{type(e).__name__}: {e}"
        t_("put", lambda: db.put(b"child", b"1"))
        t_("put_buffer", lambda: db.put(bytearray(b"child"), memoryview(b"1")))
        t_("get_in_table", lambda: db.get(b"p0310"))
        t_("get_in_snapshot", lambda: db.get(b"p0001"))
        t_("get_default", lambda: db.get(b"nope", b"d"))
        t_("contains", lambda: b"p0001" in db)
        t_("delete", lambda: db.delete(b"p0001"))
        t_("batch", lambda: db.batch())
        def commit():
            with inherited:
                inherited.put(b"child-batch", b"2")
        t_("inherited_batch", commit)
        t_("checkpoint", db.checkpoint)
        t_("sync", db.sync)
        t_("items", lambda: list(db.items()))
        t_("info", db.info)
        t_("stats", db.stats)
        t_("close", db.close)
        def with_exit():
            with db:
                pass
        t_("with_exit", with_exit)
        t_("open_again", lambda: walstate.open(path))
        t_("open_read_only", lambda: walstate.open(path, read_only=True))
        res["repr"] = repr(db)
        json.dump(res, open(out, "w"))
        sys.exit(0)            # the interpreter's normal exit
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0, st
    if busy:
        stop.set(); t.join()
    same_tree = tree is None or tree == {
        k: v for k, v in walstate.testing.crashsim.read_tree(path).items()
        if not k.startswith("snapshot/lock.mdb")}
    same_lock = open(os.path.join(path, "LOCK")).read() == lock
    for i in range(320, 700):      # the parent goes on; sync="always": acknowledged
        db.put(b"p%04d" % i, b"v%d" % i)
        if i == 500:
            db.checkpoint()
    db.sync()
    print(json.dumps({"same_tree": same_tree, "same_lock": same_lock, "lock": lock,
                      "threaded": acked[1:]}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def run_scenario(tmp_path, busy: bool, sync: str = "always") -> tuple[dict, dict, str]:
    path = str(tmp_path / "db")
    out = str(tmp_path / "child.json")
    p = subprocess.run([sys.executable, "-c", SCRIPT, path, out, "busy" if busy else "idle",
                        sync], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    parent = json.loads(p.stdout.strip().splitlines()[-1])
    with open(out) as f:
        child = json.load(f)
    return child, parent, path


def check_child(child: dict) -> None:
    for name, got in child.items():
        if name == "repr":
            assert "of process" in got, got
        elif name.startswith("open"):
            assert got == "LockedError", (name, got)
        else:
            assert got == "ClosedError", (name, got)


def check_reopened(path: str, parent: dict) -> None:
    with walstate.open(path) as db:
        got = dict(db.items())
        assert db.info()["recovery"]["clean_shutdown"] is False  # the parent was killed
    for i in range(700):
        assert got.get(b"p%04d" % i) == b"v%d" % i, f"lost p{i:04d}"
    for i in parent["threaded"]:
        assert got.get(b"t%06d" % i) == b"w", f"lost t{i:06d}"
    assert not {b"child", b"child-batch", b"from-parent-batch"} & set(got)


def test_a_forked_child_cannot_write_read_or_close_the_parents_engine(tmp_path):
    child, parent, path = run_scenario(tmp_path, busy=False)
    check_child(child)
    assert parent["same_tree"], "the child changed files of the directory"
    assert parent["same_lock"] and str(os.getpid()) not in parent["lock"]
    assert json.loads(parent["lock"])["pid"] > 0       # LOCK still names its holder
    check_reopened(path, parent)


def test_a_fork_while_a_parent_thread_writes_leaves_both_unharmed(tmp_path):
    """The fork lands while another thread of the parent holds the engine's locks:
    the child's calls still raise at once (no deadlock), the parent's thread
    goes on, and everything it acknowledged survives the parent's SIGKILL."""
    child, parent, path = run_scenario(tmp_path, busy=True)
    check_child(child)
    assert parent["same_lock"]
    assert len(parent["threaded"]) > 0
    check_reopened(path, parent)


def test_a_forked_child_under_sync_none_changes_nothing(tmp_path):
    child, parent, path = run_scenario(tmp_path, busy=False, sync="none")
    check_child(child)
    assert parent["same_tree"] and parent["same_lock"]
    check_reopened(path, parent)


def test_the_child_may_open_other_directories(tmp_path):
    """Only the inherited engines are inert: the child opens a directory of its own."""
    code = textwrap.dedent(r"""
        import os, sys, walstate
        a = walstate.open(sys.argv[1])
        a.put(b"k", b"parent")
        pid = os.fork()
        if pid == 0:
            with walstate.open(sys.argv[2]) as b:
                b.put(b"k", b"child")
            os._exit(0)
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        a.close()
    """)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    subprocess.run([sys.executable, "-c", code, a, b], check=True, timeout=60)
    with walstate.open(a) as db:
        assert db.get(b"k") == b"parent"
    with walstate.open(b) as db:
        assert db.get(b"k") == b"child"
