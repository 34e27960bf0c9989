"""The storage interface both backends implement, and the transfer helpers they share.

Every public method validates its keys before touching the disk or the network, and
nothing downloaded is ever written outside the directory it was asked for: the
checks live here, once, and the backends only implement the I/O hooks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ai_service.errors import ObjectNotFound, PermanentError, PreconditionFailed, StorageError, UnsafeKey
from ai_service.storage.keys import folder as as_folder
from ai_service.storage.keys import object_key, show

log = logging.getLogger("ai_service.storage")

#: Objects transferred at once by the prefix operations.
TRANSFER_WORKERS = 8
MiB = 1024 * 1024
#: Files at least this big are uploaded/downloaded in parts by boto3's transfer manager.
MULTIPART_THRESHOLD = 8 * MiB
MULTIPART_CHUNKSIZE = 8 * MiB
#: Marks our own temporary files so that listings skip half-written objects.
TMP_MARK = ".ais-tmp-"
#: Where :meth:`Storage.supports_conditional_writes` tries its writes (the reserved
#: ``jobs/`` prefix; the probe object is removed again at once).
CONDITIONAL_PROBE_PREFIX = "jobs/.probes/"

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes and a version token (ETag or local)."""

    key: str
    size: int
    etag: str


ObjectInfos = list[ObjectInfo]
Paths = list[Path]
#: A listed object and the local file it is to be downloaded to.
Download = tuple[ObjectInfo, Path]


# --- transfer helpers ----------------------------------------------------------------


