"""Object storage: one small interface, two backends (a local directory and S3).

Datasets, pretrained weights and results are named by *storage keys* (CONTRACT.md,
"Common rules").  Keys come from BE messages, so they are untrusted: every public method
validates its keys before touching the disk or the network, and nothing downloaded is
ever written outside the directory it was asked for.

Errors are mapped at this boundary into the service's tree (``ai_service.errors``):
a missing object or bucket is :class:`ObjectNotFound`, anything else that goes wrong
talking to storage is the retryable :class:`StorageError`, and a bad key is
:class:`UnsafeKey`.  botocore exceptions never leak out, and messages carry no secrets.

The S3 backend takes its endpoint and credentials only from boto3's standard sources
(``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, profiles,
instance roles).  botocore itself switches to path-style addressing whenever an endpoint
URL is configured (unless a profile asks for ``addressing_style = virtual``), which is
what MinIO/SeaweedFS-style servers need, so nothing here overrides it.

:func:`sync_prefix` keeps a local, incrementally updated copy of a prefix (the dataset
cache under ``WORK_DIR``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import stat as _stat
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

from ai_service import keys as _keys
from ai_service.config import ConfigError, Settings
from ai_service.errors import EscapesRoot, ObjectNotFound, PermanentError, StorageError, UnsafeKey

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.config import _RetryDict
    from mypy_boto3_s3.client import S3Client

log = logging.getLogger("ai_service.storage")

MAX_KEY_LENGTH = _keys.MAX_KEY_CHARS
#: Objects transferred at once by the prefix operations.
TRANSFER_WORKERS = 8
MiB = 1024 * 1024
#: Files at least this big are uploaded/downloaded in parts by boto3's transfer manager.
MULTIPART_THRESHOLD = 8 * MiB
MULTIPART_CHUNKSIZE = 8 * MiB
#: Marks our own temporary files so that listings skip half-written objects.
_TMP_MARK = ".ais-tmp-"
MANIFEST_SUFFIX = ".manifest.json"

_T = TypeVar("_T")
_R = TypeVar("_R")


# --- keys ------------------------------------------------------------------------------


def _show(key: str) -> str:
    """The key as it may appear in an error message: quoted, escaped, shortened."""
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` unchanged if it is a safe storage key, else raise UnsafeKey.

    The rules are the contract's, kept in one place (:mod:`ai_service.keys`, shared with
    request validation): relative, no ``..`` or ``.`` segment, no backslash, no NUL or
    other control character, no empty segment (``a//b``) except one trailing ``/`` (a
    folder-style prefix), at most 1024 characters.  ``.`` segments are refused because
    ``a/./b`` is one file locally but another object in S3 (and SeaweedFS rejects it).
    The message here also shows the offending key.
    """
    try:
        return _keys.validate_key(key, allow_empty=allow_empty)
    except UnsafeKey as exc:
        if not isinstance(key, str) or key == "":
            raise
        raise UnsafeKey(f"{exc.message}: {_show(key)}") from None


def _object_key(key: str) -> str:
    """Validate a key that names one object (not a folder)."""
    validate_key(key)
    if key.endswith("/"):
        raise UnsafeKey(f"storage key {_show(key)} names a folder, not an object")
    return key


