"""SigV4 query signing of S3 GET requests (presigned URLs), without botocore.

botocore presigns one URL in ~0.25 ms and costs a fresh process ~0.27 s of CPU to import
and set up; the signature itself is two SHA-256 HMAC chains and takes ~20 µs.  This is
that signature and nothing else, for the fast paths of :mod:`~ai_service.storage.direct`:

* :class:`QuerySigner` signs a GET of a path with query parameters and headers, laying
  the URL out as botocore's ``S3SigV4QueryAuth`` does (the operation's parameters in the
  order given, then the ``X-Amz-*`` ones, then the signature), so that its URLs can be
  compared with botocore's byte for byte;
* :class:`PathStyleUrls` makes GetObject and ListObjectsV2 URLs of one bucket, path-style,
  as botocore does for a configured endpoint (:mod:`~ai_service.storage.env_config`
  decides when that configuration is known without botocore);
* :class:`Signer` makes GetObject URLs like the ones a botocore client presigns, copying
  everything but the key, the time and the signature from a URL of that client, and is
  only handed out after it reproduced that client's URL of an odd key.

A URL signed here that the server refuses is never an error: the callers fall back to
botocore, which signs the same request its own way.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

from ai_service.errors import DirectGetFailed

#: Characters botocore leaves unquoted in query keys and values (RFC 3986 unreserved).
_QUERY_SAFE = "-_.~"
#: ... and in an S3 key in the path.
_PATH_SAFE = "/~"
#: The header a GetObject URL with ``ChecksumMode`` signs (the server then names the checksum).
CHECKSUM_MODE = {"x-amz-checksum-mode": "ENABLED"}
#: The key of the URL botocore makes as :class:`Signer`'s template, and the odd one it must reproduce.
PROBE_KEY = "probe"
CHECK_KEY = "a b/é+%20?~=&;.bin"
#: Lifetime of one presigned URL (each is used at once).
URL_EXPIRES_S = 300
_ALGORITHM = "AWS4-HMAC-SHA256"
_STAMP = "%Y%m%dT%H%M%SZ"
_DEFAULT_PORTS = {"http": 80, "https": 443}

Sign = Callable[[str], SplitResult]


def _quote(value: str) -> str:
    return quote(value, safe=_QUERY_SAFE)


def stamp_time(stamp: str) -> float:
    """The epoch seconds of an ``X-Amz-Date`` value (``20261202T072242Z``)."""
    return float(calendar.timegm(time.strptime(stamp, _STAMP)))


class QuerySigner:
    """SigV4 query-string signatures of GETs to one S3 endpoint with one set of credentials.

    ``netloc`` is the URL's host (and port) as it goes into the URL; the signed ``host``
    header is botocore's: lower case, without a default port.  Keys per day are cached.
    """

    def __init__(
        self, *, scheme: str, netloc: str, region: str, access_key: str, secret_key: str,
        token: str | None, expires: int,
    ) -> None:
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"not an http(s) endpoint: {scheme!r}")
        self.scheme, self.netloc, self.region = scheme, netloc, region
        parts = urlsplit(f"{scheme}://{netloc}")
        host = parts.hostname or ""
        self._host = host if parts.port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{parts.port}"
        self._access, self._secret, self._token = access_key, secret_key, token
        self._expires = str(int(expires))
        self._keys: dict[str, bytes] = {}

    def url(
        self, path: str, params: Sequence[tuple[str, str]] = (), headers: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> SplitResult:
        """The presigned GET of ``path`` (already quoted) with ``params`` and the signed ``headers``.

        ``headers`` (lower-case names) must be sent with the request as they are given.
        """
        signed = {"host": self._host, **(headers or {})}
        names = ";".join(sorted(signed))
        stamp = time.strftime(_STAMP, time.gmtime(now))
        day = stamp[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
        auth = [("X-Amz-Algorithm", _ALGORITHM), ("X-Amz-Credential", f"{self._access}/{scope}"),
                ("X-Amz-Date", stamp), ("X-Amz-Expires", self._expires), ("X-Amz-SignedHeaders", names)]
        if self._token is not None:
            auth.append(("X-Amz-Security-Token", self._token))
        pairs = [(_quote(k), _quote(v)) for k, v in (*params, *auth)]
        query = "&".join(f"{k}={v}" for k, v in pairs)
        canonical_query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
        canonical_headers = "".join(f"{k}:{' '.join(signed[k].split())}\n" for k in sorted(signed))
        canonical = f"GET\n{path}\n{canonical_query}\n{canonical_headers}\n{names}\nUNSIGNED-PAYLOAD"
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        to_sign = f"{_ALGORITHM}\n{stamp}\n{scope}\n{digest}"
        signature = hmac.new(self._key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        return SplitResult(self.scheme, self.netloc, path, f"{query}&X-Amz-Signature={signature}", "")

    def _key(self, day: str) -> bytes:
        if day not in self._keys:
            key = ("AWS4" + self._secret).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys[day] = key
        return self._keys[day]


class PathStyleUrls:
    """GetObject and ListObjectsV2 URLs of one bucket at ``<endpoint>/<bucket>``.

    What botocore makes for an endpoint URL with the default addressing style; the
    bucket name must need no quoting (:mod:`~ai_service.storage.env_config` checks).
    Implements :class:`~ai_service.storage.direct.Presigner`.
    """

    def __init__(self, signer: QuerySigner, bucket: str) -> None:
        self._signer = signer
        self._bucket_path = f"/{bucket}"

    def get_object(self, key: str, now: float | None = None) -> SplitResult:
        """GetObject of ``key`` with checksum mode on."""
        return self._signer.url(f"{self._bucket_path}/{quote(key, safe=_PATH_SAFE)}", (), CHECKSUM_MODE, now)

    def list_objects_v2(
        self, prefix: str, token: str | None = None, page_size: int | None = None, now: float | None = None
    ) -> SplitResult:
        """One ListObjectsV2 page (keys URL-encoded), parameters in :func:`list_params`' order."""
        return self._signer.url(self._bucket_path, list_query(prefix, token, page_size), None, now)

    def bulk(self) -> Sign:
        """Already as cheap as it gets: itself."""
        return self.get_object


