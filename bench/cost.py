"""Cost of the workers: cold start, idle memory, memory after 100 inference requests.

Each worker is the real ``ai-service worker <op>`` started in a fresh ``WORK_DIR``:

* cold start: process spawn → the ``✅ RabbitMQ consumer started`` log line (settings,
  Ultralytics imported and prepared, storage client, publisher connected, topology
  declared, consuming);
* idle RSS: resident memory 3 s after that line;
* the inference worker then answers one request (the model is downloaded from S3,
  loaded and warmed up on the first one: its latency is the rest of the cold start)
  and 99 more (32 in flight): RSS after them.
"""

from __future__ import annotations

import time

from bench.common import STARTED, Proc, rss_mib, worker_command
from bench.context import Bench, Section
from bench.images import png_images
from bench.inference import INFLIGHT, bodies, drive, prepare_model

OPS = ("train", "convert", "infer")


def run(bench: Bench) -> list[Section]:
    section = Section("cost", "Cost of a worker process (real `ai-service worker <op>`, CPU)")
    cold = {op: section.figure(f"cold_{op}", f"cold start, {op} worker: spawn → consuming", "s") for op in OPS}
    idle = {op: section.figure(f"idle_{op}", f"idle RSS, {op} worker", "MiB") for op in OPS}
    first = section.figure("first_request", "first request on a fresh infer worker (model download from S3, "
                           "load, warm-up): latency", "s")
    after = section.figure("rss_after_100", "RSS of the infer worker after 100 inference requests", "MiB",
                           baseline="idle_infer")
    prepare_model(bench)
    pngs = png_images(100, 128, seed=700_000)
    for r in range(bench.repeats):
        for op in OPS:
            label = f"cost-{op}-{r}"
            args, extra = worker_command(op)
            proc = Proc(args, {**bench.worker_env(bench.path(f"{label}-work"), label), **extra},
                        bench.root / f"{label}.log")
            proc.start(wait=True)
            try:
                consuming = proc.line_time(STARTED)
                cold[op].add((consuming if consuming is not None else time.time()) - proc.spawned)
                time.sleep(3.0)
                idle[op].add(rss_mib(proc.pid))
                if op == "infer":
                    _, latency = drive(bench, bodies(pngs[:1], f"cost-first-{r}"), 1)
                    first.add(latency[0] / 1000)
                    drive(bench, bodies(pngs[1:], f"cost-{r}"), INFLIGHT)
                    time.sleep(1.0)
                    after.add(rss_mib(proc.pid))
            finally:
                proc.stop(timeout=30)
    section.notes += [
        f"{bench.repeats} starts of each worker, one after the other (so the page cache is warm after the first); "
        "storage is S3 (SeaweedFS), the broker the shared local RabbitMQ.",
        "RSS is the process's VmRSS (torch, Ultralytics and, for the inference worker, one loaded yolov8n and its "
        "warm-up).",
    ]
    return [section]
