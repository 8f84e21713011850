"""The writer's control channel: a Unix socket, DIR/CONTROL, through which
other processes ask the process that holds DIR to checkpoint now (``walstate
checkpoint DIR``), to sync, or for its info().

Who may connect: connecting to a Unix socket needs write permission on its
file, and the writer gives the socket the directory's own write bits (rw for
each of owner, group and others that may write DIR), so only users who may
write DIR reach it.

Lifetime: a writable open binds it (removing a stale one: whoever holds the
lock owns the name); a clean close removes it. One left by a crash answers
nobody (connect is refused), and the next writer replaces it; clients look
for it only while the directory's lock is held.

Protocol: one request per connection, one line of JSON each way:
``{"op": "checkpoint"|"sync"|"info"}`` -> ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "type": "DiskFullError"}``. Each request runs
in its own thread, as a call from inside the writer would (a checkpoint
stalls writers no more than any checkpoint does).

Paths: AF_UNIX names are limited to 108 bytes, so both sides name the socket
through ``/proc/self/fd/N/CONTROL``, N an O_PATH descriptor of DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from typing import Any

from .layout import CONTROL, Layout

log = logging.getLogger("walstate")

MAX_REQUEST = 4096


@contextlib.contextmanager
def _short_name(root: str) -> Iterator[str]:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{CONTROL}"
    finally:
        os.close(fd)


def _mode_for(root: str) -> int:
    """rw for every class of user that may write ``root``."""
    w = os.stat(root).st_mode & 0o222
    return w | (w << 1)


class ControlServer:
    """Serves ``engine``'s control requests until ``close()``."""

    def __init__(self, engine: Any, layout: Layout) -> None:
        self._engine = engine
        self.path = os.path.join(layout.root, CONTROL)
        self._pid = os.getpid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_name(layout.root) as name:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                        os.unlink(name)  # stale: the lock holder owns the name
                self._sock.bind(name)
            os.chmod(self.path, _mode_for(layout.root))
            self._sock.listen(16)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="walstate-control",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(conn,), name="walstate-control-req",
                             daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                req = json.loads(_read_line(conn))
                op = req.get("op") if isinstance(req, dict) else None
                reply = {"ok": True, "result": self._run(op)}
            except Exception as exc:  # every failure goes back to the asker
                reply = {"ok": False, "error": str(exc), "type": type(exc).__name__}
            try:
                conn.settimeout(10)
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
            except OSError:
                pass  # the asker gave up

    def _run(self, op: object) -> Any:
        db = self._engine
        if op == "checkpoint":
            return dataclasses.asdict(db.checkpoint())
        if op == "sync":
            return db.sync()
        if op == "info":
            info = db.info()
            if info.get("last_checkpoint") is not None:
                info["last_checkpoint"] = dataclasses.asdict(info["last_checkpoint"])
            return info
        raise ValueError(f"unknown control request {op!r} (checkpoint, sync, info)")

    def close(self) -> None:
        """Stops serving and removes the socket (not in a forked child: the
        name belongs to the parent)."""
        if self._sock.fileno() < 0:
            return
        if os.getpid() == self._pid:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if os.getpid() == self._pid and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        part = conn.recv(MAX_REQUEST)
        if not part:
            break
        buf += part
        if len(buf) > 16 * MAX_REQUEST:
            raise ValueError("control message too long")
    return buf


class NoAnswer(Exception):
    """The writer's control channel did not answer (gone, stale or too slow)."""


def request(root: str, op: str, *, timeout: float) -> dict:
    """Sends ``op`` to the writer holding ``root``; returns its reply
    (``{"ok": ..., ...}``). NoAnswer if nobody answers within ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            with _short_name(root) as name:
                sock.connect(name)
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            line = _read_line(sock)
        except TimeoutError:
            raise NoAnswer(f"no answer within {timeout:g} s") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoAnswer(f"its control channel {os.path.join(root, CONTROL)} does not "
                           f"answer ({exc.strerror})") from None
        if not line:
            raise NoAnswer("the writer closed the control channel without answering")
        return json.loads(line)
    finally:
        sock.close()
