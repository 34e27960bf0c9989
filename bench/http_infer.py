"""Inference over HTTP: ``POST /v1/infer`` on an inference worker started with ``HTTP_PORT``.

The same request bodies as the AMQP rows (:func:`bench.inference.bodies`) are posted by a
pool of ``inflight`` threads, each with one keep-alive :class:`http.client.HTTPConnection`,
so that ``inflight`` requests are outstanding at any time.  Latency: just before the
request is written → the whole response read (200 with the ``inference_completed`` body).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(port: int, timeout: float = 60.0) -> None:
    """Until ``GET /healthz`` answers 200 on ``port``."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    return
                last = f"status {response.status}"
            finally:
                conn.close()
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise RuntimeError(f"the worker's HTTP server on :{port} not ready within {timeout:.0f} s ({last})")


class Clients:
    """``size`` threads, each with its own keep-alive connection to the worker."""

    def __init__(self, port: int, size: int, timeout: float = 120.0) -> None:
        self.port = port
        self.size = size
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []
        self.pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="bench-http")

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def post(self, body: bytes) -> tuple[float, int, bytes]:
        """(latency ms, status, response body) of one ``POST /v1/infer``."""
        conn = self._conn()
        headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/infer", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            # the server closed an idle keep-alive connection: once more on a fresh one
            conn.close()
            t0 = time.perf_counter()
            conn.request("POST", "/v1/infer", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        ms = (time.perf_counter() - t0) * 1000
        if response.will_close:
            conn.close()
        return ms, response.status, data

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for conn in self._all:
                conn.close()


@contextmanager
def clients(port: int, size: int) -> Iterator[Clients]:
    pool = Clients(port, size)
    try:
        yield pool
    finally:
        pool.close()


def drive(pool: Clients, requests: list[tuple[str, bytes]]) -> tuple[float, list[float]]:
    """Post ``requests`` with ``pool.size`` outstanding; (seconds, latencies in ms)."""
    started = time.perf_counter()
    results = list(pool.pool.map(lambda r: pool.post(r[1]), requests))
    seconds = time.perf_counter() - started
    failures = [(status, data) for _, status, data in results if status != 200]
    if failures:
        status, data = failures[0]
        raise RuntimeError(f"{len(failures)} HTTP inference requests failed, e.g. {status} {data[:500]!r}")
    for _, _, data in results[:1]:
        if json.loads(data).get("type") not in (None, "inference_completed"):
            raise RuntimeError(f"unexpected answer {data[:500]!r}")
    return seconds, [ms for ms, _, _ in results]
