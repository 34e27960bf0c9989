"""Provenance of exported models: what this service made, so that only that is loaded.

TorchScript is code (PyTorch: there is no safe mode for ``torch.jit.load``) and ONNX /
OpenVINO parsers have a CVE history, so a model file from elsewhere is untrusted input.
When a conversion uploads an artifact it writes a record under ``JOBS_PREFIX``
(``jobs/artifacts/<sha256>.json``: format, key, source model and its sha256, options,
job) -- an area no request key may name.  Inference loads a non-``.pt`` model only when
the sha256 of the bytes it downloaded has such a record of the same format, unless the
operator sets ``TRUST_EXTERNAL_MODELS=true``.  ``.pt`` weights always go through the
weights-only loader instead (no record needed).

No torch import here: the digests are plain hashlib.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ai_service.errors import ObjectNotFound, UntrustedModel
from ai_service.storage import Storage


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(files: Iterable[tuple[str, str]]) -> str:
    """SHA-256 of a folder given ``(relative path, sha256 of the file)`` pairs.

    The lines ``<sha256>  <relative path>`` (``sha256sum``'s format), sorted by path,
    hashed together: the same folder gives the same digest wherever it is stored.
    """
    lines = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def describe_local(path: Path) -> tuple[int, str]:
    """``(size_bytes, sha256)`` of a model file or folder, as artifacts report them."""
    if path.is_file():
        return path.stat().st_size, file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    return size, folder_digest((p.relative_to(path).as_posix(), file_sha256(p)) for p in files)


def record_key(sha256: str, prefix: str) -> str:
    return f"{prefix}artifacts/{sha256}.json"


class Provenance:
    """Writes and checks artifact records in the service's own storage area."""

    def __init__(self, storage: Storage, *, prefix: str, trust_external: bool = False) -> None:
        self.storage = storage
        self.prefix = prefix
        self.trust_external = trust_external

    def record(self, *, sha256: str, fmt: str, key: str, size_bytes: int, source_key: str, source_sha256: str,
               options: dict[str, Any], job_id: str) -> None:
        doc = {
            "sha256": sha256, "format": fmt, "path": key, "size_bytes": size_bytes,
            "source_model": source_key, "source_sha256": source_sha256, "options": options,
            "job_id": job_id, "created": time.time(),
        }
        self.storage.write_bytes(record_key(sha256, self.prefix), json.dumps(doc, sort_keys=True).encode())

    def lookup(self, sha256: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.storage.read_bytes(record_key(sha256, self.prefix)))
        except (ObjectNotFound, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("sha256") == sha256 else None

    def check(self, local: Path, key: str, fmt: str) -> str | None:
        """Refuse ``local`` (downloaded from ``key``) unless this service exported it; returns its sha256.

        Formats are compared loosely (``openvino`` folder vs file formats): what matters is
        that the exact bytes are ones the service wrote.
        """
        if self.trust_external:
            return None
        _, sha = describe_local(local)
        doc = self.lookup(sha)
        if doc is None or str(doc.get("format", "")).split("_")[0] != fmt.split("_")[0]:
            raise UntrustedModel(
                f"model.path {key!r}: this {fmt} model was not exported by this service (no provenance record for "
                f"sha256 {sha[:16]}...); loading it would run code the service did not make. Convert the .pt "
                "weights with a conversion job, or have the operator set TRUST_EXTERNAL_MODELS=true")
        return sha
