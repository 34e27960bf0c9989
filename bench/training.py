"""Training overhead and epoch-update latency.

The same small job -- the generated shapes dataset (24 train / 8 val images of 128 px),
yolov8n from its yaml, ``EPOCHS`` epochs at 128 px, batch 8, seed 0 -- run

* (a) with Ultralytics directly in a subprocess (:mod:`bench.raw_train`), the dataset on
  local disk, torch given every core; (a') the same with Ultralytics' own thread choice
  (``min(8, cpu_count - 1)``, which the training worker keeps); the faster of the two
  (lower median) is the baseline of ``training_ratio``;
* (b) through the service: the request is published, then a fresh training worker
  (:mod:`bench.instrumented`, S3 storage on SeaweedFS) is started; timed from the
  process spawn to the BE's receipt of ``training_completed`` (dataset download from S3,
  checkpoints and best weights uploaded to S3, every message confirmed).  Right after,
  the same worker gets a second request (warm worker, dataset cache hit): timed from
  publish to receipt.

Where (b)'s time goes comes from the instrumented worker's event journal.  Each
``epoch_update`` is matched with the moment the worker's ``on_fit_epoch_end`` started
(epoch end in the worker) and with its own ``timestamp`` field; the BE's receipt time
minus those is the epoch-update latency (same machine, same clock).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import (
    STARTED,
    Got,
    Proc,
    is_terminal,
    parse_ts,
    percentile,
    read_events,
    run_module,
    worker_command,
)
from bench.context import Bench, Section

#: ``BENCH_TRAIN_EPOCHS`` shortens the job while working on the benchmark itself.
EPOCHS = int(os.environ.get("BENCH_TRAIN_EPOCHS", "20"))
#: ``BENCH_TRAIN_IMGSZ`` and ``BENCH_DEVICE`` (``cpu``, ``cuda``) for a GPU server (scripts/gpu_bench.sh):
#: the raw runs train on that device, the worker gets ``DEVICE`` set to it.
IMGSZ = int(os.environ.get("BENCH_TRAIN_IMGSZ", "128"))
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
BATCH = 8
DATASET_PREFIX = "datasets/bench-shapes/"
#: issue 14: the service's fresh-worker job within 5% of the fastest direct run
TRAINING_RATIO_GOAL = 1.05


def request(job_id: str, epochs: int = EPOCHS) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": DATASET_PREFIX, "name": "bench-shapes"},
        "output": {"prefix": "models/bench", "model_name": f"{job_id}.pt"},
        "hyperparams": {"model": "yolov8n", "epochs": epochs, "batch": BATCH, "imgsz": IMGSZ, "seed": 0},
    }


def prepare(bench: Bench) -> Path:
    """Generate the dataset, upload it to the bucket; return a data.yaml for the raw runs."""
    from ai_service.shapes import generate_shapes_dataset

    root = bench.path("train-dataset")
    generate_shapes_dataset(root, n_train=24, n_val=8, size=IMGSZ, seed=1)
    bench.storage().upload_dir(root, DATASET_PREFIX.rstrip("/"))
    text = (root / "data.yaml").read_text()
    local = root.parent / "raw-data.yaml"
    local.write_text(f"path: {root}\n{text}")
    return local


def raw_run(bench: Bench, data_yaml: Path, threads: int, label: str) -> tuple[float, dict[str, Any]]:
    work = bench.path("raw", label)
    started = time.perf_counter()
    out = run_module("bench.raw_train", "--data", str(data_yaml), "--work", str(work), "--epochs", str(EPOCHS),
                     "--imgsz", str(IMGSZ), "--batch", str(BATCH), "--threads", str(threads), "--device", DEVICE)
    wall = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"raw training failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return wall, json.loads(lines[-1])


def wait_terminal(bench: Bench, job_id: str, timeout: float = 900.0) -> Got:
    if not bench.listener.wait(lambda ms: any(m.job_id == job_id and is_terminal(m) for m in ms), timeout):
        raise RuntimeError(f"no terminal message for {job_id} within {timeout:.0f} s")
    done = next(m for m in bench.listener.of(job_id) if is_terminal(m))
    if done.type != "training_completed":
        raise RuntimeError(f"{job_id} ended with {done.body}")
    return done


def first(events: list[dict[str, Any]], ev: str) -> dict[str, Any] | None:
    for e in events:
        if e.get("ev") == ev:
            return e
    return None


def end(e: dict[str, Any]) -> float:
    return float(e["t"]) + float(e.get("dur", 0.0))


class ServiceRun:
    """One job through the service and the breakdown of its time."""

    def __init__(self, job_id: str, events: list[dict[str, Any]], done: Got, start: float) -> None:
        self.job_id = job_id
        jobs = [e for e in events if e.get("ev") == "job" and e.get("job") == job_id]
        if not jobs:
            raise RuntimeError(f"no handler event for {job_id} in the journal")
        t0, t1 = float(jobs[0]["t"]), end(jobs[0])
        # one job at a time per worker: the handler's window holds this job's events only
        evs = [e for e in events if t0 <= float(e["t"]) <= t1 and e.get("pid") == jobs[0].get("pid")]
        take, download = first(evs, "take"), first(evs, "download")
        starts, ends = first(evs, "train_start"), first(evs, "train_end")
        finish = first(evs, "finish")
        if take is None or download is None or starts is None or ends is None or finish is None:
            raise RuntimeError(f"incomplete event journal for {job_id}: {[e.get('ev') for e in evs][:60]}")
        fits = [e for e in evs if e.get("ev") == "fit_epoch_end" and not e.get("final_eval")]
        self.total = done.t - start
        self.take = float(take["dur"])
        self.download = float(download["dur"])
        self.setup = float(starts["t"]) - end(download)
        self.training = float(ends["t"]) - float(starts["t"])
        self.ckpt = sum(float(e["dur"]) for e in evs if e.get("ev") == "ckpt")
        self.epoch_publish = sum(float(e["dur"]) for e in fits)
        self.upload = sum(float(e["dur"]) for e in evs
                          if e.get("ev") == "upload" and e.get("key") == f"models/bench/{job_id}.pt")
        self.finish = float(finish["dur"])
        self.receipt = done.t - end(finish)
        self.fits = {int(e["epoch"]): float(e["t"]) for e in fits}


def run(bench: Bench) -> list[Section]:
    on = "" if DEVICE == "cpu" else f", on {DEVICE}"
    over = Section("training", f"Training overhead (yolov8n, {EPOCHS} epochs at {IMGSZ} px, 24 train / 8 val "
                               f"generated images, batch 8{on})")
    lat = Section("epoch_latency", "Epoch update latency (epoch end in the worker → BE receipt)")
    a_wall = over.figure("raw_wall", "(a) Ultralytics directly, subprocess: process start → exit", "s")
    a_train = over.figure("raw_train", "(a) … of which model.train()", "s")
    a1_wall = over.figure("raw_default_threads_wall", "(a') Ultralytics directly, its default torch threads "
                          "(cpu_count − 1)", "s", baseline="raw_wall")
    fastest = over.figure("raw_fastest_wall", "(a*) the faster direct run of (a) and (a'), lower median", "s")
    b_cold = over.figure("service_cold", "(b) service, fresh worker: spawn (request queued) → BE has "
                         "training_completed", "s", baseline="raw_fastest_wall")
    b_warm = over.figure("service_warm", "(b) service, warm worker: publish → BE has training_completed", "s",
                         baseline="raw_train")
    parts = {
        "startup": over.figure("startup", "  (b) cold: process start-up (spawn → consuming)", "s"),
        "take": over.figure("take", "  (b) take the job (job record, lease message, ack)", "s"),
        "download": over.figure("download", "  (b) cold: dataset download from S3 (65 objects) + data.yaml", "s"),
        "download_warm": over.figure("download_warm", "  (b) warm: dataset sync, cache hit (listing only)", "s"),
        "setup": over.figure("setup", "  (b) Ultralytics model build + trainer set-up", "s"),
        "training": over.figure("training", "  (b) Ultralytics training, callbacks included", "s"),
        "ckpt": over.figure("ckpt", "  (b)   of which per-epoch checkpoint upload + record (sum)", "s"),
        "epoch_publish": over.figure("epoch_publish", "  (b)   of which per-epoch record + epoch_update publish (sum)",
                                     "s"),
        "upload": over.figure("upload", "  (b) best weights upload to S3", "s"),
        "finish": over.figure("finish", "  (b) terminal message recorded, published, confirmed", "s"),
    }
    p50_end = lat.figure("end_p50", "epoch end (worker callback) → BE receipt, p50", "ms")
    p99_end = lat.figure("end_p99", "epoch end (worker callback) → BE receipt, p99", "ms")
    p50_ts = lat.figure("ts_p50", "epoch_update timestamp field → BE receipt, p50", "ms")
    p99_ts = lat.figure("ts_p99", "epoch_update timestamp field → BE receipt, p99", "ms")
    pooled_end: list[float] = []
    pooled_ts: list[float] = []

    data_yaml = prepare(bench)
    events_path = bench.root / "train-events.jsonl"
    for r in range(bench.repeats):
        for variant in ("all", "default") if r % 2 == 0 else ("default", "all"):  # alternate who goes first
            if variant == "all":
                wall, info = raw_run(bench, data_yaml, threads=len(os.sched_getaffinity(0)), label=f"r{r}")
                a_wall.add(wall)
                a_train.add(info["train_s"])
            else:
                wall, _ = raw_run(bench, data_yaml, threads=0, label=f"d{r}")
                a1_wall.add(wall)

        work = bench.path("train-work", f"r{r}")
        args, extra = worker_command("train", instrumented=True)
        env = bench.worker_env(work, f"train{r}", BENCH_EVENTS=str(events_path), DEVICE=DEVICE, **extra)
        cold_id, warm_id = f"bench-cold-{r}", f"bench-warm-{r}"
        bench.sender.send(bench.settings.train_request_queue, request(cold_id))
        proc = Proc(args, env, bench.root / f"train-worker-{r}.log")
        proc.start(wait=False)
        try:
            done = wait_terminal(bench, cold_id)
            published = time.time()
            bench.sender.send(bench.settings.train_request_queue, request(warm_id))
            done_warm = wait_terminal(bench, warm_id)
        finally:
            proc.stop(timeout=60)
        events = read_events(events_path)
        cold = ServiceRun(cold_id, events, done, proc.spawned)
        warm = ServiceRun(warm_id, events, done_warm, published)
        b_cold.add(cold.total)
        b_warm.add(warm.total)
        consuming = proc.line_time(STARTED)
        parts["startup"].add((consuming or float("nan")) - proc.spawned)
        for name in ("take", "download", "setup", "training", "ckpt", "epoch_publish", "upload", "finish"):
            for run_ in (cold, warm):
                if name == "download" and run_ is warm:
                    parts["download_warm"].add(run_.download)
                else:
                    parts[name].add(getattr(run_, name))
        for job_id, run_ in ((cold_id, cold), (warm_id, warm)):
            ends, stamps = epoch_latencies(bench.listener.of(job_id, "epoch_update"), run_.fits)
            pooled_end.extend(ends)
            pooled_ts.extend(stamps)
            p50_end.add(percentile(ends, 50))
            p99_end.add(percentile(ends, 99))
            p50_ts.add(percentile(stamps, 50))
            p99_ts.add(percentile(stamps, 99))
        shutil.rmtree(work, ignore_errors=True)

    fastest.values = list(min((a_wall, a1_wall), key=lambda f: f.median).values)
    fastest.note = "(a')" if a1_wall.median <= a_wall.median else "(a)"
    over.extra = {"training_ratio": b_cold.median / fastest.median if fastest.values else None,
                  "training_ratio_goal": TRAINING_RATIO_GOAL, "fastest_direct": fastest.note}
    over.notes += [
        f"training_ratio = (b) fresh worker ÷ (a*), the faster direct run, here {fastest.note}: "
        f"×{b_cold.median / fastest.median:.2f} (goal ≤ ×{TRAINING_RATIO_GOAL}).",
        "(a) and (b) train the same job with the same arguments (workers=0, plots=False, seed 0); (a) reads the "
        "dataset from local disk, (b) downloads it from SeaweedFS S3 and uploads a checkpoint every epoch.",
        "(b) rows indented are medians over the cold and the warm runs of each repeat (download split); they come "
        "from the instrumented worker's event journal (bench/instrumented.py).",
        "Ratios: the cold service run against (a)'s whole process, the warm run against (a)'s model.train() alone "
        "(a warm worker has paid Python and library start-up already).",
    ]
    lat.extra = {"samples": len(pooled_end), "pooled_end_p50_ms": percentile(pooled_end, 50),
                 "pooled_end_p99_ms": percentile(pooled_end, 99), "pooled_ts_p50_ms": percentile(pooled_ts, 50),
                 "pooled_ts_p99_ms": percentile(pooled_ts, 99)}
    lat.notes += [
        f"{len(pooled_end)} epoch updates ({2 * bench.repeats} jobs × {EPOCHS} epochs); each row is the median "
        "over jobs of that job's p50 or p99, with min/max over jobs; pooled over all updates: p50 "
        f"{percentile(pooled_end, 50):.1f} ms, p99 {percentile(pooled_end, 99):.1f} ms (callback start → receipt).",
        "'Epoch end' is the start of the worker's on_fit_epoch_end (after validation and the checkpoint upload): "
        "it includes renewing the job record in S3 before the update is published (durable before the BE hears "
        "of it). The timestamp field is set when the message is built, after that.",
    ]
    return [over, lat]


def epoch_latencies(updates: list[Got], fits: dict[int, float]) -> tuple[list[float], list[float]]:
    ends, stamps = [], []
    for u in updates:
        epoch = int(u.body.get("current_epoch", -1))
        if epoch in fits:
            ends.append((u.t - fits[epoch]) * 1000)
        stamp = u.body.get("timestamp")
        if isinstance(stamp, str):
            stamps.append((u.t - parse_ts(stamp)) * 1000)
    return ends, stamps

