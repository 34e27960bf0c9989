"""RABBITMQ_QUEUE_TYPE=classic: classic queues carry no ``x-delivery-count``, so the
consumer counts deliveries itself and the delivery limit still ends a retried request in
its ``.dlq``.  Real worker processes on the real broker, classic queues per test."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from ai_service.consumer import DELIVERY_COUNT_HEADER, count_deliveries
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.test_runtime import SLEEPY, request

LIMIT = 3
CONTROL_STUB = "tests.support.control_worker"


@pytest.fixture
def worker_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, "RABBITMQ_QUEUE_TYPE": "classic", "RABBITMQ_DELIVERY_LIMIT": str(LIMIT)}


def queue_type(queue: str) -> str | None:
    out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "type"],
                         capture_output=True, text=True, check=True).stdout
    types = dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)
    return types.get(queue)


def test_a_request_that_always_fails_retryably_ends_in_the_dlq_after_the_delivery_limit_on_classic_queues(
    be: BE, start_worker: WorkerFactory
) -> None:
    worker = start_worker(module=SLEEPY)
    queue = be.settings.train_request_queue
    assert queue_type(queue) == "classic"
    be.send(queue, json.dumps(request("flaky-classic", mode="flaky")),
            correlation_id="corr-1", message_id="req-1", headers={"x-be-trace": "abc"})

    failed = be.terminal(be.settings.train_result_queue, "flaky-classic", timeout=60)
    assert failed.body["error_code"] == "storage_error"
    assert be.wait_count(f"{queue}.dlq", 1) == 1
    method, props, body = be.channel.basic_get(f"{queue}.dlq", auto_ack=True)
    assert method is not None
    assert json.loads(body)["job_id"] == "flaky-classic"
    # The dead letter is the last counted copy, with the request's own properties.
    assert props.headers[DELIVERY_COUNT_HEADER] == LIMIT - 1
    assert props.headers["x-be-trace"] == "abc"
    assert (props.correlation_id, props.message_id) == ("corr-1", "req-1")
    assert worker.new_log().count("[flaky-classic] Received train request") == LIMIT
    time.sleep(0.5)
    assert be.count(queue) == 0
    assert be.drain(be.settings.train_result_queue) == []  # answered once

    be.send_train(request("after-flaky"))
    assert be.terminal(be.settings.train_result_queue, "after-flaky", timeout=30).type == "training_completed"
    assert worker.alive


def test_a_classic_retry_keeps_reply_to_and_the_answer_goes_there(be: BE, start_worker: WorkerFactory) -> None:
    start_worker(module=SLEEPY)
    reply = be.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    be.send(be.settings.train_request_queue, json.dumps(request("flaky-reply", mode="flaky")),
            reply_to=reply, correlation_id="corr-2")
    answer = be.terminal(reply, "flaky-reply", timeout=60)
    assert answer.body["error_code"] == "storage_error"
    assert answer.properties.correlation_id == "corr-2"


def test_a_redelivery_after_a_crash_counts_as_a_delivery_on_a_classic_queue(
    be: BE, start_worker: WorkerFactory
) -> None:
    """The first worker dies with the request unacked; the broker redelivers it
    (``redelivered``, no count header): that is the second delivery, so after one more
    retry (the third) the request reaches the limit."""
    be.send_train(request("crash-then-flaky", mode="crash-once-then-flaky"))
    dead = start_worker(module=CONTROL_STUB, wait_started=False, name="dies")
    assert dead.wait(timeout=60) == 3
    worker = start_worker(module=CONTROL_STUB, name="retries")
    failed = be.terminal(be.settings.train_result_queue, "crash-then-flaky", timeout=60)
    assert failed.body["error_code"] == "storage_error"
    assert be.wait_count(f"{be.settings.train_request_queue}.dlq", 1) == 1
    method, props, _ = be.channel.basic_get(f"{be.settings.train_request_queue}.dlq", auto_ack=True)
    assert method is not None
    assert props.headers[DELIVERY_COUNT_HEADER] == LIMIT - 1
    log = worker.log()
    assert "[crash-then-flaky] Redelivered: counted as delivery 2 of 3" in log
    assert "[crash-then-flaky] Received train request (delivery 2)" in log
    assert "[crash-then-flaky] Received train request (delivery 3)" in log
    assert log.count("[crash-then-flaky] Received train request") == LIMIT - 1


def test_a_request_that_kills_the_worker_every_time_is_dead_lettered_after_the_delivery_limit_on_classic_queues(
    be: BE, start_worker: WorkerFactory
) -> None:
    be.send_train(request("poison-classic", mode="crash"))
    queue = be.settings.train_request_queue
    deaths = 0
    for attempt in range(LIMIT + 3):
        worker = start_worker(module=SLEEPY, wait_started=False, name=f"poison-{attempt}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and worker.alive and be.count(f"{queue}.dlq") == 0:
            time.sleep(0.1)
        if be.count(f"{queue}.dlq") == 1:
            break
        assert worker.wait(timeout=5) == 3, worker.log()
        deaths += 1
        # The broker hands the delivery back once it notices the dead connection.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and be.count(queue) == 0:
            time.sleep(0.1)
    else:
        pytest.fail(f"the poison message never reached the .dlq ({deaths} deaths)")
    assert deaths == LIMIT
    worker.stop(timeout=10)
    assert "Delivered 3 times without being settled" in worker.log()
    assert be.count(queue) == 0
    start_worker(module=SLEEPY, name="after-poison")
    be.send_train(request("after-poison"))
    assert be.terminal(be.settings.train_result_queue, "after-poison").type == "training_completed"


def test_delivery_counts_come_from_the_broker_on_quorum_queues_and_from_our_header_on_classic_ones() -> None:
    assert count_deliveries({}, False, counted_by_us=True) == 0
    assert count_deliveries({}, True, counted_by_us=True) == 1
    assert count_deliveries({DELIVERY_COUNT_HEADER: 2}, False, counted_by_us=True) == 2
    assert count_deliveries({DELIVERY_COUNT_HEADER: 2}, True, counted_by_us=True) == 3
    assert count_deliveries({DELIVERY_COUNT_HEADER: True}, False, counted_by_us=True) == 0
    assert count_deliveries({DELIVERY_COUNT_HEADER: -4}, False, counted_by_us=True) == 0
    # Quorum queues: the broker's count; a header a BE could forge is not ours to trust there.
    assert count_deliveries({"x-delivery-count": 2}, True, counted_by_us=False) == 2
    assert count_deliveries({DELIVERY_COUNT_HEADER: 9}, False, counted_by_us=False) == 0
    assert count_deliveries({}, True, counted_by_us=False) == 1
