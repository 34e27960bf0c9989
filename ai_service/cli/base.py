"""What every BE-side command shares: exit codes, the error that ends a command, and the
connections to RabbitMQ and storage with their failures mapped to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from ai_service.config import ConfigError, Settings
from ai_service.errors import AuthenticationFailed, BrokerError, StorageError
from ai_service.errors import CommandError as CommandError  # defined in errors.py, importable from here as before
from ai_service.messages import JOB_ID_RE


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    CANCELLED = 3
    TIMEOUT = 4
    BROKER = 5
    NOT_FOUND = 6
    STORAGE = 7
    NO_WORKER = 8
    INTERRUPTED = 130


EXIT_CODES_HELP = """\
exit codes (stable, for scripts):
  0    success; with --follow (and demo): the job completed
  1    the job failed (*_failed), an inference was answered inference_failed,
       or asyncapi|openapi --check found the file stale
  2    usage error, invalid request (every bad field is named) or bad configuration
  3    the job was cancelled (*_cancelled)
  4    --timeout passed before the job ended (the job itself goes on)
  5    RabbitMQ unreachable, credentials refused, or the connection dropped
  6    not found: no job record (status), no such dead-letter queue or no
       matching dead letter (dlq), no worker heard (workers)
  7    storage error (status, demo, cancel --record)
  8    no worker consumes the train request queue (demo --no-wait)
  130  interrupted (Ctrl-C); a job already submitted goes on
"""

def err(text: str) -> None:
    """Print a line for the human on stderr (stdout carries the results)."""
    print(text, file=sys.stderr, flush=True)


def connect(settings: Settings, purpose: str) -> Any:
    """A :class:`~ai_service.client.BrokerClient`; exit 5 with a hint when RabbitMQ is unreachable."""
    from ai_service.broker import describe_endpoint
    from ai_service.client import BrokerClient

    try:
        return BrokerClient(settings, purpose=purpose)
    except AuthenticationFailed:
        raise
    except BrokerError as exc:
        raise CommandError(
            ExitCode.BROKER,
            f"cannot reach RabbitMQ at {describe_endpoint(settings)}: {exc.message}\n"
            "Is it running? `make rabbitmq` starts a local one; RABBITMQ_HOST/RABBITMQ_PORT say where.",
        ) from None


def check_job_id(value: str) -> str:
    """``value`` when it is a valid job id; exit 2 otherwise."""
    if not JOB_ID_RE.fullmatch(value):
        raise CommandError(ExitCode.USAGE, f"job id {value!r} is invalid: 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def new_job_id(op: str) -> str:
    """A fresh job id, ``<op>-`` and 12 hex digits: unique without asking anyone."""
    return f"{op}-{uuid.uuid4().hex[:12]}"


def open_storage(settings: Settings) -> Any:
    """The storage the settings name; exit 2 or 7 when it cannot be opened."""
    from ai_service.storage import open_storage as open_backend

    try:
        return open_backend(settings)
    except ConfigError as exc:
        raise CommandError(ExitCode.USAGE, f"configuration error: {exc}") from None
    except StorageError as exc:
        raise CommandError(ExitCode.STORAGE, exc.message) from None


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC (to the second), None for none."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def run_command(args: argparse.Namespace) -> int:
    """Run a BE-side command; map the error families to exit codes."""
    logging.basicConfig(level=logging.WARNING, format="ai-service: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    func: Callable[..., ExitCode] = args.func
    try:
        if getattr(args, "needs_settings", True):
            try:
                settings = Settings.from_env()
            except ConfigError as exc:
                raise CommandError(ExitCode.USAGE, f"configuration error: {exc}") from None
            return int(func(args, settings))
        return int(func(args))
    except CommandError as exc:
        err(f"ai-service: {exc.message}")
        return int(exc.code)
    except AuthenticationFailed as exc:
        err(f"ai-service: RabbitMQ refused the credentials: {exc.message}")
        return int(ExitCode.BROKER)
    except BrokerError as exc:
        err(f"ai-service: RabbitMQ: {exc.message}")
        return int(ExitCode.BROKER)
    except KeyboardInterrupt:
        err("\nai-service: interrupted")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # stdout went away (`| head`): not an error of ours; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)
