"""S3 configured by the environment alone: listings signed without botocore, and botocore wherever that is unsure.

The signer must make botocore's URLs byte for byte; a fresh process's no-op sync must not
import botocore, unless a profile or config file could change what botocore does; and a
fast listing that fails in any way must leave the answer to botocore's paginator, with
the error mapping and the key checks as before.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from ai_service.errors import StorageError
from ai_service.storage import S3Storage, make_s3_client, sigv4
from ai_service.storage.base import ObjectInfo
from ai_service.storage.direct import DirectGets
from ai_service.storage.env_config import EnvS3Config, from_environment
from ai_service.storage.s3_client import plain_etag
from tests.support.s3 import S3Server

REPO = Path(__file__).resolve().parents[1]
#: One of each character botocore quotes in its own way, and all of them at once.
ODD = [" ", "é", "+", "%20", "?", "~", "=", "&", ";", " é+%20?~=&;"]


def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> None:
    """Only ``env`` of the AWS variables, no proxy, and no shared config or credentials file."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _env_config() -> EnvS3Config:
    config = from_environment()
    assert config is not None
    return config


@pytest.fixture
def env_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The SeaweedFS server's AWS variables and nothing else that botocore reads."""
    env = s3_server.env()
    _clean(monkeypatch, tmp_path, env)
    return env


# --- the signer against botocore -------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "region", "token", "bucket"), [
    ("http://127.0.0.1:8333", None, None, "bkt"),
    ("http://seaweedfs.internal:8333/", "eu-west-3", "session/token+with=odd&chars", "bkt"),
    ("https://s3.example.com", "garage", None, "data.sets-01"),
])
def test_urls_signed_from_the_environment_are_botocores_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str, region: str | None, token: str | None,
    bucket: str,
) -> None:
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t/+key"}
    if region is not None:
        env["AWS_DEFAULT_REGION"] = region
    if token is not None:
        env["AWS_SESSION_TOKEN"] = token
    _clean(monkeypatch, tmp_path, env)
    client = make_s3_client()
    urls = _env_config().urls(bucket)
    assert urls is not None

    def at(reference: str) -> float:
        return sigv4.stamp_time(dict(parse_qsl(urlsplit(reference).query))["X-Amz-Date"])

    for odd in ODD:
        key = f"ds/x{odd}y.bin"
        reference = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}, ExpiresIn=300)
        assert urls.get_object(key, now=at(reference)).geturl() == reference
        for prefix, continuation, size in ((f"ds/x{odd}y/", None, None), (f"ds/{odd}", f"t{odd}", 2), ("", None, 7)):
            reference = client.generate_presigned_url(
                "list_objects_v2", Params={"Bucket": bucket, **sigv4.list_params(prefix, continuation, size)},
                ExpiresIn=300)
            assert urls.list_objects_v2(prefix, continuation, size, now=at(reference)).geturl() == reference


