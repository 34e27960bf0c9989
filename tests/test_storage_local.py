"""The local-directory backend: what only it has (temporary files, permissions).

Its symlink rule (EscapesRoot) is tested in tests/test_containment.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ai_service.errors import StorageError
from ai_service.storage import (
    LocalStorage,
)


def test_a_local_half_written_temp_file_is_not_listed(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.write_bytes("ds/a.txt", b"a")
    (tmp_path / "ds" / ".b.txt.ais-tmp-123456").write_bytes(b"partial")
    assert [o.key for o in store.list("ds")] == ["ds/a.txt"]


def test_local_permission_problems_are_storage_errors(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "store"
        blocker.write_bytes(b"a file where the root folder should be")
        with pytest.raises(StorageError):
            LocalStorage(blocker).write_bytes("a/b", b"x")
        return
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(StorageError):
            LocalStorage(root).write_bytes("a/b", b"x")
    finally:
        root.chmod(0o700)
