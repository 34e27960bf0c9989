"""The BE-side ``ai-service`` commands: ``submit``, ``cancel``, ``status``, ``dlq``,
``workers``, ``demo``, ``asyncapi`` and ``openapi``.

Nothing here (or in what it imports) loads torch or Ultralytics, so these start fast;
``tests/test_cli.py`` checks it.  Every command returns an :class:`ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ai_service.cli import demo
from ai_service.cli.base import (
    EXIT_CODES_HELP,
    OP_WORDS,
    CommandError,
    ExitCode,
    check_job_id,
    connect,
    err,
    iso,
    open_storage,
)
from ai_service.cli.follow import declare, follow, request_reply, submit_http, warn_if_no_worker
from ai_service.cli.payloads import build_request, validate_request
from ai_service.config import ConfigError, Settings
from ai_service.errors import AuthenticationFailed, BrokerError, ObjectNotFound, StorageError
from ai_service.messages import Cancel

# --- the parser ----------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """Add the BE-side subcommands to the ``ai-service`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    _add_submit(sub, fmt)

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

    p = sub.add_parser(
        "status", help="show a job's record from storage (training and conversion jobs)", formatter_class=fmt,
        description="Print the job record jobs/<op>/JOB.json (status, attempt, owner, lease, last epoch,\n"
        "checkpoints, terminal message) from the storage that STORAGE_BACKEND, STORAGE_DIR\n"
        "and S3_BUCKET name. Inference jobs keep no record. Exit 6 when there is none.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--op", choices=["train", "convert"], help="the operation (default: train, then convert)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_status)

    _add_dlq(sub, fmt)

    p = sub.add_parser(
        "workers", help="list the running workers, from their heartbeats", formatter_class=fmt,
        description="Bind an exclusive, auto-delete queue of our own to EVENTS_EXCHANGE with `worker.#`,\n"
        "listen for about 1.5 heartbeat intervals (HEARTBEAT_SECONDS, or --wait) and print one line per\n"
        "worker: name, operation, state, device/GPU, current job and progress, last seen, versions.\n"
        "A worker silent for 3 of its intervals shows as `lost`; one that said so, `stopped`.\n"
        "Exit 6 when no worker was heard.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--wait", type=float, metavar="SECONDS", help="listen this long (default 1.5 x HEARTBEAT_SECONDS)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list: each worker's last heartbeat with status, last_seen and age_seconds")
    p.set_defaults(func=cmd_workers)

    demo.add_parser(sub, fmt)


    p = sub.add_parser(
        "asyncapi", help="print the AsyncAPI 3.0 document of the message contract", formatter_class=fmt,
        description="Generate the AsyncAPI 3.0.0 document (docs/asyncapi.yaml) from the pydantic\n"
        "message models and the default settings.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("-o", "--output", type=Path, help="write it to this file instead of stdout")
    p.add_argument("--check", type=Path, metavar="FILE",
                   help="exit 1 if FILE differs from the generated document (stale)")
    p.add_argument("--env", action="store_true",
                   help="use the queue, exchange and broker names of this environment instead of the defaults")
    p.set_defaults(func=cmd_asyncapi, needs_settings=False)

    p = sub.add_parser(
        "openapi", help="print the OpenAPI 3 document of the worker HTTP API", formatter_class=fmt,
        description="Generate the OpenAPI document (docs/openapi.json) of the workers' HTTP API from\n"
        "its routes and the pydantic message models.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("-o", "--output", type=Path, help="write it to this file instead of stdout")
    p.add_argument("--check", type=Path, metavar="FILE",
                   help="exit 1 if FILE differs from the generated document (stale)")
    p.set_defaults(func=cmd_openapi, needs_settings=False)

    _add_supervisor_config(sub, fmt)


def _add_supervisor_config(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    from ai_service.supervisor import DEFAULT_OUTPUT, parse_gpus

    def gpus(text: str) -> Any:
        from ai_service.supervisor import GpuListError

        try:
            return parse_gpus(text)
        except GpuListError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    p = sub.add_parser(
        "supervisor-config", help="write supervisord's worker programs (the GPU split) to supervisor.d/workers.conf",
        formatter_class=fmt,
        description="Write the include that supervisord.conf pulls in: group `ai` with one program per\n"
        "operation and GPU (`train-gpu0`, ...), each pinned with CUDA_VISIBLE_DEVICES=<gpu>, or one\n"
        "`<op>-cpu0` of each kind (CUDA_VISIBLE_DEVICES=\"\") without a GPU. An operation whose list is\n"
        "not given gets every GPU that `nvidia-smi` lists (narrowed by CUDA_VISIBLE_DEVICES), else the\n"
        "CPU. GPUS: 0-3, 0,2,5, 0-1,6, none (no worker of that kind), cpu, cpu:N.\n"
        "Apply a new split with `supervisorctl reread && supervisorctl update` (restarts group ai warmly).",
        epilog=EXIT_CODES_HELP,
    )
    for op in ("train", "convert", "infer"):
        p.add_argument(f"--{op}-gpus", type=gpus, metavar="GPUS", dest=f"{op}_gpus",
                       help=f"where the {op} workers run (default: every detected GPU, else the CPU)")
    p.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), metavar="PATH|-",
                   help=f"write here, `-` for stdout (default {DEFAULT_OUTPUT}, beside supervisord.conf in the "
                        "current directory)")
    p.set_defaults(func=cmd_supervisor_config, needs_settings=False)


def _add_submit(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "submit", help="submit a training, conversion or inference request", formatter_class=fmt,
        description="Validate a request with the contract's model and publish it (persistent,\n"
        "confirmed) to the operation's request queue. Prints the job id, or with --follow\n"
        "the job's progress (stderr) and its terminal message (stdout, JSON).",
        epilog=EXIT_CODES_HELP,
    )
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")

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

    t = ops.add_parser(
        "train", parents=[common], help="a training job", formatter_class=fmt, epilog=EXIT_CODES_HELP,
        description="A training request from --file or from the flags below, e.g.\n"
        "  ai-service submit train --dataset datasets/shapes/ --epochs 10 --imgsz 128 --follow\n"
        "--follow shows epoch x/y, loss, mAP50 and ETA, and ends with the terminal message.",
    )
    g = t.add_argument_group("training request (without --file)")
    g.add_argument("--dataset", metavar="PREFIX", help="storage prefix of the dataset (with data.yaml)")
    g.add_argument("--dataset-name", help="dataset name (default: the prefix's last segment)")
    g.add_argument("--model", help="model architecture, e.g. yolov8n (default yolov8n)")
    g.add_argument("--epochs", type=int, help="epochs (default 100)")
    g.add_argument("--batch", type=int, help="batch size, -1 = auto (default 16)")
    g.add_argument("--imgsz", type=int, help="image size (default 640)")
    g.add_argument("--output-prefix", help="storage prefix for the weights (default models/<model>)")
    g.add_argument("--model-name", help="weights file name (default <dataset name>-<job id>.pt)")
    g.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="an optional hyperparameter (patience, lr0, optimizer, seed, ...); VALUE is JSON "
                        "when it parses as JSON, else a string; repeatable")
    t.set_defaults(func=cmd_submit)

    c = ops.add_parser(
        "convert", parents=[common], help="a conversion (export) job", formatter_class=fmt, epilog=EXIT_CODES_HELP,
        description="A conversion request from --file or from the flags below, e.g.\n"
        "  ai-service submit convert --model-path models/yolov8n/shapes.pt --formats onnx,torchscript --follow",
    )
    g = c.add_argument_group("conversion request (without --file)")
    g.add_argument("--model-path", help="storage key of the .pt weights")
    g.add_argument("--formats", help="comma-separated export formats (default onnx), e.g. onnx,torchscript")
    g.add_argument("--output-prefix", help="storage prefix for the exports (default <model dir>/exports)")
    g.add_argument("--imgsz", type=int, help="export image size (default 640)")
    g.add_argument("--half", action="store_true", default=None, help="FP16 export")
    g.add_argument("--int8", action="store_true", default=None, help="INT8 export")
    g.add_argument("--dynamic", action="store_true", default=None, help="dynamic input shapes")
    g.add_argument("--opset", type=int, help="ONNX opset")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other export option (simplify, batch, ...), VALUE as JSON; repeatable")
    c.set_defaults(func=cmd_submit)

    i = ops.add_parser(
        "infer", parents=[common], help="an inference request (RPC: waits for and prints the result)",
        formatter_class=fmt, epilog=EXIT_CODES_HELP,
        description="Without --follow the request carries reply_to (an exclusive queue of ours) and\n"
        "a correlation_id, and the result is printed as JSON when it arrives.",
    )
    g = i.add_argument_group("inference request (without --file)")
    g.add_argument("--model-path", help="storage key of the model (.pt or an exported artifact)")
    g.add_argument("--image", dest="images", action="append", type=lambda s: ("path", s), metavar="KEY",
                   help="storage key of an image; repeatable")
    g.add_argument("--image-file", dest="images", action="append", type=lambda s: ("file", s), metavar="PATH",
                   help="a local image file, sent inline (base64); repeatable")
    g.add_argument("--conf", type=float, help="confidence threshold (default 0.25)")
    g.add_argument("--iou", type=float, help="NMS IoU threshold (default 0.7)")
    g.add_argument("--imgsz", type=int, help="image size (default 640)")
    g.add_argument("--max-det", type=int, help="detections per image (default 300)")
    g.add_argument("--classes", help="comma-separated class ids to keep")
    i.set_defaults(func=cmd_submit)


