"""uvicorn in the worker process: one event loop on one daemon thread, bounded.

Whatever clients do, the server costs a fixed number of threads (its loop, plus the
pools a route uses on purpose) and a file descriptor per open connection:

* at most ``max_connections`` connections are open at once; past that a new one is
  closed at once (``ai_http_connections_closed_total{reason="full"}``);
* a connection gets ``request_timeout`` seconds to send a whole request (line, headers
  and body) -- from its accept, or from the end of the previous answer on a kept-alive
  connection -- else it is closed (``reason="timeout"``).  uvicorn itself only times out
  *idle keep-alive* connections, not one that never sends a byte or sends half a head
  (checked in uvicorn 0.54's ``h11_impl``): :class:`_GuardedH11` adds that;
* a request head is at most :data:`MAX_REQUEST_HEAD` bytes (431 past it,
  ``reason="too_large"``);
* kept-alive connections idle for ``request_timeout`` are closed (uvicorn's
  ``timeout_keep_alive``).

No signal handlers are installed (uvicorn installs none off the main thread): the worker
has its own SIGTERM handling and stops the server with :meth:`HttpServer.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ai_service.metrics import Metrics

log = logging.getLogger("ai_service.http")

#: Request line plus headers, at most (a health probe sends a few hundred bytes).
MAX_REQUEST_HEAD = 16 * 1024


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a whole-request deadline."""

    max_connections = 256
    request_timeout = 5.0
    metrics: Metrics | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _no_delay(transport)
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self._count("full")
            transport.abort()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # h11's own limit only counts a head that arrives in pieces; a whole one in one read passes it.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            head = bytes(self.conn.trailing_data[0]) + data[:MAX_REQUEST_HEAD + 4]
            end = head.find(b"\r\n\r\n")
            if end > MAX_REQUEST_HEAD or (end < 0 and len(head) > MAX_REQUEST_HEAD):
                self._count("too_large")
                self._disarm()
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
                self.transport.close()
                return
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # Still waiting for (the rest of) a request: close.  A request that fully arrived is
        # being answered and keeps its connection however long the answer takes.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            if self.conn.their_state is h11.IDLE and self.cycle is not None and not self.cycle.response_complete:
                return
            self._count("timeout")
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.http_connections_closed.labels(reason).inc()


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Send each write at once (TCP_NODELAY), as asyncio does for the sockets it makes itself.

    asyncio sets TCP_NODELAY only on sockets whose ``proto`` is ``IPPROTO_TCP``; those accepted
    from a listener made by ``socket.create_server`` (or uvicorn's own ``bind_socket``) have 0.
    Without it, h11's response (head, then body: two writes) met Nagle and the client's delayed
    ACK: every keep-alive request waited ~40 ms (``/healthz`` p50 44 ms, ``POST /v1/infer`` one
    at a time 64 ms vs 23-26 ms over AMQP, measured 2026-12-02).
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _protocol(metrics: Metrics | None, max_connections: int, request_timeout: float) -> type[H11Protocol]:
    return type("GuardedH11", (_GuardedH11,), {
        "metrics": metrics, "max_connections": max(1, max_connections), "request_timeout": request_timeout})


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=backlog)
    sock.setblocking(False)
    return sock


class HttpServer:
    """``app`` served by uvicorn on ``host:port`` (and ``extra`` listeners) from a daemon thread.

    The sockets are bound in the constructor (an address in use raises ``OSError`` there);
    ``port`` is the actual port (when 0 was asked), ``ports`` every listener's.
    """

    def __init__(self, app: Any, host: str, port: int, *, limit_concurrency: int = 256,
                 timeout_keep_alive: float = 5.0, request_timeout: float = 5.0, backlog: int = 128,
                 metrics: Metrics | None = None, extra: Sequence[tuple[str, int]] = ()) -> None:
        self.app = app
        self.host = host
        self._sockets = [_listen(host, port, backlog)]
        try:
            for extra_host, extra_port in extra:
                self._sockets.append(_listen(extra_host, extra_port, backlog))
        except OSError:
            for sock in self._sockets:
                sock.close()
            raise
        self.ports = [int(s.getsockname()[1]) for s in self._sockets]
        self.port = self.ports[0]
        self.config = uvicorn.Config(
            app, http=_protocol(metrics, limit_concurrency, request_timeout), ws="none", lifespan="off",
            loop="asyncio", interface="asgi3", log_config=None, access_log=False, server_header=False,
            date_header=True, backlog=backlog, timeout_keep_alive=max(1, round(timeout_keep_alive)),
            # uvicorn answers 503 past this many connections or tasks; the protocol's own cap
            # (connections closed at once) comes first.
            limit_concurrency=max(1, limit_concurrency) + 1,
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
            timeout_graceful_shutdown=3,
        )
        self.server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once uvicorn listens (or ``timeout`` passed)."""
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if self.server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)

    def _run(self) -> None:
        try:
            self.server.run(sockets=self._sockets)
        except BaseException:  # the HTTP server must not take the worker down
            log.exception("[HTTP] The HTTP server stopped after an unexpected error")
        finally:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(1.0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and bool(self.server.started)