def parallel(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
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
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` atomically.

    Readers (and a crashed writer's next run) therefore see either the old file or the
    complete new one, never a half-written file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def temp_path(dest: Path, tag: str = "") -> Path:
    """A hidden name beside ``dest`` that listings skip (a new random one without ``tag``)."""
    return dest.with_name(f".{dest.name[:100]}{TMP_MARK}{tag or uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``: processes (and threads) take turns.

    The lock file is never deleted; deleting it would let two holders lock different
    inodes at the same time.  ``what`` names the lock in the error message.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open the {what} lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_file`'s half-written temporary files."""
    return name.startswith(".") and TMP_MARK in name


def _source_file(src: Path) -> Path:
    """``src`` as a Path, if it is a readable regular file to upload."""
    path = Path(src)
    if not path.is_file():
        raise StorageError(f"cannot upload {path}: not a file")
    return path


def _relative_keys(prefix: str, objects: Sequence[ObjectInfo]) -> dict[str, ObjectInfo]:
    """Listed objects by their safe key relative to ``prefix``; the others are logged."""
    rels: dict[str, ObjectInfo] = {}
    for info in objects:
        if not info.key.startswith(prefix):
            log.warning("skipping listed object %s: not under prefix %r", show(info.key), prefix)
            continue
        rel = info.key[len(prefix):]
        try:
            object_key(rel)
        except UnsafeKey as exc:
            log.warning("skipping listed object %s: %s", show(info.key), exc.message)
            continue
        rels[rel] = info
    return rels


def plan_downloads(prefix: str, objects: Sequence[ObjectInfo], dest_dir: Path) -> list[Download]:
    """Map listed objects under ``prefix`` to files under ``dest_dir``.

    Anything that would land outside ``dest_dir`` (a ``..`` key from a hostile or buggy
    listing, a symlink planted inside ``dest_dir``) is skipped with a warning, as is an
    object whose key is also used as a folder by another object (a file cannot be both).
    Each folder is resolved once, and a file only when it is itself a symlink: a
    thousand-file dataset costs one ``lstat`` per file, not one per path segment.
    """
    root = str(dest_dir.resolve())
    rels = _relative_keys(prefix, objects)
    folders = {"/".join(rel.split("/")[:i]) for rel in rels for i in range(1, rel.count("/") + 1)}
    parents: dict[str, str | None] = {"": root}
    plan: list[Download] = []
    for rel, info in sorted(rels.items()):
        if rel in folders:
            log.warning("skipping object %s: other objects use it as a folder", show(info.key))
            continue
        target = _resolved_target(rel, root, parents)
        if target is None or target == root or not _inside(target, root):
            log.warning("skipping object %s: it would be written outside %s", show(info.key), root)
            continue
        plan.append((info, Path(target)))
    return plan


def _resolved_target(rel: str, root: str, parents: dict[str, str | None]) -> str | None:
    """``root/rel`` with symlinks resolved; None when its folder leads outside ``root``.

    ``parents`` caches each folder's resolution (None: outside) across calls.
    """
    folder, _, name = rel.rpartition("/")
    if folder not in parents:
        real = os.path.realpath(os.path.join(root, folder))
        parents[folder] = real if _inside(real, root) else None
    parent = parents[folder]
    if parent is None:
        return None
    target = os.path.join(parent, name)
    return os.path.realpath(target) if os.path.islink(target) else target


def _inside(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


# --- the interface ---------------------------------------------------------------------


class Storage(ABC):
    """Where keys live.  Both backends have exactly the same semantics.

    Prefixes are folders: ``list("a/b")`` and ``list("a/b/")`` both return the objects
    under ``a/b/`` and never ``a/bc``.  Deleting a missing object is not an error.
    """

    workers: int = TRANSFER_WORKERS

    def __init__(self) -> None:
        self._conditional: bool | None = None  # supports_conditional_writes(), once known
        self._conditional_lock = threading.Lock()

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
    def read_versioned(self, key: str) -> tuple[bytes, ObjectInfo]:
        """The content of ``key`` and the info of exactly that version (one request).

        For :meth:`replace_if_match`: an etag taken by a separate :meth:`stat` after the
        read could belong to a newer version than the bytes, and a write based on the
        old bytes would then win.  A missing object is ObjectNotFound.
        """

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace ``key`` with ``data``, atomically."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder ``prefix`` (which must not be empty)."""

    @abstractmethod
    def _create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        """Create the already validated ``key``; PreconditionFailed if it exists."""

    @abstractmethod
    def _replace_if_match(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        """Replace the validated ``key`` if its etag is ``etag``; else PreconditionFailed."""

    @abstractmethod
    def _fetch(self, key: str, dest: Path, *, bulk: bool) -> None:
        """Download the already validated ``key`` to ``dest`` atomically.

        ``bulk``: one of many parallel transfers, so do not add threads of its own.
        """

    @abstractmethod
    def _store(self, src: Path, key: str, *, bulk: bool) -> ObjectInfo:
        """Upload the file ``src`` to the already validated ``key``."""

    # --- conditional writes (job records that two hosts cannot both win) ---------------

    def create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        """Create ``key`` with ``data`` only if there is no such object; return its info.

        PreconditionFailed when it exists: of several writers racing, exactly one wins.
        A store without conditional writes (:meth:`supports_conditional_writes`) refuses
        with a PermanentError rather than silently overwriting.
        """
        object_key(key)
        self._require_conditional()
        return self._create_exclusive(key, data)

    def replace_if_match(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        """Replace ``key`` with ``data`` only if its current etag is ``etag``; return the new info.

        PreconditionFailed when the object changed since the caller read ``etag`` or is
        gone: of several writers holding the same etag, exactly one wins.
        """
        object_key(key)
        self._require_conditional()
        return self._replace_if_match(key, data, etag)

    def supports_conditional_writes(self) -> bool:
        """Whether :meth:`create_exclusive` and :meth:`replace_if_match` hold, tried once.

        Detected by writing a probe object under :data:`CONDITIONAL_PROBE_PREFIX`: one
        exclusive create that must succeed, a second that must fail, and a replace with
        a wrong etag that must fail (an S3-compatible server may accept the headers and
        ignore them).  The result is logged and kept; a storage that cannot be reached
        raises StorageError and is asked again next time.
        """
        with self._conditional_lock:
            if self._conditional is None:
                supported, how = self._probe_conditional_writes()
                log.info("conditional writes in %s: %s", self.describe(),
                         "supported" if supported else f"not supported ({how})")
                self._conditional = supported
            return self._conditional

    def _require_conditional(self) -> None:
        if not self.supports_conditional_writes():
            raise PermanentError(
                f"{self.describe()} does not support conditional writes",
                error_code="storage_error",
            )

    def _probe_conditional_writes(self) -> tuple[bool, str]:
        """Try the three writes of :meth:`supports_conditional_writes`; (result, why not)."""
        folder = f"{CONDITIONAL_PROBE_PREFIX}{uuid.uuid4().hex}/"
        key = f"{folder}conditional-writes"
        try:
            self._create_exclusive(key, b"1")
            writes: tuple[tuple[str, Callable[[], object]], ...] = (
                ("a second exclusive create", lambda: self._create_exclusive(key, b"2")),
                ("a replace with a wrong etag", lambda: self._replace_if_match(key, b"3", "0" * 32)),
            )
            for attempt, write in writes:
                try:
                    write()
                except PreconditionFailed:
                    continue
                return False, f"{attempt} succeeded"
            return True, ""
        except PreconditionFailed:
            return False, "the first exclusive create of a new key failed"
        except PermanentError as exc:  # e.g. the server answers NotImplemented
            return False, exc.message
        finally:
            self.delete_prefix(folder)  # with the local backend's lock file

    # --- transfers ------------------------------------------------------------------

    def fetch_file(self, key: str, dest: Path, *, bulk: bool = False) -> None:
        """Download ``key`` to the file ``dest`` (replaced atomically), without a stat.

        For callers that have just listed ``key`` (the dataset cache) and so already know
        its size and version.  ``bulk``: the caller runs many transfers in parallel, so
        the backend adds no threads of its own.  A missing object is ObjectNotFound.
        """
        self._fetch(object_key(key), Path(dest), bulk=bulk)

    def fetch_files(self, items: Sequence[Download], done: Callable[[ObjectInfo], None]) -> None:
        """Download many just-listed objects (:func:`plan_downloads`' output); ``done(info)`` after each.

        Every key is validated before the first transfer.  Here: :meth:`fetch_file` on
        ``workers`` threads; a backend may move them all at once more cheaply.
        """
        for info, _ in items:
            object_key(info.key)

        def one(item: Download) -> None:
            self.fetch_file(item[0].key, item[1], bulk=True)
            done(item[0])

        parallel(one, items, self.workers)

    def download_file(self, key: str, dest: Path) -> ObjectInfo:
        """Download ``key`` to the file ``dest`` (replaced atomically); return its info."""
        object_key(key)
        info = self.stat(key)
        if info is None:
            raise ObjectNotFound(f"no object {show(key)} in {self.describe()}")
        self._fetch(key, Path(dest), bulk=False)
        return info

    def upload_file(self, src: Path, key: str) -> ObjectInfo:
        """Store the local file ``src`` as ``key`` (multipart when large)."""
        object_key(key)
        return self._store(_source_file(src), key, bulk=False)

    def upload_dir(self, src_dir: Path, prefix: str) -> ObjectInfos:
        """Upload every file below ``src_dir`` to ``<prefix>/<relative path>``.

        All keys are derived and validated before the first upload, so an unsafe file
        name fails the whole call instead of leaving half a folder behind.
        """
        folder = as_folder(prefix, allow_empty=False)
        src_dir = Path(src_dir)
        if not src_dir.is_dir():
            raise StorageError(f"cannot upload {src_dir}: not a directory")
        pairs: list[tuple[Path, str]] = []
        for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
            key = folder + path.relative_to(src_dir).as_posix()
            pairs.append((path, object_key(key)))
        return parallel(lambda pair: self._store(pair[0], pair[1], bulk=True), pairs, self.workers)

    def download_prefix(self, prefix: str, dest_dir: Path) -> Paths:
        """Download every object under ``prefix`` into ``dest_dir``, keeping the layout.

        Returns the local paths written.  An empty or missing prefix is ObjectNotFound.
        """
        folder = as_folder(prefix, allow_empty=True)
        plan = plan_downloads(folder, self.list(folder), Path(dest_dir))
        if not plan:
            raise ObjectNotFound(f"no objects under prefix {show(prefix)} in {self.describe()}")
        self.fetch_files(plan, lambda _: None)
        return [dest for _, dest in plan]
