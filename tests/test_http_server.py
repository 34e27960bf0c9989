"""The worker's HTTP server: bounded against idle and slow clients, health and metrics on
``HTTP_PORT`` and the ``METRICS_PORT`` alias, and the checked-in OpenAPI document.

Real uvicorn: in the real worker process (against the real broker) where the worker is
what is tested, in this process where only the server's own guards are.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from ai_service.config import Settings
from ai_service.http.app import create_app
from ai_service.http.openapi import render
from ai_service.http.server import HttpServer
from ai_service.metrics import Metrics
from tests.conftest import WorkerFactory
from tests.test_cli import cli_args, cli_env, output, poison_dir  # noqa: F401 - poison_dir is a fixture
from tests.test_floods import (
    ThreadSampler,
    free_port,
    http_get,
    metric,
    open_idle,
    settled_threads,
    threads_of,
)
from tests.test_runtime import SLEEPY

REPO = Path(__file__).resolve().parents[1]
OPENAPI = REPO / "docs" / "openapi.json"


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange with http.client: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(port: int, path: str, payload: Any, token: str | None = None,
              timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, body = call(port, "POST", path, raw, headers, timeout=timeout)
    return status, json.loads(body)


def closed_eventually(sock: socket.socket, timeout: float) -> bool:
    """True when the server closes ``sock`` within ``timeout`` (whatever it answered before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


# --- the real worker ---------------------------------------------------------------------


def test_two_hundred_idle_connections_to_the_http_port_leave_healthz_answering_within_a_second_and_threads_flat(
    start_worker: WorkerFactory,
) -> None:
    port = free_port()
    worker = start_worker(module=SLEEPY, env={"HTTP_PORT": str(port), "METRICS_REQUEST_TIMEOUT": "3"})
    assert http_get(port, "/healthz")[0] == 200
    baseline = settled_threads(worker)

    with ThreadSampler(worker) as sampler:
        opened = time.monotonic()
        idle = open_idle(port, 200)
        half = open_idle(port, 10, b"GET /heal")  # half a request line, never finished
        slow_body = open_idle(port, 10, b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        try:
            time.sleep(0.5)
            for _ in range(5):
                started = time.monotonic()
                status, body = http_get(port, "/healthz", timeout=5)
                answered_in = time.monotonic() - started
                assert (status, body) == (200, "ok\n")
                assert answered_in < 1.0, f"/healthz took {answered_in:.2f} s with 220 idle connections open"
            assert http_get(port, "/readyz")[0] == 200
            assert threads_of(worker) < baseline + 5
            for sock in idle + half + slow_body:
                assert closed_eventually(sock, timeout=max(0.1, opened + 8 - time.monotonic())), \
                    "an idle or slow connection was still open 8 s after it was opened (timeout 3 s)"
            assert time.monotonic() - opened >= 2.5, "connections were closed before their timeout"
        finally:
            for sock in idle + half + slow_body:
                sock.close()
    assert sampler.peak < baseline + 5, f"{baseline} threads before, {sampler.peak} with 220 connections open"
    text = http_get(port, "/metrics")[1]
    # the 210 that never sent a whole head; the slow bodies were answered (404: no /v1 here) first
    assert metric(text, "ai_http_connections_closed_total", '{reason="timeout"}') >= 210
    assert worker.alive


def test_http_port_and_the_metrics_port_alias_both_serve_health_and_metrics_from_one_server(
    start_worker: WorkerFactory,
) -> None:
    http_port, metrics_port = free_port(), free_port()
    worker = start_worker(module=SLEEPY, env={"HTTP_PORT": str(http_port), "METRICS_PORT": str(metrics_port)})
    for port in (http_port, metrics_port):
        assert http_get(port, "/healthz") == (200, "ok\n")
        status, text = http_get(port, "/metrics")
        assert status == 200
        assert "ai_consumer_state" in text
        assert call(port, "GET", "/readyz")[0] == 200
    status, headers, raw = call(http_port, "GET", "/openapi.json")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert json.loads(raw)["info"]["title"] == "ai-service worker HTTP API"
    log = worker.log()
    assert f"http://127.0.0.1:{http_port}" in log, log[-2000:]
    assert f"also on :{metrics_port}" in log, log[-2000:]


# --- the server's own guards, in this process --------------------------------------------


def guarded_app() -> tuple[Any, Metrics]:
    metrics = Metrics()
    router = APIRouter()

    @router.post("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(2.0)  # longer than the request timeout: an answer in progress is not cut
        return {"ok": "slow"}

    return create_app(Settings(), metrics=metrics, ready=lambda: (False, "not connected"), routers=[router]), metrics


def test_the_server_closes_silent_half_sent_and_slow_body_connections_but_finishes_a_long_answer() -> None:
    app, metrics = guarded_app()
    server = HttpServer(app, "127.0.0.1", 0, request_timeout=1.0, timeout_keep_alive=1.0, limit_concurrency=50,
                        metrics=metrics)
    server.start()
    try:
        port = server.port
        silent = open_idle(port, 3)
        half = open_idle(port, 3, b"GET /healthz HTTP/1.1\r\nHost:")
        body = open_idle(port, 3, b"POST /v1/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
        started = time.monotonic()
        status, _, answer = call(port, "POST", "/v1/slow", b"", timeout=10)
        assert (status, json.loads(answer)) == (200, {"ok": "slow"}), "a 2 s answer outlives the 1 s request timeout"
        ready_status, _, why = call(port, "GET", "/readyz")
        assert (ready_status, why) == (503, b"not connected\n")
        for sock in silent + half + body:
            assert closed_eventually(sock, timeout=max(0.1, started + 4 - time.monotonic()))
        assert metrics.http_connections_closed.labels("timeout")._value.get() >= 9
        # a kept-alive connection that goes quiet is closed too
        keep = socket.create_connection(("127.0.0.1", port), timeout=5)
        keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in keep.recv(4096)
        assert closed_eventually(keep, timeout=4)
        keep.close()
        big = socket.create_connection(("127.0.0.1", port), timeout=5)
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40000 + b"\r\n\r\n")
        assert big.recv(4096).startswith(b"HTTP/1.1 431"), "a request head over 16 KiB is refused"
        big.close()
    finally:
        for sock in silent + half + body:
            sock.close()
        server.stop()
    assert not server.running


def test_every_accepted_connection_sends_without_nagle_so_a_kept_alive_request_is_not_held_for_a_delayed_ack() -> None:
    """asyncio sets TCP_NODELAY only where the listener's ``proto`` is IPPROTO_TCP, which ours
    (``socket.create_server``) is not: h11's head-then-body writes then waited ~40 ms a request."""
    app, metrics = guarded_app()
    server = HttpServer(app, "127.0.0.1", 0, metrics=metrics)
    server.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        protocols = list(server.server.server_state.connections)
        assert len(protocols) == 1
        sock = protocols[0].transport.get_extra_info("socket")
        assert sock.proto != socket.IPPROTO_TCP, "asyncio would set TCP_NODELAY itself: this test checks nothing"
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        conn.close()
    finally:
        server.stop()


# --- the OpenAPI document ------------------------------------------------------------------


def test_docs_openapi_json_is_generated_from_the_models_and_up_to_date(poison_dir: Path) -> None:  # noqa: F811
    assert OPENAPI.read_text(encoding="utf-8") == render(), (
        "docs/openapi.json is stale: regenerate it with `.venv/bin/ai-service openapi -o docs/openapi.json`"
    )
    doc = json.loads(OPENAPI.read_text(encoding="utf-8"))
    assert {"/healthz", "/readyz", "/metrics", "/v1/infer"} <= set(doc["paths"])
    infer = doc["paths"]["/v1/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceRequest"}
    assert {"InferenceRequest", "InferenceCompleted", "InferenceFailed", "ImagePath", "ImageData"} <= set(
        doc["components"]["schemas"])
    assert {"200", "400", "401", "404", "413", "500", "503"} <= set(infer["responses"])
    result = subprocess.run(cli_args("openapi", "--check", str(OPENAPI)), cwd=REPO, env=cli_env({}, poison_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, output(result)  # and without torch or Ultralytics (poisoned)