def _folder(prefix: str, *, allow_empty: bool) -> str:
    """Validate a prefix and return it folder-style: ``""`` or ending in ``/``."""
    validate_key(prefix, allow_empty=allow_empty)
    if prefix == "" or prefix.endswith("/"):
        return prefix
    return prefix + "/"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes and a version token (ETag or local)."""

    key: str
    size: int
    etag: str


ObjectInfos = list[ObjectInfo]
Paths = list[Path]


# --- helpers ---------------------------------------------------------------------------


def _parallel(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads; the first error wins."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(
        max_workers=min(workers, len(items)), thread_name_prefix="storage"
    ) as pool:
        futures: list[Future[_R]] = [pool.submit(fn, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` atomically.

    Readers (and a crashed writer's next run) therefore see either the old file or the
    complete new one, never a half-written file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name[:100]}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _source_file(src: Path) -> Path:
    """``src`` as a Path, if it is a readable regular file to upload."""
    path = Path(src)
    if not path.is_file():
        raise StorageError(f"cannot upload {path}: not a file")
    return path


def _is_tmp_name(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _plan_downloads(
    prefix: str, objects: Sequence[ObjectInfo], dest_dir: Path
) -> list[tuple[ObjectInfo, Path]]:
    """Map listed objects under ``prefix`` to files under ``dest_dir``.

    Anything that would land outside ``dest_dir`` (a ``..`` key from a hostile or buggy
    listing, a symlink planted inside ``dest_dir``) is skipped with a warning, as is an
    object whose key is also used as a folder by another object (a file cannot be both).
    """
    root = dest_dir.resolve()
    rels: dict[str, ObjectInfo] = {}
    for info in objects:
        if not info.key.startswith(prefix):
            log.warning("skipping listed object %s: not under prefix %r", _show(info.key), prefix)
            continue
        rel = info.key[len(prefix):]
        try:
            _object_key(rel)
        except UnsafeKey as exc:
            log.warning("skipping listed object %s: %s", _show(info.key), exc.message)
            continue
        rels[rel] = info
    folders = {"/".join(rel.split("/")[:i]) for rel in rels for i in range(1, rel.count("/") + 1)}
    plan: list[tuple[ObjectInfo, Path]] = []
    for rel, info in sorted(rels.items()):
        if rel in folders:
            log.warning(
                "skipping object %s: other objects use it as a folder", _show(info.key)
            )
            continue
        target = (root / rel).resolve()
        if target == root or not target.is_relative_to(root):
            log.warning(
                "skipping object %s: it would be written outside %s", _show(info.key), root
            )
            continue
        plan.append((info, target))
    return plan


# --- the interface ---------------------------------------------------------------------


class Storage(ABC):
    """Where keys live.  Both backends have exactly the same semantics.

    Prefixes are folders: ``list("a/b")`` and ``list("a/b/")`` both return the objects
    under ``a/b/`` and never ``a/bc``.  Deleting a missing object is not an error.
    """

    workers: int = TRANSFER_WORKERS

    @abstractmethod
    def describe(self) -> str:
        """Where this storage is, for logs and cache names (no secrets)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and version of ``key``, or None when there is no such object."""

    @abstractmethod
    def list(self, prefix: str = "") -> ObjectInfos:
        """Every object under the folder ``prefix`` (``""``: all), sorted by key."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole content of ``key`` (for small objects: manifests, images)."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace ``key`` with ``data``, atomically."""

    def upload_file(self, src: Path, key: str) -> ObjectInfo:
        """Store the local file ``src`` as ``key`` (multipart when large)."""
        _object_key(key)
        return self._store(_source_file(src), key, bulk=False)

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder ``prefix`` (which must not be empty)."""

    @abstractmethod
    def _fetch(self, key: str, dest: Path, *, bulk: bool) -> None:
        """Download the already validated ``key`` to ``dest`` atomically.

        ``bulk``: one of many parallel transfers, so do not add threads of its own.
        """

    @abstractmethod
    def _store(self, src: Path, key: str, *, bulk: bool) -> ObjectInfo:
        """Upload the file ``src`` to the already validated ``key``."""

    def download_file(self, key: str, dest: Path) -> ObjectInfo:
        """Download ``key`` to the file ``dest`` (replaced atomically); return its info."""
        _object_key(key)
        info = self.stat(key)
        if info is None:
            raise ObjectNotFound(f"no object {_show(key)} in {self.describe()}")
        self._fetch(key, Path(dest), bulk=False)
        return info

    def upload_dir(self, src_dir: Path, prefix: str) -> ObjectInfos:
        """Upload every file below ``src_dir`` to ``<prefix>/<relative path>``.

        All keys are derived and validated before the first upload, so an unsafe file
        name fails the whole call instead of leaving half a folder behind.
        """
        folder = _folder(prefix, allow_empty=False)
        src_dir = Path(src_dir)
        if not src_dir.is_dir():
            raise StorageError(f"cannot upload {src_dir}: not a directory")
        pairs: list[tuple[Path, str]] = []
        for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
            key = folder + path.relative_to(src_dir).as_posix()
            pairs.append((path, _object_key(key)))
        return _parallel(lambda pair: self._store(pair[0], pair[1], bulk=True), pairs, self.workers)

    def download_prefix(self, prefix: str, dest_dir: Path) -> Paths:
        """Download every object under ``prefix`` into ``dest_dir``, keeping the layout.

        Returns the local paths written.  An empty or missing prefix is ObjectNotFound.
        """
        folder = _folder(prefix, allow_empty=True)
        objects = self.list(folder)
        plan = _plan_downloads(folder, objects, Path(dest_dir))
        if not plan:
            raise ObjectNotFound(f"no objects under prefix {_show(prefix)} in {self.describe()}")
        _parallel(lambda item: self._fetch(item[0].key, item[1], bulk=True), plan, self.workers)
        return [dest for _, dest in plan]


