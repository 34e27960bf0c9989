"""Ultralytics used directly, as a user would script it: the baseline of the training figures.

``python -m bench.raw_train --data DATA_YAML --work DIR --epochs 20 --imgsz 128 --batch 8
[--threads N] [--device cpu|cuda]`` trains yolov8n from its yaml with the arguments the training worker
passes (``workers=0``, ``plots=False``, ``seed``), and prints one JSON line:
``import_s`` (Python start to Ultralytics imported), ``train_s`` (``model.train()``).

``--threads N`` gives torch N threads at every epoch start, as the worker does on the
CPU (Ultralytics itself uses ``cpu_count - 1``); 0 keeps Ultralytics' own choice.
The offline switches (``workers.yolo.prepare_ultralytics``) are the ones any user
without internet needs too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(args.work)

    from workers import yolo

    yolo.prepare_ultralytics(work)
    import torch
    from ultralytics.models import YOLO

    imported = time.perf_counter()
    model = YOLO("yolov8n.yaml")
    if args.threads:
        def threads(trainer: Any) -> None:
            torch.set_num_threads(args.threads)

        model.add_callback("on_train_epoch_start", threads)
    began = time.perf_counter()
    model.train(data=args.data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, seed=args.seed, workers=0,
                plots=False, verbose=False, device=args.device, project=str(work / "runs"), name="raw", exist_ok=True)
    ended = time.perf_counter()
    print(json.dumps({"import_s": imported - STARTED, "train_s": ended - began,
                      "total_in_process_s": ended - STARTED}))


if __name__ == "__main__":
    main()
