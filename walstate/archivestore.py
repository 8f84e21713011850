"""Where the archive's objects live: one small interface, two stores.

- ``DirStore``: a directory (local disk, NFS...). An object is a file; it is
  published complete or not at all (``<name>.tmp``, fsync, rename, fsync of
  its directory), so a reader never sees a partial object.
- ``S3Store``: ``s3://bucket/prefix`` on any S3-compatible store, through
  boto3 (endpoint and credentials the standard AWS way: ``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws/config``...). A
  PUT is atomic in S3. The client has short connect/read timeouts and a
  bounded number of retries: a store that is down costs the shipper seconds,
  never a hang.

Keys are "/"-separated paths relative to the archive's root. Every failure is
an ``ArchiveError`` whose message names the problem (store unreachable,
credentials refused, no such bucket, store full...).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from typing import Any

from .errors import WalStateError
from .layout import fsync_dir, make_dirs

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
MAX_ATTEMPTS = 2


class ArchiveError(WalStateError):
    """The archive's store failed or refused an operation."""


def is_url(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and "://" in location


def normalize(location: str | os.PathLike[str]) -> str:
    """The canonical spelling of an archive location (ValueError naming the
    problem for a bad one): ``s3://bucket/prefix`` without a trailing slash,
    or an absolute directory path."""
    if isinstance(location, str) and "://" in location:
        scheme, _, rest = location.partition("://")
        if scheme.lower() != "s3":
            raise ValueError(f"unsupported archive URL scheme {scheme!r} in {location!r}: use "
                             "s3://bucket/prefix or a directory")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"no bucket in the archive URL {location!r} "
                             "(s3://bucket/prefix)")
        if not _valid_bucket(bucket):
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3-63 characters: "
                             "lowercase letters, digits, dots, hyphens)")
        prefix = prefix.strip("/")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    path = os.fsdecode(os.fspath(location))
    if not path:
        raise ValueError("an empty archive path")
    return os.path.abspath(path)


def _valid_bucket(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", name))


def open_store(location: str) -> Store:
    loc = normalize(location)
    if loc.startswith("s3://"):
        return S3Store(loc)
    return DirStore(loc)


class Store:
    """The operations the archive needs; keys are relative "/" paths."""

    url: str

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Publishes ``data`` at ``key`` (complete or not at all). With
        ``if_absent``: only if no object is there yet; returns False if one was."""
        raise NotImplementedError

    def put_file(self, key: str, path: str) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        raise NotImplementedError

    def get_file(self, key: str, path: str) -> int:
        """Downloads ``key`` to ``path`` (fsynced); returns its size."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        """(key, size) of every object whose key starts with ``prefix``, sorted."""
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raises ArchiveError naming the problem if the store cannot be used."""
        self.list("WALSTATE_ARCHIVE")

    def describe(self) -> str:
        return self.url


# ---- a directory ------------------------------------------------------------------
class DirStore(Store):
    def __init__(self, root: str) -> None:
        self.root = root
        self.url = root

    def _path(self, key: str) -> str:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"bad archive key {key!r}")
        return os.path.join(self.root, *parts)

    def _wrap(self, exc: OSError, what: str) -> ArchiveError:
        if exc.errno == errno.ENOSPC:
            why = "the archive's disk is full"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = f"permission denied ({exc.strerror})"
        else:
            why = str(exc)
        return ArchiveError(f"{what} in the archive directory {self.root}: {why}")

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        try:
            make_dirs(os.path.dirname(path))
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as exc:  # no hard links here: look, then rename
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                                         errno.EMLINK):
                        raise
                    if os.path.exists(path):
                        return False
                    os.rename(tmp, path)
                    fsync_dir(os.path.dirname(path))
                    return True
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                os.rename(tmp, path)
            fsync_dir(os.path.dirname(path))
            return True
        except OSError as exc:
            raise self._wrap(exc, f"writing {key}") from exc

    def put_file(self, key: str, path: str) -> None:
        from .archive import copy_durable

        dst = self._path(key)
        try:
            make_dirs(os.path.dirname(dst))
            copy_durable(path, dst, keep_mtime=False)
        except OSError as exc:
            raise self._wrap(exc, f"writing {key}") from exc

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._wrap(exc, f"reading {key}") from exc

    def get_file(self, key: str, path: str) -> int:
        from .archive import copy_durable

        try:
            return copy_durable(self._path(key), path, keep_mtime=False)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._wrap(exc, f"reading {key}") from exc

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        out = []
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not os.path.isdir(self.root):
            raise ArchiveError(f"the archive directory {self.root} does not exist")
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.endswith(".tmp"):
                    continue
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                if key.startswith(prefix):
                    try:
                        out.append((key, os.path.getsize(os.path.join(dirpath, name))))
                    except FileNotFoundError:
                        pass
        out.sort()
        return out

    def delete(self, keys: Iterable[str]) -> None:
        dirs = set()
        for key in keys:
            p = self._path(key)
            try:
                os.unlink(p)
                dirs.add(os.path.dirname(p))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._wrap(exc, f"deleting {key}") from exc
        for d in sorted(dirs, key=len, reverse=True):
            while d != self.root and d.startswith(self.root):
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = os.path.dirname(d)
        for d in dirs:
            if os.path.isdir(d):
                fsync_dir(d)

    def check(self) -> None:
        if not os.path.isdir(self.root):
            try:
                make_dirs(self.root)
            except OSError as exc:
                raise self._wrap(exc, "creating the archive") from exc


