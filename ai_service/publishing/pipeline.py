"""One connection's worth of pipelined, confirmed publishing (pika's asynchronous
publisher pattern): a ``SelectConnection`` driven on the publisher's own thread, up to
:data:`WINDOW` messages in flight, confirms by delivery tag with ``multiple``.

Messages go out in seq order on one channel, so the broker keeps their order.  A body
over :data:`ISOLATE_BYTES` goes out alone (nothing else in flight): the one message a
406 PRECONDITION_FAILED (larger than the broker's ``max_message_size``) can name.  A 406
with several in flight (no size to blame) is narrowed down by sending what was in flight
one by one.  A nack pauses sending until what is in flight settled, then sends again
from the oldest unconfirmed message, so a retried message does not overtake the ones
behind it.  The publisher (:class:`Feed`) keeps the spool, receipts and refusals.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from typing import Any, Protocol

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec

from ai_service.broker import describe_pika_error, wrap_pika
from ai_service.errors import ConnectionClosed
from ai_service.spool import Envelope

log = logging.getLogger("ai_service.publisher")

#: Messages in flight (sent, not yet confirmed) at most.
WINDOW = 1000
#: Bytes in flight at most (at least one message is always let through).
WINDOW_BYTES = 32 * 1024 * 1024
#: A body larger than this goes out alone, so that a broker refusal names it.
ISOLATE_BYTES = 64 * 1024
#: How often the loop looks at the stop deadline and writes the spool's removals.
TICK_SECONDS = 0.2


class Feed(Protocol):
    """What the pipeline needs from the publisher."""

    lock: threading.Condition

    def snapshot(self) -> list[Envelope]: ...

    def take_ephemeral(self) -> tuple[Envelope, Any] | None: ...

    def on_ready(self, pipeline: Pipeline) -> None: ...

    def on_confirmed(self, envelope: Envelope) -> None: ...

    def on_unroutable(self, envelope: Envelope) -> None: ...

    def on_nacked(self, envelope: Envelope) -> float | None: ...

    def on_broker_refusal(self, envelope: Envelope, exc: pika.exceptions.ChannelClosedByBroker) -> None: ...

    def settle_ephemeral(self, item: tuple[Envelope, Any], reason: str | None) -> None: ...

    def done_stopping(self) -> bool: ...

    def tick(self) -> None: ...


class Pipeline:
    """Runs one ``SelectConnection`` until it closes: :meth:`run` returns when the
    publisher stopped it, raises a :class:`~ai_service.errors.BrokerError` when it was lost."""

    def __init__(self, feed: Feed, parameters: pika.ConnectionParameters) -> None:
        self.feed = feed
        self.parameters = parameters
        self.connection: pika.SelectConnection | None = None
        self.channel: pika.channel.Channel | None = None
        self.unsent: deque[Envelope] = deque()  # guarded by feed.lock
        self._in_flight: dict[int, Envelope | tuple[Envelope, Any]] = {}
        self._spooled = 0  # spooled messages among those in flight
        self._bytes = 0
        self._tag = 0
        self._paused = False
        self._lockstep = 0  # messages still to send one by one (after a 406 that named none)
        self._closing = False
        self._error: BaseException | None = None
        self._wake_pending = False
        self._retry_delay = 0.0
        self._resume_scheduled = False
        self._ready = False  # confirm mode reached once on this connection

    # --- from any thread -----------------------------------------------------------------

    def accept(self, envelope: Envelope) -> None:
        """A newly spooled message (the caller holds ``feed.lock``)."""
        self.unsent.append(envelope)

    def wake(self) -> None:
        """Have the I/O thread send what is waiting (cheap to call often)."""
        with self.feed.lock:
            if self._wake_pending or self.connection is None:
                return
            self._wake_pending = True
        with contextlib.suppress(Exception):  # the loop is gone: the next connection sends it
            self.connection.ioloop.add_callback_threadsafe(self._woken)

    @property
    def in_flight(self) -> int:
        return self._spooled

    # --- the I/O thread ------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.connection = pika.SelectConnection(
                self.parameters, on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed)
        except Exception as exc:  # noqa: BLE001 - the socket's and pika's errors alike
            raise wrap_pika(exc) from None
        self.connection.ioloop.call_later(TICK_SECONDS, self._tick)
        self.connection.ioloop.start()
        self._settle_ephemerals("not sent (connection lost)")
        if self._error is not None:
            raise wrap_pika(self._error) from None
        if not self._closing:
            raise ConnectionClosed("the connection closed")

    def _on_open_error(self, connection: Any, error: BaseException | str) -> None:
        self._error = error if isinstance(error, BaseException) else ConnectionClosed(str(error))
        connection.ioloop.stop()

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        if not self._closing and self._error is None:
            self._error = reason
        connection.ioloop.stop()

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: pika.channel.Channel) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm,
                                 callback=lambda _frame: self._on_confirm_mode(channel))

    def _on_confirm_mode(self, channel: pika.channel.Channel) -> None:
        """Only now may anything be sent on ``channel``, starting with everything unconfirmed."""
        self.channel = channel
        self._tag = 0
        self._rewind()
        if not self._ready:
            self._ready = True
            self.feed.on_ready(self)
        self._send()

    def _rewind(self) -> None:
        """Everything unconfirmed goes out again, oldest first."""
        with self.feed.lock:
            self.unsent = deque(self.feed.snapshot())
        self._paused = False

    def _woken(self) -> None:
        with self.feed.lock:
            self._wake_pending = False
        self._send()

    def _tick(self) -> None:
        self.feed.tick()
        self._send()
        self._stop_if_done()
        if self.connection is not None and not self._closing:
            self.connection.ioloop.call_later(TICK_SECONDS, self._tick)

    def _stop_if_done(self) -> None:
        if not self._closing and self.feed.done_stopping() and self.connection is not None:
            self._closing = True
            if self.connection.is_open:
                self.connection.close()
            else:
                self.connection.ioloop.stop()

    def _send(self) -> None:
        channel = self.channel
        if channel is None or not channel.is_open or self._closing:
            return
        ephemeral = self.feed.take_ephemeral()
        if ephemeral is not None:
            self._publish(channel, ephemeral[0], ephemeral)
        while not self._paused and len(self._in_flight) < WINDOW and (not self._spooled or self._bytes < WINDOW_BYTES):
            with self.feed.lock:
                envelope = self.unsent[0] if self.unsent else None
                alone = envelope is not None and (self._lockstep > 0 or len(envelope.body) > ISOLATE_BYTES)
                if envelope is None or (alone and self._spooled):
                    return
                self.unsent.popleft()
            self._publish(channel, envelope, envelope)
            if alone:
                return

    def _publish(self, channel: pika.channel.Channel, envelope: Envelope,
                 item: Envelope | tuple[Envelope, Any]) -> None:
        channel.basic_publish(envelope.exchange, envelope.routing_key, envelope.body,
                              properties=pika.BasicProperties(**envelope.properties), mandatory=envelope.mandatory)
        self._tag += 1
        self._in_flight[self._tag] = item
        if item is envelope:
            self._spooled += 1
            self._bytes += len(envelope.body)

    def _settled(self, upto: int, multiple: bool) -> list[Envelope | tuple[Envelope, Any]]:
        tags = [t for t in self._in_flight if t <= upto] if multiple else [upto]
        out = []
        for tag in tags:
            item = self._in_flight.pop(tag, None)
            if item is None:
                continue
            if isinstance(item, Envelope):
                self._spooled -= 1
                self._bytes -= len(item.body)
                self._lockstep = max(0, self._lockstep - 1)
            out.append(item)
        return out

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        for item in self._settled(int(method.delivery_tag), bool(method.multiple)):
            if not isinstance(item, Envelope):
                self.feed.settle_ephemeral(item, None if acked else "nacked by the broker")
            elif acked:
                self.feed.on_confirmed(item)
            else:
                delay = self.feed.on_nacked(item)
                self._retry_delay = max(self._retry_delay, delay or 0.0)
                self._paused = True
        if self._paused and not self._spooled and not self._resume_scheduled and self.connection is not None:
            self._resume_scheduled = True  # what was in flight settled: send again, oldest first
            self.connection.ioloop.call_later(self._retry_delay, self._resume)
        self._send()
        self._stop_if_done()

    def _resume(self) -> None:
        self._resume_scheduled = False
        self._retry_delay = 0.0
        self._rewind()
        self._send()

    def _on_return(self, _channel: Any, _method: Any, properties: pika.BasicProperties, _body: bytes) -> None:
        wanted = properties.message_id
        for item in self._in_flight.values():
            if isinstance(item, Envelope) and item.message_id == wanted:
                self.feed.on_unroutable(item)
                return

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        self.channel = None
        if self._closing or self.connection is None or not self.connection.is_open:
            return
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker) or reason.reply_code != 406:
            self._error = reason
            log.warning("[RMQ] Publisher channel closed: %s", describe_pika_error(reason))
            self.connection.close()
            return
        lost = list(self._in_flight.values())
        self._in_flight.clear()
        self._spooled = self._bytes = 0
        spooled = [item for item in lost if isinstance(item, Envelope)]
        for item in lost:
            if not isinstance(item, Envelope):
                self.feed.settle_ephemeral(item, "not sent (channel closed)")
        if len(spooled) == 1:
            self.feed.on_broker_refusal(spooled[0], reason)
            self._lockstep = 0
        else:  # which one? send them one by one: the culprit is then alone
            self._lockstep = len(spooled)
            log.warning("[RMQ] The broker closed the channel (%s) with %d messages in flight; re-sending them "
                        "one by one", describe_pika_error(reason), len(spooled))
        self.connection.channel(on_open_callback=self._on_channel)

    def _settle_ephemerals(self, reason: str) -> None:
        for tag, item in list(self._in_flight.items()):
            if not isinstance(item, Envelope):
                del self._in_flight[tag]
                self.feed.settle_ephemeral(item, reason)

