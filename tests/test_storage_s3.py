"""The S3 backend against a real SeaweedFS: folder markers, errors at the boundary, client setup.

Configured through the standard AWS environment variables only, as a worker would be.
"""

from __future__ import annotations

import base64
import calendar
import http.client
import logging
import socket
import time
import zlib
from pathlib import Path
from typing import Any, cast
from urllib.parse import SplitResult, parse_qsl, urlsplit

import boto3
import pytest

from ai_service.errors import ObjectNotFound, StorageError
from ai_service.storage import (
    S3Storage,
    direct,
    make_s3_client,
    sigv4,
    sync_prefix,
    sync_prefix_report,
)
from tests.support.s3 import S3Server
from tests.support.storage import tree


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
    assert exc.__cause__ is None
    assert exc.__suppress_context__
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
    with s3_server.paused(), pytest.raises(StorageError, match="did not answer") as caught:
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


# --- the direct GETs of bulk downloads -----------------------------------------------


class _CountingClient:
    """A real client that counts GetObject calls and can point its presigned URLs elsewhere.

    ``presigned`` names each presigned GetObject by its key and each listing page as
    ``list:<prefix>``; ``presign_port`` redirects the operations in ``redirect``.
    """

    def __init__(
        self, client: Any, *, presign_port: int | None = None,
        redirect: tuple[str, ...] = ("get_object", "list_objects_v2"),
    ) -> None:
        self._client = client
        self._presign_port = presign_port
        self._redirect = redirect
        self.meta = client.meta
        self.presigned: list[str] = []
        self.get_objects = 0
        self.paginators = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **kw: Any) -> Any:
        self.get_objects += 1
        return self._client.get_object(**kw)

    def get_paginator(self, name: str) -> Any:
        self.paginators += 1
        return self._client.get_paginator(name)

    def generate_presigned_url(self, operation: str, **kw: Any) -> str:
        params = kw["Params"]
        self.presigned.append(params["Key"] if "Key" in params else f"list:{params['Prefix']}")
        url = str(self._client.generate_presigned_url(operation, **kw))
        if self._presign_port is None or operation not in self._redirect:
            return url
        return url.replace(f":{urlsplit(url).port}/", f":{self._presign_port}/", 1)