# --- local directory -------------------------------------------------------------------


class LocalStorage(Storage):
    """Keys are files under ``root`` (``STORAGE_DIR``); for development and single hosts.

    The version token of a file is ``<size>-<mtime_ns>-<inode>``: cheap, and it changes
    whenever the file is replaced (our writes always replace).

    Symlinks (to a file or a folder) are followed only while they stay inside ``root``:
    one that leads outside is :class:`EscapesRoot`, for reads, listings and writes alike,
    so a dataset cannot pull ``/etc/passwd`` or another tenant's files into a job.
    """

    def __init__(self, root: Path, *, workers: int = TRANSFER_WORKERS) -> None:
        self.root = Path(root).absolute()
        self.workers = workers
        self._real_root = Path(os.path.realpath(self.root))

    def describe(self) -> str:
        return f"local:{self.root}"

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        """The file of ``key``, refused when a symlink on its way leads outside the root."""
        path = self.root / key
        self._check_inside(path, key)
        return path

    def _check_inside(self, path: Path, key: str) -> None:
        real = Path(os.path.realpath(path))
        if real != self._real_root and not real.is_relative_to(self._real_root):
            raise EscapesRoot(f"storage key {_show(key)} is a symlink that leads outside {self.describe()}; "
                              "it is not followed")

    @contextlib.contextmanager
    def _errors(self, action: str, key: str, *, missing: bool = True) -> Iterator[None]:
        """Map OSError to the service's errors (FileNotFoundError: ObjectNotFound)."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            if missing:
                raise ObjectNotFound(f"no object {_show(key)} in {self.describe()}") from None
            raise StorageError(
                f"cannot {action} {_show(key)} in {self.describe()}: {exc.strerror}"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot {action} {_show(key)} in {self.describe()}: {exc.strerror or exc}"
            ) from None

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}")

    def stat(self, key: str) -> ObjectInfo | None:
        _object_key(key)
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(
                f"cannot stat {_show(key)} in {self.describe()}: {exc.strerror}"
            ) from None
        if not _is_regular(st):
            return None
        return self._info(key, st)

    def list(self, prefix: str = "") -> ObjectInfos:
        folder = _folder(prefix, allow_empty=True)
        base = self._path(folder) if folder else self.root
        out: ObjectInfos = []
        if not base.is_dir():
            return out

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):  # vanished while walking: fine
                raise exc

        seen: set[tuple[int, int]] = set()
        with self._errors("list", folder, missing=False):
            # Symlinked folders are followed (inside the root only), each real folder once.
            for dirpath, dirnames, filenames in os.walk(base, onerror=fail, followlinks=True):
                here = Path(dirpath)
                self._check_inside(here, here.relative_to(self.root).as_posix() + "/")
                try:
                    st_dir = here.stat()
                except FileNotFoundError:
                    dirnames[:] = []
                    continue
                if (st_dir.st_dev, st_dir.st_ino) in seen:
                    dirnames[:] = []  # a symlink loop, or a second link to a folder already listed
                    continue
                seen.add((st_dir.st_dev, st_dir.st_ino))
                for name in filenames:
                    if _is_tmp_name(name):
                        continue
                    path = Path(dirpath, name)
                    key = path.relative_to(self.root).as_posix()
                    try:
                        _object_key(key)
                    except UnsafeKey as exc:
                        log.warning("skipping local file %s: %s", path, exc.message)
                        continue
                    self._check_inside(path, key)
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    if _is_regular(st):
                        out.append(self._info(key, st))
        out.sort(key=lambda info: info.key)
        return out

    def read_bytes(self, key: str) -> bytes:
        _object_key(key)
        with self._errors("read", key):
            return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        _object_key(key)
        with self._errors("write", key, missing=False), _atomic_file(self._path(key)) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())

    def _fetch(self, key: str, dest: Path, *, bulk: bool) -> None:
        src = self._path(key)
        with self._errors("download", key):
            src.stat()  # a missing source is ObjectNotFound, not a write error
        with self._errors("download", key, missing=False), _atomic_file(dest) as tmp:
            shutil.copyfile(src, tmp)

    def _store(self, src: Path, key: str, *, bulk: bool) -> ObjectInfo:
        dest = self._path(key)
        with self._errors("upload", key, missing=False):
            with _atomic_file(dest) as tmp:
                shutil.copyfile(src, tmp)
            return self._info(key, dest.stat())

    def delete(self, key: str) -> None:
        _object_key(key)
        with self._errors("delete", key, missing=False), contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        folder = _folder(prefix, allow_empty=False)
        with self._errors("delete", folder, missing=False):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self._path(folder))


def _is_regular(st: os.stat_result) -> bool:
    return _stat.S_ISREG(st.st_mode)


# --- S3 --------------------------------------------------------------------------------


def make_s3_client(
    *,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_attempts: int | None = None,
    max_pool_connections: int = 4 * TRANSFER_WORKERS,
) -> S3Client:
    """Build an S3 client from boto3's standard configuration sources only.

    Endpoint, credentials and region come from the environment / shared config / instance
    role exactly as the AWS CLI would read them; the region defaults to us-east-1 (what
    S3-compatible servers expect).  Retries use botocore's "standard" mode unless the
    environment or profile chose a mode; ``max_attempts`` (total tries) overrides
    ``AWS_MAX_ATTEMPTS`` -- tests use 1 to fail fast.
    """
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        core = botocore.session.get_session()
        session = boto3.session.Session(botocore_session=core)
        region = session.region_name or "us-east-1"
        retries: dict[str, Any] = {
            "mode": core.get_config_variable("retry_mode") or "standard"
        }
        if max_attempts is not None:
            retries["total_max_attempts"] = max_attempts
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries=cast("_RetryDict", retries),
            max_pool_connections=max_pool_connections,
        )
        return session.client("s3", region_name=region, config=config)
    except BotoCoreError as exc:  # bad profile, unknown retry mode, ...
        raise StorageError(f"cannot configure the S3 client: {exc}") from None


def _endpoint_label(client: Any) -> str | None:
    """``scheme://host[:port]`` of a non-AWS endpoint (credentials in the URL dropped)."""
    url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    if not isinstance(url, str):
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws")):
        return None
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def _explain(exc: BaseException) -> str:
    """A short, secret-free reason for a botocore/boto3 failure."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or "?"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"{code} (HTTP {status})"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return "cannot connect to the S3 endpoint"
    if isinstance(exc, ReadTimeoutError):
        return "the S3 endpoint did not answer in time"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return (
            "no usable S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or use an instance role)"
        )
    return type(exc).__name__


def _client_error(exc: BaseException) -> BaseException:
    """The ClientError behind a boto3 transfer error, if there is one."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


