"""The S3 backend against a real SeaweedFS: folder markers, errors at the boundary, client setup.

Configured through the standard AWS environment variables only, as a worker would be.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ai_service.errors import ObjectNotFound, StorageError
from ai_service.storage import (
    S3Storage,
    make_s3_client,
    sync_prefix,
)
from tests.support.s3 import S3Server


def test_an_s3_folder_marker_object_is_not_listed(s3_env: dict[str, str], s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="ds/images/", Body=b"")
    s3_server.client().put_object(Bucket=s3_bucket, Key="ds/images/1.jpg", Body=b"jpg")
    assert [o.key for o in S3Storage(s3_bucket).list("ds")] == ["ds/images/1.jpg"]


# --- errors at the boundary ----------------------------------------------------------


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


# --- configuration -------------------------------------------------------------------


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
