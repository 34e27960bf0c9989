"""The shared publisher: one connection, one thread, pipelined confirms, reconnects, a spool.

Any thread calls :meth:`Publisher.publish`; it returns once the message is on disk in the
spool (synced: group-committed with every other thread publishing at the same time, see
:class:`~ai_service.spool.Spool`), and the receipt settles on the broker's confirm.  The
publisher thread sends in seq order on a ``SelectConnection``, up to
:data:`~ai_service.publishing.pipeline.WINDOW` messages in flight, with ``mandatory`` and
``delivery_mode=2`` (:mod:`ai_service.publishing.pipeline`); one job's messages (one
``correlation_id``) one at a time, so that a nacked one is never overtaken by its job's
next.  A message leaves the spool only when the broker confirmed it.  When the connection
goes, the thread reconnects with capped exponential backoff and jitter, re-declares the
topology and re-sends everything unconfirmed, in order.  A restarted process re-sends what its predecessor left in the
spool.  Each message carries a unique ``message_id`` so a consumer can drop the rare
duplicate a lost confirm causes (at most what was in flight when a connection was lost).

One message never stalls the ones behind it.  A body larger than ``MAX_MESSAGE_BYTES``
is refused by :meth:`Publisher.publish` before it enters the spool; a message the broker
refuses for good (the channel closed with 406 PRECONDITION_FAILED while it was being
published, e.g. larger than the broker's ``max_message_size``, or nacked
:data:`NACK_LIMIT` times in a row) leaves the spool.  Either way it is written to the
spool's :class:`~ai_service.spool.RefusedLog`, logged once, reported to ``on_refused``,
and the small message the ``replace`` hook makes of it (a ``*_failed`` for that job, see
:func:`failure_replacer`) is published in its place.  A replacement is never replaced.
That refusal path lives in :mod:`ai_service.publishing.refusals` (mixed into
:class:`Publisher`); this module keeps the public API and the publisher thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ai_service import tracing
from ai_service.broker import NodeRing, Topology, connected_node, connection_parameters, describe_endpoint, session
from ai_service.config import BrokerNode, Settings
from ai_service.errors import AuthenticationFailed, BrokerError, SpoolFull
from ai_service.messages import new_message_id
from ai_service.publishing.pipeline import Pipeline
from ai_service.publishing.receipts import Backoff as Backoff
from ai_service.publishing.receipts import Receipt as Receipt
from ai_service.publishing.refusals import NACK_LIMIT as NACK_LIMIT
from ai_service.publishing.refusals import Refusals
from ai_service.publishing.refusals import RefusedHook as RefusedHook
from ai_service.publishing.replacements import ERROR_CODES as ERROR_CODES
from ai_service.publishing.replacements import HINTS as HINTS
from ai_service.publishing.replacements import Replacer as Replacer
from ai_service.publishing.replacements import failure_replacer as failure_replacer
from ai_service.publishing.replacements import replacement_envelope as replacement_envelope
from ai_service.spool import Envelope, RefusedLog, Spool
from ai_service.spool import payload as spool_payload

log = logging.getLogger("ai_service.publisher")

APP_ID = "ai-service"

#: Name of the refused-messages file inside the spool directory (the spool reads its segments only).
REFUSED_FILE = "refused.jsonl"

Ephemeral = tuple[Envelope, Receipt]


class Publisher(Refusals):
    """Thread-safe, confirmed, spooled publishing on a connection of its own."""

    def __init__(
        self,
        settings: Settings,
        *,
        spool_dir: Path,
        topology: Topology | None = None,
        client_name: str = "ai-service publisher",
        on_state: Callable[[str], None] | None = None,
        replace: Replacer | None = None,
        on_refused: RefusedHook | None = None,
        on_node: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.client_name = client_name
        self.spool = Spool(spool_dir, settings.spool_max_messages, settings.spool_max_bytes)
        self.refused_log = RefusedLog(spool_dir / REFUSED_FILE)
        self._replace = replace
        self._on_refused = on_refused
        self._nacks: dict[int, int] = {}  # seq -> nacks in a row
        self.refused_count = 0
        self._unconfirmed: dict[int, Envelope] = {}  # by seq, in seq order (a replacement keeps its place)
        self._receipts: dict[int, Receipt] = {}
        self.lock = self._cond = threading.Condition()
        self._stopping = False
        self._stop_deadline = 0.0
        self._room_waiters = 0  # threads waiting for room in a full spool
        self._thread: threading.Thread | None = None
        self._pipeline: Pipeline | None = None
        self._ring = NodeRing(settings)
        self._backoff = Backoff(cap=settings.reconnect_max_delay)
        self._connected = threading.Event()
        self._ever_connected = False
        self._full_warned = False
        self._on_state = on_state or (lambda state: None)
        self._on_node = on_node or (lambda node: None)
        self.reconnects = 0
        self.confirmed_count = 0
        #: Messages sent but unconfirmed when a connection was lost (each may arrive twice), summed.
        self.lost_in_flight = 0
        #: What ended the publisher thread unexpectedly (a bug), if anything.
        self.crashed: BaseException | None = None
        #: An ``ephemeral`` message waiting for the thread (at most one: a newer one replaces it).
        self._ephemeral: Ephemeral | None = None

    # --- public API ------------------------------------------------------------------

    def start(self) -> None:
        """Open the spool (re-queueing what a previous process left) and start the thread."""
        left = self.spool.open()
        if left:
            log.warning("[RMQ] Re-sending %d message(s) left unconfirmed by a previous run", len(left))
        with self._cond:
            self._unconfirmed.update((e.seq, e) for e in left)
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
        ephemeral: bool = False,
        order_key: str | None = None,
    ) -> Receipt:
        """Queue a message for confirmed delivery; returns once it is on disk in the spool.

        When the spool is full (broker away for long), waits for room (``block``) or
        raises :class:`SpoolFull`, and says so loudly in the log either way.  A body
        larger than ``MAX_MESSAGE_BYTES`` never enters the spool: the receipt comes back
        with ``refused_reason`` set, and ``replaced`` when the ``replace`` hook's message
        was queued in its place.

        ``ephemeral`` (heartbeats): non-persistent, never spooled, sent ahead of the spool
        while connected; skipped (receipt settled with ``refused_reason``) when
        disconnected, too large, or replaced by a newer one before it went out.

        ``order_key``: the job whose messages keep their order (one in flight at a time);
        without it, the ``correlation_id`` is.
        """
        message_id = message_id or new_message_id()
        span = tracing.publishing(exchange, routing_key, message_type=message_type, message_id=message_id,
                                  correlation_id=correlation_id, body_size=len(body))
        headers = span.inject(headers)  # traceparent: the message carries the job's trace on
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
        envelope = Envelope(exchange, routing_key, body, properties, mandatory, order=order_key)
        receipt = Receipt(message_id)
        receipt.span = span
        if ephemeral:
            return self._publish_ephemeral(envelope, receipt)
        if len(body) > self.settings.max_message_bytes:
            reason = (f"message of {len(body):,} bytes is larger than the {self.settings.max_message_bytes:,}-byte "
                      "limit (MAX_MESSAGE_BYTES / broker max_message_size)")
            replacement = self._refused(envelope, "too_large", reason, receipt)
            if replacement is None:
                receipt._set()
                return receipt
            envelope = replacement
        self._enqueue(envelope, receipt, block)
        return receipt

    def _publish_ephemeral(self, envelope: Envelope, receipt: Receipt) -> Receipt:
        envelope.properties["delivery_mode"] = 1
        envelope.mandatory = False
        with self._cond:
            skipped, self._ephemeral = self._ephemeral, (envelope, receipt)
            if not self._connected.is_set() or len(envelope.body) > self.settings.max_message_bytes:
                skipped, self._ephemeral = (envelope, receipt), skipped
        self.settle_ephemeral(skipped, "skipped (publisher disconnected, message too large, or superseded)")
        self._wake()
        return receipt

    @staticmethod
    def settle_ephemeral(item: Ephemeral | None, reason: str | None) -> None:
        if item is not None:
            item[1].refused_reason = reason
            item[1]._set()

    def _enqueue(self, envelope: Envelope, receipt: Receipt, block: bool) -> None:
        """Into the spool and the send queue; back once the spool synced it (group commit)."""
        record = spool_payload(envelope)  # the costly part, outside the lock every publishing thread takes
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
                self._room_waiters += 1
                try:
                    self._cond.wait(1.0)
                finally:
                    self._room_waiters -= 1
            self._full_warned = False
            ticket = self.spool.reserve(envelope, record)
            self._unconfirmed[envelope.seq] = envelope
            self._receipts[envelope.seq] = receipt
            if self._pipeline is not None:
                self._pipeline.accept(envelope)
        self._wake()  # it may go out while the sync runs: the receipt settles on the confirm either way
        self.spool.commit(ticket)

    def _wake(self) -> None:
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.wake()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message is confirmed (and the spool on disk says so); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._unconfirmed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        self.spool.flush()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Try to deliver what is queued for up to ``timeout`` s, then close.

        Whatever is still unconfirmed stays in the spool for the next start.
        """
        self._stop_deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout + 15)
        self.spool.close()
        if self._unconfirmed:
            log.warning("[RMQ] %d message(s) left in the spool for the next start", len(self._unconfirmed))

    @property
    def _pending(self) -> list[Envelope]:
        """The unconfirmed messages, in seq order."""
        return list(self._unconfirmed.values())

    @property
    def pending(self) -> int:
        return len(self._unconfirmed)

    @property
    def in_flight(self) -> int:
        """Messages sent on the current connection and not yet confirmed."""
        pipeline = self._pipeline
        return pipeline.in_flight if pipeline is not None else 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # --- the publisher thread --------------------------------------------------------

    def _run(self) -> None:
        """The publisher thread: whatever it did not expect is recorded as :attr:`crashed`."""
        try:
            self._reconnect_loop()
        except BaseException as exc:  # recorded, and said loudly
            self.crashed = exc
            log.critical("[RMQ] ❌ Publisher crashed on its thread: %r; messages stay in the spool", exc,
                         exc_info=exc)

    def _reconnect_loop(self) -> None:
        """Reconnect for as long as it runs: a loop around the one primitive (broker.session)."""
        while not self.done_stopping():
            try:
                node = self._declare()
                pipeline = Pipeline(self, connection_parameters(self.settings, client_name=self.client_name,
                                                                node=node))
                with self._cond:
                    self._pipeline = pipeline
                pipeline.run()
            except AuthenticationFailed as exc:
                log.error("[RMQ] ❌ Publisher failed to connect to RabbitMQ: %s", exc.message)
                self._backoff.attempt = 30
            except BrokerError as exc:  # the session and the pipeline map pika's and the socket's errors
                if self._connected.is_set():
                    log.warning("[RMQ] Publisher lost its connection: %s", exc.message)
                else:
                    log.error("[RMQ] ❌ Publisher failed to connect to RabbitMQ: %s", exc.message)
            finally:
                with self._cond:
                    if self._pipeline is not None:
                        self.lost_in_flight += self._pipeline.in_flight
                    self._pipeline = None
                    dropped, self._ephemeral = self._ephemeral, None
                self._connected.clear()
                self.settle_ephemeral(dropped, "publisher disconnected")
                self._on_state("disconnected")
            if self.done_stopping():
                return
            self._sleep(self._backoff.next())

    def _declare(self) -> BrokerNode | None:
        """Declare the topology on a short blocking session; the node it reached is the one to publish to."""
        with session(self.settings, client_name=self.client_name, ring=self._ring) as connection:
            if self.topology is not None:
                self.topology.declare(connection)
            return connected_node(connection)

    def done_stopping(self) -> bool:
        return self._stopping and (not self._unconfirmed or time.monotonic() >= self._stop_deadline)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, deadline - time.monotonic()))
        if self._stopping:
            time.sleep(min(0.2, max(0.0, self._stop_deadline - time.monotonic())))

    # --- the pipeline's feed (called on the publisher thread) -------------------------

    def snapshot(self) -> list[Envelope]:
        return list(self._unconfirmed.values())

    def take_ephemeral(self) -> Ephemeral | None:
        with self._cond:
            item, self._ephemeral = self._ephemeral, None
        return item

    def on_ready(self, pipeline: Pipeline) -> None:
        reconnected = self._ever_connected
        node = f"{pipeline.parameters.host}:{pipeline.parameters.port}"
        if reconnected:
            log.info("[RMQ] Publisher reconnected to %s (node %s)", describe_endpoint(self.settings), node)
            self.reconnects += 1
        else:
            log.info("[RMQ] Publisher connected to node %s", node)
        self._on_node(node)
        self._backoff.reset()
        self._ever_connected = True
        self._connected.set()
        self._on_state("reconnected" if reconnected else "connected")

    def tick(self) -> None:
        self.spool.flush(wait=False)

    def on_confirmed(self, envelopes: list[Envelope]) -> None:
        """Confirmed by the broker (one ack often covers many): out of the spool, receipts settled."""
        receipts = []
        with self._cond:
            self.confirmed_count += len(envelopes)
            self.spool.remove_many(envelopes)
            for envelope in envelopes:
                if self._nacks:
                    self._nacks.pop(envelope.seq, None)
                self._unconfirmed.pop(envelope.seq, None)
                receipt = self._receipts.pop(envelope.seq, None)
                if receipt is not None:
                    receipts.append(receipt)
            if not self._unconfirmed or self._room_waiters:  # flush() waits for none, _enqueue for room
                self._cond.notify_all()
        for receipt in receipts:
            receipt._set()

    def on_unroutable(self, envelope: Envelope) -> None:
        log.error("[RMQ] Message %s to %r/%r was returned unroutable (no queue bound); dropping it",
                  envelope.message_id, envelope.exchange, envelope.routing_key)
        receipt = self._receipts.get(envelope.seq)
        if receipt is not None:
            receipt.unroutable = True