# ---- S3 -----------------------------------------------------------------------------
_CLIENT_LOCK = threading.Lock()


class S3Store(Store):
    """An S3 bucket (and key prefix) through boto3."""

    def __init__(self, url: str) -> None:
        self.url = url
        rest = url[len("s3://"):]
        self.bucket, _, self.prefix = rest.partition("/")
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            with _CLIENT_LOCK:  # boto3's session set-up is not thread-safe
                if self._client is None:
                    try:
                        import boto3
                        from botocore.config import Config as BotoConfig
                    except ImportError:
                        raise ArchiveError("an s3:// archive needs boto3: pip install "
                                           "'walstate[s3]'") from None
                    cfg = BotoConfig(connect_timeout=CONNECT_TIMEOUT,
                                     read_timeout=READ_TIMEOUT,
                                     retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                                     tcp_keepalive=True)
                    self._client = boto3.session.Session().client("s3", config=cfg)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, exc: Exception, what: str) -> ArchiveError:
        try:
            from botocore import exceptions as bx
        except ImportError:  # pragma: no cover
            return ArchiveError(f"{what}: {exc}")
        where = f"{what} in {self.url}"
        endpoint = getattr(self.client.meta, "endpoint_url", None)
        if isinstance(exc, bx.NoCredentialsError):
            why = ("no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                   "a profile)")
        elif isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                              bx.ReadTimeoutError, bx.ConnectionClosedError)):
            why = f"the object store at {endpoint} is unreachable ({exc})"
        elif isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("NoSuchBucket",):
                why = f"the bucket {self.bucket!r} does not exist"
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                          "InvalidToken", "ExpiredToken", "403", "Forbidden"):
                why = f"the store refused the credentials ({code}: {err.get('Message', '')})"
            elif code in ("QuotaExceeded", "EntityTooLarge", "InsufficientStorage",
                          "XMinioStorageFull", "507"):
                why = f"the store is full ({code}: {err.get('Message', '')})"
            else:
                why = f"{code}: {err.get('Message', exc)}"
        else:
            why = str(exc)
        return ArchiveError(f"{where}: {why}")

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kw)
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(2, "no such object in the archive",
                                        kw.get("Key", "")) from None
            if isinstance(exc, ArchiveError):
                raise
            raise self._wrap(exc, what) from exc

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        kw: dict[str, Any] = {"Key": self._key(key), "Body": bytes(data)}
        if if_absent:
            kw["IfNoneMatch"] = "*"
        try:
            self.client.put_object(Bucket=self.bucket, **kw)
            return True
        except Exception as exc:
            code = _code(exc)
            if if_absent and code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            if if_absent and code in ("NotImplemented", "501"):
                # a store without conditional writes: look first (a small race remains)
                try:
                    self.get(key)
                    return False
                except FileNotFoundError:
                    return self.put(key, data)
            raise self._wrap(exc, f"writing {key}") from exc

    def put_file(self, key: str, path: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= 64 << 20:
                self.put(key, f.read())
                return
        try:
            self.client.upload_file(path, self.bucket, self._key(key))
        except Exception as exc:
            raise self._wrap(exc, f"writing {key}") from exc

    def get(self, key: str) -> bytes:
        resp = self._call(f"reading {key}", self.client.get_object, Key=self._key(key))
        try:
            return resp["Body"].read()
        except Exception as exc:
            raise self._wrap(exc, f"reading {key}") from exc

    def get_file(self, key: str, path: str) -> int:
        tmp = path + ".tmp"
        try:
            self.client.download_file(self.bucket, self._key(key), tmp)
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(2, "no such object in the archive", key) from None
            raise self._wrap(exc, f"reading {key}") from exc
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
        return size

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        token = None
        while True:
            kw: dict[str, Any] = {"Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            resp = self._call(f"listing {prefix or '/'}", self.client.list_objects_v2, **kw)
            for obj in resp.get("Contents", []):
                out.append((obj["Key"][strip:], int(obj["Size"])))
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
        out.sort()
        return out

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            objs = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            resp = self._call("deleting", self.client.delete_objects,
                              Delete={"Objects": objs, "Quiet": True})
            errs = resp.get("Errors") or []
            if errs:
                e = errs[0]
                raise ArchiveError(f"deleting {e.get('Key')} in {self.url}: {e.get('Code')}: "
                                   f"{e.get('Message')}")

    def describe(self) -> str:
        endpoint = getattr(self.client.meta, "endpoint_url", None)
        return f"{self.url} (endpoint {endpoint})"


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = str(err.get("Code", ""))
        if code:
            return code
        return str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _is_missing(exc: Exception) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound")


__all__ = ["ArchiveError", "DirStore", "S3Store", "Store", "is_url", "normalize", "open_store"]
