"""The ``ai-service submit <op>`` form of each operation: its flags and the request built
from them.

A form belongs to an operation's spec (:mod:`ai_service.registry`); the CLI adds one
``submit`` subcommand per spec.  Standard library only, so the BE-side CLI starts fast.
A flag that cannot make a request raises :class:`~ai_service.errors.InvalidInput`
(``ai-service`` exits 2 with its message).
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_service.errors import InvalidInput

#: A ``submit`` form's argument group (``argparse._ArgumentGroup`` is private).
Group = Any


@dataclass(frozen=True)
class SubmitForm:
    """How ``ai-service submit <op>`` reads a request from flags (``--file`` always works)."""

    help: str
    description: str
    group: str
    add_arguments: Callable[[Group], None]
    #: The ``argparse`` dests of the form's flags: not allowed together with ``--file``.
    flags: tuple[str, ...]
    #: ``(args, job_id) -> payload`` (not validated yet).
    build: Callable[[argparse.Namespace, str], dict[str, Any]]


def file_only(description: str) -> SubmitForm:
    """A form without flags of its own: the request comes from ``--file``."""

    def build(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
        raise InvalidInput(f"submit {args.op} needs --file")

    return SubmitForm(help=description, description=description, group="request", add_arguments=lambda g: None,
                      flags=(), build=build)


def key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a dict; VALUE is JSON when it parses as JSON, else a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{flag} takes KEY=VALUE, not {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


# --- train ---------------------------------------------------------------------------


def training_arguments(g: Group) -> None:
    """The flags of ``submit train``."""
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


def training_payload(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
    """A training request from the flags, with the contract's defaults."""
    if not args.dataset:
        raise InvalidInput("submit train needs --dataset PREFIX (or --file)")
    name = args.dataset_name or args.dataset.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    model = args.model or "yolov8n"
    hyperparams: dict[str, Any] = {
        "model": model,
        "epochs": 100 if args.epochs is None else args.epochs,
        "batch": 16 if args.batch is None else args.batch,
        "imgsz": 640 if args.imgsz is None else args.imgsz,
    }
    hyperparams.update(key_values(args.param, "--param"))
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": args.dataset, "name": name},
        "output": {
            "prefix": args.output_prefix or f"models/{model}",
            "model_name": args.model_name or f"{name}-{job_id}.pt",
        },
        "hyperparams": hyperparams,
    }


TRAINING = SubmitForm(
    help="a training job",
    description="A training request from --file or from the flags below, e.g.\n"
    "  ai-service submit train --dataset datasets/shapes/ --epochs 10 --imgsz 128 --follow\n"
    "--follow shows epoch x/y, loss, mAP50 and ETA, and ends with the terminal message.",
    group="training request (without --file)",
    add_arguments=training_arguments,
    flags=("dataset", "dataset_name", "model", "epochs", "batch", "imgsz", "output_prefix", "model_name", "param"),
    build=training_payload,
)


# --- convert -------------------------------------------------------------------------


def conversion_arguments(g: Group) -> None:
    """The flags of ``submit convert``."""
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


def conversion_payload(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
    """A conversion request from the flags (formats default to onnx)."""
    if not args.model_path:
        raise InvalidInput("submit convert needs --model-path KEY (or --file)")
    formats = [f.strip() for f in (args.formats or "onnx").split(",") if f.strip()]
    folder = args.model_path.rsplit("/", 1)[0] if "/" in args.model_path else ""
    options: dict[str, Any] = {}
    for name in ("imgsz", "half", "int8", "dynamic", "opset"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    options.update(key_values(args.option, "--option"))
    payload: dict[str, Any] = {
        "job_id": job_id,
        "model": {"path": args.model_path},
        "formats": formats,
        "output": {"prefix": args.output_prefix or (f"{folder}/exports" if folder else "exports")},
    }
    if options:
        payload["options"] = options
    return payload


CONVERSION = SubmitForm(
    help="a conversion (export) job",
    description="A conversion request from --file or from the flags below, e.g.\n"
    "  ai-service submit convert --model-path models/yolov8n/shapes.pt --formats onnx,torchscript --follow",
    group="conversion request (without --file)",
    add_arguments=conversion_arguments,
    flags=("model_path", "formats", "output_prefix", "imgsz", "half", "int8", "dynamic", "opset", "option"),
    build=conversion_payload,
)


# --- infer ---------------------------------------------------------------------------


def inference_arguments(g: Group) -> None:
    """The flags of ``submit infer``."""
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


def _images(given: list[tuple[str, str]]) -> list[dict[str, str]]:
    images: list[dict[str, str]] = []
    for kind, value in given:
        if kind == "path":
            images.append({"path": value})
            continue
        try:
            images.append({"data": base64.b64encode(Path(value).read_bytes()).decode("ascii")})
        except OSError as exc:
            raise InvalidInput(f"cannot read image file {value}: {exc.strerror or exc}") from None
    return images


def inference_payload(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
    """An inference request; local image files are sent inline (base64)."""
    if not args.model_path:
        raise InvalidInput("submit infer needs --model-path KEY (or --file)")
    if not args.images:
        raise InvalidInput("submit infer needs at least one --image KEY or --image-file PATH")
    images = _images(args.images)
    params: dict[str, Any] = {}
    for name in ("conf", "iou", "imgsz", "max_det"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.classes is not None:
        try:
            params["classes"] = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise InvalidInput(f"--classes takes comma-separated integers, not {args.classes!r}") from None
    payload: dict[str, Any] = {"job_id": job_id, "model": {"path": args.model_path}, "images": images}
    if params:
        payload["params"] = params
    return payload


INFERENCE = SubmitForm(
    help="an inference request (RPC: waits for and prints the result)",
    description="Without --follow the request carries reply_to (an exclusive queue of ours) and\n"
    "a correlation_id, and the result is printed as JSON when it arrives.",
    group="inference request (without --file)",
    add_arguments=inference_arguments,
    flags=("model_path", "images", "conf", "iou", "imgsz", "max_det", "classes"),
    build=inference_payload,
)
