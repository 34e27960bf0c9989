"""Storage keys: unsafe keys are refused before any I/O, and no download escapes its folder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from ai_service.errors import UnsafeKey
from ai_service.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    sync_prefix,
    validate_key,
)
from tests.support.storage import tree

UNSAFE = {
    "dotdot": "datasets/../../etc/passwd",
    "leading-dotdot": "../x",
    "absolute": "/abs/key",
    "backslash": "datasets\\x",
    "nul": "datasets/x\x00.txt",
    "newline": "datasets/x\ny.txt",
    "empty-segment": "a//b",
    "dot-segment": "a/./b",
    "too-long": "k" * 1025,
}


class _NoIO:
    """An S3 client stand-in that fails the test on any use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"storage I/O attempted ({name}) before the key was checked")


def _every_method(store: Storage, key: str, tmp: Path) -> list[Callable[[], object]]:
    src = tmp / "src.bin"
    src.write_bytes(b"x")
    (tmp / "dir").mkdir(exist_ok=True)
    (tmp / "dir" / "f").write_bytes(b"f")
    return [
        lambda: store.stat(key),
        lambda: store.list(key),
        lambda: store.read_bytes(key),
        lambda: store.write_bytes(key, b"data"),
        lambda: store.read_versioned(key),
        lambda: store.create_exclusive(key, b"data"),
        lambda: store.replace_if_match(key, b"data", "etag"),
        lambda: store.download_file(key, tmp / "out"),
        lambda: store.fetch_file(key, tmp / "out", bulk=True),
        lambda: store.upload_file(src, key),
        lambda: store.upload_dir(tmp / "dir", key),
        lambda: store.download_prefix(key, tmp / "outdir"),
        lambda: store.delete(key),
        lambda: store.delete_prefix(key),
        lambda: sync_prefix(store, key, tmp / "cache"),
    ]


@pytest.mark.parametrize("key", list(UNSAFE.values()), ids=list(UNSAFE))
def test_an_unsafe_key_is_refused_by_every_method_before_any_io(key: str, tmp_path: Path) -> None:
    local_root = tmp_path / "never-created"
    for store in (LocalStorage(local_root), S3Storage("bucket", client=cast(Any, _NoIO()))):
        for call in _every_method(store, key, tmp_path):
            with pytest.raises(UnsafeKey):
                call()
    assert not local_root.exists()
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("a/../b", "'..' segment"),
        ("/abs", "leading '/'"),
        ("a\nb", "control"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a//b", "empty segment"),
        ("k" * 1025, "1024"),
        ("", "empty"),
    ],
)
def test_the_refusal_names_the_problem(key: str, problem: str) -> None:
    with pytest.raises(UnsafeKey, match=problem) as caught:
        validate_key(key)
    assert caught.value.error_code == "invalid_request"


def test_a_key_with_dotdot_is_refused_before_any_io() -> None:
    with pytest.raises(UnsafeKey, match=r"'\.\.' segment"):
        S3Storage("bucket", client=cast(Any, _NoIO())).read_bytes("models/../secrets.pt")


def test_ordinary_keys_and_folder_prefixes_are_accepted() -> None:
    for key in ("datasets/my-dataset/", "models/yolov8n/my-dataset.pt", "a..b/c", "x", "k" * 1024):
        assert validate_key(key) == key
    assert validate_key("", allow_empty=True) == ""


def test_an_object_key_may_not_name_a_folder() -> None:
    with pytest.raises(UnsafeKey, match="folder"):
        LocalStorage(Path("/nonexistent")).read_bytes("models/")


# --- hostile listings and planted symlinks -------------------------------------------


class _HostileListing:
    """A minimal S3 client whose listing returns keys that try to climb out."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.downloaded: list[str] = []

    def get_paginator(self, name: str) -> _HostileListing:
        assert name == "list_objects_v2"
        return self

    def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:  # boto3's names
        yield {"Contents": [{"Key": k, "Size": 4, "ETag": '"e"'} for k in self.keys if k.startswith(Prefix)]}

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # boto3's names
        self.downloaded.append(Key)
        return {"Body": _Body(b"data")}


class _Body:
    """A GetObject body: what the S3 backend reads of a streamed download."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_chunks(self, size: int) -> Iterator[bytes]:
        yield self.data

    def close(self) -> None:
        pass


def test_a_listed_s3_key_with_dotdot_cannot_escape_the_target_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SeaweedFS refuses to store such keys (InvalidRequest), but other servers or a
    # compromised bucket might list them; hence a fake listing.
    client = _HostileListing(["ds/ok.txt", "ds/../escape.txt", "ds/a/../../../up.txt", "ds/sub/../x.txt"])
    store = S3Storage("bucket", client=cast(Any, client))
    dest = tmp_path / "inside" / "dest"
    with caplog.at_level(logging.WARNING, logger="ai_service.storage"):
        paths = store.download_prefix("ds", dest)
        synced = sync_prefix(store, "ds", tmp_path / "cache")
    assert paths == [(dest / "ok.txt").resolve()]
    assert client.downloaded == ["ds/ok.txt", "ds/ok.txt"]
    name = synced.name
    assert set(tree(tmp_path)) == {
        "inside/dest/ok.txt", f"cache/{name}/ok.txt", f"cache/{name}.manifest.json", f"cache/{name}.lock"
    }
    assert "'..' segment" in caplog.text


def test_a_symlink_in_the_target_dir_cannot_redirect_a_download_outside(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    store.write_bytes("ds/evil/x.txt", b"x")
    store.write_bytes("ds/ok.txt", b"ok")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "evil").symlink_to(outside)
    assert store.download_prefix("ds", dest) == [(dest / "ok.txt").resolve()]
    assert list(outside.iterdir()) == []
