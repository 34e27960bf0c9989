"""Storage: both backends behave the same behind the one interface.

The S3 cases run against a real SeaweedFS (tests/support/s3.py), configured through the
standard AWS environment variables only, as a worker would be.  Key rules, each
backend's own behaviour and the dataset cache have files of their own
(tests/test_storage_{keys,local,s3,cache}.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ai_service.config import Settings
from ai_service.errors import ObjectNotFound
from ai_service.storage import (
    LocalStorage,
    ObjectInfo,
    S3Storage,
    Storage,
    open_storage,
)
from tests.support.storage import backend, tree

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return backend(request, tmp_path)


# --- round trips ---------------------------------------------------------------------


def test_bytes_written_are_read_back_and_stat_reports_their_size(storage: Storage) -> None:
    storage.write_bytes("models/m/best.pt", b"weights")
    assert storage.read_bytes("models/m/best.pt") == b"weights"
    info = storage.stat("models/m/best.pt")
    assert info is not None
    assert info.key == "models/m/best.pt"
    assert info.size == 7
    assert info.etag


def test_overwriting_an_object_changes_its_etag(storage: Storage) -> None:
    storage.write_bytes("k/x.bin", b"aaaa")
    first = storage.stat("k/x.bin")
    storage.write_bytes("k/x.bin", b"bbbb")
    second = storage.stat("k/x.bin")
    assert first is not None
    assert second is not None
    assert first.etag != second.etag
    assert storage.read_bytes("k/x.bin") == b"bbbb"


def test_a_missing_key_stats_as_none_and_reading_it_is_object_not_found_naming_it(storage: Storage) -> None:
    assert storage.stat("nope/missing.pt") is None
    with pytest.raises(ObjectNotFound, match=r"nope/missing\.pt"):
        storage.read_bytes("nope/missing.pt")
    with pytest.raises(ObjectNotFound, match=r"nope/missing\.pt"):
        storage.download_file("nope/missing.pt", Path("/nonexistent-never-written"))


def test_a_folder_is_not_an_object(storage: Storage) -> None:
    storage.write_bytes("a/b/c.txt", b"c")
    assert storage.stat("a/b") is None
    with pytest.raises(ObjectNotFound):
        storage.read_bytes("a/b")


def test_a_file_uploaded_and_downloaded_keeps_its_content(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01payload")
    up = storage.upload_file(src, "up/src.bin")
    dest = tmp_path / "deep" / "er" / "dest.bin"
    down = storage.download_file("up/src.bin", dest)
    assert dest.read_bytes() == b"\x00\x01payload"
    assert up == down == ObjectInfo("up/src.bin", 9, up.etag)
    assert [p.name for p in dest.parent.iterdir()] == ["dest.bin"]  # no temp file left


def test_deleting_removes_the_object_and_deleting_a_missing_one_is_fine(storage: Storage) -> None:
    storage.write_bytes("d/x", b"1")
    storage.delete("d/x")
    storage.delete("d/x")
    assert storage.stat("d/x") is None


def test_fetch_file_replaces_the_destination_with_the_object_and_leaves_no_temp_file(
    storage: Storage, tmp_path: Path
) -> None:
    storage.write_bytes("ds/images/1.jpg", b"new content")
    dest = tmp_path / "cache" / "images" / "1.jpg"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stale")
    for bulk in (False, True):
        storage.fetch_file("ds/images/1.jpg", dest, bulk=bulk)
        assert dest.read_bytes() == b"new content"
        assert [p.name for p in dest.parent.iterdir()] == ["1.jpg"]


def test_fetch_file_of_a_missing_object_is_object_not_found_and_keeps_the_old_file(
    storage: Storage, tmp_path: Path
) -> None:
    dest = tmp_path / "kept.bin"
    dest.write_bytes(b"old")
    with pytest.raises(ObjectNotFound, match=r"ds/gone\.bin"):
        storage.fetch_file("ds/gone.bin", dest, bulk=True)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.bin"]


# --- listing and prefixes ------------------------------------------------------------


def test_a_prefix_is_a_folder_with_or_without_its_trailing_slash(storage: Storage) -> None:
    for key in ("a/b/1.txt", "a/b/c/2.txt", "a/bc/3.txt", "z.txt"):
        storage.write_bytes(key, key.encode())
    expected = ["a/b/1.txt", "a/b/c/2.txt"]
    assert [o.key for o in storage.list("a/b")] == expected
    assert [o.key for o in storage.list("a/b/")] == expected
    assert [o.key for o in storage.list("")] == ["a/b/1.txt", "a/b/c/2.txt", "a/bc/3.txt", "z.txt"]
    assert storage.list("nothing/here") == []
    assert [o.size for o in storage.list("a/bc")] == [len("a/bc/3.txt")]


def test_a_directory_uploaded_as_a_prefix_downloads_to_the_same_tree(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "export"
    (src / "sub" / "deeper").mkdir(parents=True)
    files = {"model.xml": b"<xml/>", "model.bin": os.urandom(3000), "sub/deeper/meta.yaml": b"a: 1"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    infos = storage.upload_dir(src, "exports/openvino")
    assert sorted(i.key for i in infos) == sorted(f"exports/openvino/{rel}" for rel in files)
    dest = tmp_path / "back"
    paths = storage.download_prefix("exports/openvino/", dest)
    assert sorted(paths) == sorted((dest / rel).resolve() for rel in files)
    assert tree(dest) == files


def test_downloading_an_empty_prefix_is_object_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="no objects under prefix"):
        storage.download_prefix("empty/prefix", tmp_path / "out")


def test_delete_prefix_removes_that_folder_only(storage: Storage) -> None:
    for key in ("p/q/1", "p/q/r/2", "p/qq/3"):
        storage.write_bytes(key, b"x")
    storage.delete_prefix("p/q")
    assert [o.key for o in storage.list("p")] == ["p/qq/3"]
    storage.delete_prefix("p/q")  # already gone: fine


# --- large files ---------------------------------------------------------------------


def test_a_12_mb_file_goes_up_in_parts_and_comes_back_intact(storage: Storage, tmp_path: Path) -> None:
    data = os.urandom(12 * MiB)
    src = tmp_path / "big.pt"
    src.write_bytes(data)
    info = storage.upload_file(src, "models/big.pt")
    assert info.size == len(data)
    if isinstance(storage, S3Storage):
        assert info.etag.endswith("-2")  # two 8 MiB parts: a multipart upload
    dest = tmp_path / "big-back.pt"
    storage.download_file("models/big.pt", dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    storage.write_bytes("models/big2.pt", data)
    assert storage.read_bytes("models/big2.pt") == data


# --- configuration -------------------------------------------------------------------


def test_open_storage_picks_the_backend_from_settings(s3_env: dict[str, str], s3_bucket: str, tmp_path: Path) -> None:
    local = open_storage(Settings(storage_backend="local", storage_dir=tmp_path / "data"))
    assert isinstance(local, LocalStorage)
    assert local.describe() == f"local:{tmp_path / 'data'}"
    s3 = open_storage(Settings(storage_backend="s3", s3_bucket=s3_bucket))
    assert isinstance(s3, S3Storage)
    assert s3.describe() == f"s3://{s3_bucket} at {s3_env['AWS_ENDPOINT_URL']}"
    s3.write_bytes("hello.txt", b"from the standard AWS variables")
    assert s3.read_bytes("hello.txt") == b"from the standard AWS variables"
