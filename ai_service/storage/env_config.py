"""The S3 configuration when the environment alone decides it, so that botocore need not.

A fresh process that only lists a dataset (a no-op re-sync) spends ~0.27 s of its ~0.45 s
of CPU importing botocore and making a client.  Where the endpoint, credentials and
region come only from environment variables, botocore's answer is known without it:
:func:`from_environment` returns that configuration, and :class:`~ai_service.storage.s3.S3Storage`
lists (and bulk-downloads) with URLs signed by :mod:`~ai_service.storage.sigv4`, making
the botocore client only when an operation needs it.

It is conservative on purpose: anything that could make botocore do something else
gives None, and botocore is used as before.  That is any ``AWS_*`` variable not in
:data:`UNDERSTOOD` (profiles, ``AWS_SECURITY_TOKEN``, FIPS/dual-stack, data paths,
plugins...), a shared config or credentials file that exists (profiles there can set
region, endpoint, addressing style, proxies, CA bundle), a proxy, no endpoint URL (AWS
itself: virtual-hosted buckets, regional endpoint rules), or an endpoint, region, key
or bucket of an unusual form.  What remains is reproduced exactly as botocore 1.44 does
it, which tests/test_storage_envsign.py checks against botocore byte for byte:

* endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (the first non-empty one),
  none when ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true;
* addressing: path-style (botocore forces it for a configured endpoint unless a profile
  asks for ``virtual``, and there is no profile here);
* region: ``AWS_DEFAULT_REGION``, else us-east-1 (:func:`~ai_service.storage.s3_client.make_s3_client`'s
  default).  botocore does not read ``AWS_REGION``; one that disagrees means botocore;
* credentials: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``
  (botocore's environment provider comes first in its chain).

A signature the server refuses is not an error either: the listing falls back to
botocore's paginator, exactly as before.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ai_service.storage.sigv4 import URL_EXPIRES_S, PathStyleUrls, QuerySigner

#: The ``AWS_*`` variables this module understands.  Any other one set means botocore.
#: ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` only shape botocore's own retries (the fast
#: path has none: it falls back), the metadata ones only the instance-role credentials
#: that static ones come before, and ``AWS_CA_BUNDLE`` the TLS of https endpoints, which
#: :mod:`~ai_service.storage.direct` verifies with it (else ``REQUESTS_CA_BUNDLE``, else
#: certifi's) as botocore would.
UNDERSTOOD = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "AWS_EC2_METADATA_DISABLED", "AWS_METADATA_SERVICE_TIMEOUT", "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
    "AWS_CA_BUNDLE",
})
#: botocore's own variables outside the ``AWS_`` prefix that change what a client does.
_BOTOCORE_OTHER = ("BOTOCORE_EXPERIMENTAL__PLUGINS", "BOTO_DISABLE_CRT")
#: Regions botocore's endpoint rules treat specially (a FIPS pseudo-region, the global one).
_SPECIAL_REGION = re.compile(r"fips|^aws-global$|^s3-external-1$")
_REGION = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
#: Bucket names that need no quoting in a path and that botocore passes through as they are.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$")


@dataclass(frozen=True)
class EnvS3Config:
    """What botocore would use, read from the environment alone (the secret not shown)."""

    endpoint_url: str
    region: str
    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)

    def urls(self, bucket: str) -> PathStyleUrls | None:
        """Presigned URLs of ``bucket``'s objects, or None for a bucket name botocore might treat otherwise."""
        if not _BUCKET.match(bucket) or ".." in bucket:
            return None
        parts = urlsplit(self.endpoint_url)
        signer = QuerySigner(scheme=parts.scheme, netloc=parts.netloc, region=self.region,
                             access_key=self.access_key, secret_key=self.secret_key, token=self.token,
                             expires=URL_EXPIRES_S)
        return PathStyleUrls(signer, bucket)


def _endpoint(environ: Mapping[str, str]) -> str | None:
    """The endpoint URL botocore would take from the environment, if it is of a plain form."""
    ignore = environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
    if ignore is not None and ignore.lower() != "false":
        return None  # "true": botocore ignores them (AWS itself); anything else: unclear
    url = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    plain = (parts.scheme in ("http", "https") and parts.path in ("", "/") and not parts.query
             and not parts.fragment and "@" not in parts.netloc and _HOST.match(host) is not None
             and parts.netloc == (f"{host}:{port}" if port is not None else host)
             and port != {"http": 80, "https": 443}.get(parts.scheme)  # signed without it, sent with it
             and not host.startswith("s3-accelerate"))  # botocore keeps virtual addressing for that one
    return url if plain else None


def _shared_files(environ: Mapping[str, str]) -> bool:
    """Whether a shared config or credentials file exists where botocore would look."""
    for name, default in (("AWS_CONFIG_FILE", "~/.aws/config"), ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")):
        path = environ.get(name) or default
        if os.path.lexists(os.path.expanduser(path)):
            return True
    return False


def _retries_valid(environ: Mapping[str, str]) -> bool:
    """Whether botocore accepts the retry settings: a bad one must still fail when the storage is made."""
    mode = environ.get("AWS_RETRY_MODE")
    attempts = environ.get("AWS_MAX_ATTEMPTS")
    return (mode is None or mode in ("legacy", "standard", "adaptive")) and (attempts is None or attempts.isdigit())


def _proxied(environ: Mapping[str, str]) -> bool:
    """Whether botocore might send its requests through a proxy.

    On Linux ``urllib.request.getproxies`` (what botocore asks) reads only these
    variables, in either case; importing it would cost a fresh process ~0.02 s, so it is
    asked only where it also reads system settings.
    """
    if any(value and name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name, value in environ.items()):
        return True
    if sys.platform in ("darwin", "win32"):
        import urllib.request

        proxies = urllib.request.getproxies()
        return any(proxies.get(scheme) for scheme in ("http", "https", "all"))
    return False


def from_environment(environ: Mapping[str, str] | None = None) -> EnvS3Config | None:
    """The S3 configuration if the environment alone determines it; None: ask botocore.

    ``environ`` (default ``os.environ``) is where the variables are read, proxies'
    included.
    """
    env = os.environ if environ is None else environ
    if any(name.startswith("AWS_") and name not in UNDERSTOOD for name in env):
        return None
    if any(name in env for name in _BOTOCORE_OTHER):
        return None
    if any(env.get(name) == "" for name in UNDERSTOOD):
        return None  # botocore skips some empty values and refuses others: not worth knowing which
    if _shared_files(env) or not _retries_valid(env):
        return None
    if _proxied(env):
        return None
    endpoint = _endpoint(env)
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if endpoint is None or not access or not secret:
        return None
    region = env.get("AWS_DEFAULT_REGION") or "us-east-1"
    if env.get("AWS_REGION", region) != region:
        return None  # botocore would ignore it; whoever set it may expect otherwise
    if not _REGION.match(region) or _SPECIAL_REGION.search(region):
        return None
    return EnvS3Config(endpoint_url=endpoint, region=region, access_key=access, secret_key=secret,
                       token=env.get("AWS_SESSION_TOKEN"))
