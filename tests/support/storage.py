"""Helpers for the storage tests (tests/test_storage*.py) that run on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from ai_service.storage import LocalStorage, S3Storage, Storage, make_s3_client


def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The backend ``request.param`` names: a fresh local root, or a fresh SeaweedFS bucket."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, client=make_s3_client(connect_timeout=2, read_timeout=10, max_attempts=2))


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` by its relative path, with its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
