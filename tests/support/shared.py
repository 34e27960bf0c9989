"""Build something once per test session, shared by every pytest-xdist worker.

xdist runs session fixtures once per worker process; expensive artefacts (a trained
model) are built by the first worker under a file lock and read by the others.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def session_root(factory: pytest.TempPathFactory) -> Path:
    """A directory shared by all xdist workers of this test session."""
    base = factory.getbasetemp()
    root = base.parent if base.name.startswith("popen-gw") else base
    path = root / "shared"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build(dir)`` once per session (across workers); return its JSON result."""
    root = session_root(factory)
    target = root / name
    done = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return dict(json.loads(done.read_text()))
        target.mkdir(parents=True, exist_ok=True)
        result = build(target)
        done.write_text(json.dumps(result))
        return result
