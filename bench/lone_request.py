"""Where one inference request's time goes: ``python -m bench.lone_request [N]``.

The ``single_request_overhead_ms`` figure of ``make bench`` (service p50 − raw predict p50) in
parts.  One real inference worker (``MAX_BATCH=8``, S3 storage on SeaweedFS, the shared broker
with quorum queues, as in ``bench.inference``) runs with timestamp probes
(``python -m bench.lone_request --worker``: the real ``ai-service worker infer`` with thin
wrappers that append one JSON line per event to ``$LONE_EVENTS``).  ``N`` requests are sent one
at a time, 50 ms apart; each is split into:

* BE publish → the consumer's ``on_message`` (the broker hop in);
* on_message → handler thread → the operation (parse, validate, job context, log line);
* model version (cached), decode, the hand-off to the engine thread, predict;
* predict end → ``publish()`` (the answer built), ``publish()`` itself (spool, group commit;
  the send overlaps the sync), ``publish()`` return → BE receipt (the hop out).

Then the floor of the two broker hops alone: a plain pika echo process between two durable
queues of the same type (the request's size in, a small answer out), and the raw predict loop
of ``bench.raw_infer`` for the same images.  Prints a table; nothing is written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

EVENTS_ENV = "LONE_EVENTS"
_JOB = re.compile(rb'"job_id":\s*"([^"]+)"')


def _job(body: bytes) -> str | None:
    found = _JOB.search(body[:200])
    return found.group(1).decode() if found else None


# --- the probed worker -----------------------------------------------------------------------


def _probe_worker() -> int:
    """``ai-service worker infer`` with timestamp probes around the request's steps."""
    from ai_service.cli import main
    from ai_service.consumer.loop import Consumer
    from ai_service.publisher import Publisher
    from workers.inference.engine import Engine
    from workers.inference.service import InferenceService

    fd = os.open(os.environ[EVENTS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(ev: str, **fields: Any) -> None:
        os.write(fd, (json.dumps({"ev": ev, **fields}) + "\n").encode())

    def before(owner: Any, name: str, ev: str, job: Callable[..., str | None]) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            write(ev, t=time.time(), job=job(*args))
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def around(owner: Any, name: str, ev: str, job: Callable[..., str | None]) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                write(ev, t0=t0, t=time.time(), job=job(*args))

        setattr(owner, name, wrapper)

    before(Consumer, "_on_message", "deliver", lambda self, ch, method, props, body: _job(body))
    before(Consumer, "_handle", "handle", lambda self, delivery: _job(delivery.info.body))
    before(Consumer, "settle_delivery", "settle", lambda self, delivery, settlement: _job(delivery.info.body))
    before(InferenceService, "handle", "service", lambda self, request, ctx: str(request.job_id))
    around(InferenceService, "_decode_all", "decode", lambda self, request: str(request.job_id))
    around(Engine, "_predict", "predict", lambda *args: None)
    around(Publisher, "publish", "publish", lambda self, exchange, key, body: _job(body))
    return main(["worker", "infer"])


# --- the floor: two broker hops with plain pika ------------------------------------------------


def _echo(host: str, port: int, queue_in: str, queue_out: str, ready: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    channel = conn.channel()
    channel.confirm_delivery()
    channel.basic_qos(prefetch_count=16)

    def on(ch: Any, method: Any, props: Any, body: bytes) -> None:
        channel.basic_publish("", queue_out, body[:600], pika.BasicProperties(delivery_mode=2))
        channel.basic_ack(method.delivery_tag)

    channel.basic_consume(queue_in, on)
    ready.set()
    channel.start_consuming()


def broker_floor(host: str, port: int, queue_type: str, size: int, count: int = 120) -> float:
    """p50 ms of BE publish (confirmed) → echo consumer → publish (confirmed) → BE receipt."""
    import pika

    tag = uuid.uuid4().hex[:8]
    queue_in, queue_out = f"lone-floor-in-{tag}", f"lone-floor-out-{tag}"
    conn = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    channel = conn.channel()
    for name in (queue_in, queue_out):
        channel.queue_declare(name, durable=True, arguments=cast(Any, {"x-queue-type": queue_type}))
    channel.confirm_delivery()
    ready = multiprocessing.Event()
    echo = multiprocessing.Process(target=_echo, args=(host, port, queue_in, queue_out, ready), daemon=True)
    echo.start()
    ready.wait(30)
    got: list[float] = []
    channel.basic_consume(queue_out, lambda ch, m, p, b: got.append(time.perf_counter()), auto_ack=True)
    body = b"x" * size
    latencies = []
    try:
        for _ in range(count):
            want = len(got) + 1
            sent = time.perf_counter()
            channel.basic_publish("", queue_in, body, pika.BasicProperties(delivery_mode=2))
            while len(got) < want:
                conn.process_data_events(time_limit=cast(int, 0.5))
            latencies.append((got[-1] - sent) * 1000)
            time.sleep(0.02)
    finally:
        echo.terminate()
        for name in (queue_in, queue_out):
            channel.queue_delete(name)
        conn.close()
    return statistics.median(latencies[10:])


# --- the driver --------------------------------------------------------------------------------

PARTS = (
    ("BE publish → on_message (broker hop in)", "sent", "deliver"),
    ("on_message → handler thread", "deliver", "handle"),
    ("handler → operation (parse, validate, context, log)", "handle", "service"),
    ("operation → decode (model version, cached)", "service", "decode.t0"),
    ("decode (base64, PNG verify + decode, BGR)", "decode.t0", "decode.t"),
    ("decoded → predict starts (engine hand-off)", "decode.t", "predict.t0"),
    ("predict (letterbox, forward, NMS)", "predict.t0", "predict.t"),
    ("predict end → publish() (answer built)", "predict.t", "publish.t0"),
    ("publish() (spool append, group commit)", "publish.t0", "publish.t"),
    ("publish() returned → BE receipt (hop out)", "publish.t", "received"),
    ("whole request: BE publish → BE receipt", "sent", "received"),
    ("publish() returned → ack (confirm wait)", "publish.t", "settle"),
)


def _stamps(events: list[dict[str, Any]], sent: dict[str, float], received: dict[str, float],
            ) -> list[dict[str, float]]:
    per: dict[str, dict[str, float]] = {}
    predicts = [e for e in events if e["ev"] == "predict"]
    for e in events:
        job = e.get("job")
        if not job or job not in sent:
            continue
        stamps = per.setdefault(job, {"sent": sent[job], "received": received[job]})
        if "t0" in e:
            stamps.setdefault(f"{e['ev']}.t0", e["t0"])
            stamps.setdefault(f"{e['ev']}.t", e["t"])
        else:
            stamps.setdefault(e["ev"], e["t"])
    out = []
    for stamps in per.values():
        decoded = stamps.get("decode.t")
        following = next((p for p in predicts if decoded is not None and p["t0"] >= decoded - 5e-4), None)
        if following is None:
            continue
        stamps["predict.t0"], stamps["predict.t"] = following["t0"], following["t"]
        if all(a in stamps and b in stamps for _, a, b in PARTS):
            out.append(stamps)
    return out


def main(count: int) -> None:
    from bench import inference
    from bench.common import Proc
    from bench.context import Bench
    from bench.images import png_images
    from bench.seaweed import bench_s3

    with tempfile.TemporaryDirectory(prefix="lone-request-") as tmp:
        root = Path(tmp)
        journal = root / "events.jsonl"
        with bench_s3(root / "seaweedfs") as s3:
            bench = Bench(root, s3, quick=True)
            try:
                model = inference.prepare_model(bench)
                pngs = png_images(count, inference.IMGSZ)
                env = {**bench.worker_env(bench.path("worker"), "lone", MAX_BATCH="8"),
                       EVENTS_ENV: str(journal), "AIS_ENTRY": "bench.lone_request"}
                from bench.common import LAUNCH

                worker = Proc(["-c", LAUNCH, "--worker"], env, root / "worker.log").start()
                sent: dict[str, float] = {}
                received: dict[str, float] = {}
                try:
                    inference.drive(bench, inference.bodies(pngs[:10], "warm"), 1)
                    listener = bench.listener
                    for job, body in inference.bodies(pngs, "lone"):
                        with listener.cond:
                            cursor = len(listener.messages)
                        sent[job] = time.time()
                        bench.sender.send(bench.settings.infer_request_queue, body)
                        deadline = time.monotonic() + 60
                        while job not in received and time.monotonic() < deadline:
                            with listener.cond:
                                if len(listener.messages) == cursor:
                                    listener.cond.wait(0.5)
                                new, cursor = listener.messages[cursor:], len(listener.messages)
                            received.update((m.job_id, m.t) for m in new if m.job_id == job)
                        time.sleep(0.05)
                finally:
                    worker.stop()
                raw = inference.raw(bench, model, count, 1)
                size = len(inference.bodies(pngs[:1], "x")[0][1])
                floors = {qt: broker_floor(bench.settings.rabbitmq_host, bench.settings.rabbitmq_port, qt, size)
                          for qt in ("quorum", "classic")}
            finally:
                bench.close()
        events = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    rows = _stamps(events, sent, received)
    print(f"{len(rows)} of {count} requests, one at a time (p50 / p90, ms)")
    for label, a, b in PARTS:
        values = sorted((r[b] - r[a]) * 1000 for r in rows)
        print(f"  {label:55s} {statistics.median(values):7.2f} / {values[int(len(values) * 0.9)]:7.2f}")
    print(f"  {'raw predict loop, one image per call (decode included)':55s} "
          f"{statistics.median(raw['single'][0]['latencies_ms']):7.2f}")
    for queue_type, floor in floors.items():
        print(f"  {'two broker hops alone, plain pika, ' + queue_type + ' queues':55s} {floor:7.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.argv[1:2] = []
        sys.exit(_probe_worker())
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
