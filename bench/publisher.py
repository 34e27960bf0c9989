"""Publisher: confirmed messages per second, the shared publisher vs plain pika.

All publish the same ``COUNT`` messages of ``SIZE`` bytes (an ``epoch_update``'s size),
persistent, ``mandatory``, with the same properties, to the same kind of queue the
service's update queues are (a durable quorum queue, declared here under a unique
name) on the shared broker:

* plain pika: a ``BlockingConnection`` with ``confirm_delivery()``, ``basic_publish``
  one message at a time (each call returns when the broker confirmed it);
* pipelined pika: pika's asynchronous publisher (a ``SelectConnection``, up to
  :data:`WINDOW` messages in flight, confirms by delivery tag with ``multiple``) -- the
  limit of the client library, with no spool at all;
* the service: :class:`ai_service.publisher.Publisher` (what every worker uses), from
  :data:`THREADS` threads at once as a worker's handlers publish: each ``publish()``
  returns once the message is synced to the on-disk spool (the threads share one
  ``fdatasync`` per batch); the publisher thread pipelines them with confirms.  Timed
  from the first ``publish()`` to the last message confirmed.  Each message is a job of
  its own (its own ``correlation_id``), as an inference worker's answers are: the
  headline figure.  Also each thread one job's stream of messages (a training job's
  updates, each thread its own job): the publisher keeps a job's order even when the
  broker nacks, so a job has one message in flight at a time and a stream is bound by
  the broker's confirm latency.  And from one thread alone, where each ``publish()``
  waits for its own sync.

Also the latency of one message on an idle publisher: ``publish()`` → confirmed.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, cast

import pika
import pika.frame
import pika.spec

from ai_service.publisher import Publisher
from bench.common import broker_parameters, percentile
from bench.context import Bench, Section

SIZE = 600
#: Messages in flight at most for pipelined pika (as the service's publisher allows).
WINDOW = 1000
#: Threads publishing at once through the service, as handlers in flight do.
THREADS = 64
#: publisher_ratio (service ÷ plain pika one by one) goal, and the goal for service ÷ pipelined pika.
RATIO_GOAL = 10.0
PIPELINED_GOAL = 0.4


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


def pipelined_pika(bench: Bench, queue: str, count: int) -> float:
    """pika's asynchronous publisher: up to WINDOW in flight, confirms by tag with ``multiple``."""
    s = bench.settings
    bodies = [body(i) for i in range(count)]
    props = [pika.BasicProperties(**properties(i)) for i in range(count)]
    state = {"sent": 0, "acked": 0, "upto": 0, "started": 0.0, "ended": 0.0}

    def fill(channel: Any) -> None:
        while state["sent"] < count and state["sent"] - state["acked"] < WINDOW:
            i = int(state["sent"])
            channel.basic_publish("", queue, bodies[i], props[i], mandatory=True)
            state["sent"] += 1

    def on_ack(frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Ack):
            raise RuntimeError("pipelined pika: a message was nacked")
        tag = int(method.delivery_tag)
        state["acked"] += tag - int(state["upto"]) if method.multiple else 1
        state["upto"] = max(tag, int(state["upto"]))
        if state["acked"] >= count:
            state["ended"] = time.perf_counter()
            connection.close()
        else:
            fill(channel_box[0])

    channel_box: list[Any] = []

    def on_confirm_mode(_frame: Any) -> None:
        state["started"] = time.perf_counter()
        fill(channel_box[0])

    def on_channel(channel: Any) -> None:
        channel_box.append(channel)
        channel.confirm_delivery(ack_nack_callback=on_ack, callback=on_confirm_mode)

    def on_open(c: Any) -> None:
        c.channel(on_open_callback=on_channel)

    connection = pika.SelectConnection(
        cast(Any, broker_parameters(s.rabbitmq_host, s.rabbitmq_port))[0],
        on_open_callback=on_open,
        on_open_error_callback=lambda c, e: c.ioloop.stop(),
        on_close_callback=lambda c, e: c.ioloop.stop())
    connection.ioloop.start()
    if state["acked"] < count:
        raise RuntimeError(f"pipelined pika: {state['acked']} of {count} confirmed")
    return count / (state["ended"] - state["started"])


def job_of(thread: int, message: int, streams: bool) -> str:
    """The ``correlation_id``: one job per thread (``streams``), or one per message (answers)."""
    return f"bench-job-{thread}" if streams else f"bench-answer-{thread}-{message}"


