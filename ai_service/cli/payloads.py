"""Requests built from ``submit``'s flags (the operation's form) or ``--file``, validated
with the contract's models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ai_service.cli.base import CommandError, ExitCode, new_job_id
from ai_service.config import Settings
from ai_service.errors import InvalidInput
from ai_service.messages import describe_validation_error
from ai_service.registry import OPERATIONS, OperationSpec, Registry


def load_request_file(name: str) -> dict[str, Any]:
    """The JSON object in file ``name`` (``-``: stdin); exit 2 when it is none."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(ExitCode.USAGE, f"cannot read {name}: {exc}") from None
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise CommandError(ExitCode.USAGE, f"{'stdin' if name == '-' else name} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise CommandError(ExitCode.USAGE, "the request must be a JSON object")
    return payload


def build_request(args: argparse.Namespace, spec: OperationSpec) -> dict[str, Any]:
    """The request payload from --file or the form's flags (not validated yet)."""
    op = spec.name
    given = [f for f in spec.submit.flags if getattr(args, f, None) is not None]
    if args.file:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise CommandError(ExitCode.USAGE, f"--file cannot be combined with {flags} (edit the file instead)")
        payload = load_request_file(args.file)
        if args.job_id:
            payload["job_id"] = args.job_id
        elif "job_id" not in payload:
            payload["job_id"] = new_job_id(op)
        return payload
    try:
        return spec.submit.build(args, args.job_id or new_job_id(op))
    except InvalidInput as exc:
        raise CommandError(ExitCode.USAGE, exc.message) from None


def validate_request(op: str, payload: dict[str, Any], settings: Settings,
                     operations: Registry = OPERATIONS) -> bytes:
    """Validate with the contract's model; the body to publish (exit 2 when invalid)."""
    return check_request(operations[op], payload, settings)


def check_request(spec: OperationSpec, payload: dict[str, Any], settings: Settings) -> bytes:
    """As :func:`validate_request`, for the operation ``spec``."""
    try:
        spec.request.model.model_validate(payload)
    except ValidationError as exc:
        problem = describe_validation_error(exc)
        raise CommandError(ExitCode.USAGE, f"invalid {spec.word} request: {problem}") from None
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > settings.max_message_bytes:
        raise CommandError(
            ExitCode.USAGE,
            f"the request is {len(body)} bytes, over the {settings.max_message_bytes}-byte limit (MAX_MESSAGE_BYTES)",
        )
    return body