class S3Storage(Storage):
    """Keys are objects in one bucket of S3 or an S3-compatible server.

    The client is shared by all threads (boto3 clients are thread-safe; sessions are
    not).  Pass ``client`` to control timeouts/retries (see :func:`make_s3_client`).
    """

    def __init__(
        self,
        bucket: str,
        client: S3Client | None = None,
        *,
        workers: int = TRANSFER_WORKERS,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ConfigError(f"S3_BUCKET must be a bucket name, not {bucket!r}")
        self.bucket = bucket
        self.workers = workers
        self._client = client if client is not None else make_s3_client()
        self._transfer = _transfer_config(use_threads=True)
        # Prefix transfers already run ``workers`` objects at once; nesting a thread pool
        # per object would multiply threads and connections.
        self._bulk_transfer = _transfer_config(use_threads=False)

    def describe(self) -> str:
        endpoint = _endpoint_label(self._client)
        where = f"s3://{self.bucket}"
        return f"{where} at {endpoint}" if endpoint else where

    def __repr__(self) -> str:
        return f"S3Storage({self.describe()!r})"

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Translate botocore/boto3 failures; ``from None`` keeps their details out."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as raw:
            exc = _client_error(raw)
            if isinstance(exc, ClientError):
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code == "NoSuchBucket":
                    raise ObjectNotFound(
                        f"bucket {self.bucket!r} does not exist ({self.describe()})"
                    ) from None
                if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                    raise ObjectNotFound(f"no object {_show(key)} in {self.describe()}") from None
            raise StorageError(
                f"S3 {action} of {_show(key)} in {self.describe()} failed: {_explain(exc)}"
            ) from None
        except OSError as exc:  # the local side of a transfer
            raise StorageError(
                f"S3 {action} of {_show(key)}: local file error: {exc.strerror or exc}"
            ) from None

    def stat(self, key: str) -> ObjectInfo | None:
        _object_key(key)
        try:
            with self._errors("stat", key):
                head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(head.get("ContentLength", 0)), _etag(head.get("ETag")))

    def _iter_raw(self, folder: str) -> Iterator[dict[str, Any]]:
        """Every listed object dict under ``folder``, unfiltered."""
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("list", folder):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=folder):
                for obj in page.get("Contents", []):
                    yield dict(obj)

    def list(self, prefix: str = "") -> ObjectInfos:
        folder = _folder(prefix, allow_empty=True)
        out: ObjectInfos = []
        for obj in self._iter_raw(folder):
            key = str(obj.get("Key", ""))
            if key.endswith("/") and int(obj.get("Size", 0)) == 0:
                continue  # a "folder" marker made by consoles and some tools
            try:
                _object_key(key)
            except UnsafeKey as exc:
                log.warning("skipping listed S3 object in %s: %s", self.describe(), exc.message)
                continue
            out.append(ObjectInfo(key, int(obj.get("Size", 0)), _etag(obj.get("ETag"))))
        out.sort(key=lambda info: info.key)
        return out

    def read_bytes(self, key: str) -> bytes:
        _object_key(key)
        with self._errors("read", key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        _object_key(key)
        with self._errors("write", key):
            if len(data) < MULTIPART_THRESHOLD:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=data)
            else:
                self._client.upload_fileobj(
                    io.BytesIO(data), self.bucket, key, Config=self._transfer
                )

    def _fetch(self, key: str, dest: Path, *, bulk: bool) -> None:
        config = self._bulk_transfer if bulk else self._transfer
        with self._errors("download", key), _atomic_file(dest) as tmp:
            self._client.download_file(self.bucket, key, str(tmp), Config=config)

    def _store(self, src: Path, key: str, *, bulk: bool) -> ObjectInfo:
        config = self._bulk_transfer if bulk else self._transfer
        with self._errors("upload", key):
            self._client.upload_file(str(src), self.bucket, key, Config=config)
        info = self.stat(key)
        if info is None:
            raise StorageError(f"S3 upload of {_show(key)} in {self.describe()} did not stick")
        return info

    def delete(self, key: str) -> None:
        _object_key(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        folder = _folder(prefix, allow_empty=False)
        # Raw listing: objects with odd keys under the prefix are deleted too.
        keys = [str(obj["Key"]) for obj in self._iter_raw(folder) if "Key" in obj]
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            with self._errors("delete", folder):
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 delete of {len(errors)} object(s) under {_show(folder)} in "
                    f"{self.describe()} failed: {first.get('Code', '?')}"
                )


