"""``ai-service submit <op>`` (one subcommand per operation spec) and ``ai-service cancel``."""

from __future__ import annotations

import argparse
from typing import Any

from ai_service.cli.base import EXIT_CODES_HELP, CommandError, ExitCode, check_job_id, connect, err, open_storage
from ai_service.cli.follow import declare, follow, request_reply, submit_http, warn_if_no_worker
from ai_service.cli.payloads import build_request, check_request
from ai_service.config import Settings
from ai_service.errors import StorageError
from ai_service.messages import Cancel
from ai_service.registry import OperationSpec, Registry, listed


def add_submit(sub: Any, fmt: type[argparse.HelpFormatter], operations: Registry) -> None:
    """``submit`` with one subcommand per operation: the common flags, then the operation's form."""
    p = sub.add_parser(
        "submit", help=f"submit a {listed(spec.word for spec in operations)} request", formatter_class=fmt,
        description="Validate a request with the contract's model and publish it (persistent,\n"
        "confirmed) to the operation's request queue. Prints the job id, or with --follow\n"
        "the job's progress (stderr) and its terminal message (stdout, JSON).",
        epilog=EXIT_CODES_HELP,
    )
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    common = _common_flags()
    for spec in operations:
        form = spec.submit
        q = ops.add_parser(spec.name, parents=[common], help=form.help, formatter_class=fmt, epilog=EXIT_CODES_HELP,
                           description=form.description)
        form.add_arguments(q.add_argument_group(form.group))
        q.set_defaults(func=cmd_submit, spec=spec)


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("request and delivery")
    group.add_argument("-f", "--file", metavar="FILE",
                       help="the request as JSON ('-' reads stdin); --job-id may override its job_id")
    group.add_argument("--job-id", help="job id (default: the file's, or generated)")
    group.add_argument("--follow", action="store_true",
                       help="follow the job until it ends, through a queue of our own bound to its routing keys")
    group.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="stop waiting after this many seconds (exit 4); the job goes on")
    group.add_argument("--http", metavar="URL",
                       help="send it to a worker's HTTP API instead (e.g. http://127.0.0.1:8101; HTTP_TOKEN "
                            "from the environment as the bearer token): POST /v1/<op>, --follow reads "
                            "/v1/jobs/<id>/events")
    return common


def cmd_submit(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """Validate and publish the request; with --follow (or RPC) wait for its end."""
    spec: OperationSpec = args.spec
    op = spec.name
    payload = build_request(args, spec)
    body = check_request(spec, payload, settings)
    job_id = str(payload["job_id"])
    if args.http:
        return submit_http(args.http, op, body, job_id, settings, follow_it=args.follow, timeout=args.timeout,
                           spec=spec)
    rpc = spec.rpc and not args.follow
    with connect(settings, f"submit {op}") as client:
        declare(client, op)
        if args.follow or rpc:
            warn_if_no_worker(client, settings, op)
        if rpc:
            return request_reply(client, op, body, job_id, args.timeout, spec=spec)
        queue = client.watch(op, job_id) if args.follow else None
        client.submit(op, body, job_id)
        if queue is None:
            print(job_id, flush=True)
            return ExitCode.OK
        err(f"submitted {spec.word} job {job_id}")
        return follow(client, queue, job_id, args.timeout)


def add_cancel(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """``cancel JOB [--record]``."""
    p = sub.add_parser(
        "cancel", help="cancel a job (the contract's cancel message on CONTROL_EXCHANGE)", formatter_class=fmt,
        description="Publish {\"type\": \"cancel\", \"job_id\": JOB} to the control exchange (fanout).\n"
        "A running job stops at its next safe point and ends with *_cancelled; a job\n"
        "not yet taken is answered *_cancelled when a worker takes it.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--record", action="store_true",
                   help="also write the cancel marker jobs/JOB.cancel to storage (STORAGE_* settings), so the job "
                        "is cancelled even when no worker is running right now")
    p.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """Publish the cancel (and with --record write the marker a later worker finds)."""
    job_id = check_job_id(args.job_id)
    Cancel(type="cancel", job_id=job_id)  # the contract's shape, checked
    if args.record:
        _record_cancel(settings, job_id)
    with connect(settings, "cancel") as client:
        delivered = client.cancel(job_id)
    if delivered:
        err(f"cancel requested for job {job_id} (running workers stop it now; the cancel stream keeps it for "
            f"CANCEL_RETENTION={settings.cancel_retention} s, so that a worker started later honours it too)")
    else:
        err(f"cancel for job {job_id} published, but no worker listens on {settings.control_exchange!r} right now"
            + ("; the marker in storage cancels it when a worker takes it" if args.record
               else " (use --record so that a worker started later cancels it too)"))
    return ExitCode.OK


def _record_cancel(settings: Settings, job_id: str) -> None:
    """Write the cancel marker, so that a worker started later cancels the job too."""
    from ai_service.jobs import Ledger

    storage = open_storage(settings)
    try:
        Ledger(storage, op="", worker="ai-service-cli", lease_seconds=settings.lease_seconds,
               prefix=settings.jobs_prefix).request_cancel(job_id)
    except StorageError as exc:
        raise CommandError(ExitCode.STORAGE, f"cannot write the cancel marker: {exc.message}") from None
