"""A checkpoint store for ``CheckpointUploads`` tests that holds each upload until released."""

from __future__ import annotations

import threading
from pathlib import Path


class HeldStore:
    """Records the staged files' bytes once :attr:`release` is set; :attr:`uploading` says
    an upload has begun (so a test can rewrite the source files meanwhile)."""

    def __init__(self) -> None:
        self.uploading = threading.Event()
        self.release = threading.Event()
        self.seen: dict[str, bytes] = {}

    def __call__(self, staged: dict[str, Path], best_is_last: bool) -> None:
        self.uploading.set()
        self.release.wait(5)
        self.seen.update({name: path.read_bytes() for name, path in staged.items()})