def _etag(raw: object) -> str:
    return str(raw or "").strip('"')


def _transfer_config(*, use_threads: bool) -> TransferConfig:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=TRANSFER_WORKERS,
        use_threads=use_threads,
    )


def open_storage(settings: Settings) -> Storage:
    """The backend ``STORAGE_BACKEND`` names (``local``: STORAGE_DIR, ``s3``: S3_BUCKET)."""
    if settings.storage_backend == "s3":
        if not settings.s3_bucket:
            raise ConfigError("STORAGE_BACKEND=s3 needs S3_BUCKET")
        return S3Storage(settings.s3_bucket)
    if settings.storage_backend == "local":
        return LocalStorage(settings.storage_dir)
    raise ConfigError(f"STORAGE_BACKEND must be local or s3, not {settings.storage_backend!r}")


# --- dataset cache ---------------------------------------------------------------------


@dataclass(frozen=True)
class SyncReport:
    """What one :func:`sync_prefix_report` call did."""

    path: Path
    objects: int
    downloaded: int
    removed: int
    bytes_downloaded: int


def cache_dir_name(storage: Storage, prefix: str) -> str:
    """The cache folder name of ``prefix`` in ``storage``: a sha256 hex digest."""
    folder = _folder(prefix, allow_empty=False)
    return hashlib.sha256(f"{storage.describe()}\0{folder}".encode()).hexdigest()


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``: processes (and threads) take turns.

    The lock file is never deleted; deleting it would let two holders lock different
    inodes at the same time.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open the cache lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache manifest %s: %s", path, exc)
        return {}
    objects = data.get("objects") if isinstance(data, dict) else None
    if not isinstance(objects, dict):
        return {}
    return {k: v for k, v in objects.items() if isinstance(k, str) and isinstance(v, dict)}


