"""Requests built from ``submit``'s flags or ``--file``, validated with the contract's models."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ai_service.cli.base import OP_WORDS, CommandError, ExitCode, new_job_id
from ai_service.config import Settings
from ai_service.messages import ConversionRequest, InferenceRequest, TrainingRequest, describe_validation_error

REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "train": TrainingRequest,
    "convert": ConversionRequest,
    "infer": InferenceRequest,
}

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
            payload["job_id"] = new_job_id(op)
        return payload
    job_id = args.job_id or new_job_id(op)
    builders = {"train": _train_payload, "convert": _convert_payload, "infer": _infer_payload}
    return builders[op](args, job_id)


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
