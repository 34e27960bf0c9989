"""``ai-service demo``: generate the shapes dataset into storage, train on it and follow the job."""

from __future__ import annotations

import argparse
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
from ai_service.cli.follow import declare, follow, submit_http
from ai_service.cli.payloads import validate_request
from ai_service.config import Settings
from ai_service.errors import StorageError

DEMO_PREFIX = "datasets/shapes-demo/"


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``demo`` to the ``ai-service`` subcommands."""
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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from ai_service.broker import queue_names
    from ai_service.shapes import generate_shapes_dataset

    job_id = check_job_id(args.job_id) if args.job_id else new_job_id("demo")
    payload = {
        "job_id": job_id,
        "dataset": {"s3_prefix": DEMO_PREFIX, "name": "shapes-demo"},
        "output": {"prefix": "models/demo", "model_name": f"shapes-{job_id}.pt"},
        "hyperparams": {"model": args.model, "epochs": args.epochs, "batch": args.batch, "imgsz": args.imgsz},
    }
    body = validate_request("train", payload, settings)
    if args.images < 1:
        raise CommandError(ExitCode.USAGE, "--images must be at least 1")
    storage = open_storage(settings)
    if args.http:
        _upload_demo(storage, args.images)
        err(f"training job {job_id} ({args.model}, {args.epochs} epochs, imgsz {args.imgsz}) over {args.http}")
        return submit_http(args.http, "train", body, job_id, settings, follow_it=True, timeout=args.timeout)
    with connect(settings, "demo") as client:
        declare(client, "train")
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


def _upload_demo(storage: Any, images: int) -> None:
    from ai_service.shapes import generate_shapes_dataset

    with tempfile.TemporaryDirectory(prefix="ai-service-demo-") as tmp:
        generate_shapes_dataset(Path(tmp), n_train=images, n_val=max(8, images // 4), size=128, seed=0)
        try:
            infos = storage.upload_dir(Path(tmp), DEMO_PREFIX)
        except StorageError as exc:
            raise CommandError(ExitCode.STORAGE, f"uploading the demo dataset failed: {exc.message}") from None
    err(f"uploaded the shapes dataset ({len(infos)} files) to {storage.describe()} {DEMO_PREFIX}")
