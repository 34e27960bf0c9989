"""Following a job to its end: over RabbitMQ (a queue of our own bound to the job's
routing keys, or an RPC reply queue) or over a worker's HTTP API (README "HTTP-only mode")."""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

from ai_service.cli.base import CommandError, ExitCode, err
from ai_service.config import Settings
from ai_service.errors import BrokerError
from ai_service.registry import OPERATIONS, OperationSpec


def declare(client: Any, op: str) -> None:
    """Declare the operation's topology; a queue declared otherwise is used as it is."""
    problem = client.declare((op,))
    if problem:
        err(f"ai-service: note: could not declare the queues ({problem}); using them as they are")


def warn_if_no_worker(client: Any, settings: Settings, op: str) -> int | None:
    """The request queue's consumers (None: unknown); says so on stderr when there are none."""
    from ai_service.broker import queue_names

    queue = queue_names(settings, op).request
    consumers: int | None = client.consumer_count(queue)
    if not consumers:
        err(f"ai-service: no worker is consuming {queue!r} yet: the job waits there until one starts "
            f"(start one with `make run` or `make run-{op}-worker`)")
    return consumers


def outcome(message_type: str) -> ExitCode:
    """The exit code of a terminal message type."""
    if message_type.endswith("_completed"):
        return ExitCode.OK
    if message_type.endswith("_cancelled"):
        return ExitCode.CANCELLED
    return ExitCode.FAILED


def follow(client: Any, queue: str, job_id: str, timeout: float | None,
           correlation_id: str | None = None) -> ExitCode:
    """Show the job's progress until its terminal message; print that (JSON) on stdout."""
    from ai_service.progress import ProgressView

    view = ProgressView(sys.stderr, live=sys.stderr.isatty())
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for event in client.events(queue):
            if event is not None:
                if correlation_id is not None and event.properties.correlation_id != correlation_id:
                    continue
                view.show(event.body)
                if event.terminal:
                    view.close()
                    print(json.dumps(event.body, indent=2, ensure_ascii=False), flush=True)
                    return outcome(event.type)
            else:
                view.tick()
            if deadline is not None and time.monotonic() >= deadline:
                view.close()
                raise CommandError(
                    ExitCode.TIMEOUT,
                    f"job {job_id} did not end within {timeout:g} s; it goes on (see `ai-service status {job_id}`, "
                    f"or `ai-service cancel {job_id}`)",
                )
    except KeyboardInterrupt:
        view.close()
        raise CommandError(ExitCode.INTERRUPTED,
                           f"interrupted; job {job_id} goes on (`ai-service cancel {job_id}` stops it)") from None
    except BrokerError as exc:
        view.close()
        raise CommandError(ExitCode.BROKER, f"lost the connection to RabbitMQ while following {job_id} "
                           f"({exc.message}); the job goes on") from None
    raise CommandError(ExitCode.BROKER, "the broker ended the subscription")  # pragma: no cover


def request_reply(client: Any, op: str, body: bytes, job_id: str, timeout: float | None, *,
                  spec: OperationSpec | None = None) -> ExitCode:
    """Publish with ``reply_to`` (a queue of ours) and wait for the answer (RPC); ``spec``:
    ``op``'s (default: the registry's)."""
    spec = spec or OPERATIONS[op]
    reply_to = client.reply_queue()
    correlation_id = uuid.uuid4().hex
    client.submit(op, body, job_id, reply_to=reply_to, correlation_id=correlation_id)
    err(f"submitted {spec.word} job {job_id}; waiting for the result")
    return follow(client, reply_to, job_id, timeout, correlation_id=correlation_id)


def submit_http(base: str, op: str, body: bytes, job_id: str, settings: Settings, *, follow_it: bool,
                timeout: float | None, spec: OperationSpec | None = None) -> ExitCode:
    """POST the request to a worker's ``/v1/<op>``; with ``follow_it`` follow its events stream
    (an RPC operation answers the POST itself). ``spec``: ``op``'s (default: the registry's)."""
    from ai_service.http.follow import HttpFailure, post

    spec = spec or OPERATIONS[op]

    try:
        answer = post(base, f"/v1/{op}", body, settings.http_token, timeout=timeout or 300.0)
    except HttpFailure as exc:
        raise CommandError(ExitCode.BROKER, exc.message) from None
    if spec.rpc and isinstance(answer.body, dict) and "type" in answer.body:
        print(json.dumps(answer.body, indent=2, ensure_ascii=False), flush=True)
        return outcome(str(answer.body["type"]))
    if answer.status in (400, 413) and isinstance(answer.body, dict) and answer.body.get("type"):
        print(json.dumps(answer.body, indent=2, ensure_ascii=False), flush=True)
        raise CommandError(ExitCode.USAGE, f"invalid {spec.word} request: {answer.body.get('error_message')}")
    if answer.status != 202:
        detail = answer.body.get("detail") if isinstance(answer.body, dict) else answer.body
        retry = answer.headers.get("Retry-After")
        hint = f" (retry after {retry} s)" if retry else ""
        code = {401: ExitCode.USAGE, 409: ExitCode.USAGE, 429: ExitCode.NO_WORKER}.get(answer.status,
                                                                                    ExitCode.BROKER)
        raise CommandError(code, f"{base} answered HTTP {answer.status}: {detail}{hint}")
    if not follow_it:
        print(job_id, flush=True)
        return ExitCode.OK
    err(f"submitted {spec.word} job {job_id} to {base}")
    return follow_http(base, job_id, settings.http_token, timeout, terminal=spec.terminal_types())


def follow_http(base: str, job_id: str, token: str, timeout: float | None, *,
                terminal: frozenset[str] = OPERATIONS.terminal_types()) -> ExitCode:
    """As :func:`follow`, from ``/v1/jobs/<job_id>/events`` (reopened after a drop), until a
    message of a ``terminal`` type."""
    from ai_service.http.follow import HttpFailure, events
    from ai_service.progress import ProgressView

    view = ProgressView(sys.stderr, live=sys.stderr.isatty())
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for message in events(base, job_id, token, deadline=deadline):
            if message is not None:
                view.show(message)
                if str(message.get("type", "")) in terminal:
                    view.close()
                    print(json.dumps(message, indent=2, ensure_ascii=False), flush=True)
                    return outcome(str(message["type"]))
            else:
                view.tick()
            if deadline is not None and time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:
        view.close()
        raise CommandError(ExitCode.INTERRUPTED, f"interrupted; job {job_id} goes on "
                           f"(POST {base}/v1/jobs/{job_id}/cancel stops it)") from None
    except HttpFailure as exc:
        view.close()
        raise CommandError(ExitCode.NOT_FOUND if exc.status == 404 else ExitCode.BROKER, exc.message) from None
    view.close()
    raise CommandError(ExitCode.TIMEOUT, f"job {job_id} did not end within {timeout or 0:g} s; it goes on "
                       f"(GET {base}/v1/jobs/{job_id})")
