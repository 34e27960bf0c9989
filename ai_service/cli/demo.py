"""``ai-service demo``: the whole pipeline on the shapes dataset, ending in a picture.

Generate the circles-and-squares dataset into storage, train on it (long enough to find
the shapes: mAP50 >= 0.5 in one to two minutes on two CPU cores), convert the model to
ONNX, send a few new generated images to the inference worker with that ONNX model, and
draw the detections into one PNG.  Each step is followed like ``submit --follow``;
stdout gets one JSON summary at the end.  ``--quick`` is a short run for tests (pass
``--pretrained`` weights to still detect something); ``--http`` trains over a worker's
HTTP API only (HTTP-only set-ups).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from ai_service.cli.base import (
    EXIT_CODES_HELP,
    CommandError,
    ExitCode,
    check_job_id,
    connect,
    err,
    new_job_id,
    open_storage,
)
from ai_service.cli.follow import declare, follow, outcome, submit_http, warn_if_no_worker
from ai_service.cli.payloads import validate_request
from ai_service.config import Settings
from ai_service.errors import StorageError

DEMO_PREFIX = "datasets/shapes-demo/"
DASHBOARD_URL = "http://127.0.0.1:8080/"
#: (epochs, imgsz, images): the full demo, and ``--quick``.
FULL = (80, 128, 64)
QUICK = (2, 64, 16)
#: The generated images sent to the inference worker (seeds far from the dataset's).
INFER_SEEDS = (9001, 9002, 9003, 9004)
INFER_SIZE = 128
#: The picture: each image scaled up SCALE times, GAP pixels around each.
SCALE = 2
GAP = 8
BOX_COLOURS = {0: (255, 0, 255), 1: (0, 255, 255)}  # circle: magenta, square: cyan
BOX_WIDTH = 2


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``demo`` to the ``ai-service`` subcommands."""
    p = sub.add_parser(
        "demo", help="train on generated shapes, convert to ONNX, detect, and draw the detections into a PNG",
        formatter_class=fmt,
        description=f"Generate the synthetic circles-and-squares dataset into storage under\n"
        f"{DEMO_PREFIX} (local or s3 backend, by the settings), train on it until it finds the\n"
        "shapes, convert the model to ONNX, run a few new images through the inference worker\n"
        "with it and draw the detections into a PNG. Each step is followed like `submit --follow`;\n"
        "stdout gets one JSON summary. Workers of all three kinds must be running: `make run`\n"
        "in another shell (it also starts the dashboard, where the training curves show live).",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--epochs", type=int, help=f"epochs to train (default {FULL[0]}; --quick {QUICK[0]})")
    p.add_argument("--imgsz", type=int, help=f"image size (default {FULL[1]}; --quick {QUICK[1]})")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--model", default="yolov8n", help="model architecture (default yolov8n)")
    p.add_argument("--images", type=int, help=f"training images to generate (default {FULL[2]}; --quick {QUICK[2]})")
    p.add_argument("--quick", action="store_true", help="a short run (for tests): a few epochs on small images")
    p.add_argument("--pretrained", metavar="KEY", help="storage key of .pt weights to start training from")
    p.add_argument("--output", type=Path,
                   help="where to write the detections PNG (default WORK_DIR/demo/detections-<job>.png)")
    p.add_argument("--dashboard-url", default=DASHBOARD_URL,
                   help=f"the dashboard to point at (default {DASHBOARD_URL})")
    p.add_argument("--job-id", help="job id (default: generated)")
    p.add_argument("--timeout", type=float, help="give up following after this many seconds (exit 4)")
    p.add_argument("--no-wait", action="store_true",
                   help="do not submit when no worker consumes the train request queue (exit 8)")
    p.add_argument("--http", metavar="URL",
                   help="submit to a training worker's HTTP API (HTTP-only set-ups, ENABLE_RABBITMQ=false) and "
                        "follow /v1/jobs/<id>/events (training only); HTTP_TOKEN from the environment")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> ExitCode:
    sizes = QUICK if args.quick else FULL
    epochs, imgsz, images = args.epochs or sizes[0], args.imgsz or sizes[1], args.images or sizes[2]
    job_id = check_job_id(args.job_id) if args.job_id else new_job_id("demo")
    hyperparams: dict[str, Any] = {"model": args.model, "epochs": epochs, "batch": args.batch, "imgsz": imgsz}
    if args.pretrained:
        hyperparams["pretrained"] = args.pretrained
    payload = {
        "job_id": job_id,
        "dataset": {"s3_prefix": DEMO_PREFIX, "name": "shapes-demo"},
        "output": {"prefix": "models/demo", "model_name": f"shapes-{job_id}.pt"},
        "hyperparams": hyperparams,
    }
    body = validate_request("train", payload, settings)
    if images < 1:
        raise CommandError(ExitCode.USAGE, "--images must be at least 1")
    storage = open_storage(settings)
    if args.http:
        _upload_demo(storage, images)
        err(f"training job {job_id} ({args.model}, {epochs} epochs, imgsz {imgsz}) over {args.http}")
        return submit_http(args.http, "train", body, job_id, settings, follow_it=True, timeout=args.timeout)
    output = args.output or settings.work_dir / "demo" / f"detections-{job_id}.png"
    with connect(settings, "demo") as client:
        for op in ("train", "convert", "infer"):
            declare(client, op)
            if not warn_if_no_worker(client, settings, op) and args.no_wait:
                return ExitCode.NO_WORKER
    _upload_demo(storage, images)
    err(f"dashboard: {args.dashboard_url} (the training curves, live)")
    trained = _run(settings, "train", body, job_id, args.timeout,
                   f"training job {job_id} ({args.model}, {epochs} epochs, imgsz {imgsz})")
    if trained["type"] != "training_completed":
        print(json.dumps({"training": trained}, indent=2, ensure_ascii=False), flush=True)
        return outcome(trained["type"])
    summary = _convert_and_detect(settings, trained, job_id, imgsz, args.timeout, output)
    summary["dashboard"] = args.dashboard_url
    print(json.dumps(summary, indent=2, ensure_ascii=False), flush=True)
    if "detections_png" in summary:
        err(f"detections drawn: {summary['detections_png']}")
    else:
        err(f"ai-service: inference failed: {summary['inference'].get('error_message')}")
    err(f"dashboard: {args.dashboard_url}")
    return outcome(summary["inference"]["type"])


def _run(settings: Settings, op: str, body: bytes, job_id: str, timeout: float | None, what: str) -> dict[str, Any]:
    """Submit one job on a connection of its own and follow it (progress on stderr); its terminal message.

    The answer comes through EVENTS_EXCHANGE (a queue of ours bound to the job's keys), so the
    dashboard sees every step -- an inference too (a ``reply_to`` answer would bypass it).
    """
    with connect(settings, f"demo {op}") as client:
        queue = client.watch(op, job_id)
        client.submit(op, body, job_id)
        err(f"submitted {what}")
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):  # follow() prints the terminal message: we summarise instead
            follow(client, queue, job_id, timeout)
    terminal: dict[str, Any] = json.loads(captured.getvalue())
    return terminal


