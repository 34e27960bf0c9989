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

import itertools
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
#: ``BENCH_TRAIN_COMPARE=/path/to/checkout``: also run the service's jobs with the worker of that
#: checkout (e.g. ``git worktree add /tmp/train-old HEAD``), interleaved with this one's: an A/B
#: on the same machine at the same time.
COMPARE = os.environ.get("BENCH_TRAIN_COMPARE") or None
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
    s3_cpu = storage_cpu(bench)
    started = time.perf_counter()
    out = run_module("bench.raw_train", "--data", str(data_yaml), "--work", str(work), "--epochs", str(EPOCHS),
                     "--imgsz", str(IMGSZ), "--batch", str(BATCH), "--threads", str(threads), "--device", DEVICE)
    wall = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"raw training failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return wall, {**json.loads(lines[-1]), "storage_cpu_s": round(storage_cpu(bench) - s3_cpu, 3)}


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
        build = first(evs, "build")
        self.build = float(build["dur"]) if build is not None else float("nan")
        # the same phases as bench.raw_train.phases(), from the journal
        epoch_starts = {int(e["epoch"]): float(e["t"]) for e in evs if e.get("ev") == "train_epoch_start"}
        epoch_ends = {int(e["epoch"]): float(e["t"]) for e in evs if e.get("ev") == "train_epoch_end"}
        self.trainer_setup = float(starts["t"]) - (end(build) if build is not None else end(download))
        self.train_pass = sum(epoch_ends[k] - epoch_starts[k] for k in epoch_ends if k in epoch_starts)
        self.val_save = sum(self.fits[k] - epoch_ends[k] for k in self.fits if k in epoch_ends)
        last_fit = max((e for e in fits), key=lambda e: float(e["t"]), default=None)
        self.epochs = (end(last_fit) - min(epoch_starts.values())) if last_fit and epoch_starts else float("nan")
        self.final = float(ends["t"]) - end(last_fit) if last_fit else float("nan")
        self.cpu = float(ends.get("cpu_s", "nan")) - float(starts.get("cpu_s", "nan"))
        self.threads = thread_delta(starts.get("threads") or {}, ends.get("threads") or {})
        uploads = [e for e in evs if e.get("ev") == "upload_thread"]
        self.upload_cpu = sum(float(e.get("cpu", 0.0)) for e in uploads)  # threads gone by train_end
        self.upload_wall = sum(float(e["dur"]) for e in uploads)
        fit_times = sorted(self.fits.values())
        self.epoch_s = [round(b - a, 3) for a, b in itertools.pairwise(fit_times)]
        self.ckpt_s = [round(float(e["dur"]), 3) for e in evs if e.get("ev") == "ckpt"]
        self.fit_s = [round(float(e["dur"]), 3) for e in fits]
        #: the S3 server's CPU seconds during the job (set by service_jobs)
        self.storage_cpu = float("nan")
        self.torch_threads = ends.get("torch_threads")


def thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each thread spent between two :func:`bench.raw_train.thread_cpu` readings."""
    return {k: round(v - before.get(k, 0.0), 3) for k, v in sorted(after.items(), key=lambda kv: -kv[1])
            if v - before.get(k, 0.0) >= 0.005}


def storage_cpu(bench: Bench) -> float:
    """CPU seconds the bench's SeaweedFS server has used so far (NaN where unknown): the
    uploads' cost on the machine beyond the worker's own threads."""
    proc = getattr(bench.s3, "_proc", None)
    pid = getattr(proc, "pid", None)
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_jobs(bench: Bench, r: int, tree: str | None = None) -> tuple[ServiceRun, ServiceRun, float]:
    """A fresh instrumented worker takes a cold job, then a warm one; returns both and its start-up.

    ``tree``: run the worker from that checkout (put first on ``sys.path``) instead of this one.
    """
    tag = f"{r}" if tree is None else f"{r}-compare"
    work = bench.path("train-work", f"r{tag}")
    events_path = bench.root / f"train-events-{tag}.jsonl"
    args, extra = worker_command("train", instrumented=True)
    if tree is not None:
        args = ["-c", f"import sys; sys.path.insert(0, {tree!r}); {args[1]}", *args[2:]]
    env = bench.worker_env(work, f"train{tag}", BENCH_EVENTS=str(events_path), DEVICE=DEVICE, **extra)
    cold_id, warm_id = f"bench-cold-{tag}", f"bench-warm-{tag}"
    bench.sender.send(bench.settings.train_request_queue, request(cold_id))
    proc = Proc(args, env, bench.root / f"train-worker-{tag}.log")
    s3_cpu = [storage_cpu(bench)]
    proc.start(wait=False)
    try:
        done = wait_terminal(bench, cold_id)
        s3_cpu.append(storage_cpu(bench))
        published = time.time()
        bench.sender.send(bench.settings.train_request_queue, request(warm_id))
        done_warm = wait_terminal(bench, warm_id)
        s3_cpu.append(storage_cpu(bench))
    finally:
        proc.stop(timeout=60)
    events = read_events(events_path)
    consuming = proc.line_time(STARTED)
    shutil.rmtree(work, ignore_errors=True)
    cold, warm = ServiceRun(cold_id, events, done, proc.spawned), ServiceRun(warm_id, events, done_warm, published)
    cold.storage_cpu, warm.storage_cpu = s3_cpu[1] - s3_cpu[0], s3_cpu[2] - s3_cpu[1]
    return cold, warm, (consuming or float("nan")) - proc.spawned


#: (b)'s phases measured the same way as (a')'s: (raw_train key, ServiceRun attribute, what it is)
PHASES = (
    ("build_s", "build", "model build (YOLO(yaml))"),
    ("setup_s", "trainer_setup", "trainer set-up (train() → on_train_start)"),
    ("train_pass_s", "train_pass", "epochs' training passes (sum)"),
    ("val_save_s", "val_save", "epochs' validation + checkpoint save (+ callbacks) (sum)"),
    ("final_s", "final", "final evaluation of best.pt"),
    ("cpu_s", "cpu", "CPU seconds (a': whole process; b: on_train_start → on_train_end)"),
)


def describe(run_: ServiceRun, tree: str | None) -> dict[str, Any]:
    """One service job's breakdown for the results file."""
    return {"job": run_.job_id, "tree": tree or "this", "total_s": round(run_.total, 3),
            **{k: round(float(getattr(run_, k)), 4) for k in (
                "take", "download", "build", "trainer_setup", "train_pass", "val_save", "ckpt", "epoch_publish",
                "final", "upload", "finish", "cpu", "upload_cpu", "upload_wall", "storage_cpu")},
            "threads": run_.threads, "torch_threads": run_.torch_threads, "epoch_s": run_.epoch_s,
            "ckpt_s": run_.ckpt_s, "fit_s": run_.fit_s}