def test_the_service_endpoint_variable_wins_over_the_global_one_as_in_botocore(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean(monkeypatch, tmp_path, {"AWS_ENDPOINT_URL": "http://global.internal:1", "AWS_ENDPOINT_URL_S3":
                                   "http://s3.internal:2", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
                                   "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "false"})
    assert _env_config().endpoint_url == "http://s3.internal:2"
    assert make_s3_client().meta.endpoint_url == "http://s3.internal:2"
    assert S3Storage("bkt").describe() == S3Storage("bkt", client=make_s3_client()).describe()


_PLAIN = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}


@pytest.mark.parametrize("change", [
    {"AWS_PROFILE": "ci"},
    {"AWS_DEFAULT_PROFILE": "ci"},
    {"AWS_SECURITY_TOKEN": "older-name-of-the-token"},  # botocore reads it before AWS_SESSION_TOKEN
    {"AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z"},
    {"AWS_USE_FIPS_ENDPOINT": "true"},
    {"AWS_DATA_PATH": "/models"},
    {"AWS_S3_US_EAST_1_REGIONAL_ENDPOINT": "regional"},
    {"BOTOCORE_EXPERIMENTAL__PLUGINS": "x=y"},
    {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"},
    {"AWS_ENDPOINT_URL": ""},
    {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333/s3"},  # a path before the bucket
    {"AWS_ENDPOINT_URL": "http://user:pw@127.0.0.1:8333"},
    {"AWS_ENDPOINT_URL": "http://127.0.0.1:80"},  # signed without the port, sent with it
    {"AWS_ENDPOINT_URL": "http://Seaweed.internal:8333"},
    {"AWS_ENDPOINT_URL": "https://s3-accelerate.amazonaws.com"},
    {"AWS_SECRET_ACCESS_KEY": ""},
    {"AWS_SESSION_TOKEN": ""},
    {"AWS_DEFAULT_REGION": "fips-us-east-1"},
    {"AWS_DEFAULT_REGION": "aws-global"},
    {"AWS_REGION": "eu-west-1"},  # botocore ignores it; whoever set it may not
    {"AWS_RETRY_MODE": "sometimes"},  # refused when the storage is made, as before
    {"AWS_MAX_ATTEMPTS": "many"},
])
def test_anything_else_that_could_change_botocores_answer_leaves_it_to_botocore(change: dict[str, str]) -> None:
    env = {**_PLAIN, "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/c"}
    assert from_environment(env) is not None
    assert from_environment({**env, **change}) is None


def test_a_shared_config_or_credentials_file_or_a_proxy_leaves_it_to_botocore(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean(monkeypatch, tmp_path, _PLAIN)
    assert from_environment() is not None
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        present = tmp_path / f"{name}.ini"
        present.write_text("[default]\n")
        assert from_environment({**os.environ, name: str(present)}) is None
    assert from_environment({**os.environ, "AWS_CONFIG_FILE": ""}) is None  # "": botocore looks in ~/.aws
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert from_environment() is None


def test_a_bucket_name_botocore_might_treat_otherwise_is_not_signed_here() -> None:
    config = EnvS3Config(endpoint_url="http://127.0.0.1:8333", region="us-east-1", access_key="a", secret_key="b")
    assert config.urls("datasets-01.eu") is not None
    for bucket in ("Upper", "under_score", "a..b", "arn:aws:s3:::x", "ab"):
        assert config.urls(bucket) is None


# --- against SeaweedFS -----------------------------------------------------------------


class _CountingUrls:
    """The environment's URLs, counting the listing pages asked for."""

    def __init__(self, urls: Any) -> None:
        self._urls = urls
        self.pages = 0

    def get_object(self, key: str) -> Any:
        return self._urls.get_object(key)

    def list_objects_v2(self, prefix: str, token: str | None = None, page_size: int | None = None) -> Any:
        self.pages += 1
        return self._urls.list_objects_v2(prefix, token, page_size)

    def bulk(self) -> Any:
        return self._urls.bulk()


def test_a_listing_signed_from_the_environment_matches_botocores_paginator_over_several_pages(
    env_s3: dict[str, str], s3_bucket: str
) -> None:
    client = make_s3_client(max_attempts=1)
    keys = [f"ds/x{odd}y.bin" for odd in ODD] + ["ds/sub/a.txt", "ds/sub/", "other/z.txt"]
    for n, key in enumerate(keys):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x" * n)
    expected = sorted(
        (ObjectInfo(str(o["Key"]), int(o["Size"]), plain_etag(o["ETag"]))
         for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="ds/")
         for o in page.get("Contents", [])),
        key=lambda info: info.key,
    )
    urls = _CountingUrls(_env_config().urls(s3_bucket))
    gets = DirectGets(urls, s3_bucket, connections=2, connect_timeout=5, read_timeout=10)
    listed = gets.list_objects("ds/", page_size=3)
    assert listed is not None
    assert urls.pages == 4  # 12 objects under ds/, 3 a page
    assert sorted((ObjectInfo(o["Key"], o["Size"], plain_etag(o["ETag"])) for o in listed),
                  key=lambda info: info.key) == expected
    store = S3Storage(s3_bucket)
    assert store.list("ds") == [info for info in expected if info.key != "ds/sub/"]  # the folder marker
    assert store.list("ds") == S3Storage(s3_bucket, client=client).list("ds")


def test_a_wrong_secret_fails_the_fast_listing_and_botocore_answers_with_the_same_error(
    env_s3: dict[str, str], s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    store = S3Storage(s3_bucket)
    with caplog.at_level(logging.WARNING, logger="ai_service.storage"), pytest.raises(StorageError) as fast:
        store.list("a")
    with pytest.raises(StorageError) as botocore_only:
        S3Storage(s3_bucket, client=make_s3_client(max_attempts=1)).list("a")
    assert str(fast.value) == str(botocore_only.value)
    assert "HTTP 403" in str(fast.value)
    assert "direct GETs" in caplog.text  # the fast listing was tried, failed, and rests
    assert fast.value.__cause__ is None
    assert fast.value.__suppress_context__
    for text in (str(fast.value), caplog.text):
        assert "wrong-secret-value" not in text
        assert "X-Amz-Signature" not in text


_SYNC = """
import json, sys
from pathlib import Path
from ai_service.storage import S3Storage, sync_prefix_report
report = sync_prefix_report(S3Storage(sys.argv[1]), "ds", Path(sys.argv[2]))
print(json.dumps({"objects": report.objects, "downloaded": report.downloaded, "botocore": "botocore" in sys.modules}))
"""


def _sync_in_a_fresh_process(bucket: str, cache: Path, **extra: str) -> dict[str, Any]:
    env = {**os.environ, **extra}
    out = subprocess.run([sys.executable, "-c", _SYNC, bucket, str(cache)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_fresh_process_syncs_a_dataset_without_importing_botocore(
    env_s3: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(max_attempts=1)
    for n in range(5):
        client.put_object(Bucket=s3_bucket, Key=f"ds/img {n}+é.png", Body=b"p" * (n + 1))
    cache = tmp_path / "cache"
    assert _sync_in_a_fresh_process(s3_bucket, cache) == {"objects": 5, "downloaded": 5, "botocore": False}
    assert _sync_in_a_fresh_process(s3_bucket, cache) == {"objects": 5, "downloaded": 0, "botocore": False}


@pytest.mark.parametrize("profile", [None, "ci"])
def test_a_config_file_or_a_profile_brings_botocore_back_to_the_same_cache(
    env_s3: dict[str, str], s3_bucket: str, tmp_path: Path, profile: str | None
) -> None:
    make_s3_client(max_attempts=1).put_object(Bucket=s3_bucket, Key="ds/a.txt", Body=b"a")
    cache = tmp_path / "cache"
    assert _sync_in_a_fresh_process(s3_bucket, cache) == {"objects": 1, "downloaded": 1, "botocore": False}
    config = tmp_path / "aws-config"
    config.write_text(f"[{'profile ' + profile if profile else 'default'}]\nregion = us-east-1\n")
    extra = {"AWS_CONFIG_FILE": str(config), **({"AWS_PROFILE": profile} if profile else {})}
    assert _sync_in_a_fresh_process(s3_bucket, cache, **extra) == {"objects": 1, "downloaded": 0, "botocore": True}


# --- a listing the fast path gets wrong: botocore's paginator answers ------------------


_LISTING = (
    '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    "<Name>bkt</Name><Prefix>ds/</Prefix><KeyCount>{n}</KeyCount><MaxKeys>1000</MaxKeys>"
    "<EncodingType>url</EncodingType><IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
)


def _listing(*keys: str) -> bytes:
    contents = "".join(f"<Contents><Key>{k}</Key><Size>1</Size><ETag>&quot;e&quot;</ETag>"
                       "<LastModified>2026-12-02T00:00:00.000Z</LastModified></Contents>" for k in keys)
    return _LISTING.format(n=len(keys), contents=contents).encode()


class _Lister(ThreadingHTTPServer):
    """Answers a presigned listing with ``fast`` and a header-signed one (botocore's) with ``signed``."""

    def __init__(self, fast: tuple[int, bytes], signed: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _ListerHandler)
        self.fast, self.signed = fast, signed
        self.seen: list[str] = []


class _ListerHandler(BaseHTTPRequestHandler):
    server: _Lister

    def do_GET(self) -> None:
        presigned = "X-Amz-Signature=" in self.path
        self.server.seen.append("presigned" if presigned else "botocore")
        status, body = self.server.fast if presigned else (200, self.server.signed)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads `seen`
        pass


@pytest.fixture
def lister(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Lister]:
    server = _Lister((200, _listing("ds/a.txt")), _listing("ds/a.txt"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _clean(monkeypatch, tmp_path, {**_PLAIN, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
                                   "AWS_MAX_ATTEMPTS": "1"})
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("fast", [
    (200, b"<ListBucketResult><Contents><Key>ds/a.txt"),  # cut short
    (200, _listing("ds/a.txt").replace(b"<Size>1", b"<Size>one")),
    (403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>"),
    (500, b""),
])
def test_a_fast_listing_that_fails_in_any_way_is_answered_by_botocores_paginator(
    lister: _Lister, fast: tuple[int, bytes]
) -> None:
    lister.fast = fast
    lister.signed = _listing("ds/a.txt", "ds/b%20c.txt")
    assert [info.key for info in S3Storage("bkt").list("ds")] == ["ds/a.txt", "ds/b c.txt"]
    assert lister.seen == ["presigned", "botocore"]


def test_an_unsafe_key_in_a_fast_listing_is_skipped_as_before(
    lister: _Lister, caplog: pytest.LogCaptureFixture
) -> None:
    lister.fast = (200, _listing("ds/ok.txt", "ds/../escape.txt", "ds/a/../../up.txt", "ds/sub/../x.txt"))
    with caplog.at_level(logging.WARNING, logger="ai_service.storage"):
        listed = S3Storage("bkt").list("ds")
    assert [info.key for info in listed] == ["ds/ok.txt"]
    assert lister.seen == ["presigned"]  # no fallback: the listing itself was sound
    assert "'..' segment" in caplog.text
