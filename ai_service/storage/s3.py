"""The S3 backend (``STORAGE_BACKEND=s3``): keys are objects in one bucket.

The endpoint and credentials come only from boto3's standard sources
(``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, profiles,
instance roles).  botocore itself switches to path-style addressing whenever an endpoint
URL is configured (unless a profile asks for ``addressing_style = virtual``), which is
what MinIO/SeaweedFS-style servers need, so nothing here overrides it.

botocore exceptions never leak out: a missing object or bucket is
:class:`ObjectNotFound`, anything else is the retryable :class:`StorageError`, and the
messages carry no secrets.  boto3 is imported on first use only, so importing the
storage package stays cheap for the CLI.  Building the client and mapping botocore
failures to reasons live in :mod:`~ai_service.storage.s3_client`.

Where the environment alone configures S3 (:mod:`~ai_service.storage.env_config`:
static credentials and an endpoint in environment variables, no profile, no config file,
no proxy), even botocore waits: listings and bulk downloads are signed by
:mod:`~ai_service.storage.sigv4`, and the client is made when an operation needs it
(stat, reads, writes, deletes, and every fallback).  A no-op dataset re-sync in a fresh
process then never imports botocore, which was ~0.27 s of its ~0.45 s of CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ai_service.config import ConfigError
from ai_service.errors import ObjectNotFound, PermanentError, PreconditionFailed, StorageError, UnsafeKey
from ai_service.storage.base import (
    MULTIPART_THRESHOLD,
    TRANSFER_WORKERS,
    Download,
    ObjectInfo,
    ObjectInfos,
    Storage,
    atomic_file,
)
from ai_service.storage.env_config import EnvS3Config, from_environment
from ai_service.storage.keys import folder as as_folder
from ai_service.storage.keys import object_key, show
from ai_service.storage.s3_client import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    client_error,
    endpoint_label,
    endpoint_url_label,
    explain,
    make_s3_client,
    plain_etag,
    transfer_config,
)

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3.client import S3Client

    from ai_service.storage.direct import DirectGets
    from ai_service.storage.sigv4 import PathStyleUrls

__all__ = ["S3Storage", "make_s3_client"]

log = logging.getLogger("ai_service.storage")

#: DeleteObjects takes at most this many keys per call.
_DELETE_BATCH = 1000
#: Error codes of a conditional PutObject that lost its race.
_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict")
#: Bytes read from a GetObject body per write to the local file.
_CHUNK = 1024 * 1024


# --- the backend -----------------------------------------------------------------------


class S3Storage(Storage):
    """Keys are objects in one bucket of S3 or an S3-compatible server.

    The client is shared by all threads (boto3 clients are thread-safe; sessions are
    not).  Pass ``client`` to control timeouts/retries (see :func:`make_s3_client`).
    Without one, the configuration is read from the environment when the storage is
    made; where that alone decides it (:func:`~ai_service.storage.env_config.from_environment`)
    the client is made on first use, else at once (a bad profile fails here).
    """

    def __init__(
        self,
        bucket: str,
        client: S3Client | None = None,
        *,
        workers: int = TRANSFER_WORKERS,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ConfigError(f"S3_BUCKET must be a bucket name, not {bucket!r}")
        super().__init__()
        self.bucket = bucket
        self.workers = workers
        env = from_environment() if client is None else None
        urls = env.urls(bucket) if env is not None else None
        # Where set: the configuration and the URLs botocore would use, known without it.
        self._env: EnvS3Config | None = env if urls is not None else None
        self._env_urls: PathStyleUrls | None = urls
        if urls is None and client is None:
            client = make_s3_client(max_pool_connections=workers)
        self._made: S3Client | None = client
        self._client_lock = threading.Lock()
        # The transfer manager's settings, made on first use (boto3 and s3transfer are not
        # imported at all by a process that only lists and syncs datasets).
        self._transfers: dict[bool, TransferConfig] = {}
        # The fast path for bulk downloads, set up on the first one (None: not usable).
        self._direct: DirectGets | None = None
        self._direct_checked = False
        self._direct_lock = threading.Lock()

    def _transfer_config(self, *, bulk: bool) -> TransferConfig:
        """Threads of its own for one large object; none for one of many parallel transfers.

        Prefix transfers already run ``workers`` objects at once; nesting a thread pool per
        object would multiply threads and connections.
        """
        if bulk not in self._transfers:
            self._transfers[bulk] = transfer_config(use_threads=not bulk)
        return self._transfers[bulk]

    @property
    def _client(self) -> S3Client:
        """The botocore client, made on first use where the environment alone configured S3."""
        made = self._made
        if made is None:
            with self._client_lock:
                if self._made is None:
                    self._made = make_s3_client(max_pool_connections=self.workers)
                made = self._made
        return made

    def describe(self) -> str:
        # The same label either way: the dataset cache's folder names are made from it.
        env = self._env
        endpoint = endpoint_url_label(env.endpoint_url) if env is not None else endpoint_label(self._client)
        where = f"s3://{self.bucket}"
        return f"{where} at {endpoint}" if endpoint else where

    def __repr__(self) -> str:
        return f"S3Storage({self.describe()!r})"

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Translate botocore/boto3 failures; ``from None`` keeps their details out."""
        try:
            yield
        except Exception as raw:
            mapped = self._mapped(raw, action, key)
            if mapped is None:
                raise
            raise mapped from None

    def _mapped(self, raw: Exception, action: str, key: str) -> Exception | None:
        """The service's error for a botocore/boto3 or local failure; None: not one of those.

        botocore and boto3 are only looked at once imported: where they were not, none of
        their exceptions can have been raised (a sync signed by sigv4 never imports them).
        """
        kinds: tuple[type[BaseException], ...] = ()
        if "botocore" in sys.modules:
            from botocore.exceptions import BotoCoreError, ClientError

            kinds += (BotoCoreError, ClientError)
        if "boto3" in sys.modules:
            from boto3.exceptions import Boto3Error

            kinds += (Boto3Error,)
        if isinstance(raw, kinds):  # so botocore is imported
            from botocore.exceptions import ClientError

            exc = client_error(raw)
            if isinstance(exc, ClientError):
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code == "NoSuchBucket":
                    return ObjectNotFound(f"bucket {self.bucket!r} does not exist ({self.describe()})")
                if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                    return ObjectNotFound(f"no object {show(key)} in {self.describe()}")
            return StorageError(f"S3 {action} of {show(key)} in {self.describe()} failed: {explain(exc)}")
        if isinstance(raw, OSError):  # the local side of a transfer
            return StorageError(f"S3 {action} of {show(key)}: local file error: {raw.strerror or raw}")
        return None

    def stat(self, key: str) -> ObjectInfo | None:
        object_key(key)
        try:
            with self._errors("stat", key):
                head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(head.get("ContentLength", 0)), plain_etag(head.get("ETag")))

    def _iter_raw(self, folder: str) -> Iterator[dict[str, Any]]:
        """Every listed object dict under ``folder``, unfiltered."""
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("list", folder):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=folder):
                for obj in page.get("Contents", []):
                    yield dict(obj)

    def list(self, prefix: str = "") -> ObjectInfos:
        folder = as_folder(prefix, allow_empty=True)
        direct = self._direct_gets()
        # One presigned GET per page, parsed by ElementTree; the paginator when that fails.
        listed = direct.list_objects(folder) if direct is not None else None
        out: ObjectInfos = []
        for obj in listed if listed is not None else self._iter_raw(folder):
            key = str(obj.get("Key", ""))
            if key.endswith("/") and int(obj.get("Size", 0)) == 0:
                continue  # a "folder" marker made by consoles and some tools
            try:
                object_key(key)
            except UnsafeKey as exc:
                log.warning("skipping listed S3 object in %s: %s", self.describe(), exc.message)
                continue
            out.append(ObjectInfo(key, int(obj.get("Size", 0)), plain_etag(obj.get("ETag"))))
        out.sort(key=lambda info: info.key)
        return out

    def read_bytes(self, key: str) -> bytes:
        object_key(key)
        with self._errors("read", key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()

    def read_versioned(self, key: str) -> tuple[bytes, ObjectInfo]:
        object_key(key)
        with self._errors("read", key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            data = response["Body"].read()
        return data, ObjectInfo(key, len(data), plain_etag(response.get("ETag")))

    def write_bytes(self, key: str, data: bytes) -> None:
        object_key(key)
        with self._errors("write", key):
            if len(data) < MULTIPART_THRESHOLD:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=data)
            else:
                from boto3.s3 import inject

                inject.upload_fileobj(
                    self._client, io.BytesIO(data), self.bucket, key, Config=self._transfer_config(bulk=False)
                )

    def _create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        return self._put_conditional(key, data, {"IfNoneMatch": "*"})

    def _replace_if_match(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        return self._put_conditional(key, data, {"IfMatch": f'"{etag}"'})

    def _put_conditional(self, key: str, data: bytes, condition: dict[str, str]) -> ObjectInfo:
        """PutObject with ``If-None-Match: *`` or ``If-Match: <etag>`` (one request, no parts).

        412 is the lost race; so is 409 ConditionalRequestConflict (AWS: another
        conditional write of the key is in flight) and, for ``If-Match``, 404 (the object
        is gone).  A server that does not implement the headers (501) is a PermanentError.
        """
        from botocore.exceptions import ClientError

        with self._errors("conditional write", key):
            try:
                response = self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, **condition  # type: ignore[arg-type]
                )
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                gone = "IfMatch" in condition and (status == 404 or code == "NoSuchKey")
                if status in (409, 412) or code in _LOST_RACE or gone:
                    raise PreconditionFailed(
                        f"conditional write of {show(key)} in {self.describe()} lost: {code or status}"
                    ) from None
                if status == 501 or code == "NotImplemented":
                    raise PermanentError(
                        f"{self.describe()} does not implement conditional writes",
                        error_code="storage_error",
                    ) from None
                raise
        return ObjectInfo(key, len(data), plain_etag(response.get("ETag")))

    def fetch_files(self, items: Sequence[Download], done: Callable[[ObjectInfo], None]) -> None:
        """All at once from one thread (:mod:`~ai_service.storage.bulk_get`); misses through GetObject."""
        for info, _ in items:
            object_key(info.key)
        direct = self._direct_gets() if len(items) > 1 else None
        if direct is not None and not direct.resting():
            from ai_service.storage import bulk_get

            with self._errors("download", items[0][0].key):
                items = bulk_get.fetch_all(direct, items, done, concurrency=self.workers)
        super().fetch_files(items, done)

    def _fetch(self, key: str, dest: Path, *, bulk: bool) -> None:
        if bulk:
            self._get_streamed(key, dest)
            return
        with self._errors("download", key), atomic_file(dest) as tmp:
            from boto3.s3 import inject

            inject.download_file(self._client, self.bucket, key, str(tmp), Config=self._transfer_config(bulk=False))

    def _get_streamed(self, key: str, dest: Path) -> None:
        """One GET streamed into ``dest``'s temporary file: direct if it can, else GetObject.

        For the many-objects-at-once transfers: the transfer manager asks for the size
        first (a HEAD per object) and sets up futures and queues per file, twice the
        requests and CPU of a small object's whole download; the caller already runs
        the transfers in parallel, so nothing is lost for large ones either.  The direct
        GET (:mod:`~ai_service.storage.direct`) skips botocore's per-request CPU.
        """
        with self._errors("download", key), atomic_file(dest) as tmp:
            direct = self._direct_gets()
            if direct is not None and direct.fetch(key, tmp):
                return
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                with open(tmp, "wb") as fh:
                    for chunk in body.iter_chunks(_CHUNK):
                        fh.write(chunk)
            finally:
                body.close()

    def _direct_gets(self) -> DirectGets | None:
        """The fast path of :mod:`~ai_service.storage.direct`: signed here, or by the client if it allows it."""
        with self._direct_lock:
            if not self._direct_checked:
                from ai_service.storage import direct

                if self._env_urls is not None:
                    self._direct = direct.DirectGets(
                        self._env_urls, self.bucket, connections=self.workers,
                        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    )
                elif direct.usable(self._client, self.bucket):
                    self._direct = direct.DirectGets.of_client(self._client, self.bucket, connections=self.workers)
                self._direct_checked = True
            return self._direct

    def _store(self, src: Path, key: str, *, bulk: bool) -> ObjectInfo:
        from boto3.s3 import inject

        with self._errors("upload", key):
            inject.upload_file(self._client, str(src), self.bucket, key, Config=self._transfer_config(bulk=bulk))
        info = self.stat(key)
        if info is None:
            raise StorageError(f"S3 upload of {show(key)} in {self.describe()} did not stick")
        return info

    def delete(self, key: str) -> None:
        object_key(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        folder = as_folder(prefix, allow_empty=False)
        # Raw listing: objects with odd keys under the prefix are deleted too.
        keys = [str(obj["Key"]) for obj in self._iter_raw(folder) if "Key" in obj]
        for start in range(0, len(keys), _DELETE_BATCH):
            self._delete_batch(folder, keys[start:start + _DELETE_BATCH])

    def _delete_batch(self, folder: str, batch: Sequence[str]) -> None:
        with self._errors("delete", folder):
            response = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(
                f"S3 delete of {len(errors)} object(s) under {show(folder)} in "
                f"{self.describe()} failed: {first.get('Code', '?')}"
            )