def _write_manifest(path: Path, storage: Storage, folder: str, objects: dict[str, Any]) -> None:
    doc = {"storage": storage.describe(), "prefix": folder, "objects": objects}
    with _atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")


def _is_current(entry: dict[str, Any] | None, info: ObjectInfo, dest: Path) -> bool:
    if entry is None or entry.get("etag") != info.etag or entry.get("size") != info.size:
        return False
    try:
        return dest.stat().st_size == info.size
    except OSError:
        return False


def _prune_empty_dirs(start: Path, root: Path) -> None:
    """Remove ``start`` and its parents up to (not including) ``root`` while empty."""
    current = start
    while current != root and current.is_relative_to(root):
        try:
            current.rmdir()
        except OSError:
            return
        current = current.parent


def sync_prefix(storage: Storage, prefix: str, cache_root: Path) -> Path:
    """Make ``cache_root/<hash>`` an up-to-date copy of ``prefix``; return that folder.

    See :func:`sync_prefix_report`.
    """
    return sync_prefix_report(storage, prefix, cache_root).path


def sync_prefix_report(storage: Storage, prefix: str, cache_root: Path) -> SyncReport:
    """Incrementally mirror ``prefix`` into the cache and say what was transferred.

    A manifest (``<hash>.manifest.json`` beside the folder, so it can never collide with
    a dataset file) records each key's etag and size: unchanged objects are not
    downloaded again, changed ones are, deleted ones are removed locally.  Files the
    consumer adds (Ultralytics' ``labels.cache``) are left alone.  An exclusive lock
    per prefix lets several workers share one cache.  An empty or missing prefix is
    ObjectNotFound with ``error_code`` ``dataset_not_found``.
    """
    folder = _folder(prefix, allow_empty=False)
    cache_root = Path(cache_root)
    name = cache_dir_name(storage, folder)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the dataset cache {cache_root}: {exc.strerror}") from None
    with _exclusive_lock(cache_root / f"{name}.lock"):
        report = _sync_locked(
            storage, folder, cache_root / name, cache_root / f"{name}{MANIFEST_SUFFIX}"
        )
    log.info(
        "synced %s prefix %r to %s: %d objects, %d downloaded (%d bytes), %d removed",
        storage.describe(),
        folder,
        report.path,
        report.objects,
        report.downloaded,
        report.bytes_downloaded,
        report.removed,
    )
    return report


