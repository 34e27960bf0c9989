"""Durable cancels (CONTRACT.md, "Control"): a cancel sent while no worker runs is kept on
the cancel stream for CANCEL_RETENTION and honoured by the worker that starts later.
Real worker processes on the real broker."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika

from ai_service.cancels import CancelStream, cancel_stream_name, declare_cancel_stream, stream_arguments
from ai_service.config import Settings
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.test_floods import (
    ThreadSampler,
    flood_cancels,
    free_port,
    http_get,
    metric,
    poll,
    settled_threads,
    wait_until,
)
from tests.test_training import train_request

FLOOD = 200


def test_the_cancel_stream_keeps_cancels_for_cancel_retention() -> None:
    assert stream_arguments(Settings(cancel_retention=3600)) == {"x-queue-type": "stream", "x-max-age": "3600s"}
    assert cancel_stream_name(Settings(control_exchange="ctl")) == "ctl.cancels"


def test_a_starting_reader_begins_cancel_retention_ago_and_a_reconnected_one_after_what_it_read() -> None:
    cancels = CancelStream(Settings(cancel_retention=600))
    start = cancels.start_offset()
    assert isinstance(start, datetime)
    assert abs(start - (datetime.now(UTC) - timedelta(seconds=600))).total_seconds() < 5

    cancels.delivered({"x-stream-offset": 41})
    assert cancels.start_offset() == 42
    cancels.pending.append((7, "waiting", 40))
    assert cancels.start_offset() == 40  # not yet handed to the hook: read again


def test_a_cancel_sent_while_no_worker_runs_ends_the_job_cancelled_once_a_worker_starts(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_dir(shapes_dir, "datasets/shapes")
    be.send_train(train_request("while-away", epochs=200))
    flood_cancels(be, FLOOD)  # a flood of cancels for unknown jobs, sent while no worker ran
    be.cancel("while-away")
    port = free_port()

    # A small control queue: most of the flood waits for the hook (in the broker), none is dropped.
    worker = start_worker("train", name="later", env={"METRICS_PORT": str(port), "CONTROL_QUEUE_SIZE": "20"})
    with ThreadSampler(worker) as sampler:
        done = be.terminal(be.settings.train_result_queue, "while-away", timeout=120)

        def all_recorded() -> bool:
            text = http_get(port, "/metrics")[1]
            return metric(text, "ai_control_messages_total", '{result="queued"}') >= FLOOD + 1

        assert poll(all_recorded, 60), http_get(port, "/metrics")[1]
    assert done.type == "training_cancelled", done.body
    assert done.body["current_epoch"] == 0, done.body
    assert "Nothing to run (cancelled before start)" in worker.log()  # not after a start
    assert metric(http_get(port, "/metrics")[1], "ai_control_messages_total", '{result="dropped"}') == 0
    wait_until(lambda: storage.stat(f"jobs/unknown-{FLOOD - 1}.cancel") is not None, 30, "not every cancel recorded")
    assert storage.stat("jobs/while-away.cancel") is not None  # the record
    after = settled_threads(worker)
    assert sampler.peak <= after + 3, f"{sampler.peak} threads while reading the flood, {after} after"


def test_a_stream_declared_with_another_retention_is_used_as_it_is(be: BE) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", be.settings.rabbitmq_port))
    try:
        other = replace(be.settings, cancel_retention=7)
        assert declare_cancel_stream(connection, other)  # BE declared it with the default: a warning
    finally:
        connection.close()
