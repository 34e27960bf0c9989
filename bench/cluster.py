"""Cluster: publisher and inference throughput on a three-node RabbitMQ cluster beside
the single node.

The cluster is :func:`tests.support.cluster.private_cluster` (three private nodes on
loopback ports 5690-5692, clustered, quorum queues replicated to all three); the single
node is the shared broker.  Both get the same runs, alternating which goes first:

* publisher: :func:`bench.publisher.plain_pika` and :func:`bench.publisher.shared_publisher`
  (the service's Publisher) to a durable quorum queue;
* inference: a real ``ai-service worker infer`` (default settings, batching on) driven
  with ``INFLIGHT`` requests outstanding, as in :mod:`bench.inference`.

Every client is given ``RABBITMQ_HOST`` as the node list and lands on node 1, so a
confirm waits for a quorum of the three replicas (two of them, one a network hop away
on the same machine here).  Without rabbitmq-server installed the section reports that
and measures nothing.
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any, cast

import pika

from ai_service.broker import Topology
from ai_service.config import Settings
from bench import inference, publisher
from bench.common import Listener, Sender, broker_parameters, delete_topology
from bench.context import Bench, Section
from bench.images import png_images
from tests.support.amqp import new_names


def on_cluster(bench: Bench, rabbitmq_host: str) -> Bench:
    """A copy of ``bench`` whose names, settings, BE sender and listener are on the cluster."""
    other = copy.copy(bench)
    other.names = new_names(RABBITMQ_QUEUE_TYPE="quorum")
    other.env = {**other.names.env(), "RABBITMQ_HOST": rabbitmq_host}
    other.settings = Settings.from_env(other.env)
    s = other.settings
    other.sender = Sender(s.rabbitmq_host, s.rabbitmq_port)
    assert other.sender.connection is not None
    Topology(s).declare(other.sender.connection)
    other.listener = Listener(s.rabbitmq_host, s.rabbitmq_port, [s.infer_result_queue])
    return other


def publisher_rates(bench: Bench, count: int, run: int) -> tuple[float, float]:
    """(plain pika msg/s, shared Publisher msg/s) to a fresh quorum queue on ``bench``'s broker."""
    s = bench.settings
    queue = f"{bench.names.prefix}.bench_cluster_publisher_q.{uuid.uuid4().hex[:6]}"
    connection = pika.BlockingConnection(cast(Any, broker_parameters(s.rabbitmq_host, s.rabbitmq_port)))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments=cast(Any, {"x-queue-type": "quorum"}))
    try:
        pika_rate = publisher.plain_pika(bench, queue, count)
        service_rate, _ = publisher.shared_publisher(bench, queue, count, run, threads=1)
        return pika_rate, service_rate
    finally:
        channel.queue_delete(queue)
        connection.close()


def inference_rate(bench: Bench, count: int, label: str, repeats: int) -> list[float]:
    pngs = png_images(count, inference.IMGSZ)
    proc = inference.start_worker(bench, label)
    try:
        inference.drive(bench, inference.bodies(pngs[:16], f"warm-{label}"), 1)
        rates = []
        for r in range(repeats):
            seconds, _ = inference.drive(bench, inference.bodies(pngs, f"{label}-{r}"), inference.INFLIGHT)
            rates.append(count / seconds)
        return rates
    finally:
        proc.stop(timeout=30)


def run(bench: Bench) -> list[Section]:
    from tests.support import cluster as private

    count = 300 if bench.quick else 1000
    infer_count = 100 if bench.quick else 300
    section = Section("cluster", f"Cluster: three RabbitMQ nodes beside one ({count} messages, {infer_count} "
                                 f"inference requests, {inference.INFLIGHT} in flight)")
    f = section.figure
    pika_one = f("pika_single", "plain pika, confirm one by one: single node", "msg/s", better="higher")
    pika_three = f("pika_cluster", "plain pika, confirm one by one: cluster", "msg/s", better="higher",
                   baseline="pika_single")
    svc_one = f("service_single", "shared Publisher, one publish() after another: single node", "msg/s",
                better="higher")
    svc_three = f("service_cluster", "shared Publisher, one publish() after another: cluster", "msg/s",
                  better="higher", baseline="service_single")
    inf_one = f("infer_single", "inference, batching on: single node", "img/s", better="higher")
    inf_three = f("infer_cluster", "inference, batching on: cluster", "img/s", better="higher",
                  baseline="infer_single")
    if not private.available():
        section.notes.append("skipped: rabbitmq-server is not installed (the cluster is three private nodes)")
        return [section]
    booted = time.monotonic()
    inference.prepare_model(bench)
    with private.private_cluster() as c:
        up = time.monotonic() - booted
        clustered = on_cluster(bench, c.rabbitmq_host)
        try:
            for r in range(bench.repeats):
                for where in (("single", "cluster") if r % 2 == 0 else ("cluster", "single")):
                    target = bench if where == "single" else clustered
                    pika_rate, svc_rate = publisher_rates(target, count, r)
                    (pika_one if where == "single" else pika_three).add(pika_rate)
                    (svc_one if where == "single" else svc_three).add(svc_rate)
            for where, target in (("single", bench), ("cluster", clustered)):
                rates = inference_rate(target, infer_count, f"cluster-bench-{where}", bench.repeats)
                for rate in rates:
                    (inf_one if where == "single" else inf_three).add(rate)
        finally:
            clustered.listener.stop()
            clustered.sender.close()
            delete_topology(clustered.settings.rabbitmq_host, clustered.settings.rabbitmq_port, clustered.env)
    section.extra["cluster_boot_s"] = round(up, 1)
    section.notes += [
        f"{bench.repeats} runs of each publisher on each broker, alternating which goes first; inference: one warm "
        f"worker per broker, {bench.repeats} runs each. The cluster's three nodes share this machine's cores with "
        f"everything else (booted and joined in {up:.0f} s); on real hosts each node has its own.",
        "A quorum queue confirms a message once a majority of its replicas (2 of 3) has written it: the cluster's "
        "publisher figures are that price. Inference is bound by predict: on one machine it loses the CPU the two "
        "extra nodes take.",
    ]
    return [section]

