"""Publisher: confirmed messages per second, the shared publisher vs plain pika.

Both publish the same ``COUNT`` messages of ``SIZE`` bytes (an ``epoch_update``'s size),
persistent, ``mandatory``, with the same properties, to the same kind of queue the
service's update queues are (a durable quorum queue, declared here under a unique
name) on the shared broker:

* plain pika: a ``BlockingConnection`` with ``confirm_delivery()``, ``basic_publish``
  one message at a time (each call returns when the broker confirmed it);
* the service: :class:`ai_service.publisher.Publisher` (what every worker uses): each
  ``publish()`` writes the message to the on-disk spool and returns; the publisher
  thread sends them in order with confirms and removes each from the spool when it is
  confirmed.  Timed from the first ``publish()`` to the last message confirmed.

Also the latency of one message on an idle publisher: ``publish()`` → confirmed.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import pika

from ai_service.publisher import Publisher
from bench.common import broker_parameters, percentile
from bench.context import Bench, Section

SIZE = 600


def body(i: int) -> bytes:
    base = {"type": "epoch_update", "job_id": "bench-publisher", "status": "running", "current_epoch": i,
            "total_epochs": 100, "progress": 1.0, "metrics": {"train_loss": 0.0234, "mAP50": 0.789},
            "timestamp": "2024-01-15T10:30:45.123456+00:00", "pad": ""}
    raw = json.dumps(base)
    base["pad"] = "x" * max(0, SIZE - len(raw))
    return json.dumps(base).encode()


def properties(i: int) -> dict[str, Any]:
    return {"content_type": "application/json", "delivery_mode": 2, "message_id": uuid.uuid4().hex,
            "correlation_id": "bench-publisher", "type": "epoch_update", "timestamp": int(time.time()),
            "app_id": "ai-service"}


def plain_pika(bench: Bench, queue: str, count: int) -> float:
    s = bench.settings
    connection = pika.BlockingConnection(cast(Any, broker_parameters(s.rabbitmq_host, s.rabbitmq_port)))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        bodies = [body(i) for i in range(count)]
        started = time.perf_counter()
        for i, raw in enumerate(bodies):
            channel.basic_publish("", queue, raw, pika.BasicProperties(**properties(i)), mandatory=True)
        return count / (time.perf_counter() - started)
    finally:
        connection.close()


def shared_publisher(bench: Bench, queue: str, count: int, run: int) -> tuple[float, list[float]]:
    publisher = Publisher(bench.settings, spool_dir=bench.path("publisher-spool", str(run)), topology=None,
                          client_name="bench publisher")
    publisher.start()
    try:
        if not publisher.wait_connected(30):
            raise RuntimeError("the publisher did not connect")
        bodies = [body(i) for i in range(count)]
        started = time.perf_counter()
        receipts = [publisher.publish("", queue, raw, message_type="epoch_update", correlation_id="bench-publisher")
                    for raw in bodies]
        if not publisher.flush(300):
            raise RuntimeError("the publisher did not get every confirm within 300 s")
        rate = count / (time.perf_counter() - started)
        if any(r.unroutable or not r.confirmed for r in receipts):
            raise RuntimeError("a message was not confirmed")
        latencies = []
        for raw in bodies[:50]:
            t = time.perf_counter()
            publisher.publish("", queue, raw, message_type="epoch_update").wait(30)
            latencies.append((time.perf_counter() - t) * 1000)
        return rate, latencies
    finally:
        publisher.stop(timeout=5)


def pika_latency(bench: Bench, queue: str) -> list[float]:
    s = bench.settings
    connection = pika.BlockingConnection(cast(Any, broker_parameters(s.rabbitmq_host, s.rabbitmq_port)))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        out = []
        for i in range(50):
            raw = body(i)
            t = time.perf_counter()
            channel.basic_publish("", queue, raw, pika.BasicProperties(**properties(i)), mandatory=True)
            out.append((time.perf_counter() - t) * 1000)
        return out
    finally:
        connection.close()


def run(bench: Bench) -> list[Section]:
    count = 500 if bench.quick else 2000
    repeats = bench.repeats + 2
    section = Section("publisher", f"Publisher: confirmed messages/s ({count} messages of {SIZE} B, persistent, "
                                   "to a durable quorum queue)")
    raw = section.figure("pika", "plain pika BlockingConnection, confirm_delivery, one by one", "msg/s",
                         better="higher")
    svc = section.figure("service", "shared Publisher (spool to disk, confirms, one by one)", "msg/s",
                         baseline="pika", better="higher")
    raw_lat = section.figure("pika_latency", "one message, plain pika: basic_publish → confirmed, p50", "ms")
    svc_lat = section.figure("service_latency", "one message, shared Publisher: publish() → confirmed, p50", "ms",
                             baseline="pika_latency")
    queue = f"{bench.names.prefix}.bench_publisher_q"
    s = bench.settings
    connection = pika.BlockingConnection(cast(Any, broker_parameters(s.rabbitmq_host, s.rabbitmq_port)))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments=cast(Any, {"x-queue-type": "quorum"}))
    try:
        for r in range(repeats):
            for which in (("pika", "svc") if r % 2 == 0 else ("svc", "pika")):
                if which == "pika":
                    raw.add(plain_pika(bench, queue, count))
                    raw_lat.add(percentile(pika_latency(bench, queue), 50))
                else:
                    rate, latencies = shared_publisher(bench, queue, count, r)
                    svc.add(rate)
                    svc_lat.add(percentile(latencies, 50))
            channel.queue_purge(queue)
    finally:
        channel.queue_delete(queue)
        connection.close()
    section.notes += [
        f"{repeats} runs of each, alternating which goes first; the queue is purged between runs.",
        "The shared publisher sends one message at a time and waits for its confirm, like plain pika; its extra "
        "work is the spool (one file written before and removed after each message) and the hand-over to its own "
        "thread. It is what makes a broker outage or a worker restart lose nothing.",
    ]
    return [section]
