"""Storage: both backends behave the same, keys are checked, errors are mapped.

The S3 cases run against a real SeaweedFS (tests/support/s3.py), configured through the
standard AWS environment variables only, as a worker would be.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from ai_service.config import Settings
from ai_service.errors import ObjectNotFound, StorageError, UnsafeKey
from ai_service.storage import (
    LocalStorage,
    ObjectInfo,
    S3Storage,
    Storage,
    cache_dir_name,
    make_s3_client,
    open_storage,
    sync_prefix,
    sync_prefix_report,
    validate_key,
)
from tests.support.s3 import S3Server

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, client=make_s3_client(connect_timeout=2, read_timeout=10, max_attempts=2))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- round trips ---------------------------------------------------------------------------


def test_bytes_written_are_read_back_and_stat_reports_their_size(storage: Storage) -> None:
    storage.write_bytes("models/m/best.pt", b"weights")
    assert storage.read_bytes("models/m/best.pt") == b"weights"
    info = storage.stat("models/m/best.pt")
    assert info is not None and info.key == "models/m/best.pt" and info.size == 7 and info.etag


def test_overwriting_an_object_changes_its_etag(storage: Storage) -> None:
    storage.write_bytes("k/x.bin", b"aaaa")
    first = storage.stat("k/x.bin")
    storage.write_bytes("k/x.bin", b"bbbb")
    second = storage.stat("k/x.bin")
    assert first is not None and second is not None
    assert first.etag != second.etag and storage.read_bytes("k/x.bin") == b"bbbb"


def test_a_missing_key_stats_as_none_and_reading_it_is_object_not_found_naming_it(storage: Storage) -> None:
    assert storage.stat("nope/missing.pt") is None
    with pytest.raises(ObjectNotFound, match="nope/missing.pt"):
        storage.read_bytes("nope/missing.pt")
    with pytest.raises(ObjectNotFound, match="nope/missing.pt"):
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


# --- listing and prefixes ------------------------------------------------------------------


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
    assert _tree(dest) == files


def test_downloading_an_empty_prefix_is_object_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="no objects under prefix"):
        storage.download_prefix("empty/prefix", tmp_path / "out")


def test_delete_prefix_removes_that_folder_only(storage: Storage) -> None:
    for key in ("p/q/1", "p/q/r/2", "p/qq/3"):
        storage.write_bytes(key, b"x")
    storage.delete_prefix("p/q")
    assert [o.key for o in storage.list("p")] == ["p/qq/3"]
    storage.delete_prefix("p/q")  # already gone: fine


def test_a_local_half_written_temp_file_is_not_listed(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.write_bytes("ds/a.txt", b"a")
    (tmp_path / "ds" / ".b.txt.ais-tmp-123456").write_bytes(b"partial")
    assert [o.key for o in store.list("ds")] == ["ds/a.txt"]


def test_an_s3_folder_marker_object_is_not_listed(s3_env: dict[str, str], s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="ds/images/", Body=b"")
    s3_server.client().put_object(Bucket=s3_bucket, Key="ds/images/1.jpg", Body=b"jpg")
    assert [o.key for o in S3Storage(s3_bucket).list("ds")] == ["ds/images/1.jpg"]


# --- unsafe keys ---------------------------------------------------------------------------

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
        lambda: store.download_file(key, tmp / "out"),
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
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


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


class _HostileListing:
    """A minimal S3 client whose listing returns keys that try to climb out."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.downloaded: list[str] = []

    def get_paginator(self, name: str) -> _HostileListing:
        assert name == "list_objects_v2"
        return self

    def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:  # noqa: N803 - boto3's names
        yield {"Contents": [{"Key": k, "Size": 4, "ETag": '"e"'} for k in self.keys if k.startswith(Prefix)]}

    def download_file(self, bucket: str, key: str, filename: str, Config: object = None) -> None:  # noqa: N803
        self.downloaded.append(key)
        Path(filename).write_bytes(b"data")


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
    assert set(_tree(tmp_path)) == {
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


# --- the dataset cache ---------------------------------------------------------------------


def _dataset(storage: Storage) -> None:
    storage.write_bytes("datasets/d1/data.yaml", b"names: [car]\n")
    storage.write_bytes("datasets/d1/images/train/1.jpg", b"jpeg-1")
    storage.write_bytes("datasets/d1/labels/train/1.txt", b"0 0.5 0.5 0.1 0.1\n")
    storage.write_bytes("datasets/d1x/other.txt", b"not mine")


def test_a_second_sync_of_an_unchanged_prefix_downloads_nothing(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    first = sync_prefix_report(storage, "datasets/d1/", tmp_path / "cache")
    assert (first.objects, first.downloaded, first.removed) == (3, 3, 0)
    assert _tree(first.path) == {
        "data.yaml": b"names: [car]\n",
        "images/train/1.jpg": b"jpeg-1",
        "labels/train/1.txt": b"0 0.5 0.5 0.1 0.1\n",
    }
    (first.path / "labels" / "train.cache").write_bytes(b"ultralytics")  # consumer's own file
    second = sync_prefix_report(storage, "datasets/d1", tmp_path / "cache")
    assert second.path == first.path
    assert (second.downloaded, second.removed, second.bytes_downloaded) == (0, 0, 0)
    assert (first.path / "labels" / "train.cache").exists()


def test_a_changed_object_is_fetched_again_and_a_removed_one_is_removed(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    cache = tmp_path / "cache"
    path = sync_prefix(storage, "datasets/d1", cache)
    storage.write_bytes("datasets/d1/images/train/1.jpg", b"JPEG-1")  # same size, new content
    storage.delete("datasets/d1/labels/train/1.txt")
    storage.write_bytes("datasets/d1/images/train/2.jpg", b"jpeg-2")
    report = sync_prefix_report(storage, "datasets/d1", cache)
    assert (report.downloaded, report.removed) == (2, 1)
    assert _tree(path) == {"data.yaml": b"names: [car]\n", "images/train/1.jpg": b"JPEG-1",
                           "images/train/2.jpg": b"jpeg-2"}
    assert not (path / "labels").exists()  # emptied folders go too


def test_a_cached_file_lost_locally_is_fetched_again(storage: Storage, tmp_path: Path) -> None:
    _dataset(storage)
    path = sync_prefix(storage, "datasets/d1", tmp_path / "cache")
    (path / "data.yaml").unlink()
    report = sync_prefix_report(storage, "datasets/d1", tmp_path / "cache")
    assert report.downloaded == 1 and (path / "data.yaml").read_bytes() == b"names: [car]\n"


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
    assert len(path.name) == 64 and int(path.name, 16) >= 0
    assert (tmp_path / "cache" / f"{path.name}.manifest.json").is_file()
    assert cache_dir_name(LocalStorage(tmp_path / "other"), "ds") != path.name


# --- large files ---------------------------------------------------------------------------


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


# --- errors at the boundary ----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _assert_clean(exc: BaseException, *secrets: str) -> None:
    assert exc.__cause__ is None and exc.__suppress_context__
    for secret in secrets:
        assert secret not in str(exc)


def test_an_unreachable_s3_endpoint_is_a_storage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    store = S3Storage("bucket", client=make_s3_client(connect_timeout=1, max_attempts=1))
    for call in (lambda: store.stat("a/b"), lambda: store.list("a"), lambda: store.read_bytes("a/b"),
                 lambda: sync_prefix(store, "a", tmp_path / "cache")):
        with pytest.raises(StorageError, match="cannot connect") as caught:
            call()
        assert caught.value.error_code == "storage_error"
        _assert_clean(caught.value, "very-secret-value")


def test_an_s3_server_that_stops_answering_is_a_storage_error(
    s3_env: dict[str, str], s3_server: S3Server, s3_bucket: str
) -> None:
    store = S3Storage(s3_bucket, client=make_s3_client(connect_timeout=1, read_timeout=1, max_attempts=1))
    store.write_bytes("x/y", b"1")
    with s3_server.paused():
        with pytest.raises(StorageError, match="did not answer") as caught:
            store.read_bytes("x/y")
    _assert_clean(caught.value, s3_server.secret_key)
    assert store.read_bytes("x/y") == b"1"  # and it recovers


def test_wrong_credentials_are_a_storage_error_without_the_secret(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_bucket: str
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    store = S3Storage(s3_bucket, client=make_s3_client(max_attempts=1))
    with pytest.raises(StorageError) as caught:
        store.list("a")
    assert "HTTP 403" in str(caught.value)
    _assert_clean(caught.value, "wrong-secret-value")


def test_a_missing_bucket_is_object_not_found_naming_the_bucket(s3_env: dict[str, str], tmp_path: Path) -> None:
    store = S3Storage("no-such-bucket-here", client=make_s3_client(max_attempts=1))
    with pytest.raises(ObjectNotFound, match="no-such-bucket-here"):
        store.list("a")
    with pytest.raises(ObjectNotFound) as caught:
        sync_prefix(store, "datasets/d1", tmp_path / "cache")
    assert caught.value.error_code == "dataset_not_found"


def test_local_permission_problems_are_storage_errors(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "store"
        blocker.write_bytes(b"a file where the root folder should be")
        with pytest.raises(StorageError):
            LocalStorage(blocker).write_bytes("a/b", b"x")
        return
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(StorageError):
            LocalStorage(root).write_bytes("a/b", b"x")
    finally:
        root.chmod(0o700)


# --- configuration -------------------------------------------------------------------------


def test_open_storage_picks_the_backend_from_settings(s3_env: dict[str, str], s3_bucket: str, tmp_path: Path) -> None:
    local = open_storage(Settings(storage_backend="local", storage_dir=tmp_path / "data"))
    assert isinstance(local, LocalStorage) and local.describe() == f"local:{tmp_path / 'data'}"
    s3 = open_storage(Settings(storage_backend="s3", s3_bucket=s3_bucket))
    assert isinstance(s3, S3Storage)
    assert s3.describe() == f"s3://{s3_bucket} at {s3_env['AWS_ENDPOINT_URL']}"
    s3.write_bytes("hello.txt", b"from the standard AWS variables")
    assert s3.read_bytes("hello.txt") == b"from the standard AWS variables"


def test_a_configured_endpoint_gets_path_style_addressing_and_region_us_east_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://seaweedfs.internal:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    client = make_s3_client()
    assert client.meta.region_name == "us-east-1"
    url = client.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "a/b.pt"})
    assert url.startswith("http://seaweedfs.internal:8333/bkt/a/b.pt?")
    assert S3Storage("bkt", client=client).describe() == "s3://bkt at http://seaweedfs.internal:8333"
