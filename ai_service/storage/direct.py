"""Bulk downloads without botocore's per-request pipeline: presigned GETs over keep-alive.

A dataset sync fetches a thousand small objects.  Through ``get_object`` each costs
about 2 ms of CPU in botocore (events, endpoint rules, signing, header parsing), more
than the download itself; a presigned URL costs 0.2-0.3 ms to make and a plain
``http.client`` GET 0.3 ms.  The URLs come from a :class:`Presigner`: the shared botocore
client (:class:`ClientPresigner`: endpoint, addressing style, region and credentials are
exactly the client's), or, where the environment alone configures S3, the signer of
:mod:`~ai_service.storage.sigv4` (:mod:`~ai_service.storage.env_config`), which needs no
botocore at all.

This is only a fast path.  Any failure (a refused connection, a TLS setting it does
not know, a non-200 answer, a checksum that does not match) raises :class:`DirectGetFailed`
and the caller downloads the object again through ``get_object``, which has the
client's retries, TLS configuration and error mapping; after a failure other than a
missing object the fast path rests for :data:`REST_S`, so a store it cannot reach costs
one failed attempt, not one per object.  It is not used at all when a proxy is
configured or the client does not presign with SigV4.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import queue
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import SplitResult, unquote_plus, urlsplit
from xml.etree import ElementTree

from ai_service.errors import DirectGetFailed as DirectGetFailed  # defined in errors.py, importable from here as before
from ai_service.storage.keys import show
from ai_service.storage.sigv4 import CHECKSUM_MODE, URL_EXPIRES_S, Sign, Signer, list_params

#: Bytes read per write to the local file.
CHUNK = 1024 * 1024
#: After a failure, downloads go through ``get_object`` for this long.
REST_S = 300.0
#: Largest listing page accepted (1,000 keys of at most 1,024 bytes, URL-encoded, and their fields).
MAX_LISTING_PAGE = 16 * 1024 * 1024

log = logging.getLogger("ai_service.storage")

_T = TypeVar("_T")

Connection = http.client.HTTPConnection
#: What a keep-alive connection the server has closed meanwhile fails with.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Digest:
    """The checksum the server announced (``x-amz-checksum-*``), computed while writing.

    CRC32, SHA-1 and SHA-256 are checked; CRC32C and CRC64NVME have no stdlib
    implementation and are left to TCP and the length check, as ``aws s3 sync`` does.
    """

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.expected: str | None = None
        self._crc: int | None = None
        self._hash: Any = None
        if crc := headers.get("x-amz-checksum-crc32"):
            self.expected, self._crc = crc, 0
        elif sha := headers.get("x-amz-checksum-sha256"):
            self.expected, self._hash = sha, hashlib.sha256()
        elif sha := headers.get("x-amz-checksum-sha1"):
            self.expected, self._hash = sha, hashlib.sha1()  # S3's own checksum

    def update(self, data: bytes) -> None:
        if self._crc is not None:
            self._crc = zlib.crc32(data, self._crc)
        elif self._hash is not None:
            self._hash.update(data)

    def check(self) -> None:
        if self.expected is None:
            return
        if self._crc is not None:
            got = base64.b64encode(self._crc.to_bytes(4, "big")).decode()
        else:
            got = base64.b64encode(self._hash.digest()).decode()
        if got != self.expected:
            raise DirectGetFailed("the downloaded bytes do not match the object's checksum")


def parse_head(head: bytes) -> tuple[int, int | None, dict[str, str], bool]:
    """Status, Content-Length (None: none or chunked), lower-cased headers, and whether the server closes."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        version, code = lines[0].split(" ", 2)[:2]
        status = int(code)
    except (ValueError, IndexError):
        raise DirectGetFailed("malformed status line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length: int | None = None
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError):
            length = None
    if length is not None and length < 0:
        raise DirectGetFailed("malformed Content-Length")
    connection = headers.get("connection", "").lower()
    close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
    return status, length, headers, close


class Presigner(Protocol):
    """Who makes the fast path's URLs of one bucket."""

    def get_object(self, key: str) -> SplitResult:
        """A presigned GetObject URL of ``key`` with checksum mode on (:data:`CHECKSUM_MODE` signed)."""
        ...

    def list_objects_v2(self, prefix: str, token: str | None = None, page_size: int | None = None) -> SplitResult:
        """A presigned ListObjectsV2 page of ``prefix``, keys URL-encoded."""
        ...

    def bulk(self) -> Sign:
        """The cheapest signer of GetObject URLs, for a thousand at once."""
        ...


