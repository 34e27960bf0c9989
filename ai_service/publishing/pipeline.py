"""One connection's worth of pipelined, confirmed publishing (pika's asynchronous
publisher pattern): a ``SelectConnection`` driven on the publisher's own thread, up to
:data:`WINDOW` messages in flight, confirms by delivery tag with ``multiple``.

Messages go out in seq order on one channel, so the broker keeps their order.  A body
over :data:`ISOLATE_BYTES` goes out alone (nothing else in flight): the one message a
406 PRECONDITION_FAILED (larger than the broker's ``max_message_size``) can name.  A 406
with several in flight (no size to blame) is narrowed down by sending what was in flight
one by one.

Order per job (the messages of one ``correlation_id``) holds even when the broker nacks
(a queue at its ``x-max-length`` with ``reject-publish``, a quorum queue without a
leader): a nacked message may be followed by its successors being accepted once the
queue has room again, and no re-send can undo that.  So a job has at most one message
in flight; its later ones wait (held) until the broker confirmed it, or until it was
retried until confirmed, or refused for good.  Jobs do not wait for each other, and a
nack stalls only its own job.  The publisher (:class:`Feed`) keeps the spool, receipts
and refusals.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator
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

    def on_confirmed(self, envelopes: list[Envelope]) -> None: ...

    def on_unroutable(self, envelope: Envelope) -> None: ...

    def on_nacked(self, envelope: Envelope) -> tuple[float, Envelope] | None: ...

    def on_broker_refusal(self, envelope: Envelope, exc: pika.exceptions.ChannelClosedByBroker) -> None: ...

    def settle_ephemeral(self, item: tuple[Envelope, Any], reason: str | None) -> None: ...

    def done_stopping(self) -> bool: ...

    def tick(self) -> None: ...


class BatchingConnection(pika.SelectConnection):
    """A ``SelectConnection`` that, inside :meth:`batch`, hands its frames to the socket in
    one write: pika writes each frame on its own, three ``send`` calls per message (the
    largest cost of pipelined publishing).  Hooks pika's ``_adapter_emit_data`` (the
    one place every outgoing frame passes; pika is pinned in requirements.lock)."""

    _frames: list[bytes] | None = None

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._frames is not None:
            self._frames.append(data)
        else:
            super()._adapter_emit_data(data)  # type: ignore[misc]  # pika-stubs lack it

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self._frames = []
        try:
            yield
        finally:
            frames, self._frames = self._frames, None
            if frames:
                super()._adapter_emit_data(b"".join(frames))  # type: ignore[misc]


class Pipeline:
    """Runs one ``SelectConnection`` until it closes: :meth:`run` returns when the
    publisher stopped it, raises a :class:`~ai_service.errors.BrokerError` when it was lost."""

    def __init__(self, feed: Feed, parameters: pika.ConnectionParameters) -> None:
        self.feed = feed
        self.parameters = parameters
        self.connection: BatchingConnection | None = None
        self.channel: pika.channel.Channel | None = None
        self.unsent: deque[Envelope] = deque()  # guarded by feed.lock; the rest is the I/O thread's
        self._queue: deque[Envelope] = deque()  # taken from unsent, in seq order
        self._busy: set[str] = set()  # jobs with a message in flight, awaiting a retry, or released
        self._held: dict[str, deque[Envelope]] = {}  # a busy job's later messages, in seq order
        self._released: deque[Envelope] = deque()  # a job's next message (its job stays busy)
        self._generation = 0  # bumped by a rewind: a retry scheduled before it is void
        self._in_flight: dict[int, Envelope | tuple[Envelope, Any]] = {}
        self._spooled = 0  # spooled messages among those in flight
        self._bytes = 0
        self._tag = 0
        self._lockstep = 0  # messages still to send one by one (after a 406 that named none)
        self._closing = False
        self._error: BaseException | None = None
        self._wake_pending = False
        self._ready = False  # confirm mode reached once on this connection

    # --- from any thread -----------------------------------------------------------------

    def accept(self, envelope: Envelope) -> None:
        """A newly spooled message (the caller holds ``feed.lock``)."""
        self.unsent.append(envelope)

    def wake(self) -> None:
        """Have the I/O thread send what is waiting (cheap to call often)."""
        if self._wake_pending:  # read without the lock: it is cleared before the loop takes unsent
            return
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
            self.connection = BatchingConnection(
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
        """Everything unconfirmed goes out again, oldest first (each job's first one first)."""
        with self.feed.lock:
            self.unsent.clear()
            self._queue = deque(self.feed.snapshot())
        self._busy.clear()
        self._held.clear()
        self._released.clear()
        self._generation += 1

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
        channel, connection = self.channel, self.connection
        if channel is None or not channel.is_open or self._closing or connection is None:
            return
        with connection.batch():
            self._send_on(channel)

    def _send_on(self, channel: pika.channel.Channel) -> None:
        ephemeral = self.feed.take_ephemeral()
        if ephemeral is not None:
            self._publish(channel, ephemeral[0], ephemeral)
        if self.unsent:
            with self.feed.lock:
                self._queue.extend(self.unsent)
                self.unsent.clear()
        while len(self._in_flight) < WINDOW and (not self._spooled or self._bytes < WINDOW_BYTES):
            source = self._next_source()
            if source is None:
                return
            envelope = source[0]
            alone = self._lockstep > 0 or len(envelope.body) > ISOLATE_BYTES
            if alone and self._spooled:
                return
            source.popleft()
            job = envelope.job
            if source is self._queue and job is not None:
                self._busy.add(job)
            self._publish(channel, envelope, envelope)
            if alone:
                return

    def _next_source(self) -> deque[Envelope] | None:
        """Where the next message to send is at the head: a job's released next one first,
        then the queue, once the messages of busy jobs at its head were held back."""
        if self._released:
            return self._released
        queue, busy = self._queue, self._busy
        while queue:
            job = queue[0].job
            if job is None or job not in busy:
                return queue
            self._held.setdefault(job, deque()).append(queue.popleft())
        return None

    def _release(self, job: str | None) -> None:
        """``job``'s message in flight settled: its next one (if held) may go."""
        if job is None:
            return
        held = self._held.get(job)
        if held:
            self._released.append(held.popleft())
            if not held:
                del self._held[job]
        else:
            self._busy.discard(job)

    def _publish(self, channel: pika.channel.Channel, envelope: Envelope,
                 item: Envelope | tuple[Envelope, Any]) -> None:
        channel.basic_publish(envelope.exchange, envelope.routing_key, envelope.body,
                              properties=envelope.basic_properties(), mandatory=envelope.mandatory)
        self._tag += 1
        self._in_flight[self._tag] = item
        if item is envelope:
            self._spooled += 1
            self._bytes += len(envelope.body)

    def _settled(self, upto: int, multiple: bool) -> list[Envelope | tuple[Envelope, Any]]:
        # tags go into _in_flight in increasing order: those up to ``upto`` are at its head
        tags = list(itertools.takewhile(lambda t: t <= upto, self._in_flight)) if multiple else [upto]
        out = []
        for tag in tags:
            item = self._in_flight.pop(tag, None)
            if item is None:
                continue
            if isinstance(item, Envelope):
                self._spooled -= 1
                self._bytes -= len(item.body)
                if self._lockstep:
                    self._lockstep -= 1
            out.append(item)
        return out

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        confirmed: list[Envelope] = []
        for item in self._settled(int(method.delivery_tag), bool(method.multiple)):
            if not isinstance(item, Envelope):
                self.feed.settle_ephemeral(item, None if acked else "nacked by the broker")
            elif acked:
                confirmed.append(item)
            else:
                self._nacked(item)
        if confirmed:
            self.feed.on_confirmed(confirmed)
            for envelope in confirmed:
                self._release(envelope.job)
        self._send()
        self._stop_if_done()

    def _nacked(self, envelope: Envelope) -> None:
        """Send it (or its replacement) again after the feed's delay; its job waits for it."""
        again = self.feed.on_nacked(envelope)
        if again is None:  # refused for good, nothing in its place: the job goes on
            self._release(envelope.job)
            return
        delay, retry = again
        if envelope.job is not None:
            self._busy.add(envelope.job)
        if self.connection is not None:
            generation = self._generation
            self.connection.ioloop.call_later(delay, lambda: self._retry(generation, retry))

    def _retry(self, generation: int, envelope: Envelope) -> None:
        if generation != self._generation:
            return  # a rewind queued everything unconfirmed again, this one with it
        self._released.append(envelope)
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