def _convert_and_detect(settings: Settings, trained: dict[str, Any], job_id: str, imgsz: int,
                        timeout: float | None, output: Path) -> dict[str, Any]:
    """ONNX from the trained model, then detections on new images with it, drawn into ``output``."""
    from ai_service.shapes import draw_shapes_image

    convert_id = f"{job_id}-onnx"
    conversion = {"job_id": convert_id, "model": {"path": trained["model_path"]}, "formats": ["onnx"],
                  "options": {"imgsz": imgsz}, "output": {"prefix": "models/demo/exports"}}
    converted = _run(settings, "convert", validate_request("convert", conversion, settings), convert_id, timeout,
                     f"conversion job {convert_id} (onnx)")
    summary: dict[str, Any] = {"training": trained, "conversion": converted}
    if converted["type"] != "conversion_completed":
        raise CommandError(ExitCode.FAILED, f"conversion failed: {converted.get('error_message')}")
    onnx = converted["artifacts"][0]["path"]
    pictures = [draw_shapes_image(INFER_SIZE, seed)[0] for seed in INFER_SEEDS]
    infer_id = f"{job_id}-detect"
    inference: dict[str, Any] = {"job_id": infer_id, "model": {"path": onnx}, "params": {"conf": 0.25, "imgsz": imgsz},
                                 "images": [{"data": _png_base64(p)} for p in pictures]}
    answer = _run(settings, "infer", validate_request("infer", inference, settings), infer_id, timeout,
                  f"inference job {infer_id} ({len(pictures)} images, {onnx})")
    results = answer.get("results") or []
    summary["inference"] = {key: answer.get(key) for key in ("type", "job_id", "model_path", "inference_time_ms",
                                                            "error_code", "error_message")}
    summary["images"] = [{"seed": seed, "detections": r.get("detections", [])}
                         for seed, r in zip(INFER_SEEDS, results, strict=False)]
    if answer["type"] == "inference_completed":
        draw_detections(pictures, [r.get("detections", []) for r in results]).save(_writable(output))
        summary["detections_png"] = str(output.resolve())
    return summary


