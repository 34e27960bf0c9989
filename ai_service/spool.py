"""The publisher's on-disk spool: every message stays here until the broker confirms it.

One file per message, named by a sequence number so that a restarted process re-sends
in the original order.  The directory is locked for the life of the process: two
processes must not share a spool (they would both re-send it).  The spool is bounded by
message count (``SPOOL_MAX_MESSAGES``) and by bytes on disk (``SPOOL_MAX_BYTES``).

Messages the broker refuses for good leave the spool and are kept, for an operator to
look at, in a small :class:`RefusedLog` (``refused.jsonl`` in the spool directory,
bounded in bytes; the spool itself only reads ``*.msg`` files).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ai_service.errors import SpoolLocked

log = logging.getLogger("ai_service.spool")


@dataclass
class Envelope:
    """A message ready to publish, with everything needed to re-send it identically."""

    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    mandatory: bool = True
    seq: int = 0
    #: Set when the broker confirmed it (or it was given up as unroutable).
    done: bool = field(default=False, compare=False)
    #: This message stands in for one that was refused: it is never replaced in turn.
    replacement: bool = False

    def header(self) -> dict[str, Any]:
        head: dict[str, Any] = {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "properties": self.properties,
            "mandatory": self.mandatory,
        }
        if self.replacement:
            head["replacement"] = True
        return head

    @property
    def message_id(self) -> str:
        return str(self.properties.get("message_id") or "")


class Spool:
    """Durable FIFO of unconfirmed messages, bounded by count and by bytes on disk.

    ``max_bytes`` (``SPOOL_MAX_BYTES``) bounds the spooled files' total size; ``None``
    leaves only the count bound.  The spool is :attr:`full` once either bound is
    reached, so one message larger than the rest of the room still gets in.
    """

    SUFFIX = ".msg"

    def __init__(self, directory: Path, max_messages: int, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file: BinaryIO | None = None
        self._count = 0
        self._bytes = 0
        self._sizes: dict[int, int] = {}
        self._next_seq = 1

    def open(self) -> list[Envelope]:
        """Lock the directory and return the messages a previous process left, in order."""
        lock = open(self.directory / ".lock", "wb")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise SpoolLocked(f"spool {self.directory} is in use by another process (same WORKER_NAME?)") from None
        self._lock_file = lock
        left: list[Envelope] = []
        self._sizes = {}
        for path in sorted(self.directory.glob(f"*{self.SUFFIX}")):
            try:
                envelope, size = self._read(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("[RMQ] Dropping unreadable spooled message %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            left.append(envelope)
            self._sizes[envelope.seq] = size
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self._count = len(left)
        self._bytes = sum(self._sizes.values())
        if left:
            self._next_seq = left[-1].seq + 1
        return left

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Total size of the spooled files."""
        return self._bytes

    @property
    def full(self) -> bool:
        if self._count >= self.max_messages:
            return True
        return self.max_bytes is not None and self._bytes >= self.max_bytes

    def add(self, envelope: Envelope) -> None:
        """Persist ``envelope`` and give it the next sequence number."""
        envelope.seq = self._next_seq
        self._next_seq += 1
        self._write(envelope)
        self._count += 1

    def swap(self, old: Envelope, new: Envelope) -> None:
        """Replace ``old`` by ``new`` in one atomic rename, in ``old``'s place in the order."""
        new.seq = old.seq
        if old.seq not in self._sizes:  # already gone: ``new`` is a new entry in that place
            self._count += 1
        self._write(new)

    def remove(self, envelope: Envelope) -> None:
        try:
            self._path(envelope.seq).unlink()
            self._count -= 1
        except FileNotFoundError:
            pass
        self._bytes -= self._sizes.pop(envelope.seq, 0)

    def _write(self, envelope: Envelope) -> None:
        path = self._path(envelope.seq)
        tmp = path.with_suffix(".tmp")
        data = json.dumps(envelope.header(), separators=(",", ":")).encode() + b"\n" + envelope.body
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        self._bytes += len(data) - self._sizes.get(envelope.seq, 0)
        self._sizes[envelope.seq] = len(data)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}{self.SUFFIX}"

    def _read(self, path: Path) -> tuple[Envelope, int]:
        raw = path.read_bytes()
        head, _, body = raw.partition(b"\n")
        meta = json.loads(head)
        envelope = Envelope(
            exchange=meta["exchange"],
            routing_key=meta["routing_key"],
            body=body,
            properties=meta["properties"],
            mandatory=bool(meta.get("mandatory", True)),
            seq=int(path.name[: -len(self.SUFFIX)]),
            replacement=bool(meta.get("replacement", False)),
        )
        return envelope, len(raw)


class RefusedLog:
    """Messages refused for good, one JSON object a line, bounded in bytes.

    Each line has ``time``, ``code``, ``reason``, ``exchange``, ``routing_key``,
    ``properties``, ``body_bytes`` and, for bodies up to ``body_limit`` bytes,
    ``body_base64``.  Past half of ``max_bytes`` the file is rotated to ``<name>.1``
    (the older ``.1`` is dropped), so the two together stay within ``max_bytes``.
    """

    def __init__(self, path: Path, max_bytes: int = 16 * 1024 * 1024, body_limit: int = 64 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.body_limit = body_limit
        self._lock = threading.Lock()

    def append(self, envelope: Envelope, code: str, reason: str) -> None:
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(),
            "code": code,
            "reason": reason,
            "exchange": envelope.exchange,
            "routing_key": envelope.routing_key,
            "properties": envelope.properties,
            "body_bytes": len(envelope.body),
        }
        if len(envelope.body) <= self.body_limit:
            entry["body_base64"] = base64.b64encode(envelope.body).decode()
        line = json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(line) > self.max_bytes // 2:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with open(self.path, "ab") as fh:
                fh.write(line)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry still kept, oldest first."""
        out: list[dict[str, Any]] = []
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            out.extend(json.loads(line) for line in text.splitlines() if line.strip())
        return out
