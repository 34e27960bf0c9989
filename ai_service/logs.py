"""Logging set-up: text (``[RMQ]`` / ``[Handler]`` prefixes) or one JSON object a line.

Called once by the process entry point; nothing here runs at import time.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from ai_service.config import Settings

_NOISY = ("pika", "botocore", "boto3", "s3transfer", "urllib3", "PIL", "matplotlib")


class JsonFormatter(logging.Formatter):
    """One JSON object per line with ``job_id``, ``worker`` and ``op`` when known."""

    def __init__(self, worker: str, op: str | None) -> None:
        super().__init__()
        self.worker = worker
        self.op = op

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "worker": self.worker,
            "op": getattr(record, "op", None) or self.op,
            "job_id": getattr(record, "job_id", None),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: Settings, op: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(settings.worker_name, op))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # pika logs a traceback for every failed connection attempt; our own [RMQ] lines
    # already say what failed and that we retry.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    logging.getLogger("ultralytics").setLevel(max(logging.WARNING, root.level))