def list_params(prefix: str, token: str | None, page_size: int | None) -> dict[str, Any]:
    """botocore's parameters of the same ListObjectsV2 page, in the order the URL carries them."""
    params: dict[str, Any] = {"Prefix": prefix, "EncodingType": "url"}
    if page_size is not None:
        params["MaxKeys"] = page_size
    if token is not None:
        params["ContinuationToken"] = token
    return params


def list_query(prefix: str, token: str | None, page_size: int | None) -> list[tuple[str, str]]:
    """The query of a ListObjectsV2 page as botocore serialises :func:`list_params`."""
    query = [("list-type", "2"), ("prefix", prefix), ("encoding-type", "url")]
    if page_size is not None:
        query.append(("max-keys", str(page_size)))
    if token is not None:
        query.append(("continuation-token", token))
    return query


class Signer:
    """GetObject URLs signed here (~20 µs) in the image of a botocore client's (~0.25 ms each).

    Everything but the key, the time and the signature is copied from a URL botocore
    made (endpoint, addressing style, region, expiry, session token); the secret is the
    client's own credentials.  :meth:`checked` only hands one out after it reproduced,
    at botocore's timestamp, botocore's URL of an odd key: any difference (another
    signer, quoting, a header) and the caller keeps botocore's presigning.
    """

    def __init__(self, template: SplitResult, secret: str) -> None:
        params = dict(parse_qsl(template.query, keep_blank_values=True))
        if not template.path.endswith("/" + PROBE_KEY):
            raise ValueError("not a presigned GetObject URL of the probe key")
        if params.get("X-Amz-SignedHeaders") != "host;x-amz-checksum-mode":
            raise ValueError("not the signed headers of a GetObject with checksum mode")
        access, _, region, service, _ = params["X-Amz-Credential"].split("/")
        if service != "s3" or params.get("X-Amz-Algorithm") != _ALGORITHM:
            raise ValueError("not SigV4 for S3")
        known = {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
                 "X-Amz-Security-Token", "X-Amz-Signature"}
        if set(params) - known:
            raise ValueError("a query parameter this signer does not make")
        self._base = template.path[: -len(PROBE_KEY)]
        self._signer = QuerySigner(scheme=template.scheme, netloc=template.netloc, region=region,
                                   access_key=access, secret_key=secret,
                                   token=params.get("X-Amz-Security-Token"), expires=int(params["X-Amz-Expires"]))

    @classmethod
    def checked(cls, client: Any, sign: Sign) -> Signer | None:
        """A signer for ``client``'s URLs (``sign``: botocore's), or None where it would differ."""
        creds = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        try:
            frozen = creds.get_frozen_credentials()  # type: ignore[union-attr]
            signer = cls(sign(PROBE_KEY), str(frozen.secret_key))
            reference = sign(CHECK_KEY)
            ours = signer.url(CHECK_KEY, stamp_time(dict(parse_qsl(reference.query))["X-Amz-Date"]))
        except (AttributeError, KeyError, ValueError, DirectGetFailed):
            return None
        same = (ours.path == reference.path and ours.netloc == reference.netloc
                and sorted(parse_qsl(ours.query)) == sorted(parse_qsl(reference.query)))
        return signer if same else None

    def url(self, key: str, now: float | None = None) -> SplitResult:
        """The presigned GetObject URL of ``key`` (checksum mode on) as of ``now``."""
        return self._signer.url(self._base + quote(key, safe=_PATH_SAFE), (), CHECKSUM_MODE, now)
