"""Inference benchmark: raw Ultralytics predict vs the service through RabbitMQ.

Prints, from one run on one machine: images/s and p50/p99 latency of
(a) a raw ``predict`` loop in this process (one image per call, and lists of 8),
(b) the service with batching off (``MAX_BATCH=1``) and (c) on (``MAX_BATCH=8``), for
1-image requests with ``--inflight`` requests outstanding, and the single-request
latency of the service over raw predict (one request in flight).

Needs RabbitMQ on ``RABBITMQ_HOST``/``RABBITMQ_PORT`` (default localhost:5672); uses
private queue names and a temporary local storage, and starts real worker processes.
Without ``--model`` it benchmarks a yolov8n built from its yaml (random weights: the
speed is the same as a trained one).

    .venv/bin/python scripts/bench_inference.py --imgsz 128 --requests 400 --inflight 32
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the worker does (workers/inference.py)

from ai_service.shapes import draw_shapes_image  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def line(name: str, count: int, seconds: float, latencies_ms: list[float]) -> str:
    return (f"{name:<48} {count / seconds:8.1f} img/s   p50 {percentile(latencies_ms, 50):7.1f} ms   "
            f"p99 {percentile(latencies_ms, 99):7.1f} ms")


def images(count: int, size: int) -> list[bytes]:
    out = []
    for i in range(count):
        image, _ = draw_shapes_image(size, 500_000 + i)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def build_model(work: Path, model: str | None) -> Path:
    target = work / "bench.pt"
    if model:
        target.write_bytes(Path(model).read_bytes())
        return target
    code = (
        "import sys; from pathlib import Path; from workers import yolo; "
        "yolo.prepare_ultralytics(Path(sys.argv[1]) / 'work'); from ultralytics import YOLO; "
        "m = YOLO('yolov8n.yaml'); m.model.names = {0: 'circle', 1: 'square'}; m.save(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(work), str(target)], cwd=REPO, check=True)
    return target


def raw_predict(model_path: Path, work: Path, pngs: list[bytes], imgsz: int, threads: int) -> dict[str, Any]:
    """(a): Ultralytics predict in this process, as a user of the library would call it."""
    from workers import yolo

    yolo.prepare_ultralytics(work / "work")
    import numpy as np
    from PIL import Image

    arrays = [np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(p)).convert("RGB"))[:, :, ::-1]) for p in pngs]
    model = yolo.safe_load_model(model_path)
    kwargs = {"imgsz": imgsz, "verbose": False, "device": "cpu", "save": False}
    model.predict(arrays[0], **kwargs)
    yolo.set_cpu_threads(threads)
    out: dict[str, Any] = {}
    for batch in (1, 8):
        latencies = []
        started = time.perf_counter()
        for at in range(0, len(arrays), batch):
            t = time.perf_counter()
            model.predict(arrays[at:at + batch] if batch > 1 else arrays[at], batch=batch, **kwargs)
            latencies.append((time.perf_counter() - t) * 1000)
        out[batch] = (len(arrays), time.perf_counter() - started, latencies)
    return out


class Service:
    """A real ``ai-service worker infer`` and an RPC client for it."""

    def __init__(self, work: Path, model_path: Path, env: dict[str, str]) -> None:
        import pika

        from ai_service.broker import Topology
        from ai_service.config import Settings
        from ai_service.storage import LocalStorage

        prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.env = {
            "RABBITMQ_HOST": os.environ.get("RABBITMQ_HOST", "127.0.0.1"),
            "RABBITMQ_PORT": os.environ.get("RABBITMQ_PORT", "5672"),
            "INFER_REQUEST_QUEUE": f"{prefix}.infer_request_q", "INFER_RESULT_QUEUE": f"{prefix}.infer_result_q",
            "EVENTS_EXCHANGE": f"{prefix}.events", "CONTROL_EXCHANGE": f"{prefix}.control",
            "DEAD_LETTER_EXCHANGE": f"{prefix}.dlx", "RABBITMQ_QUEUE_TYPE": "classic",
            "STORAGE_BACKEND": "local", "STORAGE_DIR": str(work / "storage"), "WORK_DIR": str(work / "work"),
            "WORKER_NAME": f"bench/{prefix}", "LOG_LEVEL": "WARNING", **env,
        }
        for name in ("TRAIN", "CONVERT"):
            for kind in ("REQUEST", "UPDATE", "RESULT"):
                self.env[f"{name}_{kind}_QUEUE"] = f"{prefix}.{name.lower()}_{kind.lower()}_q"
        self.settings = Settings.from_env(self.env)
        LocalStorage(work / "storage").upload_file(model_path, "models/bench.pt")
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(host=self.settings.rabbitmq_host, port=self.settings.rabbitmq_port))
        Topology(self.settings).declare(self.connection)
        self.channel = self.connection.channel()
        self.reply_to = str(self.channel.queue_declare("", exclusive=True).method.queue)
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.channel.basic_consume(self.reply_to, self._on_reply, auto_ack=True)
        log = open(work / f"{prefix}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "ai_service.cli", "worker", "infer"], cwd=REPO,
                                     env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)

    def _on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        started = self.sent.pop(props.correlation_id)
        self.latencies.append((time.perf_counter() - started) * 1000)
        if json.loads(body)["type"] != "inference_completed":
            raise RuntimeError(body[:500])

    def run(self, pngs: list[bytes], imgsz: int, inflight: int) -> tuple[int, float, list[float]]:
        import pika

        bodies = [json.dumps({"job_id": f"b{i}", "model": {"path": "models/bench.pt"},
                              "images": [{"data": base64.b64encode(p).decode()}],
                              "params": {"imgsz": imgsz}}).encode() for i, p in enumerate(pngs)]
        self.latencies = []
        started = time.perf_counter()
        next_body = 0
        while len(self.latencies) < len(bodies):
            while next_body < len(bodies) and len(self.sent) < inflight:
                correlation_id = uuid.uuid4().hex
                self.sent[correlation_id] = time.perf_counter()
                self.channel.basic_publish("", self.settings.infer_request_queue, bodies[next_body],
                                           pika.BasicProperties(reply_to=self.reply_to, correlation_id=correlation_id))
                next_body += 1
            self.connection.process_data_events(time_limit=0.001)
        return len(bodies), time.perf_counter() - started, list(self.latencies)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        channel = self.connection.channel()
        for queue in (self.settings.infer_request_queue, self.settings.infer_result_queue,
                      f"{self.settings.infer_request_queue}.dlq"):
            channel.queue_delete(queue)
        for exchange in (self.settings.events_exchange, self.settings.control_exchange,
                         self.settings.dead_letter_exchange):
            channel.exchange_delete(exchange)
        self.connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .pt to benchmark (default: yolov8n from yaml)")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads for raw predict and the workers (INFER_THREADS)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ai-bench-") as tmp:
        work = Path(tmp)
        model_path = build_model(work, args.model)
        pngs = images(args.requests, args.imgsz)
        print(f"{args.requests} images of {args.imgsz} px, {args.threads} torch threads, "
              f"{args.inflight} requests in flight\n")
        rows = []
        results: dict[str, Any] = {}
        for name, env in (("(b) service, batching off (MAX_BATCH=1)", {"MAX_BATCH": "1"}),
                          ("(c) service, batching on (MAX_BATCH=8)", {"MAX_BATCH": "8"})):
            service = Service(work, model_path, {"INFER_PREFETCH": str(max(args.inflight, 1)),
                                                 "INFER_THREADS": str(args.threads), **env})
            try:
                service.run(pngs[:16], args.imgsz, 1)  # start-up and warm-up
                results[name] = service.run(pngs, args.imgsz, args.inflight)
                if name.startswith("(b)"):
                    results["single"] = service.run(pngs[: min(100, len(pngs))], args.imgsz, 1)
            finally:
                service.close()
        raw = raw_predict(model_path, work, pngs, args.imgsz, args.threads)
        count, seconds, latencies = raw[1]
        rows.append(line("(a) raw predict, one image per call", count, seconds, latencies))
        count, seconds, latencies = raw[8]
        rows.append(line("(a) raw predict, lists of 8 (latency per list)", count, seconds, latencies))
        for name in ("(b) service, batching off (MAX_BATCH=1)", "(c) service, batching on (MAX_BATCH=8)"):
            rows.append(line(name, *results[name]))
        print("\n".join(rows))
        single = statistics.median(results["single"][2])
        raw_single = statistics.median(raw[1][2])
        print(f"\nsingle request, one in flight: service p50 {single:.1f} ms vs raw predict p50 {raw_single:.1f} ms: "
              f"overhead {single - raw_single:.1f} ms")


if __name__ == "__main__":
    main()
