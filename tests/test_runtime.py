"""The consumer runtime through the real broker and a real worker process.

The worker here is ``tests/support/sleepy_worker.py``: the real runtime, the real
training request model and failure message, and a scripted handler.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from tests.conftest import WorkerFactory
from tests.support.amqp import BE, BrokerNames

SLEEPY = "tests.support.sleepy_worker"


def request(job_id: str, mode: str = "sleep", tenths: int = 1) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": "datasets/my-dataset/", "name": "my-dataset"},
        "output": {"prefix": "models/yolov8n", "model_name": "my-dataset.pt"},
        "hyperparams": {"model": mode, "epochs": tenths, "batch": 16, "imgsz": 640},
    }


def test_a_handler_sleeping_past_two_heartbeats_is_acked_and_the_connection_survives(
    be: BE, start_worker: WorkerFactory
) -> None:
    worker = start_worker(module=SLEEPY, env={"RABBITMQ_HEARTBEAT": "2"})
    be.send_train(request("hb1", tenths=100))  # 10 s, five heartbeat intervals
    done = be.terminal(be.settings.train_result_queue, "hb1", timeout=40)
    assert done.type == "training_completed"
    be.send_train(request("hb2"))
    assert be.terminal(be.settings.train_result_queue, "hb2", timeout=20).type == "training_completed"
    assert be.count(be.settings.train_request_queue) == 0
    assert be.count(be.settings.train_request_queue + ".dlq") == 0
    log = worker.log()
    assert "Connection lost" not in log, log
    assert "StreamLost" not in log, log


def test_results_carry_the_contract_amqp_properties(be: BE, start_worker: WorkerFactory) -> None:
    start_worker(module=SLEEPY)
    be.send_train(request("props1"))
    msg = be.terminal(be.settings.train_result_queue, "props1")
    p = msg.properties
    assert p.content_type == "application/json"
    assert p.delivery_mode == 2
    assert p.message_id
    assert len(p.message_id) >= 16
    assert p.correlation_id == "props1"
    assert p.type == "training_completed"
    assert p.app_id == "ai-service"
    assert isinstance(p.timestamp, int)
    assert abs(p.timestamp - time.time()) < 120
    assert msg.routing_key == "train.result.props1"


INVALID_BODIES: list[tuple[str, bytes, str | None, str]] = [
    ("not json", b"{this is not json", None, ""),
    ("a JSON array", b"[1, 2]", None, ""),
    ("wrong type", json.dumps({**request("bad-type"), "hyperparams": {
        "model": "sleep", "epochs": "ten", "batch": 16, "imgsz": 640}}).encode(), "bad-type", "hyperparams.epochs"),
    ("missing field", json.dumps({k: v for k, v in request("bad-missing").items() if k != "output"}).encode(),
     "bad-missing", "output"),
    ("missing imgsz", json.dumps({**request("bad-imgsz"), "hyperparams": {
        "model": "sleep", "epochs": 1, "batch": 16}}).encode(), "bad-imgsz", "hyperparams.imgsz"),
    ("unknown field", json.dumps({**request("bad-extra"), "priority": 3}).encode(), "bad-extra", "priority"),
    ("unknown hyperparam", json.dumps({**request("bad-hp"), "hyperparams": {
        "model": "sleep", "epochs": 1, "batch": 16, "imgsz": 640, "mosaic_magic": 1}}).encode(),
     "bad-hp", "hyperparams.mosaic_magic"),
    ("traversal key", json.dumps({**request("bad-key"), "dataset": {
        "s3_prefix": "../etc/", "name": "x"}}).encode(), "bad-key", "dataset.s3_prefix"),
    ("job_id with a slash", json.dumps(request("a/b")).encode(), None, ""),
    ("job_id of 500 characters", json.dumps(request("j" * 500)).encode(), None, ""),
    ("body over the size cap", json.dumps({**request("bad-big"), "pad": "x" * 3000}).encode(), None, ""),
]


def test_every_invalid_input_is_answered_dead_lettered_and_the_worker_goes_on(
    be: BE, start_worker: WorkerFactory
) -> None:
    start_worker(module=SLEEPY, env={"MAX_MESSAGE_BYTES": "2048"})
    for _, body, _, _ in INVALID_BODIES:
        be.send(be.settings.train_request_queue, body)
    be.send_train(request("valid-after"))
    results: list[Any] = []
    be.wait_for(be.settings.train_result_queue, lambda m: m.body["job_id"] == "valid-after", 60, results)
    answered = {m.body["job_id"]: m.body for m in results}
    assert answered["valid-after"]["type"] == "training_completed"
    for label, _, job_id, field in INVALID_BODIES:
        if job_id is None:
            continue
        failed = answered.get(job_id)
        assert failed is not None, f"{label}: no answer"
        assert failed["type"] == "training_failed"
        assert failed["status"] == "failed"
        assert failed["error_code"] == "invalid_request", label
        assert field in failed["error_message"], (label, failed["error_message"])
        assert "Traceback" not in failed["error_message"]
    dlq = be.settings.train_request_queue + ".dlq"
    assert be.wait_count(dlq, len(INVALID_BODIES)) == len(INVALID_BODIES)
    assert sorted(be.dlq_bodies(be.settings.train_request_queue)) == sorted(b for _, b, _, _ in INVALID_BODIES)


def test_a_message_that_kills_the_worker_every_time_is_dead_lettered_after_the_delivery_limit(
    be: BE, start_worker: WorkerFactory
) -> None:
    be.send_train(request("poison", mode="crash"))
    dlq = be.settings.train_request_queue + ".dlq"
    deaths = 0
    for _ in range(8):
        worker = start_worker(module=SLEEPY, wait_started=False, name=f"poison-{deaths}")
        code = worker.wait(timeout=60)
        if code == 3:
            deaths += 1
        # The broker requeues or dead-letters the delivery once it notices the dead
        # connection: wait for one of the two before starting the next worker.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and be.count(dlq) + be.count(be.settings.train_request_queue) == 0:
            time.sleep(0.1)
        if be.count(dlq) == 1:
            break
    else:
        pytest.fail("poison message never reached the DLQ")
    worker.stop(timeout=5)
    # The limit is 3 redeliveries (RABBITMQ_DELIVERY_LIMIT=3): 4 deliveries, each killed the worker.
    assert deaths == 4
    assert be.count(be.settings.train_request_queue) == 0
    # A new worker is not bothered by it any more.
    start_worker(module=SLEEPY, name="after-poison")
    be.send_train(request("after-poison"))
    assert be.terminal(be.settings.train_result_queue, "after-poison").type == "training_completed"


def test_a_permanent_failure_is_answered_once_and_acked(be: BE, start_worker: WorkerFactory) -> None:
    start_worker(module=SLEEPY)
    be.send_train(request("perm", mode="fail"))
    msg = be.terminal(be.settings.train_result_queue, "perm")
    assert msg.body["error_code"] == "dataset_invalid"
    assert msg.body["current_epoch"] == 0
    time.sleep(1)
    assert be.drain(be.settings.train_result_queue) == []
    assert be.count(be.settings.train_request_queue + ".dlq") == 0


def test_a_retryable_failure_is_retried_then_answered_once_and_dead_lettered(
    be: BE, start_worker: WorkerFactory
) -> None:
    worker = start_worker(module=SLEEPY)
    be.send_train(request("flaky", mode="flaky"))
    msg = be.terminal(be.settings.train_result_queue, "flaky", timeout=60)
    assert msg.body["error_code"] == "storage_error"
    assert be.wait_count(be.settings.train_request_queue + ".dlq", 1) == 1
    assert be.drain(be.settings.train_result_queue) == []
    # Each retry went through the holding queue (a TTL'd, counted copy), not a sleeping thread.
    log = worker.log()
    assert [f"Retrying in {d:.1f} s (delivery {n} of 3)" in log for d, n in ((1.0, 2), (2.0, 3))] == [True, True]
    assert log.count("[flaky] Received train request") == 3


def test_sigterm_during_a_handler_lets_it_finish_and_the_process_exits_zero(
    be: BE, start_worker: WorkerFactory
) -> None:
    worker = start_worker(module=SLEEPY)
    be.send_train(request("term1", tenths=40))
    worker.wait_log("[term1] sleeping")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert be.terminal(be.settings.train_result_queue, "term1", timeout=5).type == "training_completed"
    assert be.count(be.settings.train_request_queue) == 0
    assert "warm shutdown" in worker.log()


def test_a_second_sigterm_forces_and_hands_the_delivery_back(be: BE, start_worker: WorkerFactory) -> None:
    worker = start_worker(module=SLEEPY)
    be.send_train(request("term2", tenths=600))
    worker.wait_log("[term2] sleeping")
    worker.signal(signal.SIGTERM)
    time.sleep(0.5)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 1
    assert be.wait_count(be.settings.train_request_queue, 1) == 1
    assert be.drain(be.settings.train_result_queue) == []


def test_messaging_disabled_makes_the_worker_exit_zero_with_a_clear_line(start_worker: WorkerFactory) -> None:
    worker = start_worker(env={"ENABLE_RABBITMQ": "false"}, wait_started=False)
    assert worker.wait(timeout=60) == 0
    assert "Messaging is disabled" in worker.log()


def test_the_start_up_lines_come_in_the_contract_order(start_worker: WorkerFactory) -> None:
    worker = start_worker(module=SLEEPY)
    worker.wait_log("🚀 Started RabbitMQ consumer in background thread")
    log = worker.log()
    a = log.index("🐰 Initializing RabbitMQ consumer...")
    b = log.index("✅ RabbitMQ consumer started")
    c = log.index("🚀 Started RabbitMQ consumer in background thread")
    assert a < b < c
    assert all("[RMQ] " in line for line in log.splitlines() if "RabbitMQ consumer" in line)


def test_a_refused_connection_is_logged_and_retried_with_backoff(start_worker: WorkerFactory) -> None:
    worker = start_worker(module=SLEEPY, env={"RABBITMQ_PORT": "1"}, wait_started=False)
    worker.wait_log("❌ Failed to connect to RabbitMQ:", count=2, timeout=30)
    assert "Connection refused" in worker.log() or "refused" in worker.log().lower()
    assert worker.stop(timeout=20) == 0


def test_bad_credentials_log_access_refused_and_never_the_password(
    names: BrokerNames, start_worker: WorkerFactory
) -> None:
    secret = "s3cr3t-Pa55word-xyz"
    worker = start_worker(
        module=SLEEPY, env={"RABBITMQ_USER": "nobody", "RABBITMQ_PASSWORD": secret}, wait_started=False
    )
    worker.wait_log("ACCESS_REFUSED", timeout=30)
    worker.stop(timeout=20)
    log = worker.log()
    assert secret not in log
    assert "❌ Failed to connect to RabbitMQ:" in log


def test_the_password_never_appears_in_the_log_of_a_working_worker(
    names: BrokerNames, be: BE, start_worker: WorkerFactory, tmp_path: Any
) -> None:
    import subprocess

    secret = "Xx-very-secret-pw-9"
    user = f"u{names.prefix}"
    subprocess.run(["rabbitmqctl", "add_user", user, secret], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", "/", user, ".*", ".*", ".*"], check=True,
                   capture_output=True)
    try:
        worker = start_worker(module=SLEEPY, env={"RABBITMQ_USER": user, "RABBITMQ_PASSWORD": secret,
                                                  "LOG_LEVEL": "DEBUG"})
        be.send_train(request("pw1"))
        body = be.terminal(be.settings.train_result_queue, "pw1").body
        worker.stop()
        assert secret not in worker.log()
        assert secret not in json.dumps(body)
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], check=False, capture_output=True)
