"""The dataset cache: an incrementally updated local copy of a prefix, on both backends."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ai_service.errors import ObjectNotFound
from ai_service.storage import (
    MANIFEST_SUFFIX,
    LocalStorage,
    Storage,
    cache_dir_name,
    sync_prefix,
    sync_prefix_report,
)
from tests.support.storage import backend, tree


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return backend(request, tmp_path)


def _dataset(storage: Storage) -> None:
    storage.write_bytes("datasets/d1/data.yaml", b"names: [car]\n")
    storage.write_bytes("datasets/d1/images/train/1.jpg", b"jpeg-1")
    storage.write_bytes("datasets/d1/labels/train/1.txt", b"0 0.5 0.5 0.1 0.1\n")
    storage.write_bytes("datasets/d1x/other.txt", b"not mine")


def test_a_second_sync_of_an_unchanged_prefix_downloads_nothing(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    first = sync_prefix_report(storage, "datasets/d1/", tmp_path / "cache")
    assert (first.objects, first.downloaded, first.removed) == (3, 3, 0)
    assert tree(first.path) == {
        "data.yaml": b"names: [car]\n",
        "images/train/1.jpg": b"jpeg-1",
        "labels/train/1.txt": b"0 0.5 0.5 0.1 0.1\n",
    }
    (first.path / "labels" / "train.cache").write_bytes(b"ultralytics")  # consumer's own file
    second = sync_prefix_report(storage, "datasets/d1", tmp_path / "cache")
    assert second.path == first.path
    assert (second.downloaded, second.removed, second.bytes_downloaded) == (0, 0, 0)
    assert (first.path / "labels" / "train.cache").exists()


def test_a_sync_that_changes_nothing_leaves_the_manifest_as_it_was(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    path = sync_prefix(storage, "datasets/d1", tmp_path / "cache")
    manifest = path.with_name(f"{path.name}{MANIFEST_SUFFIX}")
    before = manifest.stat()
    sync_prefix(storage, "datasets/d1", tmp_path / "cache")
    after = manifest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    storage.write_bytes("datasets/d1/images/train/2.jpg", b"jpeg-2")
    sync_prefix(storage, "datasets/d1", tmp_path / "cache")
    assert manifest.stat().st_ino != before.st_ino  # a new object: written again


def test_a_changed_object_is_fetched_again_and_a_removed_one_is_removed(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    cache = tmp_path / "cache"
    path = sync_prefix(storage, "datasets/d1", cache)
    storage.write_bytes("datasets/d1/images/train/1.jpg", b"JPEG-1")  # same size, new content
    storage.delete("datasets/d1/labels/train/1.txt")
    storage.write_bytes("datasets/d1/images/train/2.jpg", b"jpeg-2")
    report = sync_prefix_report(storage, "datasets/d1", cache)
    assert (report.downloaded, report.removed) == (2, 1)
    assert tree(path) == {"data.yaml": b"names: [car]\n", "images/train/1.jpg": b"JPEG-1",
                           "images/train/2.jpg": b"jpeg-2"}
    assert not (path / "labels").exists()  # emptied folders go too


def test_a_cached_file_lost_locally_is_fetched_again(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    path = sync_prefix(storage, "datasets/d1", tmp_path / "cache")
    (path / "data.yaml").unlink()
    report = sync_prefix_report(storage, "datasets/d1", tmp_path / "cache")
    assert report.downloaded == 1
    assert (path / "data.yaml").read_bytes() == b"names: [car]\n"


def test_syncing_a_missing_prefix_is_dataset_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="no objects under prefix") as caught:
        sync_prefix(storage, "datasets/nope/", tmp_path / "cache")
    assert caught.value.error_code == "dataset_not_found"


def test_two_concurrent_syncs_of_one_prefix_do_not_clash(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    reports: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reports.append(sync_prefix_report(storage, "datasets/d1", tmp_path / "cache").downloaded)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(reports) == [0, 0, 0, 3]  # the lock made the others find it done


def test_the_cache_folder_is_a_hash_of_backend_and_prefix_with_the_manifest_beside_it(
    tmp_path: Path,
) -> None:
    store = LocalStorage(tmp_path / "store")
    store.write_bytes("ds/a.txt", b"a")
    path = sync_prefix(store, "ds", tmp_path / "cache")
    assert path.name == cache_dir_name(store, "ds/") == cache_dir_name(store, "ds")
    assert len(path.name) == 64
    assert int(path.name, 16) >= 0
    assert (tmp_path / "cache" / f"{path.name}.manifest.json").is_file()
    assert cache_dir_name(LocalStorage(tmp_path / "other"), "ds") != path.name


class _RecordingStorage(LocalStorage):
    """Local storage that records what goes through its public download method."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetched: list[tuple[str, bool]] = []

    def fetch_file(self, key: str, dest: Path, *, bulk: bool = False) -> None:
        self.fetched.append((key, bulk))
        super().fetch_file(key, dest, bulk=bulk)


def test_the_cache_downloads_through_the_public_fetch_file_as_bulk_transfers(tmp_path: Path) -> None:
    store = _RecordingStorage(tmp_path / "store")
    _dataset(store)
    sync_prefix(store, "datasets/d1", tmp_path / "cache")
    assert sorted(store.fetched) == [
        ("datasets/d1/data.yaml", True),
        ("datasets/d1/images/train/1.jpg", True),
        ("datasets/d1/labels/train/1.txt", True),
    ]

