"""The event log of one HTTP-only job: its messages in order, in memory and on disk.

One JSON line per message in ``WORK_DIR/events/<op>/<job_id>.jsonl``, appended and
fsynced before the handler goes on; a repeat (same message_id, a second update for an
epoch or format, anything after the terminal message) is not appended again.  The
events stream (:mod:`ai_service.http.events`) reads it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_service.messages import new_message_id


@dataclass(frozen=True)
class Entry:
    """One message of a job, as the events stream serves it."""

    id: str
    kind: str
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        """A result: every operation's terminal messages, and only they, are ``<op>.result.<job_id>``."""
        return self.kind == "result"


class EventLog:
    """The messages of one job, in order; in memory, and on disk when ``path`` is set.

    ``max_entries`` bounds a memory-only log (the RabbitMQ-on follower): past it further
    progress messages are dropped (the terminal message never is).
    """

    def __init__(self, path: Path | None = None, *, max_entries: int = 100_000) -> None:
        self.path = path
        self.max_entries = max_entries
        self.entries: list[Entry] = []
        self.dropped = 0
        self._ids: set[str] = set()
        self._epochs: set[tuple[str, Any]] = set()
        self._lock = threading.Lock()
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        for line in path.read_bytes().splitlines():
            try:
                raw = json.loads(line)
                entry = Entry(str(raw["id"]), str(raw["kind"]), str(raw["type"]), dict(raw["data"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash mid-write: the handler sends it again
            self._remember(entry)

    def _remember(self, entry: Entry) -> bool:
        if entry.id in self._ids or self.terminal is not None:
            return False
        step = _step(entry)
        if step is not None and step in self._epochs:
            return False
        self._ids.add(entry.id)
        if step is not None:
            self._epochs.add(step)
        self.entries.append(entry)
        return True

    @property
    def terminal(self) -> Entry | None:
        return self.entries[-1] if self.entries and self.entries[-1].terminal else None

    def append(self, kind: str, message_type: str, data: dict[str, Any], message_id: str | None = None) -> Entry:
        """Append one message (durably when on disk); returns the entry (the stored one for a repeat)."""
        entry = Entry(message_id or new_message_id(), kind, message_type, data)
        with self._lock:
            if self.path is None and len(self.entries) >= self.max_entries and not entry.terminal:
                self.dropped += 1
                return entry
            if not self._remember(entry):
                return entry
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                line = json.dumps({"id": entry.id, "kind": kind, "type": message_type, "data": data},
                                  separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return entry

    def index_after(self, last_id: str | None) -> int:
        """Where a stream resuming after ``last_id`` starts (0 when None or unknown)."""
        if last_id:
            for i, entry in enumerate(self.entries):
                if entry.id == last_id:
                    return i + 1
        return 0

    @property
    def last_update(self) -> Entry | None:
        for entry in reversed(self.entries):
            if entry.kind == "update":
                return entry
        return None

    @property
    def progress(self) -> float:
        values = [float(e.data["progress"]) for e in self.entries if isinstance(e.data.get("progress"), (int, float))]
        return max(values, default=0.0)


def _step(entry: Entry) -> tuple[str, Any] | None:
    """What makes a progress message one of a kind: its epoch or its format."""
    if entry.type == "epoch_update":
        return entry.type, entry.data.get("current_epoch")
    if entry.type == "conversion_update":
        return entry.type, entry.data.get("current_format")
    return None
