"""Floods a worker must absorb without growing: cancels on the control exchange and
connections to its metrics port.  Real worker processes on the real broker; their thread
count is read from ``/proc/<pid>/task``.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pika

from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.support.procs import WorkerProcess
from tests.test_runtime import SLEEPY, request

CONTROL_STUB = "tests.support.control_worker"


def threads_of(worker: WorkerProcess) -> int:
    assert worker.proc is not None
    return len(list(Path(f"/proc/{worker.proc.pid}/task").iterdir()))


def settled_threads(worker: WorkerProcess, quiet: float = 1.0, timeout: float = 15.0) -> int:
    """The thread count once it stopped changing for ``quiet`` seconds (start-up is over)."""
    deadline = time.monotonic() + timeout
    last, since = threads_of(worker), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = threads_of(worker)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return last


class ThreadSampler:
    """The highest thread count of a process, sampled every 5 ms while it runs."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, threads_of(self.worker))
            except OSError:
                return
            time.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return int(resp.status), resp.read().decode()


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def poll(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    if not poll(check, timeout):
        raise AssertionError(f"{what} within {timeout} s")


# --- control exchange -------------------------------------------------------------------

CANCELS = 2000


def flood_cancels(be: BE, count: int) -> None:
    """Publish ``count`` cancels for unknown jobs as fast as the broker takes them."""
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", be.settings.rabbitmq_port))
    try:
        channel = connection.channel()  # no confirms: as fast as a misbehaving BE can send
        for i in range(count):
            body = json.dumps({"type": "cancel", "job_id": f"unknown-{i}"}).encode()
            channel.basic_publish(be.settings.control_exchange, "", body)
    finally:
        connection.close()


def test_two_thousand_cancels_for_unknown_jobs_cost_no_threads_and_the_worker_still_answers(
    be: BE, start_worker: WorkerFactory
) -> None:
    port = free_port()
    # A slow cancel hook (a 50 ms storage write) and a small control queue: most cancels
    # wait or are dropped, and neither may cost a thread.
    worker = start_worker(module=CONTROL_STUB, env={
        "METRICS_PORT": str(port), "STUB_CANCEL_DELAY": "0.05", "CONTROL_QUEUE_SIZE": "100",
    })
    baseline = settled_threads(worker)

    with ThreadSampler(worker) as sampler:
        flood_cancels(be, CANCELS)

        def all_seen() -> bool:
            text = http_get(port, "/metrics")[1]
            seen = sum(metric(text, "ai_control_messages_total", f'{{result="{r}"}}')
                       for r in ("queued", "duplicate", "dropped"))
            return seen >= CANCELS

        took_all = poll(all_seen, 30)
    assert sampler.peak <= baseline + 3, f"{baseline} threads before the flood, {sampler.peak} during it"
    assert took_all, f"the worker did not take all {CANCELS} cancels within 30 s"

    text = http_get(port, "/metrics")[1]
    dropped = metric(text, "ai_control_messages_total", '{result="dropped"}')
    queued = metric(text, "ai_control_messages_total", '{result="queued"}')
    assert dropped > 0, text
    assert queued >= 100, text
    warnings = [line for line in worker.log().splitlines() if "Control queue full" in line]
    assert 1 <= len(warnings) <= 10, f"{len(warnings)} drop warnings for {dropped:.0f} drops: not rate-limited"
    # The hook ran for what was queued (one thread, in order): the first cancel's marker is there.
    storage = Path(worker.env["STORAGE_DIR"])
    wait_until(lambda: any(storage.rglob("unknown-0.cancel")), 10, "the first cancel was not recorded")

    be.send_train(request("after-flood"))
    assert be.terminal(be.settings.train_result_queue, "after-flood", timeout=30).type == "training_completed"
    assert worker.alive


def test_a_cancel_still_reaches_the_job_running_here_during_a_cancel_flood(
    be: BE, start_worker: WorkerFactory
) -> None:
    """The job's own worker acts on its cancel on the I/O thread, before the (full) hook queue."""
    worker = start_worker(module=CONTROL_STUB, env={"STUB_CANCEL_DELAY": "0.05", "CONTROL_QUEUE_SIZE": "10"})
    be.send_train(request("busy", tenths=50))
    worker.wait_log("[busy] sleeping")
    flood_cancels(be, 500)
    be.cancel("busy")
    worker.wait_log("Cancel requested for job busy (running here)", timeout=4)
    # (the scripted handler does not honour cancels: it completes)
    assert be.terminal(be.settings.train_result_queue, "busy", timeout=30).type == "training_completed"
    assert worker.alive


# --- metrics port -----------------------------------------------------------------------


def open_idle(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first_bytes:
            s.sendall(first_bytes)
        socks.append(s)
    return socks


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closed ``sock`` (recv gives b'' or a reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_two_hundred_silent_connections_to_the_metrics_port_cost_no_threads_and_are_closed_by_the_timeout(
    start_worker: WorkerFactory,
) -> None:
    port = free_port()
    worker = start_worker(module=SLEEPY, env={"METRICS_PORT": str(port), "METRICS_REQUEST_TIMEOUT": "3"})
    assert http_get(port, "/healthz")[0] == 200
    baseline = settled_threads(worker)

    with ThreadSampler(worker) as sampler:
        opened = time.monotonic()
        silent = open_idle(port, 200)
        half = open_idle(port, 20, b"GET /heal")  # half a request line, never finished
        try:
            time.sleep(0.5)
            started = time.monotonic()
            status, body = http_get(port, "/healthz", timeout=5)
            answered_in = time.monotonic() - started
            assert (status, body) == (200, "ok\n")
            assert answered_in < 2.0, f"/healthz took {answered_in:.2f} s with 220 idle connections open"
            assert http_get(port, "/readyz")[0] == 200
            assert threads_of(worker) < baseline + 10
            # The server closes every one of them once their 3 s are up, and not long after.
            for sock in silent + half:
                assert closed_by_server(sock, timeout=max(0.1, opened + 8 - time.monotonic())), \
                    "an idle connection was still open 8 s after it was opened (timeout 3 s)"
            assert time.monotonic() - opened >= 2.5, "idle connections were closed before their timeout"
        finally:
            for sock in silent + half:
                sock.close()
    assert sampler.peak < baseline + 10, f"{baseline} threads before, {sampler.peak} with 220 connections open"
    text = http_get(port, "/metrics")[1]
    assert metric(text, "ai_http_connections_closed_total", '{reason="timeout"}') >= 220
    assert worker.alive


def test_past_the_connection_cap_new_metrics_connections_are_closed_at_once_and_health_comes_back(
    start_worker: WorkerFactory,
) -> None:
    port = free_port()
    start_worker(module=SLEEPY, env={"METRICS_PORT": str(port), "METRICS_MAX_CONNECTIONS": "20",
                                     "METRICS_REQUEST_TIMEOUT": "2"})
    idle = open_idle(port, 20)
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        started = time.monotonic()
        assert closed_by_server(extra, timeout=1.0), "a connection past the cap was not closed at once"
        assert time.monotonic() - started < 1.0
        extra.close()
        # The idle ones time out; the port serves again.
        for sock in idle:
            assert closed_by_server(sock, timeout=6)
        assert http_get(port, "/healthz") == (200, "ok\n")
    finally:
        for sock in idle:
            sock.close()
    text = http_get(port, "/metrics")[1]
    assert metric(text, "ai_http_connections_closed_total", '{reason="full"}') >= 1
