"""Ultralytics used directly, as a user would script it: the baseline of the training figures.

``python -m bench.raw_train --data DATA_YAML --work DIR --epochs 20 --imgsz 128 --batch 8
[--threads N] [--device cpu|cuda]`` trains yolov8n from its yaml with the arguments the training worker
passes (``workers=0``, ``plots=False``, ``seed``), and prints one JSON line:
``import_s`` (Python start to Ultralytics imported), ``train_s`` (``model.train()``), and
the phases of ``model.train()`` from Ultralytics' callbacks, so that the service's run
can be compared phase by phase (:func:`phases`): ``setup_s`` (trainer set-up, dataset
scan, model to device: train() called -> ``on_train_start``), ``epochs_s`` (first epoch
start -> last ``on_fit_epoch_end``), ``train_pass_s`` and ``val_save_s`` (their sums over
epochs: the batches, then validation + checkpoint save), ``final_s`` (final evaluation of
``best.pt`` -> ``on_train_end``), ``epoch_s`` (each epoch's ``on_fit_epoch_end`` to the
next), ``cpu_s`` (the process's CPU seconds), ``train_cpu_s`` (of which ``on_train_start``
-> ``on_train_end``) and ``threads`` (CPU seconds per thread, :func:`thread_cpu`).

``--threads N`` gives torch N threads at every epoch start, as the worker does on the
CPU (Ultralytics itself uses ``cpu_count - 1``); 0 keeps Ultralytics' own choice.
The offline switches (``workers.yolo.prepare_ultralytics``) are the ones any user
without internet needs too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

#: Ultralytics callbacks whose times :func:`phases` reads.
PHASE_EVENTS = ("on_train_start", "on_train_epoch_start", "on_train_epoch_end", "on_fit_epoch_end", "on_train_end")


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, from /proc (Linux).

    Keyed by the Python thread's name where there is one, else ``native-<tid>`` (torch's
    OpenMP threads); threads of one name are summed.  Empty where /proc is missing.
    """
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
        name = names.get(int(tid), f"native-{tid}")
        out[name] = round(out.get(name, 0.0) + cpu, 3)
    return out


def phases(times: dict[str, list[float]], began: float) -> dict[str, Any]:
    """``model.train()``'s phases from the callbacks' times (see the module docstring)."""
    starts, ends, fits = (times.get(k, []) for k in ("on_train_epoch_start", "on_train_epoch_end",
                                                      "on_fit_epoch_end"))
    epoch_fits = fits[:len(starts)]  # the last one is the final evaluation's
    out: dict[str, Any] = {"setup_s": (times.get("on_train_start") or [began])[0] - began}
    if starts and epoch_fits:
        out["epochs_s"] = epoch_fits[-1] - starts[0]
        out["train_pass_s"] = sum(e - s for s, e in zip(starts, ends, strict=False))
        out["val_save_s"] = sum(f - e for e, f in zip(ends, epoch_fits, strict=False))
        out["epoch_s"] = [round(b - a, 3) for a, b in itertools.pairwise(epoch_fits)]
        if times.get("on_train_end"):
            out["final_s"] = times["on_train_end"][0] - epoch_fits[-1]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


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
    built = time.perf_counter()
    times: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    for event in PHASE_EVENTS:
        model.add_callback(event, lambda trainer, event=event: times.setdefault(event, []).append(time.perf_counter()))
    for event in ("on_train_start", "on_train_end"):
        model.add_callback(event, lambda trainer, event=event: cpu.setdefault(event, time.process_time()))
    if args.threads:
        def threads(trainer: Any) -> None:
            torch.set_num_threads(args.threads)

        model.add_callback("on_train_epoch_start", threads)
    began = time.perf_counter()
    model.train(data=args.data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, seed=args.seed, workers=0,
                plots=False, verbose=False, device=args.device, project=str(work / "runs"), name="raw", exist_ok=True)
    ended = time.perf_counter()
    print(json.dumps({"import_s": imported - STARTED, "build_s": built - imported, "train_s": ended - began,
                      "total_in_process_s": ended - STARTED, **phases(times, began),
                      "cpu_s": round(time.process_time(), 3), "threads": thread_cpu(),
                      "train_cpu_s": round(cpu.get("on_train_end", 0.0) - cpu.get("on_train_start", 0.0), 3),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
