"""Where a worker's publisher spools: ``<WORK_DIR>/spool/<worker>/<op>``, and adopting the
messages an older version left one level up.  Apart from the process code in
:mod:`ai_service.worker` because the publisher tests and scripts only need the paths."""

from __future__ import annotations

import fcntl
import logging
import os
import re
from pathlib import Path

from ai_service.config import Settings

log = logging.getLogger("ai_service.worker")


def safe_worker_name(settings: Settings) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.worker_name).strip("_") or "worker"


def spool_dir(settings: Settings, op: str) -> Path:
    """``<WORK_DIR>/spool/<worker>/<op>``: processes of different operations may share a
    WORKER_NAME and WORK_DIR; two processes of one operation may not (the spool is locked)."""
    return settings.work_dir / "spool" / safe_worker_name(settings) / op


def adopt_legacy_spool(settings: Settings, op: str) -> int:
    """Move the messages an older version left in ``<WORK_DIR>/spool/<worker>/`` (before the
    operation was part of the path) into this operation's spool; returns how many."""
    new = spool_dir(settings, op)
    old = new.parent
    if not any(old.glob("*.msg")):
        return 0
    locks = []
    try:
        for directory in (old, new):
            directory.mkdir(parents=True, exist_ok=True)
            lock = open(directory / ".lock", "wb")  # noqa: SIM115 - held (flock) until closed below
            locks.append(lock)
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live process holds one of them; the publisher's own lock says so
        if any(new.glob("*.msg")):
            log.warning("[RMQ] Old-layout spool %s still holds messages; %s has its own, so they stay there",
                        old, new)
            return 0
        moved = sorted(old.glob("*.msg"))
        for path in moved:
            os.replace(path, new / path.name)
        log.warning("[RMQ] Moved %d unconfirmed message(s) from the old-layout spool %s to %s", len(moved), old, new)
        return len(moved)
    finally:
        for lock in locks:
            lock.close()

