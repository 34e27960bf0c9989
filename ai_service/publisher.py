"""The shared publisher: one connection, one thread, confirms, reconnects, a spool.

Any thread calls :meth:`Publisher.publish`; the message is written to the on-disk spool
first, then sent in order by the publisher thread with publisher confirms, ``mandatory``
and ``delivery_mode=2``.  It leaves the spool only when the broker confirmed it.  When
the connection goes, the thread reconnects with capped exponential backoff and jitter,
re-declares the topology and re-sends everything unconfirmed, in order.  A restarted
process re-sends what its predecessor left in the spool.  Each message carries a unique
``message_id`` so a consumer can drop the rare duplicate a lost confirm causes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.broker import Topology, connect, describe_endpoint, describe_pika_error
from ai_service.config import Settings
from ai_service.errors import AuthenticationFailed, BrokerError, SpoolFull
from ai_service.messages import new_message_id
from ai_service.spool import Envelope, Spool

log = logging.getLogger("ai_service.publisher")

APP_ID = "ai-service"


class Backoff:
    """Capped exponential backoff with full jitter (AWS style)."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class Receipt:
    """Lets a caller wait until its message was confirmed by the broker."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self._event = threading.Event()
        self.unroutable = False

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    @property
    def confirmed(self) -> bool:
        return self._event.is_set()

    def _set(self) -> None:
        self._event.set()


class Publisher:
    """Thread-safe, confirmed, spooled publishing on a connection of its own."""

    def __init__(
        self,
        settings: Settings,
        *,
        spool_dir: Path,
        topology: Topology | None = None,
        client_name: str = "ai-service publisher",
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.client_name = client_name
        self.spool = Spool(spool_dir, settings.spool_max_messages)
        self._pending: deque[Envelope] = deque()
        self._receipts: dict[int, Receipt] = {}
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._ever_connected = False
        self._full_warned = False
        self._on_state = on_state or (lambda state: None)
        self.reconnects = 0
        self.confirmed_count = 0

    # --- public API ------------------------------------------------------------------

    def start(self) -> None:
        """Open the spool (re-queueing what a previous process left) and start the thread."""
        left = self.spool.open()
        if left:
            log.warning("[RMQ] Re-sending %d message(s) left unconfirmed by a previous run", len(left))
        with self._cond:
            self._pending.extend(left)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_type: str,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
        mandatory: bool = True,
        block: bool = True,
        message_id: str | None = None,
        expiration: str | None = None,
    ) -> Receipt:
        """Queue a message for confirmed delivery; returns once it is in the spool.

        When the spool is full (broker away for long), waits for room (``block``) or
        raises :class:`SpoolFull`, and says so loudly in the log either way.
        """
        message_id = message_id or new_message_id()
        properties: dict[str, Any] = {
            "content_type": "application/json",
            "delivery_mode": 2,
            "message_id": message_id,
            "correlation_id": correlation_id,
            "type": message_type,
            "timestamp": int(time.time()),
            "app_id": APP_ID,
        }
        if headers:
            properties["headers"] = headers
        if expiration is not None:
            properties["expiration"] = expiration
        envelope = Envelope(exchange, routing_key, body, properties, mandatory)
        receipt = Receipt(message_id)
        with self._cond:
            while self.spool.full:
                if not self._full_warned:
                    log.error(
                        "[RMQ] 📛 Publisher spool is FULL (%d messages unconfirmed; broker unreachable?). "
                        "Publishing %s waits until the broker is back.",
                        len(self.spool),
                        "blocks" if block else "fails",
                    )
                    self._full_warned = True
                if not block:
                    raise SpoolFull(f"publisher spool full ({len(self.spool)} messages)")
                self._cond.wait(1.0)
            self._full_warned = False
            self.spool.add(envelope)
            self._pending.append(envelope)
            self._receipts[envelope.seq] = receipt
        self._wake.set()
        return receipt

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message is confirmed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Try to deliver what is queued for up to ``timeout`` s, then close.

        Whatever is still unconfirmed stays in the spool for the next start.
        """
        self._stop_deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 15)
        self.spool.close()
        if self._pending:
            log.warning("[RMQ] %d message(s) left in the spool for the next start", len(self._pending))

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # --- the publisher thread --------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(cap=self.settings.reconnect_max_delay)
        while True:
            if self._stopping and (not self._pending or time.monotonic() >= self._stop_deadline):
                return
            connection: pika.BlockingConnection | None = None
            try:
                connection = connect(self.settings, client_name=self.client_name)
                if self.topology is not None:
                    self.topology.declare(connection)
                channel = connection.channel()
                channel.confirm_delivery()
                reconnected = self._ever_connected
                if reconnected:
                    log.info("[RMQ] Publisher reconnected to %s", describe_endpoint(self.settings))
                    self.reconnects += 1
                backoff.reset()
                self._ever_connected = True
                self._connected.set()
                self._on_state("reconnected" if reconnected else "connected")
                self._pump(connection, channel)
            except AuthenticationFailed as exc:
                log.error("[RMQ] ❌ Publisher failed to connect to RabbitMQ: %s", exc.message)
                backoff.attempt = 30
            except (BrokerError, pika.exceptions.AMQPError, OSError) as exc:
                message = exc.message if isinstance(exc, BrokerError) else describe_pika_error(exc)
                if self._connected.is_set():
                    log.warning("[RMQ] Publisher lost its connection: %s", message)
                else:
                    log.error("[RMQ] ❌ Publisher failed to connect to RabbitMQ: %s", message)
            finally:
                self._connected.clear()
                self._on_state("disconnected")
                if connection is not None and connection.is_open:
                    try:
                        connection.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
            if self._stopping and (not self._pending or time.monotonic() >= self._stop_deadline):
                return
            self._sleep(backoff.next())

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, deadline - time.monotonic()))
        if self._stopping:
            time.sleep(min(0.2, max(0.0, self._stop_deadline - time.monotonic())))

    def _pump(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        """Send pending messages in order; between messages keep heartbeats flowing."""
        while True:
            with self._cond:
                envelope = self._pending[0] if self._pending else None
            if envelope is None:
                if self._stopping:
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                connection.process_data_events(0)
                continue
            if self._stopping and time.monotonic() >= self._stop_deadline:
                return
            self._send(channel, envelope)
            self._done(envelope)

    def _send(self, channel: BlockingChannel, envelope: Envelope) -> None:
        props = pika.BasicProperties(**envelope.properties)
        try:
            channel.basic_publish(
                envelope.exchange,
                envelope.routing_key,
                envelope.body,
                properties=props,
                mandatory=envelope.mandatory,
            )
            self.confirmed_count += 1
        except pika.exceptions.UnroutableError:
            log.error(
                "[RMQ] Message %s to %r/%r was returned unroutable (no queue bound); dropping it",
                envelope.properties.get("message_id"),
                envelope.exchange,
                envelope.routing_key,
            )
            receipt = self._receipts.get(envelope.seq)
            if receipt is not None:
                receipt.unroutable = True
        except pika.exceptions.NackError:
            log.warning("[RMQ] Broker nacked message %s; will retry", envelope.properties.get("message_id"))
            time.sleep(0.5)
            raise BrokerError("message nacked by the broker") from None

    def _done(self, envelope: Envelope) -> None:
        with self._cond:
            self.spool.remove(envelope)
            if self._pending and self._pending[0] is envelope:
                self._pending.popleft()
            receipt = self._receipts.pop(envelope.seq, None)
            self._cond.notify_all()
        if receipt is not None:
            receipt._set()
