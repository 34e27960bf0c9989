"""The local-directory backend (``STORAGE_BACKEND=local``): keys are files under a root.

For development and single hosts.  Its one rule beyond the interface's: a symlink is
followed only while it stays inside the root (:class:`EscapesRoot` otherwise), so a
dataset cannot pull ``/etc/passwd`` or another tenant's files into a job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat as _stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ai_service.errors import EscapesRoot, ObjectNotFound, PreconditionFailed, StorageError, UnsafeKey
from ai_service.storage.base import (
    TRANSFER_WORKERS,
    ObjectInfo,
    ObjectInfos,
    Storage,
    atomic_file,
    exclusive_lock,
    is_tmp_name,
    temp_path,
)
from ai_service.storage.keys import folder as as_folder
from ai_service.storage.keys import object_key, show

log = logging.getLogger("ai_service.storage")


def _is_regular(st: os.stat_result) -> bool:
    return _stat.S_ISREG(st.st_mode)


def _write_new(path: Path, data: bytes, mtime_ns: int) -> os.stat_result:
    """Write the new file ``path`` durably with the given mtime; return its stat."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        return os.fstat(fd)
    finally:
        os.close(fd)


def _vanished_ok(exc: OSError) -> None:
    """``os.walk``'s error hook: a folder that vanished while walking is fine."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


class LocalStorage(Storage):
    """Keys are files under ``root`` (``STORAGE_DIR``); for development and single hosts.

    The version token of a file is ``<size>-<mtime_ns>-<inode>``: cheap, and it changes
    whenever the file is replaced (our writes always replace).

    Symlinks (to a file or a folder) are followed only while they stay inside ``root``:
    one that leads outside is :class:`EscapesRoot`, for reads, listings and writes alike,
    so a dataset cannot pull ``/etc/passwd`` or another tenant's files into a job.
    """

    def __init__(self, root: Path, *, workers: int = TRANSFER_WORKERS) -> None:
        super().__init__()
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
            raise EscapesRoot(f"storage key {show(key)} is a symlink that leads outside {self.describe()}; "
                              "it is not followed")

    @contextlib.contextmanager
    def _errors(self, action: str, key: str, *, missing: bool = True) -> Iterator[None]:
        """Map OSError to the service's errors (FileNotFoundError: ObjectNotFound)."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            if missing:
                raise ObjectNotFound(f"no object {show(key)} in {self.describe()}") from None
            raise StorageError(
                f"cannot {action} {show(key)} in {self.describe()}: {exc.strerror}"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot {action} {show(key)} in {self.describe()}: {exc.strerror or exc}"
            ) from None

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}")

    def stat(self, key: str) -> ObjectInfo | None:
        object_key(key)
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(
                f"cannot stat {show(key)} in {self.describe()}: {exc.strerror}"
            ) from None
        if not _is_regular(st):
            return None
        return self._info(key, st)

    def list(self, prefix: str = "") -> ObjectInfos:
        folder = as_folder(prefix, allow_empty=True)
        base = self._path(folder) if folder else self.root
        out: ObjectInfos = []
        if not base.is_dir():
            return out
        seen: set[tuple[int, int]] = set()
        with self._errors("list", folder, missing=False):
            # Symlinked folders are followed (inside the root only), each real folder once.
            for dirpath, dirnames, filenames in os.walk(base, onerror=_vanished_ok, followlinks=True):
                here = Path(dirpath)
                if not self._first_visit(here, seen):
                    dirnames[:] = []  # vanished, a symlink loop, or a second link to a folder
                    continue
                out.extend(self._files_in(here, filenames))
        out.sort(key=lambda info: info.key)
        return out

    def _first_visit(self, here: Path, seen: set[tuple[int, int]]) -> bool:
        """Whether the walked folder ``here`` still exists and was not listed before."""
        self._check_inside(here, here.relative_to(self.root).as_posix() + "/")
        try:
            st_dir = here.stat()
        except FileNotFoundError:
            return False
        if (st_dir.st_dev, st_dir.st_ino) in seen:
            return False
        seen.add((st_dir.st_dev, st_dir.st_ino))
        return True

    def _files_in(self, here: Path, filenames: Sequence[str]) -> Iterator[ObjectInfo]:
        """The objects among the regular files ``filenames`` of the folder ``here``."""
        for name in filenames:
            if is_tmp_name(name):
                continue
            path = here / name
            key = path.relative_to(self.root).as_posix()
            try:
                object_key(key)
            except UnsafeKey as exc:
                log.warning("skipping local file %s: %s", path, exc.message)
                continue
            self._check_inside(path, key)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if _is_regular(st):
                yield self._info(key, st)

    def read_bytes(self, key: str) -> bytes:
        object_key(key)
        with self._errors("read", key):
            return self._path(key).read_bytes()

    def read_versioned(self, key: str) -> tuple[bytes, ObjectInfo]:
        object_key(key)
        with self._errors("read", key), open(self._path(key), "rb") as fh:
            st = os.fstat(fh.fileno())  # the opened inode: writes replace, never modify
            if not _is_regular(st):
                raise FileNotFoundError(key)
            return fh.read(), self._info(key, st)

    def write_bytes(self, key: str, data: bytes) -> None:
        object_key(key)
        with self._errors("write", key, missing=False), atomic_file(self._path(key)) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def _create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        """A complete temporary file, hard-linked to the key: ``link`` fails if it exists.

        Its mtime is the clock's nanoseconds, so that a key deleted and created again
        gets a new version token even when the file system reuses the inode.
        """
        path = self._path(key)
        with self._errors("create", key, missing=False):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(path)
            try:
                st = _write_new(tmp, data, time.time_ns())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailed(
                        f"{show(key)} already exists in {self.describe()}"
                    ) from None
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return self._info(key, st)

    def _replace_if_match(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        """Compare and rename while holding the key's lock file (``flock``), so one wins.

        The new mtime is later than the old one's, so a version token cannot come back
        (an inode reused within one clock tick would otherwise repeat an old etag).
        """
        path = self._path(key)
        gone = PreconditionFailed(f"{show(key)} is gone from {self.describe()}")
        if not path.parent.is_dir():
            raise gone
        with self._errors("replace", key, missing=False), exclusive_lock(temp_path(path, "lock"), "record"):
            try:
                st = path.stat()
            except FileNotFoundError:
                raise gone from None
            if not _is_regular(st) or self._info(key, st).etag != etag:
                raise PreconditionFailed(
                    f"{show(key)} in {self.describe()} is no longer version {etag!r}"
                )
            tmp = temp_path(path)
            try:
                new = _write_new(tmp, data, max(time.time_ns(), st.st_mtime_ns + 1))
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return self._info(key, new)

    def _fetch(self, key: str, dest: Path, *, bulk: bool) -> None:
        src = self._path(key)
        with self._errors("download", key):
            src.stat()  # a missing source is ObjectNotFound, not a write error
        with self._errors("download", key, missing=False), atomic_file(dest) as tmp:
            shutil.copyfile(src, tmp)

    def _store(self, src: Path, key: str, *, bulk: bool) -> ObjectInfo:
        dest = self._path(key)
        with self._errors("upload", key, missing=False):
            with atomic_file(dest) as tmp:
                shutil.copyfile(src, tmp)
            return self._info(key, dest.stat())

    def delete(self, key: str) -> None:
        object_key(key)
        with self._errors("delete", key, missing=False), contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        folder = as_folder(prefix, allow_empty=False)
        with self._errors("delete", folder, missing=False), contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._path(folder))
