"""Inference: a raw Ultralytics predict loop vs the service, without and with batching.

The model is a yolov8n built from its yaml (random weights: the speed of a trained
one), stored in the SeaweedFS bucket as ``models/bench.pt``; the images are ``COUNT``
generated shapes PNGs of ``IMGSZ`` px, sent inline (base64), one image per request.

* raw (:mod:`bench.raw_infer`, its own process): Pillow decode + ``model.predict`` one
  image per call, and in lists of 8;
* the service: a real ``ai-service worker infer`` with default settings (16 requests in
  flight in the worker) except ``MAX_BATCH`` -- 1 (batching off) or 8 (the default:
  up to 8 images per predict call, waiting up to ``BATCH_WINDOW_MS`` = 5 ms) -- while
  the BE keeps ``INFLIGHT`` requests outstanding.  Latency: BE publish → BE receipt of
  ``inference_completed`` (on ``infer_result_q``).
* single request: one request in flight at a time (the default worker), p50 latency
  against the raw one-image call.
* HTTP (:mod:`bench.http_infer`): the batching-on worker also serves ``HTTP_PORT``; the
  same bodies are posted to ``POST /v1/infer`` by 1 and ``INFLIGHT`` keep-alive
  ``http.client`` connections, interleaved with the AMQP runs on the same warm worker.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from bench import http_infer
from bench.common import Proc, build_model, percentile, run_module, worker_command
from bench.context import Bench, Section
from bench.images import png_images

IMGSZ = 128
INFLIGHT = 32
MODEL_KEY = "models/bench.pt"


def bodies(pngs: list[bytes], tag: str) -> list[tuple[str, bytes]]:
    out = []
    for i, raw in enumerate(pngs):
        job_id = f"{tag}-{i}"
        out.append((job_id, json.dumps({
            "job_id": job_id, "model": {"path": MODEL_KEY}, "images": [{"data": base64.b64encode(raw).decode()}],
            "params": {"conf": 0.25, "iou": 0.7, "imgsz": IMGSZ, "max_det": 300, "classes": None},
        }).encode()))
    return out


def drive(bench: Bench, requests: list[tuple[str, bytes]], inflight: int, timeout: float = 600.0,
          ) -> tuple[float, list[float]]:
    """Send ``requests`` keeping ``inflight`` outstanding; (seconds, latencies in ms)."""
    listener, queue = bench.listener, bench.settings.infer_request_queue
    with listener.cond:
        cursor = len(listener.messages)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    failures: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    started = time.time()
    nxt = 0
    while len(latencies) + len(failures) < len(requests):
        while nxt < len(requests) and len(sent) < inflight:
            job_id, raw = requests[nxt]
            sent[job_id] = time.time()
            bench.sender.send(queue, raw)
            nxt += 1
        with listener.cond:
            if len(listener.messages) == cursor:
                listener.cond.wait(0.5)
            new, cursor = listener.messages[cursor:], len(listener.messages)
        for m in new:
            if m.job_id in sent:
                t0 = sent.pop(m.job_id)
                if m.type == "inference_completed":
                    latencies.append((m.t - t0) * 1000)
                else:
                    failures.append(m.body)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(sent)} inference requests unanswered after {timeout:.0f} s")
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return time.time() - started, latencies


def raw_env() -> dict[str, str]:
    """The thread environment the inference worker gives itself (``workers.inference.setup``)."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def raw(bench: Bench, model: Path, count: int, repeats: int) -> dict[str, Any]:
    work = bench.path("raw-infer")
    out = run_module("bench.raw_infer", "--model", str(model), "--work", str(work), "--imgsz", str(IMGSZ),
                     "--count", str(count), "--repeats", str(repeats), "--threads", str(len(os.sched_getaffinity(0))),
                     env=raw_env())
    if out.returncode != 0:
        raise RuntimeError(f"raw_infer failed: {out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def start_worker(bench: Bench, label: str, **env: str) -> Proc:
    args, extra = worker_command("infer")
    proc = Proc(args, {**bench.worker_env(bench.path(f"{label}-work"), label, **env), **extra},
                bench.root / f"{label}.log")
    return proc.start()


def prepare_model(bench: Bench) -> Path:
    model = bench.root / "bench-model" / "bench.pt"
    if not model.exists():
        build_model(model, bench.path("bench-model-work"))
        bench.storage().upload_file(model, MODEL_KEY)
    return model


def run(bench: Bench) -> list[Section]:
    count = 150 if bench.quick else 300
    section = Section("inference", f"Inference ({count} one-image requests of {IMGSZ} px, inline PNG, "
                                   f"{INFLIGHT} in flight; yolov8n)")
    f = section.figure
    raw_tput = f("raw_single_tput", "raw predict loop, one image per call: throughput", "img/s", better="higher")
    raw_p50 = f("raw_single_p50", "raw predict loop, one image per call: latency p50", "ms")
    raw_p99 = f("raw_single_p99", "raw predict loop, one image per call: latency p99", "ms")
    raw8 = f("raw_list8_tput", "raw predict, lists of 8: throughput", "img/s", better="higher",
             baseline="raw_single_tput")
    off_tput = f("service_off_tput", "service, batching off (MAX_BATCH=1): throughput", "img/s", better="higher",
                 baseline="raw_single_tput")
    off_p50 = f("service_off_p50", "service, batching off: latency p50 (publish → answer)", "ms")
    off_p99 = f("service_off_p99", "service, batching off: latency p99", "ms")
    on_tput = f("service_on_tput", "service, batching on (MAX_BATCH=8, default): throughput", "img/s",
                better="higher", baseline="raw_single_tput")
    on_p50 = f("service_on_p50", "service, batching on: latency p50", "ms")
    on_p99 = f("service_on_p99", "service, batching on: latency p99", "ms")
    single = f("single_p50", "one request at a time, service (default settings): latency p50", "ms",
               baseline="raw_single_p50")
    overhead = f("single_overhead", "  … single-request overhead over a raw one-image call (p50 − p50)", "ms")
    # HTTP vs AMQP vs raw, side by side: the batching-on worker (default settings) with HTTP_PORT set
    amqp32_tput = f("amqp_32_tput", f"AMQP, {INFLIGHT} in flight (= batching on): throughput", "img/s",
                    better="higher", baseline="raw_single_tput")
    amqp32_p50 = f("amqp_32_p50", f"AMQP, {INFLIGHT} in flight: latency p50", "ms")
    amqp32_p99 = f("amqp_32_p99", f"AMQP, {INFLIGHT} in flight: latency p99", "ms")
    amqp1_tput = f("amqp_1_tput", "AMQP, 1 in flight: throughput", "img/s", better="higher",
                   baseline="raw_single_tput")
    amqp1_p50 = f("amqp_1_p50", "AMQP, 1 in flight: latency p50", "ms", baseline="raw_single_p50")
    amqp1_p99 = f("amqp_1_p99", "AMQP, 1 in flight: latency p99", "ms", baseline="raw_single_p99")
    http32_tput = f("http_32_tput", f"HTTP, {INFLIGHT} in flight: throughput (vs raw)", "img/s", better="higher",
                    baseline="raw_single_tput")
    http32_tput_a = f("http_32_tput_vs_amqp", f"HTTP, {INFLIGHT} in flight: throughput (vs AMQP)", "img/s",
                      better="higher", baseline="amqp_32_tput")
    http32_p50 = f("http_32_p50", f"HTTP, {INFLIGHT} in flight: latency p50 (vs AMQP)", "ms",
                   baseline="amqp_32_p50")
    http32_p99 = f("http_32_p99", f"HTTP, {INFLIGHT} in flight: latency p99 (vs AMQP)", "ms",
                   baseline="amqp_32_p99")
    http1_tput = f("http_1_tput", "HTTP, 1 in flight: throughput (vs raw)", "img/s", better="higher",
                   baseline="raw_single_tput")
    http1_tput_a = f("http_1_tput_vs_amqp", "HTTP, 1 in flight: throughput (vs AMQP)", "img/s", better="higher",
                     baseline="amqp_1_tput")
    http1_p50 = f("http_1_p50", "HTTP, 1 in flight: latency p50 (vs raw)", "ms", baseline="raw_single_p50")
    http1_p50_a = f("http_1_p50_vs_amqp", "HTTP, 1 in flight: latency p50 (vs AMQP)", "ms", baseline="amqp_1_p50")
    http1_p99 = f("http_1_p99", "HTTP, 1 in flight: latency p99 (vs raw)", "ms", baseline="raw_single_p99")
    http1_p99_a = f("http_1_p99_vs_amqp", "HTTP, 1 in flight: latency p99 (vs AMQP)", "ms", baseline="amqp_1_p99")
    batched = f("inference_batched_ratio", "service ÷ raw predict in lists of 8 (same repeat), throughput", "×",
                better="higher")
    lone_count = 50

    model = prepare_model(bench)
    pngs = png_images(count, IMGSZ)
    for name, max_batch, tput, p50, p99 in (("off", "1", off_tput, off_p50, off_p99),
                                            ("on", "8", on_tput, on_p50, on_p99)):
        port = http_infer.free_port() if name == "on" else 0
        proc = start_worker(bench, f"infer-{name}", MAX_BATCH=max_batch, **({"HTTP_PORT": str(port)} if port else {}))
        try:
            drive(bench, bodies(pngs[:16], f"warm-{name}"), 1)
            if port:
                http_infer.wait_ready(port)
                with http_infer.clients(port, INFLIGHT) as pool:
                    http_infer.drive(pool, bodies(pngs[:INFLIGHT], "warm-http"))
            for r in range(bench.repeats):
                seconds, latencies = drive(bench, bodies(pngs, f"{name}-{r}"), INFLIGHT)
                tput.add(count / seconds)
                p50.add(percentile(latencies, 50))
                p99.add(percentile(latencies, 99))
                if name == "on":
                    amqp32_tput.add(count / seconds)
                    amqp32_p50.add(percentile(latencies, 50))
                    amqp32_p99.add(percentile(latencies, 99))
                    lone_s, lone = drive(bench, bodies(pngs[:lone_count], f"single-{r}"), 1)
                    single.add(percentile(lone, 50))
                    amqp1_tput.add(lone_count / lone_s)
                    amqp1_p50.add(percentile(lone, 50))
                    amqp1_p99.add(percentile(lone, 99))
                    with http_infer.clients(port, INFLIGHT) as pool:
                        h_s, h_lat = http_infer.drive(pool, bodies(pngs, f"http-{r}"))
                    for fig in (http32_tput, http32_tput_a):
                        fig.add(count / h_s)
                    http32_p50.add(percentile(h_lat, 50))
                    http32_p99.add(percentile(h_lat, 99))
                    with http_infer.clients(port, 1) as pool:
                        h_s, h_lat = http_infer.drive(pool, bodies(pngs[:lone_count], f"http-single-{r}"))
                    for fig in (http1_tput, http1_tput_a):
                        fig.add(lone_count / h_s)
                    for fig in (http1_p50, http1_p50_a):
                        fig.add(percentile(h_lat, 50))
                    for fig in (http1_p99, http1_p99_a):
                        fig.add(percentile(h_lat, 99))
                    # the raw baseline of this repeat, right after it (the worker idle meanwhile)
                    result = raw(bench, model, count, 1)
                    rep, rep8 = result["single"][0], result["list8"][0]
                    raw_tput.add(rep["ips"])
                    raw_p50.add(percentile(rep["latencies_ms"], 50))
                    raw_p99.add(percentile(rep["latencies_ms"], 99))
                    raw8.add(rep8["ips"])
                    batched.add(on_tput.values[-1] / rep8["ips"])
                    overhead.add(single.values[-1] - raw_p50.values[-1])
        finally:
            proc.stop(timeout=30)
    section.notes += [
        f"Service rows: {bench.repeats} runs of {count} requests on one warm worker per setting (16 warm-up "
        "requests first); the model is stored in SeaweedFS S3 and the worker checks its version (one HEAD) at "
        "most once per MODEL_VERSION_TTL (1 s). Raw rows: the same images decoded and predicted in one process, "
        "torch given every core and OMP_WAIT_POLICY=PASSIVE, as the inference worker sets them.",
        "Latency through the service is BE publish (with confirm) → BE receipt: queueing in RabbitMQ and in the "
        "worker, base64 and PNG decoding, predict, the answer's spool write and confirm, and delivery.",
        "Each raw run (one process: load, warm-up, one image per call, then lists of 8) follows the batching-on "
        "repeat it is paired with, on the same machine minutes apart at most: inference_batched_ratio is that "
        "repeat's service throughput ÷ its raw lists-of-8 throughput, and the single-request overhead its "
        "service p50 − its raw one-image p50.",
        f"HTTP vs AMQP vs raw: one worker with default settings (MAX_BATCH=8) and HTTP_PORT set serves both; "
        f"each repeat runs, in turn, {count} AMQP requests with {INFLIGHT} in flight, {lone_count} with 1 in "
        f"flight, then the same bodies as POST /v1/infer from a pool of {INFLIGHT} (then 1) threads, each "
        "with one keep-alive http.client connection. HTTP latency: request written → whole response read "
        "(200, the inference_completed body). The raw baseline is the one-image-per-call predict loop (it "
        "has no concurrency: the same figures stand for 1 and 32 in flight). Ratio rows: HTTP ÷ raw "
        "(\"vs raw\") and HTTP ÷ AMQP (\"vs AMQP\"), medians of the same run.",
    ]
    return [section]
