"""The BE-side ``ai-service`` commands: ``submit``, ``cancel``, ``status``, ``dlq``,
``workers``, ``demo``, ``asyncapi`` and ``openapi``.

Nothing here (or in what it imports) loads torch or Ultralytics, so these start fast;
``tests/test_cli.py`` checks it.  Every command returns an :class:`ExitCode`.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ai_service.config import ConfigError, Settings
from ai_service.errors import AuthenticationFailed, BrokerError, ObjectNotFound, StorageError
from ai_service.messages import (
    JOB_ID_RE,
    TERMINAL_TYPES,
    Cancel,
    ConversionRequest,
    InferenceRequest,
    TrainingRequest,
    describe_validation_error,
)


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

REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "train": TrainingRequest,
    "convert": ConversionRequest,
    "infer": InferenceRequest,
}
OP_WORDS = {"train": "training", "convert": "conversion", "infer": "inference"}
DEMO_PREFIX = "datasets/shapes-demo/"

class CommandError(Exception):
    """Ends a command with ``code`` after printing ``message`` on stderr."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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

    p = sub.add_parser(
        "demo", help="generate the shapes dataset into storage, train on it and follow the job",
        formatter_class=fmt,
        description=f"Generate the synthetic circles-and-squares dataset into storage under\n"
        f"{DEMO_PREFIX} (local or s3 backend, by the settings), submit a short training job\n"
        "and follow it like `submit --follow`. A training worker must be running:\n"
        "`make run` or `make run-train-worker` in another shell.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (default 10)")
    p.add_argument("--imgsz", type=int, default=128, help="image size (default 128)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--model", default="yolov8n", help="model architecture (default yolov8n)")
    p.add_argument("--images", type=int, default=64, help="training images to generate (default 64)")
    p.add_argument("--job-id", help="job id (default: generated)")
    p.add_argument("--timeout", type=float, help="give up following after this many seconds (exit 4)")
    p.add_argument("--no-wait", action="store_true",
                   help="do not submit when no worker consumes the train request queue (exit 8)")
    p.add_argument("--http", metavar="URL",
                   help="submit to a training worker's HTTP API (HTTP-only set-ups, ENABLE_RABBITMQ=false) and "
                        "follow /v1/jobs/<id>/events; HTTP_TOKEN from the environment")
    p.set_defaults(func=cmd_demo)

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


def _connect(settings: Settings, purpose: str) -> Any:
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


def _job_id(value: str) -> str:
    if not JOB_ID_RE.fullmatch(value):
        raise CommandError(ExitCode.USAGE, f"job id {value!r} is invalid: 1-64 characters of A-Z a-z 0-9 _ -")
    return value


# --- submit ----------------------------------------------------------------------------