def publish_from_threads(publisher: Publisher, queue: str, bodies: list[bytes], threads: int,
                         streams: bool = False) -> list[Any]:
    """Each thread publishes its share one by one, as a handler does; all start together."""
    receipts: list[Any] = []
    barrier = threading.Barrier(threads)

    def run(k: int, share: list[bytes]) -> None:
        barrier.wait()
        mine = [publisher.publish("", queue, raw, message_type="epoch_update", correlation_id=job_of(k, i, streams))
                for i, raw in enumerate(share)]
        receipts.extend(mine)

    workers = [threading.Thread(target=run, args=(k, bodies[k::threads])) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return receipts


def shared_publisher(bench: Bench, queue: str, count: int, run: int, threads: int = THREADS,
                     streams: bool = False) -> tuple[float, list[float]]:
    publisher = Publisher(bench.settings, spool_dir=bench.path("publisher-spool", f"{run}-{threads}-{streams}"),
                          topology=None, client_name="bench publisher")
    publisher.start()
    try:
        if not publisher.wait_connected(30):
            raise RuntimeError("the publisher did not connect")
        bodies = [body(i) for i in range(count)]
        started = time.perf_counter()
        if threads > 1:
            receipts = publish_from_threads(publisher, queue, bodies, threads, streams)
        else:
            receipts = [publisher.publish("", queue, raw, message_type="epoch_update",
                                          correlation_id=job_of(0, i, streams)) for i, raw in enumerate(bodies)]
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
    count = 1000 if bench.quick else 4000
    repeats = bench.repeats + 2
    section = Section("publisher", f"Publisher: confirmed messages/s ({count} messages of {SIZE} B, persistent, "
                                   "to a durable quorum queue)")
    raw = section.figure("pika", "plain pika BlockingConnection, confirm_delivery, one by one", "msg/s",
                         better="higher")
    piped = section.figure("pika_pipelined", f"pipelined pika SelectConnection, ≤{WINDOW} in flight, multiple acks",
                           "msg/s", baseline="pika", better="higher")
    svc = section.figure("service", f"shared Publisher from {THREADS} threads (synced spool, pipelined confirms), "
                         "each message a job of its own (answers)", "msg/s", baseline="pika", better="higher")
    streams = section.figure("service_streams", f"shared Publisher from {THREADS} threads, each thread one job's "
                             "stream (one in flight per job: its order holds under nacks)", "msg/s", baseline="pika",
                             better="higher")
    one = section.figure("service_one_thread", "shared Publisher from one thread (each publish() waits for its "
                         "own sync)", "msg/s", baseline="pika", better="higher")
    raw_lat = section.figure("pika_latency", "one message, plain pika: basic_publish → confirmed, p50", "ms")
    svc_lat = section.figure("service_latency", "one message, shared Publisher: publish() → confirmed, p50", "ms",
                             baseline="pika_latency")
    queue = f"{bench.names.prefix}.bench_publisher_q"
    s = bench.settings
    connection = pika.BlockingConnection(cast(Any, broker_parameters(s.rabbitmq_host, s.rabbitmq_port)))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments=cast(Any, {"x-queue-type": "quorum"}))
    order = ("pika", "piped", "svc", "streams", "one")
    try:
        for r in range(repeats):
            for which in order[r % len(order):] + order[:r % len(order)]:
                if which == "pika":
                    raw.add(plain_pika(bench, queue, count // 4))
                    raw_lat.add(percentile(pika_latency(bench, queue), 50))
                elif which == "piped":
                    piped.add(pipelined_pika(bench, queue, count))
                elif which == "svc":
                    rate, latencies = shared_publisher(bench, queue, count, r)
                    svc.add(rate)
                    svc_lat.add(percentile(latencies, 50))
                elif which == "streams":
                    streams.add(shared_publisher(bench, queue, count, r, streams=True)[0])
                else:
                    one.add(shared_publisher(bench, queue, count // 8, r, threads=1)[0])
                channel.queue_purge(queue)
    finally:
        channel.queue_delete(queue)
        connection.close()
    ratio = svc.median / raw.median if svc.values and raw.values else None
    pipelined = svc.median / piped.median if svc.values and piped.values else None
    section.extra = {"publisher_ratio": ratio, "publisher_ratio_goal": RATIO_GOAL,
                     "publisher_pipelined_ratio": pipelined, "publisher_pipelined_ratio_goal": PIPELINED_GOAL}
    section.notes += [
        f"{repeats} runs of each, rotating which goes first; the queue is purged after each. Plain pika publishes "
        f"{count // 4} and the one-thread service {count // 8} messages a run (they are slow), the others {count}.",
        f"publisher_ratio = service ÷ plain pika one by one = ×{ratio:.2f} (goal ≥ ×{RATIO_GOAL:g}); service ÷ "
        f"pipelined pika = ×{pipelined:.2f} (publisher_pipelined_ratio, goal ≥ ×{PIPELINED_GOAL:g})."
        if ratio is not None and pipelined is not None else "publisher_ratio: a figure is missing.",
        "The service's publish() returns only once the message is fdatasynced to its spool (nothing lost on kill -9 "
        "or power loss); threads publishing at the same time share one sync, so one thread alone is bounded by "
        "the disk's sync latency (service_one_thread), many by the broker. Pipelined pika keeps nothing on disk.",
        "service: each message is a job of its own (an inference worker's answers). service_streams: each thread "
        "publishes one job's messages; a job has one message in flight at a time (a nacked message is never "
        "overtaken by its job's next), so a stream waits one confirm per message and 64 streams are bound by "
        "64 ÷ the broker's confirm latency.",
    ]
    return [section]