class ClientPresigner:
    """URLs presigned by a botocore client (``generate_presigned_url``)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    def get_object(self, key: str) -> SplitResult:
        return self._presign("get_object", {"Bucket": self._bucket, "Key": key, "ChecksumMode": "ENABLED"})

    def list_objects_v2(self, prefix: str, token: str | None = None, page_size: int | None = None) -> SplitResult:
        return self._presign("list_objects_v2", {"Bucket": self._bucket, **list_params(prefix, token, page_size)})

    def bulk(self) -> Sign:
        """:class:`~ai_service.storage.sigv4.Signer` where it reproduces the client's URLs, else the client."""
        signer = Signer.checked(self._client, self.get_object)
        return signer.url if signer is not None else self.get_object

    def _presign(self, operation: str, params: dict[str, Any]) -> SplitResult:
        from botocore.exceptions import BotoCoreError

        try:
            url: str = self._client.generate_presigned_url(operation, Params=params, ExpiresIn=URL_EXPIRES_S)
        except BotoCoreError as exc:  # e.g. no credentials: get_object says it properly
            raise DirectGetFailed(type(exc).__name__) from None
        return urlsplit(url)


def usable(client: Any, bucket: str) -> bool:
    """Whether ``client`` hands out SigV4 URLs for direct GETs and no proxy is configured.

    botocore still presigns S3 URLs with SigV2 unless the client's config names a
    signature version (:func:`~ai_service.storage.s3.make_s3_client` says ``s3v4``), so
    one URL is made to see.
    """
    import urllib.request

    from botocore.exceptions import BotoCoreError

    meta = getattr(client, "meta", None)
    config = getattr(meta, "config", None)
    url = getattr(meta, "endpoint_url", None)
    if config is None or not isinstance(url, str) or getattr(config, "proxies", None):
        return False
    proxies = urllib.request.getproxies()
    if proxies.get("http") or proxies.get("https") or urlsplit(url).scheme not in ("http", "https"):
        return False
    try:
        probe = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "probe"})
    except BotoCoreError:
        return False
    return isinstance(probe, str) and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in probe


def _ca_bundle() -> str | None:
    """The CA bundle botocore verifies with by default: AWS_CA_BUNDLE, REQUESTS_CA_BUNDLE, certifi's.

    certifi is asked directly (what botocore's ``get_cert_path`` returns when it is
    installed), so an https endpoint costs no botocore import either.
    """
    bundle = os.environ.get("AWS_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE")
    if bundle:
        return bundle
    try:
        import certifi
    except ImportError:
        from botocore.httpsession import get_cert_path

        found = get_cert_path(True)
        return found if isinstance(found, str) else None
    return str(certifi.where())


def _tls_context() -> ssl.SSLContext:
    """Verified TLS with the CA bundle botocore would use by default."""
    return ssl.create_default_context(cafile=_ca_bundle())