class Figures:
    """The section's figures, filled run by run."""

    def __init__(self) -> None:
        on = "" if DEVICE == "cpu" else f", on {DEVICE}"
        self.over = over = Section("training", f"Training overhead (yolov8n, {EPOCHS} epochs at {IMGSZ} px, 24 train "
                                               f"/ 8 val generated images, batch 8{on})")
        self.lat = lat = Section("epoch_latency", "Epoch update latency (epoch end in the worker → BE receipt)")
        self.a_wall = over.figure("raw_wall", "(a) Ultralytics directly, subprocess: process start → exit", "s")
        self.a_train = over.figure("raw_train", "(a) … of which model.train()", "s")
        self.a1_wall = over.figure("raw_default_threads_wall", "(a') Ultralytics directly, its default torch threads "
                                   "(cpu_count − 1)", "s", baseline="raw_wall")
        self.fastest = over.figure("raw_fastest_wall", "(a*) the faster direct run of (a) and (a'), lower median", "s")
        self.b_cold = over.figure("service_cold", "(b) service, fresh worker: spawn (request queued) → BE has "
                                  "training_completed", "s", baseline="raw_fastest_wall")
        self.b_warm = over.figure("service_warm", "(b) service, warm worker: publish → BE has training_completed",
                                  "s", baseline="raw_train")
        self.parts = {
            "startup": over.figure("startup", "  (b) cold: process start-up (spawn → consuming)", "s"),
            "take": over.figure("take", "  (b) take the job (job record, lease message, ack)", "s"),
            "download": over.figure("download", "  (b) cold: dataset download from S3 (65 objects) + data.yaml", "s"),
            "download_warm": over.figure("download_warm", "  (b) warm: dataset sync, cache hit (listing only)", "s"),
            "setup": over.figure("setup", "  (b) Ultralytics model build + trainer set-up", "s"),
            "training": over.figure("training", "  (b) Ultralytics training, callbacks included", "s"),
            "ckpt": over.figure("ckpt", "  (b)   of which per-epoch checkpoint upload + record (sum)", "s"),
            "epoch_publish": over.figure("epoch_publish", "  (b)   of which per-epoch record + epoch_update publish "
                                         "(sum)", "s"),
            "upload": over.figure("upload", "  (b) best weights upload to S3", "s"),
            "finish": over.figure("finish", "  (b) terminal message recorded, published, confirmed", "s"),
            "storage_cpu": over.figure("storage_cpu", "  (b) the S3 server's CPU seconds during the job (checkpoints "
                                       "stored)", "s"),
        }
        self.a1_import = over.figure("raw_default_import", "  (a') Python start → Ultralytics imported", "s")
        self.side = {attr: (over.figure(f"raw_default_{attr}", f"  (a') {what}", "s"),
                            over.figure(f"phase_{attr}", f"  (b) {what}, cold and warm", "s"))
                     for _key, attr, what in PHASES}
        self.compare = {k: over.figure(f"compare_{k}", f"(b°) {what}, the worker of BENCH_TRAIN_COMPARE", "s")
                        for k, what in (("cold", "fresh worker"), ("warm", "warm worker"), ("startup", "start-up"),
                                        ("train_pass", "training passes"), ("val_save", "validation + save"),
                                        ("cpu", "CPU seconds"))} if COMPARE else {}
        self.raw_runs: list[dict[str, Any]] = []
        self.service_runs: list[dict[str, Any]] = []
        self.latency = {(kind, q): lat.figure(f"{kind}_p{q}", f"{what} → BE receipt, p{q}", "ms")
                        for kind, what in (("end", "epoch end (worker callback)"),
                                           ("ts", "epoch_update timestamp field")) for q in (50, 99)}
        self.pooled: dict[str, list[float]] = {"end": [], "ts": []}

    def raw(self, variant: str, wall: float, info: dict[str, Any]) -> None:
        if variant == "all":
            self.a_wall.add(wall)
            self.a_train.add(info["train_s"])
            return
        self.a1_wall.add(wall)
        self.a1_import.add(info["import_s"])
        self.raw_runs.append({"wall_s": round(wall, 3), **info})
        for key, attr, _what in PHASES:
            self.side[attr][0].add(float(info.get(key, "nan")))

    def service(self, bench: Bench, cold: ServiceRun, warm: ServiceRun, startup: float, tree: str | None) -> None:
        self.service_runs += [describe(cold, tree), describe(warm, tree)]
        if tree is not None:
            for k, v in (("cold", cold.total), ("warm", warm.total), ("startup", startup)):
                self.compare[k].add(v)
            for k in ("train_pass", "val_save", "cpu"):
                for run_ in (cold, warm):
                    self.compare[k].add(getattr(run_, k))
            return
        self.b_cold.add(cold.total)
        self.b_warm.add(warm.total)
        self.parts["startup"].add(startup)
        for run_ in (cold, warm):
            for name in ("take", "download", "setup", "training", "ckpt", "epoch_publish", "upload", "finish",
                         "storage_cpu"):
                self.parts["download_warm" if name == "download" and run_ is warm else name].add(getattr(run_, name))
            for _key, attr, _what in PHASES:
                self.side[attr][1].add(getattr(run_, attr))
            ends, stamps = epoch_latencies(bench.listener.of(run_.job_id, "epoch_update"), run_.fits)
            for kind, values in (("end", ends), ("ts", stamps)):
                self.pooled[kind].extend(values)
                for q in (50, 99):
                    self.latency[kind, q].add(percentile(values, q))

    def finish(self, repeats: int) -> list[Section]:
        over, lat, fastest = self.over, self.lat, self.fastest
        fastest.values = list(min((self.a_wall, self.a1_wall), key=lambda f: f.median).values)
        fastest.note = "(a')" if self.a1_wall.median <= self.a_wall.median else "(a)"
        ratio = self.b_cold.median / fastest.median
        over.extra = {"training_ratio": ratio if fastest.values else None,
                      "training_ratio_goal": TRAINING_RATIO_GOAL, "fastest_direct": fastest.note,
                      "raw_default_runs": self.raw_runs, "service_runs": self.service_runs}
        if COMPARE:
            over.extra["compare_tree"] = COMPARE
            over.extra["compare_training_ratio"] = self.compare["cold"].median / fastest.median
        over.notes += [
            f"training_ratio = (b) fresh worker ÷ (a*), the faster direct run, here {fastest.note}: "
            f"×{ratio:.2f} (goal ≤ ×{TRAINING_RATIO_GOAL}).",
            "(a) and (b) train the same job with the same arguments (workers=0, plots=False, seed 0); (a) reads the "
            "dataset from local disk, (b) downloads it from SeaweedFS S3 and uploads a checkpoint every epoch.",
            "(b) rows indented are medians over the cold and the warm runs of each repeat (download split); they "
            "come from the instrumented worker's event journal (bench/instrumented.py). The (a') phase rows are the "
            "same phases of (a')'s model.train(), from its callbacks (bench/raw_train.py).",
            "Ratios: the cold service run against (a)'s whole process, the warm run against (a)'s model.train() "
            "alone (a warm worker has paid Python and library start-up already).",
        ]
        end, ts = self.pooled["end"], self.pooled["ts"]
        lat.extra = {"samples": len(end), "pooled_end_p50_ms": percentile(end, 50),
                     "pooled_end_p99_ms": percentile(end, 99), "pooled_ts_p50_ms": percentile(ts, 50),
                     "pooled_ts_p99_ms": percentile(ts, 99)}
        lat.notes += [
            f"{len(end)} epoch updates ({2 * repeats} jobs × {EPOCHS} epochs); each row is the median "
            "over jobs of that job's p50 or p99, with min/max over jobs; pooled over all updates: p50 "
            f"{percentile(end, 50):.1f} ms, p99 {percentile(end, 99):.1f} ms (callback start → receipt).",
            "'Epoch end' is the start of the worker's on_fit_epoch_end (after validation and the checkpoint "
            "upload): it includes renewing the job record in S3 before the update is published (durable before "
            "the BE hears of it). The timestamp field is set when the message is built, after that.",
        ]
        return [over, lat]


def run(bench: Bench) -> list[Section]:
    figures = Figures()
    data_yaml = prepare(bench)
    for r in range(bench.repeats):
        for variant in ("all", "default") if r % 2 == 0 else ("default", "all"):  # alternate who goes first
            threads = len(os.sched_getaffinity(0)) if variant == "all" else 0
            wall, info = raw_run(bench, data_yaml, threads=threads, label=f"{variant}{r}")
            figures.raw(variant, wall, info)
        trees: list[str | None] = [None, COMPARE] if COMPARE else [None]
        for tree in trees if r % 2 == 0 else trees[::-1]:  # alternate who goes first
            cold, warm, startup = service_jobs(bench, r, tree)
            figures.service(bench, cold, warm, startup, tree)
    return figures.finish(bench.repeats)


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