def test_bulk_downloads_go_direct_and_a_missing_object_is_still_object_not_found(
    s3_env: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    client = _CountingClient(make_s3_client(max_attempts=1))
    store = S3Storage(s3_bucket, client=cast(Any, client))
    odd = "ds/a b/é+%20?.bin"  # quoted into the URL by botocore, sent as it is
    store.write_bytes(odd, b"a" * 3000)
    store.write_bytes("ds/b.bin", b"b")
    store.fetch_file(odd, tmp_path / "a.bin", bulk=True)
    with pytest.raises(ObjectNotFound, match=r"ds/gone\.bin"):
        store.fetch_file("ds/gone.bin", tmp_path / "gone.bin", bulk=True)
    store.fetch_file("ds/b.bin", tmp_path / "b.bin", bulk=True)  # a 404 does not turn it off
    assert (tmp_path / "a.bin").read_bytes() == b"a" * 3000
    assert (tmp_path / "b.bin").read_bytes() == b"b"
    assert not (tmp_path / "gone.bin").exists()
    assert client.presigned == ["probe", odd, "ds/gone.bin", "ds/b.bin"]  # probe: is it SigV4?
    assert client.get_objects == 1  # only to say "no such key"


def test_a_failed_direct_get_falls_back_to_get_object_and_rests(
    s3_env: dict[str, str], s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _CountingClient(make_s3_client(max_attempts=1), presign_port=_closed_port())
    store = S3Storage(s3_bucket, client=cast(Any, client))
    store.write_bytes("ds/a.bin", b"a")
    store.write_bytes("ds/b.bin", b"b")
    with caplog.at_level(logging.WARNING, logger="ai_service.storage"):
        store.fetch_file("ds/a.bin", tmp_path / "a.bin", bulk=True)
        store.fetch_file("ds/b.bin", tmp_path / "b.bin", bulk=True)
    assert (tmp_path / "a.bin").read_bytes() == b"a"
    assert (tmp_path / "b.bin").read_bytes() == b"b"
    assert client.presigned == ["probe", "ds/a.bin"]  # the second download did not try again
    assert client.get_objects == 2
    assert "direct GETs" in caplog.text
    assert "rest" in caplog.text
    assert "X-Amz-Signature" not in caplog.text


def test_direct_gets_are_not_used_behind_a_proxy_or_without_sigv4(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert direct.usable(make_s3_client(), "b")
    assert not direct.usable(boto3.session.Session().client("s3"), "b")  # presigns with SigV2
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert not direct.usable(make_s3_client(), "b")


def test_bytes_that_do_not_match_the_announced_checksum_are_refused() -> None:
    headers = http.client.HTTPMessage()
    headers["x-amz-checksum-crc32"] = base64.b64encode(zlib.crc32(b"abc").to_bytes(4, "big")).decode()
    good, bad = direct.Digest(headers), direct.Digest(headers)
    good.update(b"abc")
    good.check()
    bad.update(b"abd")
    with pytest.raises(direct.DirectGetFailed, match="checksum"):
        bad.check()


# --- prefix syncs: one listing, all objects from one thread ----------------------------


def _files() -> dict[str, bytes]:
    big = bytes(range(256)) * (10 * 1024 + 7)  # 2.5 MiB: several reads, one checksum
    many = {f"ds/many/{i:02d}.txt": str(i).encode() * i for i in range(1, 25)}
    return {"ds/a b/é+%20?.bin": b"a" * 3000, "ds/plus+sign.txt": b"p", "ds/big.bin": big, **many}


def test_an_object_whose_size_changed_since_the_listing_is_fetched_through_get_object_whole(
    s3_env: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    client = _CountingClient(make_s3_client(max_attempts=1))
    store = S3Storage(s3_bucket, client=cast(Any, client))
    for n in "abc":
        store.write_bytes(f"ds/{n}.bin", n.encode() * 100)
    listed = [store.stat(f"ds/{n}.bin") for n in "abc"]
    store.write_bytes("ds/b.bin", b"grown since the listing" * 1000)  # rewritten after it was listed
    got: list[str] = []
    assert all(listed)
    store.fetch_files([(info, tmp_path / info.key) for info in listed if info], lambda info: got.append(info.key))
    assert (tmp_path / "ds/b.bin").read_bytes() == b"grown since the listing" * 1000  # never a cut-off body
    assert (tmp_path / "ds/a.bin").read_bytes() == b"a" * 100
    assert sorted(got) == ["ds/a.bin", "ds/b.bin", "ds/c.bin"]
    assert client.presigned.count("ds/b.bin") == 1  # fetched again on its own: the bulk GET refused its size
    assert client.presigned.count("ds/a.bin") == 0  # the others stayed on the bulk path (its own signer)


def test_a_sync_lists_and_downloads_directly_and_odd_keys_arrive_intact(
    s3_env: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    client = _CountingClient(make_s3_client(max_attempts=1))
    store = S3Storage(s3_bucket, client=cast(Any, client))
    files = _files()
    for key, data in files.items():
        store.write_bytes(key, data)
    report = sync_prefix_report(store, "ds", tmp_path / "cache")
    assert tree(report.path) == {key.removeprefix("ds/"): data for key, data in files.items()}
    assert (report.objects, report.downloaded) == (len(files), len(files))
    assert client.presigned.count("list:ds/") == 1
    assert (client.paginators, client.get_objects) == (0, 0)  # neither botocore's listing nor GetObject
    assert not set(files) & set(client.presigned)  # each GET signed by sigv4.Signer, not botocore


def test_the_signer_is_used_only_where_it_reproduces_botocores_url(s3_env: dict[str, str]) -> None:
    client = make_s3_client()

    def botocore(key: str) -> SplitResult:
        return urlsplit(client.generate_presigned_url(
            "get_object", Params={"Bucket": "b", "Key": key, "ChecksumMode": "ENABLED"}, ExpiresIn=300))

    signer = sigv4.Signer.checked(client, botocore)
    assert signer is not None
    reference = botocore("ds/x y/ü+%.png")
    stamp = dict(parse_qsl(reference.query))["X-Amz-Date"]
    ours = signer.url("ds/x y/ü+%.png", calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ")))
    assert ours.geturl() == reference.geturl()

    def quoted_otherwise(key: str) -> SplitResult:
        url = botocore(key)
        return url._replace(path=url.path.replace("~", "%7E"))

    assert sigv4.Signer.checked(client, quoted_otherwise) is None
    assert sigv4.Signer.checked(object(), botocore) is None  # no credentials to sign with


def test_a_sync_whose_direct_gets_fail_arrives_through_get_object_and_logs_no_signed_url(
    s3_env: dict[str, str], s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _CountingClient(make_s3_client(max_attempts=1), presign_port=_closed_port(), redirect=("get_object",))
    store = S3Storage(s3_bucket, client=cast(Any, client))
    files = _files()
    for key, data in files.items():
        store.write_bytes(key, data)
    with caplog.at_level(logging.WARNING, logger="ai_service.storage"):
        report = sync_prefix_report(store, "ds", tmp_path / "cache")
    assert tree(report.path) == {key.removeprefix("ds/"): data for key, data in files.items()}
    assert client.get_objects >= len(files) - 8  # at most one failed try per connection, then GetObject
    assert "rest" in caplog.text
    assert "X-Amz-Signature" not in caplog.text
    assert "testsecret" not in caplog.text


def test_a_listing_that_the_direct_path_cannot_read_is_listed_by_the_paginator(
    s3_env: dict[str, str], s3_bucket: str
) -> None:
    client = _CountingClient(make_s3_client(max_attempts=1), presign_port=_closed_port(), redirect=("list_objects_v2",))
    store = S3Storage(s3_bucket, client=cast(Any, client))
    store.write_bytes("ds/x+y z.txt", b"1")
    assert [info.key for info in store.list("ds")] == ["ds/x+y z.txt"]
    assert client.paginators == 1


_PAGE = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{encoding}<IsTruncated>{truncated}</IsTruncated>'
    "{token}<Contents><Key>{key}</Key><ETag>&#34;abc&#34;</ETag><Size>3</Size></Contents></ListBucketResult>"
)


def test_a_listing_page_decodes_keys_only_when_it_says_they_are_url_encoded() -> None:
    out: list[dict[str, Any]] = []
    encoded = _PAGE.format(encoding="<EncodingType>url</EncodingType>", truncated="true",
                           token="<NextContinuationToken>t1</NextContinuationToken>", key="a+b%2Bc")
    assert direct.parse_listing(encoded.encode(), out) == "t1"
    plain = _PAGE.format(encoding="", truncated="false", token="", key="a+b%2Bc")
    assert direct.parse_listing(plain.encode(), out) is None
    assert out == [{"Key": "a b+c", "Size": 3, "ETag": '"abc"'}, {"Key": "a+b%2Bc", "Size": 3, "ETag": '"abc"'}]


@pytest.mark.parametrize("body", [
    b"<ListBucketResult><Contents><Key>a",  # cut short
    b"<Error><Code>AccessDenied</Code></Error>",
    _PAGE.format(encoding="", truncated="true", token="", key="a").encode(),  # truncated, no token
    _PAGE.format(encoding="", truncated="false", token="", key="a").replace("<Size>3", "<Size>x").encode(),
])
def test_a_listing_page_that_is_not_a_sound_listing_is_refused(body: bytes) -> None:
    with pytest.raises(direct.DirectGetFailed):
        direct.parse_listing(body, [])
