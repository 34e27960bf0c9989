"""``ai-service status JOB``: a recorded job's record, read from storage."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from ai_service.cli.base import EXIT_CODES_HELP, CommandError, ExitCode, check_job_id, iso, open_storage
from ai_service.cli.render import format_record
from ai_service.config import Settings
from ai_service.errors import ObjectNotFound, StorageError
from ai_service.registry import Registry, listed


def add_status(sub: Any, fmt: type[argparse.HelpFormatter], operations: Registry) -> None:
    """``status JOB [--op OP]``: the recorded operations of the registry."""
    recorded = operations.recorded()
    words = listed((operations[op].word for op in recorded), "and")
    p = sub.add_parser(
        "status", help=f"show a job's record from storage ({words} jobs)",
        formatter_class=fmt,
        description="Print the job record jobs/<op>/JOB.json (status, attempt, owner, lease, last epoch,\n"
        "checkpoints, terminal message) from the storage that STORAGE_BACKEND, STORAGE_DIR\n"
        "and S3_BUCKET name. Inference jobs keep no record. Exit 6 when there is none.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--op", choices=list(recorded),
                   help=f"the operation (default: {', then '.join(recorded)})")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_status, recorded=recorded)


def cmd_status(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """Print the job record (and whether a cancel is marked) as text or JSON."""
    from ai_service.jobs import JobRecord

    job_id = check_job_id(args.job_id)
    ops = [args.op] if getattr(args, "op", None) else list(args.recorded)
    raw, cancel_requested = _read_record(settings, job_id, ops)
    try:
        record = JobRecord.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise CommandError(ExitCode.STORAGE, f"the job record of {job_id} is unreadable ({exc})") from None
    data = asdict(record)
    data.pop("etag", None)  # the version this process read, not part of the record
    data["cancel_requested"] = cancel_requested
    data["lease_expires_at"] = iso(record.lease_expires)
    data["updated_at"] = iso(record.updated)
    data["terminal_type"] = (record.terminal or {}).get("type")
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return ExitCode.OK
    print(format_record(data))
    return ExitCode.OK


def _read_record(settings: Settings, job_id: str, ops: list[str]) -> tuple[bytes, bool]:
    """The first record found of ``ops`` (then the legacy key), and whether a cancel is marked."""
    from ai_service.jobs import cancel_key, legacy_record_key, record_key

    storage = open_storage(settings)
    prefix = settings.jobs_prefix
    keys = [record_key(op, job_id, prefix) for op in ops] + [legacy_record_key(job_id, prefix)]
    raw = None
    try:
        for key in keys:
            try:
                raw = storage.read_bytes(key)
                break
            except ObjectNotFound:
                continue
        cancel_requested = storage.stat(cancel_key(job_id, prefix)) is not None
    except StorageError as exc:
        raise CommandError(ExitCode.STORAGE, exc.message) from None
    if raw is None:
        raise CommandError(
            ExitCode.NOT_FOUND,
            f"no job record for {job_id} in {storage.describe()} ({', '.join(keys[:-1])}): no worker has taken "
            "it yet, or it is an inference job (they keep no record), or the storage settings point elsewhere",
        ) from None
    return bytes(raw), cancel_requested
