"""Object storage: one small interface, two backends (a local directory and S3).

Datasets, pretrained weights and results are named by *storage keys* (CONTRACT.md,
"Common rules").  Keys come from BE messages, so they are untrusted: every public method
validates its keys before touching the disk or the network, and nothing downloaded is
ever written outside the directory it was asked for.

Errors are mapped at this boundary into the service's tree (``ai_service.errors``):
a missing object or bucket is :class:`ObjectNotFound`, anything else that goes wrong
talking to storage is the retryable :class:`StorageError`, and a bad key is
:class:`UnsafeKey`.  botocore exceptions never leak out, and messages carry no secrets.

Job records are written with conditional writes where the store has them
(:meth:`Storage.create_exclusive`, :meth:`Storage.replace_if_match` with the etag of
:meth:`Storage.read_versioned`; :meth:`Storage.supports_conditional_writes` says whether
it does): a lost race is :class:`~ai_service.errors.PreconditionFailed`.

The modules, along the seams:

* :mod:`~ai_service.storage.keys` -- key rules at the storage boundary (built on
  :mod:`ai_service.keys`, the I/O-free rule request validation uses);
* :mod:`~ai_service.storage.base` -- :class:`ObjectInfo`, the :class:`Storage`
  interface and the transfer helpers both backends share;
* :mod:`~ai_service.storage.local` -- :class:`LocalStorage` and its symlink rule;
* :mod:`~ai_service.storage.s3` -- :class:`S3Storage`;
* :mod:`~ai_service.storage.s3_client` -- S3 client construction and the reasons
  botocore failures are reported with;
* :mod:`~ai_service.storage.direct` -- the fast path of S3 bulk downloads and listings
  (presigned GETs over keep-alive connections, GetObject and the paginator as fallbacks),
  with :mod:`~ai_service.storage.bulk_get` (many GETs from one event loop);
* :mod:`~ai_service.storage.env_config` -- when the environment alone decides the S3
  configuration (static keys, an endpoint, no profile or config file), that configuration,
  so a listing needs no botocore at all; :mod:`~ai_service.storage.sigv4` signs those URLs;
* :mod:`~ai_service.storage.cache` -- the dataset cache (:func:`sync_prefix`).
"""

from __future__ import annotations

from ai_service.config import ConfigError, Settings
from ai_service.storage.base import (
    CONDITIONAL_PROBE_PREFIX,
    MULTIPART_CHUNKSIZE,
    MULTIPART_THRESHOLD,
    TRANSFER_WORKERS,
    MiB,
    ObjectInfo,
    ObjectInfos,
    Paths,
    Storage,
)
from ai_service.storage.cache import (
    MANIFEST_SUFFIX,
    SyncReport,
    cache_dir_name,
    forget_prefix,
    sync_prefix,
    sync_prefix_report,
)
from ai_service.storage.keys import MAX_KEY_LENGTH, validate_key
from ai_service.storage.local import LocalStorage
from ai_service.storage.s3 import S3Storage, make_s3_client

__all__ = [
    "CONDITIONAL_PROBE_PREFIX",
    "MANIFEST_SUFFIX",
    "MAX_KEY_LENGTH",
    "MULTIPART_CHUNKSIZE",
    "MULTIPART_THRESHOLD",
    "TRANSFER_WORKERS",
    "LocalStorage",
    "MiB",
    "ObjectInfo",
    "ObjectInfos",
    "Paths",
    "S3Storage",
    "Storage",
    "SyncReport",
    "cache_dir_name",
    "forget_prefix",
    "make_s3_client",
    "open_storage",
    "sync_prefix",
    "sync_prefix_report",
    "validate_key",
]


def open_storage(settings: Settings) -> Storage:
    """The backend ``STORAGE_BACKEND`` names (``local``: STORAGE_DIR, ``s3``: S3_BUCKET)."""
    if settings.storage_backend == "s3":
        if not settings.s3_bucket:
            raise ConfigError("STORAGE_BACKEND=s3 needs S3_BUCKET")
        return S3Storage(settings.s3_bucket)
    if settings.storage_backend == "local":
        return LocalStorage(settings.storage_dir)
    raise ConfigError(f"STORAGE_BACKEND must be local or s3, not {settings.storage_backend!r}")
