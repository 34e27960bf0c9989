"""``POST /v1/infer`` on a real inference worker (real uvicorn, the real broker): the same
answers as AMQP, the same batcher, the contract's status codes, the bearer token."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.test_floods import free_port, http_get, metric
from tests.test_http_server import call, post_json
from tests.test_inference import (  # noqa: F401 - models is a fixture
    BASE_ENV,
    answers,
    b64,
    models,
    put_model,
    request,
    same_detections,
    shapes,
)

TOKEN = "tok-3f9a1c77e2d54b1e"
MODEL = "models/shapes.pt"


def stored_model(worker_env: dict[str, str], exported: dict[str, Any]) -> LocalStorage:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    put_model(storage, exported, "pt", MODEL)
    return storage


def batch_buckets(port: int) -> tuple[float, float]:
    """Predict calls so far with at most 4 images, and with at most 8."""
    text = http_get(port, "/metrics")[1]
    return (metric(text, "ai_inference_batch_size_bucket", '{le="4.0"}'),
            metric(text, "ai_inference_batch_size_bucket", '{le="8.0"}'))


def test_inference_over_http_returns_the_same_detections_as_the_same_request_over_amqp(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],  # noqa: F811
) -> None:
    storage = stored_model(worker_env, models)
    raw, _ = shapes(3)
    storage.write_bytes("images/three.png", raw)
    images = [{"path": "images/three.png"}, {"data": b64(shapes(4)[0])}]
    port = free_port()
    start_worker("infer", env={**BASE_ENV, "HTTP_PORT": str(port)})

    be.send(be.settings.infer_request_queue, request("over-amqp", MODEL, images))
    over_amqp = answers(be, ["over-amqp"])["over-amqp"].body
    status, over_http = post_json(port, "/v1/infer", request("over-http", MODEL, images))

    assert status == 200, over_http
    assert over_http["type"] == "inference_completed"
    assert over_http["job_id"] == "over-http"
    assert over_http["model_path"] == MODEL
    assert [r["image"] for r in over_http["results"]] == ["images/three.png", "1"]
    assert sum(len(r["detections"]) for r in over_http["results"]) > 0, over_http
    same_detections(over_amqp, over_http)
    assert be.drain(be.settings.infer_result_queue) == [], "an HTTP answer is the response, never published"


def test_http_and_amqp_inference_requests_arriving_together_are_predicted_in_one_batch(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],  # noqa: F811
) -> None:
    stored_model(worker_env, models)
    port = free_port()
    start_worker("infer", env={**BASE_ENV, "HTTP_PORT": str(port), "BATCH_WINDOW_MS": "1500"})
    warm = post_json(port, "/v1/infer", request("warm-up", MODEL, [{"data": b64(shapes(9)[0])}]))
    assert warm[0] == 200, warm
    # 3 images over HTTP + 2 over AMQP: a predict call of 5 images can only be both together.
    http_images = [{"data": b64(shapes(i)[0])} for i in (10, 11, 12)]
    amqp_images = [{"data": b64(shapes(i)[0])} for i in (13, 14)]
    # A request the two cannot join (another imgsz, 8 images: a full batch) keeps the engine
    # busy while they arrive, so they meet in its queue even when one reaches the worker
    # later than the window lets a lone request wait (a loaded machine).
    blocker_images = [{"data": b64(shapes(i)[0])} for i in range(20, 28)]
    together = 0
    for round_ in range(4):
        small_before, big_before = batch_buckets(port)
        be.send(be.settings.infer_request_queue, request(f"busy-{round_}", MODEL, blocker_images, imgsz=640))
        time.sleep(0.3)
        got: list[tuple[int, dict[str, Any]]] = []
        http_body = request(f"http-{round_}", MODEL, http_images)
        sender = threading.Thread(target=lambda out=got, body=http_body: out.append(
            post_json(port, "/v1/infer", body)))
        sender.start()
        be.send(be.settings.infer_request_queue, request(f"amqp-{round_}", MODEL, amqp_images))
        done = answers(be, [f"amqp-{round_}", f"busy-{round_}"])
        amqp_answer = done[f"amqp-{round_}"].body
        assert len(done[f"busy-{round_}"].body["results"]) == 8
        sender.join(120)
        assert got, got
        assert got[0][0] == 200, got
        assert got[0][1]["job_id"] == f"http-{round_}"
        assert len(got[0][1]["results"]) == 3
        assert amqp_answer["type"] == "inference_completed"
        assert len(amqp_answer["results"]) == 2
        small_after, big_after = batch_buckets(port)
        # calls of 5..8 images: the busy request's one call of 8, and the two together (5)
        if (big_after - big_before) - (small_after - small_before) >= 2:
            together += 1
            break
    assert together, "an HTTP and an AMQP request in flight together were never predicted in one batch"


def test_invalid_json_and_invalid_fields_are_answered_400_naming_every_bad_field_and_sizes_413(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],  # noqa: F811
) -> None:
    stored_model(worker_env, models)
    port = free_port()
    start_worker("infer", env={**BASE_ENV, "HTTP_PORT": str(port), "MAX_MESSAGE_BYTES": "200000"})

    status, body = post_json(port, "/v1/infer", b"{not json")
    assert status == 400, body
    assert body["type"] == "inference_failed"
    assert body["error_code"] == "invalid_request"
    assert "not valid JSON" in body["error_message"]

    bad = {"job_id": "bad-fields", "model": {"path": "../etc/passwd"}, "images": [],
           "params": {"conf": 7, "imgsz": -3}}
    status, body = post_json(port, "/v1/infer", bad)
    assert status == 400, body
    assert body["job_id"] == "bad-fields"
    assert body["error_code"] == "invalid_request"
    for field in ("model.path", "images", "params.conf", "params.imgsz"):
        assert field in body["error_message"], (field, body["error_message"])
    # the consumer says the same about the same message
    be.send(be.settings.infer_request_queue, bad)
    assert answers(be, ["bad-fields"])["bad-fields"].body["error_message"] == body["error_message"]

    status, body = post_json(port, "/v1/infer", request("no-model", "models/missing.pt",
                                                        [{"data": b64(shapes(1)[0])}]))
    assert (status, body["error_code"]) == (404, "model_not_found"), body

    status, body = post_json(port, "/v1/infer", request("too-big", MODEL, [{"data": "A" * 300000}]))
    assert status == 413, body
    assert body["type"] == "inference_failed", body
    assert "200000" in body["error_message"]
    assert http_get(port, "/healthz") == (200, "ok\n"), "the worker goes on"


def test_with_http_token_set_v1_needs_the_bearer_token_health_never_does_and_the_token_is_never_logged(
    start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],  # noqa: F811
) -> None:
    stored_model(worker_env, models)
    port, metrics_port = free_port(), free_port()
    worker = start_worker("infer", env={**BASE_ENV, "HTTP_PORT": str(port), "HTTP_TOKEN": TOKEN,
                                        "METRICS_PORT": str(metrics_port)})
    body = request("with-token", MODEL, [{"data": b64(shapes(2)[0])}])

    for token in (None, "wrong", TOKEN[:-1]):
        status, answer = post_json(port, "/v1/infer", body, token=token)
        assert status == 401, (token, answer)
    status, headers, _ = call(port, "POST", "/v1/infer", json.dumps(body).encode(),
                              {"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    status, answer = post_json(port, "/v1/infer", body, token=TOKEN)
    assert status == 200, answer
    assert answer["type"] == "inference_completed", answer
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http_get(port, path)[0] == 200, path
    # the metrics port serves health and metrics, never /v1 (even with the token)
    assert post_json(metrics_port, "/v1/infer", body, token=TOKEN)[0] == 404
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    time.sleep(0.5)
    assert TOKEN not in worker.log(), "the HTTP token appeared in the worker log"
    assert "Received infer request over HTTP" in worker.log()  # the log is the DEBUG one


def test_a_public_http_host_without_a_token_serves_health_and_metrics_only_and_says_so(
    start_worker: WorkerFactory,
) -> None:
    port = free_port()
    worker = start_worker("infer", env={**BASE_ENV, "HTTP_PORT": str(port), "HTTP_HOST": "0.0.0.0"})
    assert http_get(port, "/healthz") == (200, "ok\n")
    assert http_get(port, "/metrics")[0] == 200
    status, _, _ = call(port, "POST", "/v1/infer", b"{}", {"Content-Type": "application/json"})
    assert status == 404
    assert "HTTP_TOKEN is not set: serving health and metrics only" in worker.log()