def _png_base64(picture: Any) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _writable(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(ExitCode.FAILED, f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def tile_origin(index: int, size: int = INFER_SIZE) -> tuple[int, int]:
    """Where image ``index`` starts in the picture (scaled by :data:`SCALE`)."""
    return GAP + index * (size * SCALE + GAP), GAP


def draw_detections(pictures: list[Any], detections: list[list[dict[str, Any]]]) -> Any:
    """The images side by side, scaled up, each detection's box and label drawn in its class colour."""
    from PIL import Image, ImageDraw, ImageFont

    size = pictures[0].width
    canvas = Image.new("RGB", (GAP + len(pictures) * (size * SCALE + GAP), size * SCALE + 2 * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for index, (picture, found) in enumerate(zip(pictures, detections, strict=False)):
        x0, y0 = tile_origin(index, size)
        canvas.paste(picture.convert("RGB").resize((size * SCALE, size * SCALE), Image.Resampling.NEAREST), (x0, y0))
        for det in found:
            box, colour = det["box"], BOX_COLOURS.get(int(det["class_id"]), (255, 255, 0))
            x1, y1 = x0 + box["x1"] * SCALE, y0 + box["y1"] * SCALE
            draw.rectangle((x1, y1, x0 + box["x2"] * SCALE, y0 + box["y2"] * SCALE), outline=colour, width=BOX_WIDTH)
            label = f"{det['class_name']} {det['confidence']:.2f}"
            left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
            ty = y1 - (bottom - top) - 3 if y1 - (bottom - top) - 3 >= y0 else y1 + BOX_WIDTH
            draw.rectangle((x1, ty, x1 + right - left + 4, ty + bottom - top + 3), fill=colour)
            draw.text((x1 + 2, ty + 1 - (top - y1)), label, fill="black", font=font)
    return canvas


def _upload_demo(storage: Any, images: int) -> None:
    """The shapes dataset (``images`` training images of 128 px) into storage at :data:`DEMO_PREFIX`."""
    from ai_service.shapes import generate_shapes_dataset

    with tempfile.TemporaryDirectory(prefix="ai-service-demo-") as tmp:
        generate_shapes_dataset(Path(tmp), n_train=images, n_val=max(8, images // 4), size=128, seed=0)
        try:
            infos = storage.upload_dir(Path(tmp), DEMO_PREFIX)
        except StorageError as exc:
            raise CommandError(ExitCode.STORAGE, f"uploading the demo dataset failed: {exc.message}") from None
    err(f"uploaded the shapes dataset ({len(infos)} files) to {storage.describe()} {DEMO_PREFIX}")