def _add_dlq(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "dlq", help="list or replay dead-lettered requests", formatter_class=fmt,
        description="QUEUE is an operation (train, convert, infer) or a request queue's name;\n"
        "its dead letters are in <request queue>.dlq.",
        epilog=EXIT_CODES_HELP,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = actions.add_parser(
        "list", help="show the dead letters without removing them", formatter_class=fmt, epilog=EXIT_CODES_HELP,
        description="Non-destructive: messages are fetched with basic.get without an ack and all\n"
        "returned to the queue at the end (basic.nack, requeue), so they stay, in order.\n"
        "While the listing runs they are invisible to other consumers. On quorum queues\n"
        "RabbitMQ before 4.3 counts each return as a delivery attempt (x-delivery-count).",
    )
    lst.add_argument("queue", metavar="QUEUE")
    lst.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument("--body", action="store_true", help="include each message body")
    lst.set_defaults(func=cmd_dlq_list)
    rep = actions.add_parser(
        "replay", help="re-publish dead letters to the request queue", formatter_class=fmt, epilog=EXIT_CODES_HELP,
        description="Each selected dead letter is re-published to the request queue (persistent,\n"
        "confirmed, same properties without the x- headers) and removed from the .dlq only\n"
        "after the broker confirmed the copy; the others stay where they were.",
    )
    rep.add_argument("queue", metavar="QUEUE")
    which = rep.add_mutually_exclusive_group(required=True)
    which.add_argument("--job-id", help="replay the dead letters of this job")
    which.add_argument("--all", action="store_true", help="replay every dead letter")
    rep.add_argument("--limit", type=int, default=10000, help="look at most at this many (default 10000)")
    rep.set_defaults(func=cmd_dlq_replay)


# --- running a command -----------------------------------------------------------------


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


# --- submit ----------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, settings: Settings) -> ExitCode:
    op = args.op
    payload = build_request(args)
    body = validate_request(op, payload, settings)
    job_id = str(payload["job_id"])
    if args.http:
        return submit_http(args.http, op, body, job_id, settings, follow_it=args.follow, timeout=args.timeout)
    rpc = op == "infer" and not args.follow
    with connect(settings, f"submit {op}") as client:
        declare(client, op)
        if args.follow or rpc:
            warn_if_no_worker(client, settings, op)
        if rpc:
            return request_reply(client, op, body, job_id, args.timeout)
        queue = client.watch(op, job_id) if args.follow else None
        client.submit(op, body, job_id)
        if queue is None:
            print(job_id, flush=True)
            return ExitCode.OK
        err(f"submitted {OP_WORDS[op]} job {job_id}")
        return follow(client, queue, job_id, args.timeout)


# --- cancel ----------------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> ExitCode:
    job_id = check_job_id(args.job_id)
    Cancel(type="cancel", job_id=job_id)  # the contract's shape, checked
    if args.record:
        from ai_service.jobs import Ledger

        storage = open_storage(settings)
        try:
            Ledger(storage, op="", worker="ai-service-cli", lease_seconds=settings.lease_seconds,
                   prefix=settings.jobs_prefix).request_cancel(job_id)
        except StorageError as exc:
            raise CommandError(ExitCode.STORAGE, f"cannot write the cancel marker: {exc.message}") from None
    with connect(settings, "cancel") as client:
        delivered = client.cancel(job_id)
    if delivered:
        err(f"cancel requested for job {job_id}")
    else:
        err(f"cancel for job {job_id} published, but no worker listens on {settings.control_exchange!r} right now"
            + ("; the marker in storage cancels it when a worker takes it" if args.record
               else " (use --record so that a worker started later cancels it too)"))
    return ExitCode.OK


# --- status ----------------------------------------------------------------------------



def cmd_status(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from ai_service.jobs import JobRecord, cancel_key, legacy_record_key, record_key

    job_id = check_job_id(args.job_id)
    storage = open_storage(settings)
    prefix = settings.jobs_prefix
    ops = [args.op] if getattr(args, "op", None) else ["train", "convert"]
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
    try:
        record = JobRecord.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise CommandError(ExitCode.STORAGE, f"the job record of {job_id} is unreadable ({exc})") from None
    data = asdict(record)
    data["cancel_requested"] = cancel_requested
    data["lease_expires_at"] = iso(record.lease_expires)
    data["updated_at"] = iso(record.updated)
    data["terminal_type"] = (record.terminal or {}).get("type")
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return ExitCode.OK
    print(format_record(data))
    return ExitCode.OK


def format_record(data: dict[str, Any]) -> str:
    now = time.time()
    lease = "-"
    if data["lease_expires"]:
        left = data["lease_expires"] - now
        when = f"in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        lease = f"{data['lease_expires_at']} ({when})"
    terminal = "-"
    if data["terminal"]:
        t = data["terminal"]
        terminal = f"{t.get('type')} ({'sent' if data['terminal_sent'] else 'not confirmed sent yet'})"
        if t.get("error_code"):
            terminal += f": [{t['error_code']}] {t.get('error_message', '')}"
        elif t.get("model_path"):
            terminal += f": {t['model_path']}"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(data["last_metrics"].items()) if isinstance(v, (int, float)))
    checkpoints = ", ".join(f"{k}: {v}" for k, v in sorted(data["checkpoints"].items())) or "-"
    rows = [
        ("job", data["job_id"]),
        ("operation", data["op"]),
        ("status", data["status"] + (" (cancel requested)" if data["cancel_requested"] else "")),
        ("attempt", str(data["attempt"])),
        ("owner", data["owner"] or "-"),
        ("lease expires", lease),
        ("last epoch", str(data["last_epoch"])),
        ("last metrics", metrics or "-"),
        ("checkpoints", checkpoints),
        ("terminal", terminal),
        ("updated", data["updated_at"] or "-"),
    ]
    return "\n".join(f"{k:<14} {v}" for k, v in rows)


# --- dlq -------------------------------------------------------------------------------


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from ai_service.client import QueueNotFound, request_queue

    queue = request_queue(settings, args.queue)
    with connect(settings, "dlq list") as client:
        try:
            count, letters = client.peek_dead_letters(queue, max(0, args.limit))
        except QueueNotFound as exc:
            raise CommandError(ExitCode.NOT_FOUND, exc.message) from None
    if args.json:
        print(json.dumps({"queue": f"{queue}.dlq", "count": count,
                          "messages": [letter.to_json(body=args.body) for letter in letters]}, indent=2))
        return ExitCode.OK
    print(f"{queue}.dlq: {count} message(s)" + (f", showing the first {len(letters)}" if len(letters) < count else ""))
    if letters:
        print(f"{'#':>4}  {'job_id':<24} {'reason':<16} {'deaths':>6}  {'size':>9}  dead-lettered at")
    for letter in letters:
        job = letter.job_id or "(unreadable)"
        print(f"{letter.index:>4}  {job:<24} {letter.reason or '-':<16} {letter.count:>6}  "
              f"{letter.size:>7} B  {letter.died_at or '-'}")
        if args.body:
            print("      " + letter.body.decode("utf-8", errors="replace")[:2000])
    if letters:
        err("(listed without removing: every message was returned to the queue)")
    return ExitCode.OK


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from ai_service.client import QueueNotFound, request_queue

    queue = request_queue(settings, args.queue)
    if args.job_id:
        check_job_id(args.job_id)
    with connect(settings, "dlq replay") as client:
        try:
            replayed, left = client.replay_dead_letters(
                queue, lambda letter: bool(args.all) or letter.job_id == args.job_id, max(0, args.limit)
            )
        except QueueNotFound as exc:
            raise CommandError(ExitCode.NOT_FOUND, exc.message) from None
    for letter in replayed:
        print(letter.job_id or f"(message {letter.properties.message_id or letter.index})")
    err(f"replayed {len(replayed)} message(s) from {queue}.dlq to {queue}; {left} left in the .dlq")
    if args.job_id and not replayed:
        raise CommandError(ExitCode.NOT_FOUND, f"no dead letter of job {args.job_id} in {queue}.dlq")
    return ExitCode.OK


# --- workers ---------------------------------------------------------------------------


def cmd_workers(args: argparse.Namespace, settings: Settings) -> ExitCode:
    """Listen to the workers' heartbeats (``worker.<state>.<name>``) and list who was heard."""
    import pika.exceptions

    from ai_service.broker import describe_pika_error
    from ai_service.heartbeat import EXPIRY_INTERVALS, ROUTING_PREFIX

    interval = settings.heartbeat_seconds or Settings().heartbeat_seconds
    wait = 1.5 * interval if args.wait is None else args.wait
    if wait <= 0:
        raise CommandError(ExitCode.USAGE, "--wait must be more than 0 seconds")
    exchange = settings.events_exchange
    heard: dict[str, tuple[float, dict[str, Any]]] = {}  # routing name -> (received at, last beat)
    with connect(settings, "workers") as client:
        try:
            client.channel.exchange_declare(exchange, "topic", passive=True)
            queue = str(client.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue)
            client.channel.queue_bind(queue, exchange, routing_key=f"{ROUTING_PREFIX}.#")
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise CommandError(ExitCode.NOT_FOUND, f"exchange {exchange!r} (EVENTS_EXCHANGE) does not exist: "
                                   "no worker has started on this broker and vhost") from None
            raise CommandError(ExitCode.BROKER, f"RabbitMQ: {describe_pika_error(exc)}") from None
        except pika.exceptions.AMQPError as exc:
            raise CommandError(ExitCode.BROKER, f"RabbitMQ: {describe_pika_error(exc)}") from None
        err(f"listening for worker heartbeats on {exchange!r} (worker.#) for {wait:g} s")
        deadline = time.monotonic() + wait
        for event in client.events(queue, tick=0.2):
            if event is not None and event.type == "worker_heartbeat":
                name = str(event.body.get("name") or event.routing_key.split(".", 2)[-1])
                heard[name] = (time.time(), event.body)
            if time.monotonic() >= deadline:
                break
    now = time.time()
    rows = []
    for seen_at, beat in sorted(heard.values(), key=lambda h: (str(h[1].get("worker")), str(h[1].get("operation")))):
        every = float(beat.get("interval_seconds") or interval)
        state = str(beat.get("state", "?"))
        status = state if state == "stopped" or now - seen_at <= EXPIRY_INTERVALS * every else "lost"
        rows.append({**beat, "status": status, "last_seen": iso(seen_at), "age_seconds": round(now - seen_at, 1)})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    elif rows:
        print(format_workers(rows))
    if not rows:
        raise CommandError(ExitCode.NOT_FOUND, f"no worker heartbeat on {exchange!r} within {wait:g} s: no worker "
                           "is running (or they run with HEARTBEAT_SECONDS=0, or on other EVENTS_EXCHANGE)")
    err(f"{len(rows)} worker(s) heard on {exchange!r} in {wait:g} s")
    return ExitCode.OK


def format_workers(rows: list[dict[str, Any]]) -> str:
    table = [("WORKER", "OP", "STATE", "DEVICE", "JOB", "PROGRESS", "LAST SEEN", "VERSIONS")]
    for r in rows:
        device = str(r.get("device") or "?") + (f" ({r['gpu']})" if r.get("gpu") else "")
        job = str(r.get("job_id") or "-")
        if int(r.get("jobs_running") or 0) > 1:
            job += f" (+{int(r['jobs_running']) - 1})"
        progress = r.get("progress")
        versions = r.get("versions")
        versions = versions if isinstance(versions, dict) else {}
        table.append((
            str(r.get("worker", "?")), str(r.get("operation", "?")), str(r["status"]), device, job,
            f"{progress:.1f}%" if isinstance(progress, (int, float)) else "-", f"{r['age_seconds']:.1f} s ago",
            ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "-",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
                     for row in table)


# --- demo ------------------------------------------------------------------------------


# --- openapi ---------------------------------------------------------------------------


def cmd_openapi(args: argparse.Namespace) -> ExitCode:
    from ai_service.http.openapi import render

    return write_document(render(), args, "openapi")


# --- asyncapi --------------------------------------------------------------------------


def cmd_asyncapi(args: argparse.Namespace) -> ExitCode:
    from ai_service.asyncapi import render

    settings = None
    if args.env:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            raise CommandError(ExitCode.USAGE, f"configuration error: {exc}") from None
    return write_document(render(settings), args, "asyncapi")


def write_document(text: str, args: argparse.Namespace, command: str) -> ExitCode:
    """Print ``text``, write it to ``--output``, or compare it with ``--check``."""
    if args.check is not None:
        try:
            current = args.check.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(ExitCode.FAILED, f"cannot read {args.check}: {exc.strerror or exc}") from None
        if current != text:
            raise CommandError(ExitCode.FAILED, f"{args.check} is stale: regenerate it with "
                               f"`ai-service {command} -o {args.check}`")
        err(f"{args.check} is up to date")
        return ExitCode.OK
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        err(f"wrote {args.output}")
        return ExitCode.OK
    sys.stdout.write(text)
    return ExitCode.OK


# --- supervisor-config -----------------------------------------------------------------


def cmd_supervisor_config(args: argparse.Namespace) -> ExitCode:
    from ai_service.supervisor import DEFAULT_OUTPUT, GpuListError, build_layout, render, slots, write_atomically

    given = {op: getattr(args, f"{op}_gpus") for op in ("train", "convert", "infer")}
    layout, how = build_layout(given)
    try:
        text = render(layout, how)
    except GpuListError as exc:
        raise CommandError(ExitCode.USAGE, str(exc)) from None
    names = ", ".join(slot.name for slot in slots(layout))
    if args.output == "-":
        sys.stdout.write(text)
        err(f"{how}; programs: {names}")
        return ExitCode.OK
    output = Path(args.output)
    if args.output == str(DEFAULT_OUTPUT) and not Path("supervisord.conf").is_file():
        raise CommandError(ExitCode.USAGE, f"no supervisord.conf here ({Path.cwd()}): run this from the directory "
                           "that holds it (the checkout), or pass --output")
    try:
        write_atomically(output, text)
    except OSError as exc:
        raise CommandError(ExitCode.FAILED, f"cannot write {output}: {exc.strerror or exc}") from None
    err(f"wrote {output} ({how}); programs: {names}\n"
        "a running supervisord picks it up with `supervisorctl reread && supervisorctl update`")
    return ExitCode.OK