class DirectGets:
    """Presigned GETs of one bucket's objects, over a pool of keep-alive connections.

    Thread-safe: each transfer takes a connection from the pool and puts it back when
    the response was read to its end (a failed one is closed instead).  Also lists a
    prefix (ListObjectsV2 is a GET too) and signs for :mod:`~ai_service.storage.bulk_get`.
    """

    def __init__(
        self, presigner: Presigner, bucket: str, *, connections: int, connect_timeout: float, read_timeout: float
    ) -> None:
        self._presigner = presigner
        self._bucket = bucket
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pool: queue.LifoQueue[Connection] = queue.LifoQueue(maxsize=max(1, connections))
        self._tls: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._rest_until = 0.0

    @classmethod
    def of_client(cls, client: Any, bucket: str, *, connections: int) -> DirectGets:
        """URLs presigned by ``client``, with its timeouts."""
        config = client.meta.config
        return cls(ClientPresigner(client, bucket), bucket, connections=connections,
                   connect_timeout=float(config.connect_timeout or 60), read_timeout=float(config.read_timeout or 60))

    def resting(self) -> bool:
        """Whether a recent failure sends everything through botocore for now."""
        return time.monotonic() < self._rest_until

    def fetch(self, key: str, tmp: Path) -> bool:
        """Write ``key``'s bytes to the new file ``tmp``; False: use ``get_object`` instead."""
        if self.resting():
            return False
        try:
            self._call(self.presign(key), lambda response: _write_body(response, tmp), CHECKSUM_MODE)
        except DirectGetFailed as exc:
            self.failed(key, exc)
            return False
        return True

    def list_objects(self, folder: str, *, page_size: int | None = None) -> list[dict[str, Any]] | None:
        """Every object under ``folder`` as ListObjectsV2 lists it; None: use the paginator instead.

        botocore's parser costs ~0.1 ms per listed object; ElementTree a tenth of that.
        ``page_size``: keys per page (the server's default, 1,000, when None).
        """
        if self.resting():
            return None
        out: list[dict[str, Any]] = []
        token: str | None = None
        try:
            while True:
                url = self._presigner.list_objects_v2(folder, token, page_size)
                following = parse_listing(self._call(url, _read_page, {}), out)
                if following is None:
                    return out
                if following == token:
                    raise DirectGetFailed("the listing repeats its continuation token")
                token = following
        except DirectGetFailed as exc:
            self.failed(folder, exc)
            return None

    def failed(self, key: str, exc: DirectGetFailed) -> None:
        """Note a failed direct request: unless the object was just missing, rest a while."""
        if exc.status == 404:
            return
        with self._lock:
            if self.resting():
                return
            self._rest_until = time.monotonic() + REST_S
        log.warning("direct GETs from s3://%s rest for %.0f s after %s failed (%s); "
                    "downloading through GetObject", self._bucket, REST_S, show(key), exc)

    def presign(self, key: str) -> SplitResult:
        """A presigned GetObject URL of ``key`` (checksum mode on), split."""
        return self._presigner.get_object(key)

    def bulk_signer(self) -> Sign:
        """The GetObject signer of :mod:`~ai_service.storage.bulk_get` (the cheapest one there is)."""
        return self._presigner.bulk()

    def tls_context(self) -> ssl.SSLContext:
        """The verified TLS context of every https connection (made once)."""
        with self._lock:
            if self._tls is None:
                self._tls = _tls_context()
            return self._tls

    def _call(self, url: SplitResult, sink: Callable[[http.client.HTTPResponse], _T], headers: dict[str, str]) -> _T:
        """GET ``url`` (with the signed ``headers``) on a pooled connection; the 200 response to ``sink``."""
        target = f"{url.path}?{url.query}"
        conn, reused = self._connection(url.scheme, url.hostname or "", url.port)
        try:
            try:
                result = self._get(conn, target, sink, headers)
            except _STALE:
                if not reused:
                    raise
                # The server closed an idle keep-alive connection: once more on a new one.
                conn.close()
                conn, _ = self._connection(url.scheme, url.hostname or "", url.port, fresh=True)
                result = self._get(conn, target, sink, headers)
        except DirectGetFailed:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            # The type and errno text only: the text of some of these quotes the signed URL.
            reason = getattr(exc, "strerror", None)
            raise DirectGetFailed(f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__) from None
        self._give_back(conn)
        return result

    def _get(
        self, conn: Connection, target: str, sink: Callable[[http.client.HTTPResponse], _T], headers: dict[str, str]
    ) -> _T:
        conn.request("GET", target, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            raise DirectGetFailed(f"HTTP {response.status}", status=response.status)
        result = sink(response)
        if response.will_close:
            conn.close()
        return result

    def _connection(
        self, scheme: str, host: str, port: int | None, *, fresh: bool = False
    ) -> tuple[Connection, bool]:
        """A pooled connection (True) or a new one (False)."""
        if not fresh:
            try:
                return self._pool.get_nowait(), True
            except queue.Empty:
                pass
        try:
            conn: Connection
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self.connect_timeout, context=self.tls_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
            conn.connect()
        except (OSError, ssl.SSLError) as exc:
            raise DirectGetFailed(f"cannot connect: {type(exc).__name__}") from None
        if conn.sock is not None:
            conn.sock.settimeout(self.read_timeout)
        return conn, False

    def _give_back(self, conn: Connection) -> None:
        if conn.sock is None:  # the server closed it (Connection: close)
            return
        try:
            self._pool.put_nowait(conn)
        except queue.Full:
            conn.close()


def _write_body(response: http.client.HTTPResponse, tmp: Path) -> None:
    """Stream a GetObject body into the new file ``tmp``, checking the announced checksum."""
    digest = Digest({k.lower(): v for k, v in response.headers.items()})
    with open(tmp, "wb") as fh:
        while chunk := response.read(CHUNK):  # IncompleteRead when the body is cut short
            digest.update(chunk)
            fh.write(chunk)
    digest.check()


def _read_page(response: http.client.HTTPResponse) -> bytes:
    """A listing page's body, refused when it is larger than any real page."""
    data = response.read(MAX_LISTING_PAGE + 1)
    if len(data) > MAX_LISTING_PAGE:
        raise DirectGetFailed("listing page too large")
    return data


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse_listing(body: bytes, out: list[dict[str, Any]]) -> str | None:
    """Append a ListObjectsV2 page's objects (Key, Size, ETag) to ``out``; the next token or None.

    Keys are URL-decoded when the page says ``EncodingType`` url, as botocore decodes them.
    """
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise DirectGetFailed("malformed listing") from None
    fields = {_local(child.tag): child.text or "" for child in root if len(child) == 0}
    if _local(root.tag) != "ListBucketResult":
        raise DirectGetFailed("not a listing")
    decode = fields.get("EncodingType") == "url"
    for entry in root:
        if _local(entry.tag) != "Contents":
            continue
        obj = {_local(f.tag): f.text or "" for f in entry}
        if "Key" not in obj:
            raise DirectGetFailed("a listed object without a key")
        try:
            size = int(obj.get("Size", "0"))
        except ValueError:
            raise DirectGetFailed("a listed object with a malformed size") from None
        key = unquote_plus(obj["Key"]) if decode else obj["Key"]
        out.append({"Key": key, "Size": size, "ETag": obj.get("ETag", "")})
    if fields.get("IsTruncated", "").lower() != "true":
        return None
    token = fields.get("NextContinuationToken")
    if not token:
        raise DirectGetFailed("a truncated listing without a continuation token")
    return token
