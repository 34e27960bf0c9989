"""The HTTP jobs API with RabbitMQ on: a second door onto the same queues, through real
worker processes on the real broker (127.0.0.1:5672)."""

from __future__ import annotations

from pathlib import Path

import httpx

from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.support.sse import SseEvent, events, free_port, wait_http
from tests.test_training import train_request

TERMINAL = {"training_completed", "training_failed", "training_cancelled"}


def test_a_training_job_posted_over_http_is_taken_through_the_queue_and_its_stream_shows_every_message(
        start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, be: BE) -> None:
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        start_worker("train", env={"HTTP_PORT": str(port), "HTTP_TOKEN": "s3cret"}, name=f"train-http-{i}")
    base, other = (f"http://127.0.0.1:{port}" for port in ports)
    wait_http(base)
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.post(f"{base}/v1/train", json=train_request("via-http"), timeout=30).status_code == 401

    answer = httpx.post(f"{base}/v1/train", json=train_request("via-http"), headers=auth, timeout=30)
    assert answer.status_code == 202, answer.text
    seen = list(events(base + answer.json()["events"], headers=auth))
    assert [e.type for e in seen] == ["training_started", "epoch_update", "epoch_update", "training_completed"]
    assert [e.data["current_epoch"] for e in seen if e.type == "epoch_update"] == [1, 2]
    assert seen[0].data["worker"] in {"test/train-http-0", "test/train-http-1"}

    # The same messages (same message_ids) went to the BE's queues: one machinery.
    result = be.terminal(be.settings.train_result_queue, "via-http", timeout=60)
    assert result.type == "training_completed"
    assert result.properties.message_id == seen[-1].id

    # Any worker knows the job from its record; a stream opened after the end replays the terminal message.
    job = httpx.get(f"{other}/v1/jobs/via-http", headers=auth, timeout=10).json()
    assert job["op"] == "train"
    assert job["state"] == "completed"
    assert job["terminal"] == seen[-1].data
    late = list(events(f"{other}/v1/jobs/via-http/events", headers=auth))
    assert [(e.id, e.type) for e in late] == [(seen[-1].id, "training_completed")]

    taken = httpx.post(f"{other}/v1/train", json=train_request("via-http"), headers=auth, timeout=30)
    assert taken.status_code == 409, taken.text
    bad = httpx.post(f"{base}/v1/train", json=train_request("bad-http", imgsz=8), headers=auth, timeout=30)
    assert bad.status_code == 400
    assert "hyperparams.imgsz" in bad.json()["error_message"]
    assert httpx.get(f"{base}/v1/jobs/never-sent", headers=auth, timeout=10).status_code == 404


def test_a_job_posted_over_http_with_rabbitmq_on_is_cancelled_over_http(
        start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path) -> None:
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")
    port = free_port()
    start_worker("train", env={"HTTP_PORT": str(port)}, name="train-http")
    base = f"http://127.0.0.1:{port}"
    wait_http(base)
    answer = httpx.post(f"{base}/v1/train", json=train_request("cancel-http", epochs=300), timeout=30)
    assert answer.status_code == 202, answer.text
    seen: list[SseEvent] = []
    for event in events(base + answer.json()["events"]):
        seen.append(event)
        if event.type == "epoch_update" and event.data["current_epoch"] == 1:
            assert httpx.post(f"{base}/v1/jobs/cancel-http/cancel", timeout=10).status_code == 202
    assert seen[-1].type == "training_cancelled"
    assert sum(e.type in TERMINAL for e in seen) == 1
    assert seen[-1].data["current_epoch"] < 300
    assert httpx.get(f"{base}/v1/jobs/cancel-http", timeout=10).json()["state"] == "cancelled"
