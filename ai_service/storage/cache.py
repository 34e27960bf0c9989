"""The dataset cache: a local, incrementally updated copy of a storage prefix.

Training and conversion read datasets from local files; this keeps one copy per
(storage, prefix) under ``WORK_DIR`` and transfers only what changed since the last
job.  It uses nothing of a backend but the public :class:`Storage` interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_service.errors import EscapesRoot, ObjectNotFound, PermanentError, StorageError, UnsafeKey
from ai_service.storage.base import (
    Download,
    ObjectInfo,
    Storage,
    atomic_file,
    exclusive_lock,
    plan_downloads,
)
from ai_service.storage.keys import folder as as_folder
from ai_service.storage.keys import object_key, show

log = logging.getLogger("ai_service.storage")

MANIFEST_SUFFIX = ".manifest.json"

#: A manifest's ``objects``: key -> {"etag": ..., "size": ...}.
Entries = dict[str, dict[str, Any]]


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
    folder = as_folder(prefix, allow_empty=False)
    return hashlib.sha256(f"{storage.describe()}\0{folder}".encode()).hexdigest()


# --- the manifest ----------------------------------------------------------------------


def _read_manifest(path: Path) -> Entries:
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


def _write_manifest(path: Path, storage: Storage, folder: str, objects: Entries) -> None:
    doc = {"storage": storage.describe(), "prefix": folder, "objects": objects}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")


def _is_current(entry: dict[str, Any] | None, info: ObjectInfo, dest: Path) -> bool:
    if entry is None or entry.get("etag") != info.etag or entry.get("size") != info.size:
        return False
    try:
        return dest.stat().st_size == info.size
    except OSError:
        return False


# --- syncing ---------------------------------------------------------------------------


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
    folder = as_folder(prefix, allow_empty=False)
    cache_root = Path(cache_root)
    name = cache_dir_name(storage, folder)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the dataset cache {cache_root}: {exc.strerror}") from None
    with exclusive_lock(cache_root / f"{name}.lock", "cache"):
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
    folder = as_folder(prefix, allow_empty=False)
    cache_root = Path(cache_root)
    name = cache_dir_name(storage, folder)
    if not cache_root.is_dir():
        return
    with exclusive_lock(cache_root / f"{name}.lock", "cache"):
        shutil.rmtree(cache_root / name, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (cache_root / f"{name}{MANIFEST_SUFFIX}").unlink()


def _sync_locked(storage: Storage, folder: str, target: Path, manifest_path: Path) -> SyncReport:
    """The sync itself, run while holding the prefix's lock."""
    plan = _dataset_plan(storage, folder, target)
    old = _read_manifest(manifest_path)
    keep: Entries = {}
    todo: list[Download] = []
    for info, dest in plan:
        if _is_current(old.get(info.key), info, dest):
            keep[info.key] = old[info.key]
        else:
            todo.append((info, dest))
    removed = _remove_stale(set(old) - {info.key for info, _ in plan}, folder, target)
    done = _fetch_recording(storage, todo, keep, old, folder, manifest_path)
    return SyncReport(
        path=target,
        objects=len(plan),
        downloaded=len(done),
        removed=removed,
        bytes_downloaded=sum(info.size for info in done),
    )


def _dataset_plan(storage: Storage, folder: str, target: Path) -> list[Download]:
    """What the prefix holds, mapped to files under ``target``; errors in dataset terms."""
    try:
        objects = storage.list(folder)
    except ObjectNotFound as exc:  # e.g. the bucket does not exist
        raise ObjectNotFound(exc.message, error_code="dataset_not_found") from None
    except EscapesRoot as exc:
        raise PermanentError(f"dataset {show(folder)}: {exc.message}", error_code="dataset_invalid") from None
    plan = plan_downloads(folder, objects, target)
    if not plan:
        raise ObjectNotFound(
            f"no objects under prefix {show(folder)} in {storage.describe()}",
            error_code="dataset_not_found",
        )
    return plan


def _stale_file(key: str, folder: str, root: Path) -> Path | None:
    """The cached file of a key no longer listed, if it is safely inside ``root``."""
    rel = key[len(folder):] if key.startswith(folder) else ""
    try:
        object_key(rel)
    except UnsafeKey:
        return None
    path = (root / rel).resolve()
    if path == root or not path.is_relative_to(root):
        return None
    return path


def _remove_stale(gone: set[str], folder: str, target: Path) -> int:
    """Delete the cached files of the keys ``gone``; return how many there were."""
    removed = 0
    root = target.resolve()
    for key in sorted(gone):
        path = _stale_file(key, folder, root)
        if path is None:
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot remove stale cache file {path}: {exc.strerror}") from None
        _prune_empty_dirs(path.parent, root)
    return removed


def _prune_empty_dirs(start: Path, root: Path) -> None:
    """Remove ``start`` and its parents up to (not including) ``root`` while empty."""
    current = start
    while current != root and current.is_relative_to(root):
        try:
            current.rmdir()
        except OSError:
            return
        current = current.parent


def _fetch_recording(
    storage: Storage, todo: list[Download], keep: Entries, old: Entries, folder: str, manifest_path: Path
) -> list[ObjectInfo]:
    """Download ``todo`` in parallel and record in the manifest what arrived."""
    done: list[ObjectInfo] = []
    try:
        storage.fetch_files(todo, done.append)  # list.append is atomic
    finally:
        # Also after a failure: what did arrive is not fetched again next time.
        for info in done:
            keep[info.key] = {"etag": info.etag, "size": info.size}
        try:
            if keep != old:  # a no-op sync leaves the manifest as it is
                _write_manifest(manifest_path, storage, folder, keep)
        except OSError as exc:
            log.error("cannot write the cache manifest %s: %s", manifest_path, exc.strerror)
    return done
