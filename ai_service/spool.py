"""The publisher's on-disk spool: every message stays here until the broker confirms it.

One file per message, named by a sequence number so that a restarted process re-sends
in the original order.  The directory is locked for the life of the process: two
processes must not share a spool (they would both re-send it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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

    def header(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "properties": self.properties,
            "mandatory": self.mandatory,
        }


class SpoolLocked(RuntimeError):
    """Another live process holds this spool directory."""


class Spool:
    """Durable FIFO of unconfirmed messages (bounded by count)."""

    SUFFIX = ".msg"

    def __init__(self, directory: Path, max_messages: int) -> None:
        self.directory = directory
        self.max_messages = max_messages
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file: BinaryIO | None = None
        self._count = 0
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
        for path in sorted(self.directory.glob(f"*{self.SUFFIX}")):
            try:
                left.append(self._read(path))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("[RMQ] Dropping unreadable spooled message %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self._count = len(left)
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
    def full(self) -> bool:
        return self._count >= self.max_messages

    def add(self, envelope: Envelope) -> None:
        """Persist ``envelope`` and give it the next sequence number."""
        envelope.seq = self._next_seq
        self._next_seq += 1
        path = self._path(envelope.seq)
        tmp = path.with_suffix(".tmp")
        header = json.dumps(envelope.header(), separators=(",", ":")).encode()
        with open(tmp, "wb") as fh:
            fh.write(header + b"\n" + envelope.body)
        os.replace(tmp, path)
        self._count += 1

    def remove(self, envelope: Envelope) -> None:
        try:
            self._path(envelope.seq).unlink()
            self._count -= 1
        except FileNotFoundError:
            pass

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}{self.SUFFIX}"

    def _read(self, path: Path) -> Envelope:
        raw = path.read_bytes()
        head, _, body = raw.partition(b"\n")
        meta = json.loads(head)
        return Envelope(
            exchange=meta["exchange"],
            routing_key=meta["routing_key"],
            body=body,
            properties=meta["properties"],
            mandatory=bool(meta.get("mandatory", True)),
            seq=int(path.name[: -len(self.SUFFIX)]),
        )