def _kv(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CommandError(ExitCode.USAGE, f"{flag} takes KEY=VALUE, not {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _load_request_file(name: str) -> dict[str, Any]:
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


#: Flags that build a request from scratch (not allowed together with --file).
_REQUEST_FLAGS = {
    "train": ("dataset", "dataset_name", "model", "epochs", "batch", "imgsz", "output_prefix", "model_name", "param"),
    "convert": ("model_path", "formats", "output_prefix", "imgsz", "half", "int8", "dynamic", "opset", "option"),
    "infer": ("model_path", "images", "conf", "iou", "imgsz", "max_det", "classes"),
}


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request payload from --file or the flags (not validated yet)."""
    op = args.op
    given = [f for f in _REQUEST_FLAGS[op] if getattr(args, f, None) is not None]
    if args.file:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise CommandError(ExitCode.USAGE, f"--file cannot be combined with {flags} (edit the file instead)")
        payload = _load_request_file(args.file)
        if args.job_id:
            payload["job_id"] = args.job_id
        elif "job_id" not in payload:
            payload["job_id"] = _new_job_id(op)
        return payload
    job_id = args.job_id or _new_job_id(op)
    builders = {"train": _train_payload, "convert": _convert_payload, "infer": _infer_payload}
    return builders[op](args, job_id)


def _new_job_id(op: str) -> str:
    return f"{op}-{uuid.uuid4().hex[:12]}"


def _train_payload(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
    if not args.dataset:
        raise CommandError(ExitCode.USAGE, "submit train needs --dataset PREFIX (or --file)")
    name = args.dataset_name or args.dataset.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    model = args.model or "yolov8n"
    hyperparams: dict[str, Any] = {
        "model": model,
        "epochs": 100 if args.epochs is None else args.epochs,
        "batch": 16 if args.batch is None else args.batch,
        "imgsz": 640 if args.imgsz is None else args.imgsz,
    }
    hyperparams.update(_kv(args.param, "--param"))
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": args.dataset, "name": name},
        "output": {
            "prefix": args.output_prefix or f"models/{model}",
            "model_name": args.model_name or f"{name}-{job_id}.pt",
        },
        "hyperparams": hyperparams,
    }


def _convert_payload(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
    if not args.model_path:
        raise CommandError(ExitCode.USAGE, "submit convert needs --model-path KEY (or --file)")
    formats = [f.strip() for f in (args.formats or "onnx").split(",") if f.strip()]
    folder = args.model_path.rsplit("/", 1)[0] if "/" in args.model_path else ""
    options: dict[str, Any] = {}
    for name in ("imgsz", "half", "int8", "dynamic", "opset"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    options.update(_kv(args.option, "--option"))
    payload: dict[str, Any] = {
        "job_id": job_id,
        "model": {"path": args.model_path},
        "formats": formats,
        "output": {"prefix": args.output_prefix or (f"{folder}/exports" if folder else "exports")},
    }
    if options:
        payload["options"] = options
    return payload


def _infer_payload(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
    if not args.model_path:
        raise CommandError(ExitCode.USAGE, "submit infer needs --model-path KEY (or --file)")
    if not args.images:
        raise CommandError(ExitCode.USAGE, "submit infer needs at least one --image KEY or --image-file PATH")
    images: list[dict[str, str]] = []
    for kind, value in args.images:
        if kind == "path":
            images.append({"path": value})
            continue
        try:
            images.append({"data": base64.b64encode(Path(value).read_bytes()).decode("ascii")})
        except OSError as exc:
            raise CommandError(ExitCode.USAGE, f"cannot read image file {value}: {exc.strerror or exc}") from None
    params: dict[str, Any] = {}
    for name in ("conf", "iou", "imgsz", "max_det"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.classes is not None:
        try:
            params["classes"] = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise CommandError(
                ExitCode.USAGE, f"--classes takes comma-separated integers, not {args.classes!r}"
            ) from None
    payload: dict[str, Any] = {"job_id": job_id, "model": {"path": args.model_path}, "images": images}
    if params:
        payload["params"] = params
    return payload


def validate_request(op: str, payload: dict[str, Any], settings: Settings) -> bytes:
    """Validate with the contract's model; the body to publish (exit 2 when invalid)."""
    try:
        REQUEST_MODELS[op].model_validate(payload)
    except ValidationError as exc:
        problem = describe_validation_error(exc)
        raise CommandError(ExitCode.USAGE, f"invalid {OP_WORDS[op]} request: {problem}") from None
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > settings.max_message_bytes:
        raise CommandError(
            ExitCode.USAGE,
            f"the request is {len(body)} bytes, over the {settings.max_message_bytes}-byte limit (MAX_MESSAGE_BYTES)",
        )
    return body


def cmd_submit(args: argparse.Namespace, settings: Settings) -> ExitCode:
    op = args.op
    payload = build_request(args)
    body = validate_request(op, payload, settings)
    job_id = str(payload["job_id"])
    if args.http:
        return submit_http(args.http, op, body, job_id, settings, follow_it=args.follow, timeout=args.timeout)
    rpc = op == "infer" and not args.follow
    with _connect(settings, f"submit {op}") as client:
        _declare(client, op)
        if args.follow or rpc:
            _warn_if_no_worker(client, settings, op)
        if rpc:
            return _rpc(client, op, body, job_id, args.timeout)
        queue = client.watch(op, job_id) if args.follow else None
        client.submit(op, body, job_id)
        if queue is None:
            print(job_id, flush=True)
            return ExitCode.OK
        err(f"submitted {OP_WORDS[op]} job {job_id}")
        return follow(client, queue, job_id, args.timeout)


def _declare(client: Any, op: str) -> None:
    problem = client.declare((op,))
    if problem:
        err(f"ai-service: note: could not declare the queues ({problem}); using them as they are")


def _warn_if_no_worker(client: Any, settings: Settings, op: str) -> int | None:
    from ai_service.broker import queue_names

    queue = queue_names(settings, op).request
    consumers = client.consumer_count(queue)
    if not consumers:
        err(f"ai-service: no worker is consuming {queue!r} yet: the job waits there until one starts "
            f"(start one with `make run` or `make run-{op}-worker`)")
    return consumers


def _outcome(message_type: str) -> ExitCode:
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
                    return _outcome(event.type)
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


def _rpc(client: Any, op: str, body: bytes, job_id: str, timeout: float | None) -> ExitCode:
    reply_to = client.reply_queue()
    correlation_id = uuid.uuid4().hex
    client.submit(op, body, job_id, reply_to=reply_to, correlation_id=correlation_id)
    err(f"submitted {OP_WORDS[op]} job {job_id}; waiting for the result")
    return follow(client, reply_to, job_id, timeout, correlation_id=correlation_id)


# --- cancel ----------------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> ExitCode:
    job_id = _job_id(args.job_id)
    Cancel(type="cancel", job_id=job_id)  # the contract's shape, checked
    if args.record:
        from ai_service.jobs import Ledger

        storage = _storage(settings)
        try:
            Ledger(storage, op="", worker="ai-service-cli", lease_seconds=settings.lease_seconds,
                   prefix=settings.jobs_prefix).request_cancel(job_id)
        except StorageError as exc:
            raise CommandError(ExitCode.STORAGE, f"cannot write the cancel marker: {exc.message}") from None
    with _connect(settings, "cancel") as client:
        delivered = client.cancel(job_id)
    if delivered:
        err(f"cancel requested for job {job_id}")
    else:
        err(f"cancel for job {job_id} published, but no worker listens on {settings.control_exchange!r} right now"
            + ("; the marker in storage cancels it when a worker takes it" if args.record
               else " (use --record so that a worker started later cancels it too)"))
    return ExitCode.OK


# --- status ----------------------------------------------------------------------------


def _storage(settings: Settings) -> Any:
    from ai_service.storage import open_storage

    try:
        return open_storage(settings)
    except ConfigError as exc:
        raise CommandError(ExitCode.USAGE, f"configuration error: {exc}") from None
    except StorageError as exc:
        raise CommandError(ExitCode.STORAGE, exc.message) from None


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def cmd_status(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from ai_service.jobs import JobRecord, cancel_key, legacy_record_key, record_key

    job_id = _job_id(args.job_id)
    storage = _storage(settings)
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
    data["lease_expires_at"] = _iso(record.lease_expires)
    data["updated_at"] = _iso(record.updated)
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
    with _connect(settings, "dlq list") as client:
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
        _job_id(args.job_id)
    with _connect(settings, "dlq replay") as client:
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
    with _connect(settings, "workers") as client:
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
        rows.append({**beat, "status": status, "last_seen": _iso(seen_at), "age_seconds": round(now - seen_at, 1)})
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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from ai_service.broker import queue_names
    from ai_service.shapes import generate_shapes_dataset

    job_id = _job_id(args.job_id) if args.job_id else _new_job_id("demo")
    payload = {
        "job_id": job_id,
        "dataset": {"s3_prefix": DEMO_PREFIX, "name": "shapes-demo"},
        "output": {"prefix": "models/demo", "model_name": f"shapes-{job_id}.pt"},
        "hyperparams": {"model": args.model, "epochs": args.epochs, "batch": args.batch, "imgsz": args.imgsz},
    }
    body = validate_request("train", payload, settings)
    if args.images < 1:
        raise CommandError(ExitCode.USAGE, "--images must be at least 1")
    storage = _storage(settings)
    if args.http:
        _upload_demo(storage, args.images)
        err(f"training job {job_id} ({args.model}, {args.epochs} epochs, imgsz {args.imgsz}) over {args.http}")
        return submit_http(args.http, "train", body, job_id, settings, follow_it=True, timeout=args.timeout)
    with _connect(settings, "demo") as client:
        _declare(client, "train")
        queue = queue_names(settings, "train").request
        if not client.consumer_count(queue):
            err(f"ai-service: no training worker is consuming {queue!r}: start one with `make run` or "
                "`make run-train-worker` in another shell")
            if args.no_wait:
                return ExitCode.NO_WORKER
            err("ai-service: submitting anyway; the job starts when a worker does")
        with tempfile.TemporaryDirectory(prefix="ai-service-demo-") as tmp:
            generate_shapes_dataset(Path(tmp), n_train=args.images, n_val=max(8, args.images // 4), size=128, seed=0)
            try:
                infos = storage.upload_dir(Path(tmp), DEMO_PREFIX)
            except StorageError as exc:
                raise CommandError(ExitCode.STORAGE, f"uploading the demo dataset failed: {exc.message}") from None
        err(f"uploaded the shapes dataset ({len(infos)} files) to {storage.describe()} {DEMO_PREFIX}")
        watch = client.watch("train", job_id)
        client.submit("train", body, job_id)
        err(f"submitted training job {job_id} ({args.model}, {args.epochs} epochs, imgsz {args.imgsz})")
        return follow(client, watch, job_id, args.timeout)


# --- openapi ---------------------------------------------------------------------------


def cmd_openapi(args: argparse.Namespace) -> ExitCode:
    from ai_service.http.openapi import render

    return _write_document(render(), args, "openapi")


def _upload_demo(storage: Any, images: int) -> None:
    from ai_service.shapes import generate_shapes_dataset

    with tempfile.TemporaryDirectory(prefix="ai-service-demo-") as tmp:
        generate_shapes_dataset(Path(tmp), n_train=images, n_val=max(8, images // 4), size=128, seed=0)
        try:
            infos = storage.upload_dir(Path(tmp), DEMO_PREFIX)
        except StorageError as exc:
            raise CommandError(ExitCode.STORAGE, f"uploading the demo dataset failed: {exc.message}") from None
    err(f"uploaded the shapes dataset ({len(infos)} files) to {storage.describe()} {DEMO_PREFIX}")


# --- over HTTP (README "HTTP-only mode") -----------------------------------------------


def submit_http(base: str, op: str, body: bytes, job_id: str, settings: Settings, *, follow_it: bool,
                timeout: float | None) -> ExitCode:
    """POST the request to a worker's ``/v1/<op>``; with ``follow_it`` follow its events stream."""
    from ai_service.http.follow import HttpFailure, post

    try:
        answer = post(base, f"/v1/{op}", body, settings.http_token, timeout=timeout or 300.0)
    except HttpFailure as exc:
        raise CommandError(ExitCode.BROKER, exc.message) from None
    if op == "infer" and isinstance(answer.body, dict) and "type" in answer.body:
        print(json.dumps(answer.body, indent=2, ensure_ascii=False), flush=True)
        return _outcome(str(answer.body["type"]))
    if answer.status in (400, 413) and isinstance(answer.body, dict) and answer.body.get("type"):
        print(json.dumps(answer.body, indent=2, ensure_ascii=False), flush=True)
        raise CommandError(ExitCode.USAGE, f"invalid {OP_WORDS[op]} request: {answer.body.get('error_message')}")
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
    err(f"submitted {OP_WORDS[op]} job {job_id} to {base}")
    return follow_http(base, job_id, settings.http_token, timeout)


def follow_http(base: str, job_id: str, token: str, timeout: float | None) -> ExitCode:
    """As :func:`follow`, from ``/v1/jobs/<job_id>/events`` (reopened after a drop)."""
    from ai_service.http.follow import HttpFailure, events
    from ai_service.progress import ProgressView

    view = ProgressView(sys.stderr, live=sys.stderr.isatty())
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for message in events(base, job_id, token, deadline=deadline):
            if message is not None:
                view.show(message)
                if str(message.get("type", "")) in TERMINAL_TYPES:
                    view.close()
                    print(json.dumps(message, indent=2, ensure_ascii=False), flush=True)
                    return _outcome(str(message["type"]))
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


# --- asyncapi --------------------------------------------------------------------------


def cmd_asyncapi(args: argparse.Namespace) -> ExitCode:
    from ai_service.asyncapi import render

    settings = None
    if args.env:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            raise CommandError(ExitCode.USAGE, f"configuration error: {exc}") from None
    return _write_document(render(settings), args, "asyncapi")


def _write_document(text: str, args: argparse.Namespace, command: str) -> ExitCode:
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
