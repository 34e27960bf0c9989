"""Carrying out a settlement on the I/O thread, the only thread that touches the channel.

Mixed into :class:`~ai_service.consumer.loop.Consumer`.  Classic queues count nothing,
so a redelivery whose first run is not in this process is counted here, durably, before
it runs again (a confirmed copy carrying the count replaces it).
"""

from __future__ import annotations

import copy
import logging
import threading

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ai_service.broker import QueueNames, describe_pika_error
from ai_service.config import Settings
from ai_service.consumer.handlers import Delivery
from ai_service.consumer.policy import Outcome, Settlement
from ai_service.consumer.tracker import DELIVERY_COUNT_HEADER, RequestTracker, readable_job_id_from
from ai_service.metrics import Metrics
from ai_service.operation import Operation

log = logging.getLogger("ai_service.consumer")

#: Headers the broker sets on a delivery: never copied onto a republished request.
BROKER_HEADERS = frozenset({"x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue",
                            "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                            "x-last-death-reason"})


class Settling:
    """ack / reject / requeue on the channel the delivery came on, if it is still open."""

    settings: Settings
    op: Operation
    names: QueueNames
    metrics: Metrics
    tracker: RequestTracker
    _connection: pika.BlockingConnection | None
    _channel: BlockingChannel | None
    _retry_channel: BlockingChannel | None
    _generation: int
    _inflight: dict[tuple[int, int], Delivery]
    _inflight_lock: threading.Lock

    def _cancel_consumer(self) -> None:
        raise NotImplementedError

    def ack_early(self, delivery: Delivery) -> None:
        """Stop consuming first (so no new job arrives while this one runs), then ack."""
        if not self._usable(delivery):
            return
        self._cancel_consumer()
        assert self._channel is not None
        self._channel.basic_ack(delivery.tag)
        delivery.acked = True

    def settle_delivery(self, delivery: Delivery, settlement: Settlement) -> None:
        """The delivery half of ``settlement`` (a retry's copy is spooled already: ack)."""
        with self._inflight_lock:
            self._inflight.pop(delivery.key, None)
        usable = delivery.acked or self._usable(delivery)
        if delivery.seen is not None:
            self.tracker.finish(delivery.digest)
        if delivery.acked or settlement.delivery is Outcome.NONE:
            return
        if not usable:
            log.warning("[RMQ] Delivery %d belongs to a closed channel; the broker has already requeued it",
                        delivery.tag)
            return
        assert self._channel is not None
        outcome = settlement.delivery
        if outcome is Outcome.RETRY_LATER:
            self._retry_later(delivery, settlement.delay)
        elif outcome is Outcome.ACK:
            self._channel.basic_ack(delivery.tag)
        elif outcome is Outcome.REJECT:
            self._channel.basic_reject(delivery.tag, requeue=False)
        else:
            self._channel.basic_nack(delivery.tag, requeue=True)

    def _count_redelivery(self, channel: BlockingChannel, delivery: Delivery) -> bool:
        """Classic queues: a redelivery whose first run is not in this process (its worker
        died or lost its connection) is counted durably before it runs again: past the
        delivery limit it is dead-lettered unrun (a request that kills its worker every
        time); otherwise a copy carrying the count replaces it.  True when settled here."""
        count = delivery.info.delivery_count
        job = readable_job_id_from(delivery.info.body) or "?"
        limit = self.settings.rabbitmq_delivery_limit
        if count >= limit:
            log.error("[Handler] [%s] Delivered %d times without being settled (the worker died on it?): "
                      "dead-lettering it (RABBITMQ_DELIVERY_LIMIT=%d)", job, count, limit)
            channel.basic_reject(delivery.tag, requeue=False)
            self.metrics.jobs.labels(self.op.name, "dead_lettered").inc()
            return True
        if self._republish_counted(delivery, count):
            log.info("[Handler] [%s] Redelivered: counted as delivery %d of %d", job, count + 1, limit)
            channel.basic_ack(delivery.tag)
            return True
        return False

    def _retry_later(self, delivery: Delivery, delay: float) -> bool:
        """A retry: a counted copy goes to the holding queue, whose TTL (``delay``) brings it
        back into the request queue; then the original is acked.  False: the copy was not
        confirmed, and the delivery went straight back to its queue instead (sooner, never
        lost)."""
        count = delivery.info.delivery_count + 1
        ok = self._republish_counted(delivery, count, queue=self.names.lease, delay_ms=max(1, int(delay * 1000)))
        if ok:
            log.info("[Handler] [%s] Retrying in %.1f s (delivery %d of %d)",
                     readable_job_id_from(delivery.info.body) or "?", delay, count + 1,
                     self.settings.rabbitmq_delivery_limit)
        assert self._channel is not None
        if ok:
            self._channel.basic_ack(delivery.tag)
        else:
            self._channel.basic_nack(delivery.tag, requeue=True)
        return ok

    def _republish_counted(self, delivery: Delivery, count: int, *, queue: str | None = None,
                           delay_ms: int | None = None) -> bool:
        """Put a copy of the request (same body and properties, its deliveries so far in
        :data:`DELIVERY_COUNT_HEADER`) at the end of ``queue`` (its own by default; the
        holding queue with a ``delay_ms`` TTL for a retry), confirmed, on this connection.
        True when the broker confirmed it (the original may be acked)."""
        connection = self._connection
        if connection is None:
            return False
        props = copy.copy(delivery.props) if delivery.props is not None else pika.BasicProperties()
        headers = {k: v for k, v in (props.headers or {}).items() if k not in BROKER_HEADERS}
        props.headers = {**headers, DELIVERY_COUNT_HEADER: count}
        if delay_ms is not None:
            props.expiration = str(delay_ms)
        try:
            if self._retry_channel is None or not self._retry_channel.is_open:
                self._retry_channel = connection.channel()
                self._retry_channel.confirm_delivery()
            self._retry_channel.basic_publish("", queue or self.names.request, delivery.info.body,
                                              properties=props, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError, pika.exceptions.ChannelClosed) as exc:
            self._retry_channel = None
            log.warning("[RMQ] Could not republish delivery %d with its count (%s); leaving it uncounted",
                        delivery.tag, describe_pika_error(exc))
            return False
        self.metrics.retries_republished.labels(self.op.name).inc()
        return True

    def _usable(self, delivery: Delivery) -> bool:
        return (
            self._channel is not None
            and self._channel.is_open
            and delivery.generation == self._generation
        )

    def _hand_back_all(self) -> None:
        with self._inflight_lock:
            deliveries = list(self._inflight.values())
            self._inflight.clear()
        for d in deliveries:
            if not d.acked and self._usable(d):
                assert self._channel is not None
                self._channel.basic_nack(d.tag, requeue=True)
                log.warning("[RMQ] Forced stop: delivery %d handed back to the queue", d.tag)
