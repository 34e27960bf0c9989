"""Prometheus metrics and health endpoints of one worker process.

Every worker has a :class:`Metrics` (its own registry, no global state); with
``METRICS_PORT`` set it is served on ``/metrics`` beside ``/healthz`` (the process is
alive) and ``/readyz`` (connected to the broker and able to take or run work).
"""

from __future__ import annotations

import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("ai_service.metrics")

#: consumer state gauge values
DISCONNECTED, CONNECTED, CONSUMING = 0, 1, 2


class Metrics:
    """The worker's instruments; cheap enough to exist whether served or not."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("ai_jobs_total", "Jobs handled, by operation and final status", ["op", "status"],
                            registry=r)
        self.job_seconds = Histogram(
            "ai_job_duration_seconds", "Wall time from delivery to settle", ["op"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
        )
        self.epoch_seconds = Histogram(
            "ai_epoch_duration_seconds", "Training epoch duration", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.inference_seconds = Histogram(
            "ai_inference_latency_seconds", "Inference request latency (decode to answer)", registry=r,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.batch_size = Histogram("ai_inference_batch_size", "Images per predict call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.model_cache = Counter("ai_model_cache_total", "Model cache lookups", ["result"], registry=r)
        self.spool_depth = Gauge("ai_publisher_spool_messages", "Messages waiting for a broker confirm",
                                 registry=r)
        self.reconnects = Counter("ai_broker_reconnects_total", "Reconnections to RabbitMQ", ["component"],
                                  registry=r)
        self.consumer_state = Gauge("ai_consumer_state", "0 disconnected, 1 connected (paused), 2 consuming",
                                    registry=r)
        self.publisher_connected = Gauge("ai_publisher_connected", "1 when the publisher is connected",
                                         registry=r)
        self.control_messages = Counter(
            "ai_control_messages_total",
            "Control messages seen: queued for the cancel hook, duplicate (already waiting), dropped (control "
            "queue full), malformed, no_hook",
            ["result"], registry=r,
        )
        self.retries_republished = Counter(
            "ai_retries_republished_total",
            "Copies of a request republished with its delivery count (classic queues: a retry, or a redelivery "
            "after a worker died), the original acked",
            ["op"], registry=r,
        )
        self.http_connections_closed = Counter(
            "ai_http_connections_closed_total",
            "Metrics/health connections closed by the server without an answer: full (too many open), timeout "
            "(no complete request in time), too_large (request head over the limit)",
            ["reason"], registry=r,
        )
        self.publisher_refused = Counter(
            "ai_publisher_refused_total",
            "Messages not published because they were larger than MAX_MESSAGE_BYTES or the broker refused "
            "them for good (reason: too_large, precondition_failed, nacked)",
            ["reason"], registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Request:
    """A connection whose request head (line and headers) has fully arrived."""

    def __init__(self, sock: socket.socket, address: Any, head: bytes) -> None:
        self.sock = sock
        self.address = address
        self.head = head


class _Pending:
    """A connection still sending its request head."""

    __slots__ = ("address", "buffer", "deadline")

    def __init__(self, address: Any, deadline: float) -> None:
        self.address = address
        self.buffer = b""
        self.deadline = deadline


#: Request line plus headers, at most (a health probe sends a few hundred bytes).
MAX_REQUEST_HEAD = 16 * 1024


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a fixed, small set of threads.

    Bounded whatever clients do: one selector thread accepts connections and reads
    request heads without blocking; a connection gets ``request_timeout`` seconds from
    accept to send its whole request line and headers (at most :data:`MAX_REQUEST_HEAD`
    bytes), else it is closed.  Complete requests go to ``threads`` handler threads
    through a bounded queue.  At most ``max_connections`` connections are open at once;
    past that a new one is closed at once.  HTTP/1.0: one request per connection, so an
    idle keep-alive connection never holds anything.  Idle or half-open connections cost
    a file descriptor and a few bytes each, never a thread.
    """

    def __init__(self, port: int, metrics: Metrics, ready: Callable[[], tuple[bool, str]],
                 refresh: Callable[[], None] | None = None, host: str = "0.0.0.0", *,
                 threads: int = 4, max_connections: int = 256, request_timeout: float = 5.0) -> None:
        self.metrics = metrics
        self.ready = ready
        self.refresh = refresh or (lambda: None)
        self.threads = max(1, threads)
        self.max_connections = max(1, max_connections)
        self.request_timeout = request_timeout if request_timeout > 0 else 5.0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending: dict[socket.socket, _Pending] = {}
        self._requests: queue.Queue[_Request | None] = queue.Queue(self.max_connections)
        self._open = 0  # connections accepted and not closed yet (pending, queued, being answered)
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()
        self._handler = _handler_class(self)
        self._workers = [threading.Thread(target=self._work, name=f"metrics-{i}", daemon=True)
                         for i in range(self.threads)]
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    def start(self) -> None:
        for t in self._workers:
            t.start()
        self._thread.start()
        log.info("[RMQ] Metrics and health on :%d (/metrics, /healthz, /readyz)", self.port)

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        self._thread.join(5)
        for _ in self._workers:
            try:
                self._requests.put(None, timeout=1)
            except queue.Full:
                break
        for t in self._workers:
            t.join(5)

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return self._open

    # --- the selector thread -----------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _serve(self) -> None:
        sel = self._selector
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                timeout = 0.5
                if self._pending:
                    soonest = min(p.deadline for p in self._pending.values())
                    timeout = max(0.0, min(timeout, soonest - time.monotonic()))
                for key, _ in sel.select(timeout):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        assert isinstance(sock, socket.socket)
                        self._read(sock)
                self._expire()
        except Exception:  # noqa: BLE001 - the health endpoint must not take the worker down
            log.exception("[RMQ] Metrics server stopped after an unexpected error")
        finally:
            for sock in list(self._pending):
                self._drop(sock, None)
            sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave the rest in the kernel's backlog
                log.warning("[RMQ] Metrics server cannot accept a connection: %s", exc)
                return
            with self._open_lock:
                full = self._open >= self.max_connections
                if not full:
                    self._open += 1
            if full:
                self.metrics.http_connections_closed.labels("full").inc()
                _close(sock)
                continue
            sock.setblocking(False)
            self._pending[sock] = _Pending(address, time.monotonic() + self.request_timeout)
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        pending = self._pending.get(sock)
        if pending is None:
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock, None)
            return
        pending.buffer += data
        head_end = _head_end(pending.buffer)
        if head_end < 0:
            if len(pending.buffer) > MAX_REQUEST_HEAD:
                self._drop(sock, "too_large")
            return
        self._selector.unregister(sock)
        del self._pending[sock]
        try:
            self._requests.put_nowait(_Request(sock, pending.address, pending.buffer[:head_end]))
        except queue.Full:  # cannot happen: the queue holds max_connections and so many are open at most
            self._release(sock, "full")

    def _expire(self) -> None:
        now = time.monotonic()
        for sock in [s for s, p in self._pending.items() if p.deadline <= now]:
            self._drop(sock, "timeout")

    def _drop(self, sock: socket.socket, reason: str | None) -> None:
        self._pending.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        self._release(sock, reason)

    def _release(self, sock: socket.socket, reason: str | None) -> None:
        if reason is not None:
            self.metrics.http_connections_closed.labels(reason).inc()
        _close(sock)
        with self._open_lock:
            self._open -= 1

    # --- handler threads ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            try:
                request.sock.setblocking(True)
                request.sock.settimeout(self.request_timeout)
                self._handler(cast(Any, request), request.address, cast(Any, self))
            except Exception:  # noqa: BLE001 - one bad exchange must not end a handler thread
                log.debug("[RMQ] Metrics request failed", exc_info=True)
            finally:
                self._release(request.sock, None)


def _head_end(buffer: bytes) -> int:
    """Where the request head ends (after the blank line), or -1."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = buffer.find(sep)
        if i >= 0:
            return i + len(sep)
    return -1


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)  # a FIN after what was written, then close
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _handler_class(outer: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        request: Any

        def setup(self) -> None:
            self.connection = self.request.sock
            self.rfile = io.BytesIO(self.request.head)
            self.wfile = self.request.sock.makefile("wb")

        def finish(self) -> None:
            try:
                self.wfile.flush()
            except OSError:
                pass
            self.wfile.close()
            self.rfile.close()

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                outer.refresh()
                self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ok, why = outer.ready()
                self._send(200 if ok else 503, (why + "\n").encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            return

    return Handler
