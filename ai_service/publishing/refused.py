"""The refused-messages file: what the broker refused for good, kept for an operator to look at."""

from __future__ import annotations

import base64
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ai_service.spool import Envelope


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
