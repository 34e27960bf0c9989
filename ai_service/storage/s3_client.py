"""The S3 client and the error mapping of :mod:`~ai_service.storage.s3`.

Client construction (:func:`make_s3_client`: boto3's standard configuration sources
only, botocore's "standard" retries, SigV4, a dateutil-free timestamp parser), the
transfer-manager settings, and the secret-free reasons a botocore failure is reported
with.  Apart from the backend so that :class:`~ai_service.storage.s3.S3Storage` holds
only the storage operations; boto3 is still imported on first use only.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from ai_service.errors import StorageError
from ai_service.storage.base import MULTIPART_CHUNKSIZE, MULTIPART_THRESHOLD, TRANSFER_WORKERS

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.config import _RetryDict
    from mypy_boto3_s3.client import S3Client


# --- the client ------------------------------------------------------------------------

#: The client's timeouts unless told otherwise (also those of the fast paths signed without it).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


def make_s3_client(
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
    max_attempts: int | None = None,
    max_pool_connections: int = TRANSFER_WORKERS,
) -> S3Client:
    """Build an S3 client from boto3's standard configuration sources only.

    Endpoint, credentials and region come from the environment / shared config / instance
    role exactly as the AWS CLI would read them; the region defaults to us-east-1 (what
    S3-compatible servers expect).  Retries use botocore's "standard" mode unless the
    environment or profile chose a mode; ``max_attempts`` (total tries) overrides
    ``AWS_MAX_ATTEMPTS`` -- tests use 1 to fail fast.  ``max_pool_connections`` should
    match the storage's transfer workers: one connection per concurrent transfer.
    """
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        # A botocore session, not a boto3 one: boto3 and s3transfer cost a fresh process
        # ~0.05 s of CPU, and S3Storage calls boto3's transfer functions with this client.
        core = botocore.session.get_session()
        core.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp
        )
        region = core.get_config_variable("region") or "us-east-1"
        retries: dict[str, Any] = {
            "mode": core.get_config_variable("retry_mode") or "standard"
        }
        if max_attempts is not None:
            retries["total_max_attempts"] = max_attempts
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries=cast("_RetryDict", retries),
            max_pool_connections=max_pool_connections,
            # SigV4 is what requests are signed with anyway; saying so makes presigned
            # URLs SigV4 too (botocore's default for them is still SigV2).
            signature_version="s3v4",
        )
        return cast("S3Client", core.create_client("s3", region_name=region, config=config))
    except BotoCoreError as exc:  # bad profile, unknown retry mode, ...
        raise StorageError(f"cannot configure the S3 client: {exc}") from None


def _parse_timestamp(value: str) -> datetime:
    """botocore's timestamp parser, minus dateutil for the ISO 8601 times of listings.

    botocore parses every ``LastModified`` of a listing with dateutil, which is most of
    the CPU a 1,000-object listing costs; ``fromisoformat`` reads the same strings.
    Anything else (HTTP dates in headers, epochs) goes to botocore's own parser.
    """
    from botocore.utils import parse_timestamp

    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)


def endpoint_label(client: Any) -> str | None:
    """``scheme://host[:port]`` of a client's non-AWS endpoint (credentials in the URL dropped)."""
    url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    return endpoint_url_label(url) if isinstance(url, str) else None


def endpoint_url_label(url: str) -> str | None:
    """``scheme://host[:port]`` of a non-AWS endpoint URL; part of the dataset cache's folder names."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws")):
        return None
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def transfer_config(*, use_threads: bool) -> TransferConfig:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=TRANSFER_WORKERS,
        use_threads=use_threads,
    )


# --- error mapping ---------------------------------------------------------------------


def explain(exc: BaseException) -> str:
    """A short, secret-free reason for a botocore/boto3 failure."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or "?"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"{code} (HTTP {status})"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return "cannot connect to the S3 endpoint"
    if isinstance(exc, ReadTimeoutError):
        return "the S3 endpoint did not answer in time"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return (
            "no usable S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or use an instance role)"
        )
    return type(exc).__name__


def client_error(exc: BaseException) -> BaseException:
    """The ClientError behind a boto3 transfer error, if there is one."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def plain_etag(raw: object) -> str:
    """An ETag without the quotes S3 puts around it."""
    return str(raw or "").strip('"')