def forget_prefix(storage: Storage, prefix: str, cache_root: Path) -> None:
    """Remove the cached copy of ``prefix`` (a rejected dataset leaves nothing behind)."""
    folder = _folder(prefix, allow_empty=False)
    cache_root = Path(cache_root)
    name = cache_dir_name(storage, folder)
    if not cache_root.is_dir():
        return
    with _exclusive_lock(cache_root / f"{name}.lock"):
        shutil.rmtree(cache_root / name, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (cache_root / f"{name}{MANIFEST_SUFFIX}").unlink()


def _sync_locked(storage: Storage, folder: str, target: Path, manifest_path: Path) -> SyncReport:
    try:
        objects = storage.list(folder)
    except ObjectNotFound as exc:  # e.g. the bucket does not exist
        raise ObjectNotFound(exc.message, error_code="dataset_not_found") from None
    except EscapesRoot as exc:
        raise PermanentError(f"dataset {_show(folder)}: {exc.message}", error_code="dataset_invalid") from None
    plan = _plan_downloads(folder, objects, target)
    if not plan:
        raise ObjectNotFound(
            f"no objects under prefix {_show(folder)} in {storage.describe()}",
            error_code="dataset_not_found",
        )
    old = _read_manifest(manifest_path)
    keep: dict[str, Any] = {}
    todo: list[tuple[ObjectInfo, Path]] = []
    for info, dest in plan:
        if _is_current(old.get(info.key), info, dest):
            keep[info.key] = old[info.key]
        else:
            todo.append((info, dest))

    removed = 0
    listed = {info.key for info, _ in plan}
    root = target.resolve()
    for key in sorted(set(old) - listed):
        rel = key[len(folder):] if key.startswith(folder) else ""
        try:
            _object_key(rel)
        except UnsafeKey:
            continue
        path = (root / rel).resolve()
        if path == root or not path.is_relative_to(root):
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot remove stale cache file {path}: {exc.strerror}") from None
        _prune_empty_dirs(path.parent, root)

    done: list[ObjectInfo] = []

    def fetch(item: tuple[ObjectInfo, Path]) -> None:
        storage._fetch(item[0].key, item[1], bulk=True)
        done.append(item[0])  # list.append is atomic

    try:
        _parallel(fetch, todo, storage.workers)
    finally:
        # Also after a failure: what did arrive is not fetched again next time.
        for info in done:
            keep[info.key] = {"etag": info.etag, "size": info.size}
        try:
            _write_manifest(manifest_path, storage, folder, keep)
        except OSError as exc:
            log.error("cannot write the cache manifest %s: %s", manifest_path, exc.strerror)
    return SyncReport(
        path=target,
        objects=len(plan),
        downloaded=len(done),
        removed=removed,
        bytes_downloaded=sum(info.size for info in done),
    )
